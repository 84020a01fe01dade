"""Readers for prefcurate's generic pair format, as JSON Lines (format ``jsonl``) or CSV (format ``csv``).

Generic pair format
-------------------
One preference pair per JSON line (an object) or per CSV row (a header row names the columns).

Required fields:

``prompt``
    The prompt / caption (text).
``image_0``, ``image_1``
    Each one of
      * a file path, resolved against the reader option ``image_root`` (default: the folder of the
        JSONL/CSV file). It must stay inside that root (symlinks resolved): an absolute path or a
        ``..`` escape is quarantined (``image_outside_root``) unless the reader option
        ``allow_outside_root=True`` is set. Only regular files of at most ``max_image_bytes``
        (64 MB) are read. The path as written is the image's uid;
      * base64 bytes: ``data:image/<type>;base64,<data>`` or ``base64:<data>`` (whitespace inside is ignored);
      * an id with no bytes, when the reader option ``metadata_only=True`` is set (a metadata-only
        pair: the lake stores the image id as ``'<source>:<id>'`` until the bytes arrive).
    ``image_0_id`` / ``image_1_id`` may replace ``image_0`` / ``image_1``: that side is then
    metadata-only. When both are given, the bytes come from ``image_N`` and ``image_N_id`` is the uid.
``label``
    Which image was preferred; label_0 in the lake. Accepted values:
      * numbers: ``1`` (image_0 preferred), ``0`` (image_1 preferred), ``0.5`` (tie); any value in
        [0, 1] is kept as a soft label, values outside are quarantined (``label_out_of_range``);
        JSON ``true`` / ``false`` count as 1 / 0;
      * text (case and surrounding spaces ignored): a number as text (``"1"``, ``"0"``, ``"0.5"``),
        ``"left"`` (= 1, image_0 preferred), ``"right"`` (= 0), ``"tie"`` (= 0.5).
    Anything else is quarantined as ``wrong_type``; an empty or missing label as ``missing_label``.

Optional fields:

``annotator``
    Annotator id (text or number) -> user_id.
``id``
    The row's identity in its source: two rows with the same id are one pair (the later is a
    duplicate). Default: ``<line or row number>:<image_0 ref>:<image_1 ref>``, where a ref is the
    uid, or ``b64:<hash of the base64 text>``. Line numbers count every line of a JSONL file from 1;
    CSV row numbers count data rows from 1 (the header is row 0).
``split``
    train, validation, test, ... Default: the reader option ``split``, else a split word in the
    file name (``prefs_test.jsonl`` -> test), else train.
``created_at``
    ISO 8601 time (``2024-05-01T12:00:00Z``; no zone = UTC) or Unix seconds.
``model_0``, ``model_1``
    The models that generated the images.

Other fields are ignored. In CSV an empty cell is a missing value.

Problems
--------
The file is refused (UnreadableSourceError, nothing written) if it is not UTF-8 text of the
format, if a required field is absent from the CSV header, or, for JSONL, if none of the first
100 non-blank lines is a JSON object or a required field occurs in none of them. Otherwise each
line or row is one pair, and a bad one is quarantined with a reason: ``malformed_json`` (a JSONL
line that does not parse as a JSON object; its identity is its line number), ``malformed_csv_row``
(a CSV row with more or fewer cells than the header), ``wrong_type`` (label, time or text field
of the wrong kind), ``corrupt_image`` (invalid base64), ``missing_image_file`` /
``unreadable_image_file`` (an image path that cannot be read), ``image_outside_root``,
``not_a_regular_file`` (a device, FIFO or folder), ``image_too_large`` (a file over the byte
limit). Blank JSONL lines are skipped.
"""
from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import io
import itertools
import json
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from prefcurate.curation.store.ids import content_id
from prefcurate.curation.ingest.raw import UnreadableSourceError, coerce_float
from prefcurate.curation.ingest.rows import MAX_IMAGE_FILE_BYTES, ImageFolder, RowBuffer, split_from_filename


REQUIRED = ("prompt", "image_0", "image_1", "label")
LABEL_WORDS = {"left": 1.0, "right": 0.0, "tie": 0.5}
PEEK_LINES = 100  # JSONL lines looked at to decide whether the file is in this format at all
# Base64 images in a CSV cell exceed csv's default 128 kB field limit; 64 MB bounds one image.
CSV_FIELD_LIMIT = 64 << 20


def parse_label(value: Any) -> tuple[float | None, str | None]:
    """label_0 from a label value (see the module docstring), or (None, problem)."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in LABEL_WORDS:
            return LABEL_WORDS[word], None
        if word == "":
            return None, None
    if isinstance(value, (list, dict)):
        return None, f"label {value!r} is not a number"
    return coerce_float(value)


def parse_time(value: Any) -> tuple[dt.datetime | None, str | None]:
    """A UTC datetime from ISO 8601 text or Unix seconds, or (None, problem)."""
    if value is None or value == "":
        return None, None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return dt.datetime.fromtimestamp(value, tz=dt.timezone.utc), None
        if isinstance(value, str):
            text = value.strip()
            try:
                return dt.datetime.fromtimestamp(float(text), tz=dt.timezone.utc), None
            except ValueError:
                pass
            if text.endswith(("Z", "z")):  # Python 3.10's fromisoformat does not read 'Z'
                text = text[:-1] + "+00:00"
            moment = dt.datetime.fromisoformat(text)
            if moment.tzinfo is None:
                return moment.replace(tzinfo=dt.timezone.utc), None
            return moment.astimezone(dt.timezone.utc), None
    except (ValueError, OverflowError, OSError):
        pass
    return None, f"created_at {value!r} is neither ISO 8601 time nor Unix seconds"


def _text(value: Any, name: str) -> tuple[str | None, str | None]:
    """A text field: strings as they are, numbers as their decimal text, anything else a problem."""
    if value is None or isinstance(value, str):
        return value, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), None
    return None, f"{name} {value!r} is not text"


class _PairMapper:
    """One record (dict of field -> value) of the generic format -> one RAW row."""

    def __init__(self, images: ImageFolder, metadata_only: bool, split: str | None):
        self.images = images
        self.metadata_only = metadata_only
        self.split = split

    def image(self, record: dict, side: int) -> tuple[bytes | None, str | None, str, str | None, str | None]:
        """(bytes, uid, ref for the default identity, reason, detail) of image_<side>."""
        value, own_id = record.get(f"image_{side}"), record.get(f"image_{side}_id")
        own_id, problem = _text(own_id, f"image_{side}_id")
        if problem is not None:
            return None, None, "?", "wrong_type", problem
        if value is None or value == "":
            return None, own_id, str(own_id), None, None  # no id either: the engine says missing_image
        if self.metadata_only:
            value, problem = _text(value, f"image_{side}")  # ids may be numbers in JSON
            uid = own_id or value
            return None, uid, str(uid), ("wrong_type" if problem else None), problem
        if not isinstance(value, str):
            return None, own_id, "?", "wrong_type", f"image_{side} {value!r} is not text"
        encoded = value[len("base64:"):] if value.startswith("base64:") else None
        if value.startswith("data:"):
            head, _, encoded = value.partition(",")
            if not head.endswith(";base64"):
                return None, own_id, "?", "corrupt_image", f"image_{side}: a data: URL that is not base64"
        if encoded is not None:
            ref = own_id or f"b64:{content_id(value.encode())}"
            try:
                return base64.b64decode("".join(encoded.split()), validate=True), own_id, ref, None, None
            except (binascii.Error, ValueError) as exc:
                return None, own_id, ref, "corrupt_image", f"image_{side}: invalid base64 ({exc})"
        data, reason, detail = self.images.read(value)
        return data, own_id or value, own_id or value, reason, detail

    def row(self, record: dict, number: int) -> dict:
        problems: list[tuple[str, str]] = []
        sides = []
        for side in (0, 1):
            data, uid, ref, reason, detail = self.image(record, side)
            sides.append((data, uid, ref))
            if reason is not None:
                problems.append((reason, detail))
        label, problem = parse_label(record.get("label"))
        if problem is not None:
            problems.append(("wrong_type", problem))
        created_at, problem = parse_time(record.get("created_at"))
        if problem is not None:
            problems.append(("wrong_type", problem))
        texts = {}
        for field, column in (("prompt", "prompt"), ("annotator", "user_id"), ("split", "split"),
                              ("model_0", "model_0"), ("model_1", "model_1"), ("id", "row_identity")):
            texts[column], problem = _text(record.get(field), field)
            if problem is not None:
                problems.append(("wrong_type", problem))
        identity = texts["row_identity"] or f"{number}:{sides[0][2]}:{sides[1][2]}"
        reason, detail = problems[0] if problems else (None, None)
        return {"row_identity": identity, "split": texts["split"] or self.split, "prompt": texts["prompt"],
                "image_0_bytes": sides[0][0], "image_1_bytes": sides[1][0],
                "image_0_uid": sides[0][1], "image_1_uid": sides[1][1], "label_0": label,
                "user_id": texts["user_id"], "created_at": created_at,
                "model_0": texts["model_0"], "model_1": texts["model_1"],
                "reader_reason": reason, "reader_detail": detail}


def _missing_required(fields: set[str]) -> list[str]:
    missing = [f for f in ("prompt", "label") if f not in fields]
    missing += [f"image_{s} (or image_{s}_id)" for s in (0, 1) if not {f"image_{s}", f"image_{s}_id"} & fields]
    return missing


class _GenericReader:
    format = ""

    def __init__(self, image_root: str | None = None, metadata_only: bool = False, split: str | None = None,
                 batch_rows: int = 256, allow_outside_root: bool = False,
                 max_image_bytes: int = MAX_IMAGE_FILE_BYTES):
        # 256 pairs with bytes of typical 512-1024 px images is ~50-250 MB in flight.
        self.image_root = image_root
        self.metadata_only = metadata_only
        self.split = split
        self.batch_rows = batch_rows
        self.allow_outside_root = allow_outside_root
        self.max_image_bytes = max_image_bytes

    def _mapper(self, path: str, fs) -> _PairMapper:
        images = (ImageFolder(self.image_root, None, self.allow_outside_root, self.max_image_bytes)
                  if self.image_root is not None
                  else ImageFolder(posixpath.dirname(path), fs, self.allow_outside_root, self.max_image_bytes))
        return _PairMapper(images, self.metadata_only, self.split or split_from_filename(path))


class JsonlReader(_GenericReader):
    format = "jsonl"

    def batches(self, path: str, fs) -> Iterator[pa.Table]:
        with fs.open(path, "rb") as f:
            lines = enumerate(f, start=1)
            head, objects, non_blank = [], [], 0
            for number, raw in lines:
                head.append((number, raw))
                if raw.strip():
                    non_blank += 1
                    record = _parse_line(raw)[0]
                    if isinstance(record, dict):
                        objects.append(record)
                    if non_blank >= PEEK_LINES:
                        break
            if non_blank:
                if not objects:
                    raise UnreadableSourceError(path, f"not JSON Lines: none of the first {PEEK_LINES} non-blank "
                                                      "lines is a JSON object")
                missing = _missing_required(set().union(*objects))
                if missing:
                    raise UnreadableSourceError(path, f"required field(s) {missing} occur in none of the first "
                                                      f"{len(objects)} JSON objects")
            mapper = self._mapper(path, fs)
            buffer = RowBuffer(self.batch_rows)
            for number, raw in itertools.chain(head, lines):
                if not raw.strip():
                    continue
                record, problem = _parse_line(raw)
                if problem is None and not isinstance(record, dict):
                    problem = f"JSON but not an object ({type(record).__name__})"
                if problem is not None:
                    row = {"row_identity": str(number), "split": mapper.split, "reader_reason": "malformed_json",
                           "reader_detail": f"line {number}: {problem}: {raw[:200]!r}"}
                else:
                    row = mapper.row(record, number)
                batch = buffer.add(**row)
                if batch is not None:
                    yield batch
            batch = buffer.flush()
            if batch is not None:
                yield batch


def _parse_line(raw: bytes) -> tuple[Any, str | None]:
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc})"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc})"


class CsvReader(_GenericReader):
    format = "csv"

    def batches(self, path: str, fs) -> Iterator[pa.Table]:
        csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
        with fs.open(path, "rb") as f:
            text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
            rows = csv.reader(text)
            number = 0
            try:
                header = next(rows, None)
                if header is None:
                    raise UnreadableSourceError(path, "empty file: no CSV header")
                header = [name.strip() for name in header]
                missing = _missing_required(set(header))
                if missing:
                    raise UnreadableSourceError(path, f"required column(s) {missing} missing from the CSV header "
                                                      f"{header}")
                mapper = self._mapper(path, fs)
                buffer = RowBuffer(self.batch_rows)
                for number, cells in enumerate(rows, start=1):
                    if len(cells) != len(header):
                        row = {"row_identity": str(number), "split": mapper.split,
                               "reader_reason": "malformed_csv_row",
                               "reader_detail": f"row {number} has {len(cells)} cells, the header {len(header)}"}
                    else:
                        row = mapper.row({k: (v if v != "" else None) for k, v in zip(header, cells)}, number)
                    batch = buffer.add(**row)
                    if batch is not None:
                        yield batch
            except (UnicodeDecodeError, csv.Error) as exc:
                # Mid-file: the engine aborts the ingest, so nothing of this file is written.
                raise UnreadableSourceError(path, f"unreadable CSV after data row {number}: {exc}") from None
            batch = buffer.flush()
            if batch is not None:
                yield batch
