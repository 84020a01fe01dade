"""Reader for HPDv2 (Human Preference Dataset v2): JSON annotation files plus an image folder.

Two shapes (docs/data-and-scorers.md §2), told apart by the keys of the first entry:

* train.json: a list of ``{human_preference: list[int], prompt, file_path: list[str]}``.
  ``human_preference[i] = 1`` marks file_path[i] as preferred. Each preferred image is paired
  with each non-preferred one, in file order (image_0 is the one listed first), label_0 = 1 if
  image_0 is the preferred one. There are no annotator ids. Row identity: entry index + the two paths.
* test.json: a list of ``{prompt, image_path: list[str], rank: list[int],
  raw_annotations: list[{rank: list[int], user_hash}]}``. Every annotator's ranking gives all
  k(k-1)/2 pairs (lower rank = better, equal ranks = tie 0.5), user_id = user_hash. An entry
  without raw_annotations gives the pairs of its averaged ``rank`` with user_id null.
  Row identity: entry index + annotation index + user_hash + the two paths ('avg' for the averaged rank).

Images are read as bytes from ``image_root/<path>`` (option ``image_root``, default: the JSON
file's folder); image_*_uid is the relative path as written in the JSON, so the same picture
keeps one uid across files. Paths must stay inside the image root (see rows.ImageFolder). Per
row problems become reader reasons: ``missing_image_file`` (detail: the full path),
``unreadable_image_file``, ``image_outside_root``, ``not_a_regular_file``, ``image_too_large``,
``malformed_entry`` (an entry that is not an object, lacks a key, or whose lists differ in length:
one row per entry or annotation),
``unlabelled`` (a train entry with no preferred or no non-preferred image), ``wrong_type``
(a rank or preference that is not a number).

Memory: the JSON file is parsed whole with ``json.load``, which is acceptable for HPDv2's sizes:
a synthetic 115 MB file shaped like the published train.json (583k two-image entries) loads in
about 3 s at a peak of about 620 MB resident. Images are read per entry and rows leave in
batches of ``batch_rows``, so image memory stays bounded whatever the file size.
"""
from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from prefcurate.curation.ingest.raw import UnreadableSourceError
from prefcurate.curation.ingest.rows import (
    MAX_IMAGE_FILE_BYTES, ImageFolder, RowBuffer, rank_pairs, split_from_filename,
)


TRAIN_KEYS = ("human_preference", "prompt", "file_path")
TEST_KEYS = ("prompt", "image_path", "rank")


def _numbers(values: Any) -> list[float] | None:
    """A JSON list of numbers as floats, or None if it is not one (bools are not numbers here)."""
    if not isinstance(values, list):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return [float(v) for v in values]


class HPDv2Reader:
    format = "hpdv2"

    def __init__(self, image_root: str | None = None, split: str | None = None, batch_rows: int = 256,
                 allow_outside_root: bool = False, max_image_bytes: int = MAX_IMAGE_FILE_BYTES):
        # 256 pairs of HPDv2 images (mostly 512-1024 px JPEG/PNG, ~50-500 kB) is < ~250 MB in flight.
        self.image_root = image_root
        self.split = split
        self.batch_rows = batch_rows
        self.allow_outside_root = allow_outside_root  # paths must stay inside image_root unless True
        self.max_image_bytes = max_image_bytes

    def batches(self, path: str, fs) -> Iterator[pa.Table]:
        try:
            with fs.open(path, "rb") as f:
                entries = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UnreadableSourceError(path, f"not a JSON file ({exc})") from None
        if not isinstance(entries, list):
            raise UnreadableSourceError(path, f"not an HPDv2 file: the top level is a {type(entries).__name__}, "
                                              "expected a list of entries")
        if not entries:
            return
        first = entries[0]
        if isinstance(first, dict) and all(k in first for k in TRAIN_KEYS):
            shape = "train"
        elif isinstance(first, dict) and all(k in first for k in TEST_KEYS):
            shape = "test"
        else:
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise UnreadableSourceError(path, f"not an HPDv2 file: the first entry has {keys}; expected the keys "
                                              f"{list(TRAIN_KEYS)} (train) or {list(TEST_KEYS)} (test)")
        images = (ImageFolder(self.image_root, None, self.allow_outside_root, self.max_image_bytes)
                  if self.image_root is not None
                  else ImageFolder(posixpath.dirname(path), fs, self.allow_outside_root, self.max_image_bytes))
        split = self.split or split_from_filename(path) or shape
        name = os.path.basename(path)
        buffer = RowBuffer(self.batch_rows)
        for index, entry in enumerate(entries):
            rows = self._train_rows(entry, index, name) if shape == "train" else self._test_rows(entry, index, name)
            cache: dict[str, tuple] = {}  # an entry's images are read once, whatever the number of pairs
            for row in rows:
                for side in (0, 1):
                    uid = row.get(f"image_{side}_uid")
                    if uid is None or row.get("reader_reason"):
                        continue
                    if uid not in cache:
                        cache[uid] = images.read(uid)
                    data, reason, detail = cache[uid]
                    row[f"image_{side}_bytes"] = data
                    if reason is not None and not row.get("reader_reason"):
                        row["reader_reason"], row["reader_detail"] = reason, detail
                batch = buffer.add(split=split, **row)
                if batch is not None:
                    yield batch
        batch = buffer.flush()
        if batch is not None:
            yield batch

    @staticmethod
    def _train_rows(entry: Any, index: int, name: str) -> list[dict]:
        """Pairs of one train entry: each preferred image against each non-preferred one."""
        identity = f"{index}"
        if not isinstance(entry, dict) or not all(k in entry for k in TRAIN_KEYS):
            return [_problem(identity, "malformed_entry", f"entry {index} lacks one of {list(TRAIN_KEYS)}")]
        paths, prefs = entry["file_path"], _numbers(entry["human_preference"])
        if prefs is None:
            return [_problem(identity, "wrong_type", f"entry {index}: human_preference "
                                                     f"{entry['human_preference']!r} is not a list of numbers")]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or len(paths) != len(prefs):
            return [_problem(identity, "malformed_entry", f"entry {index}: file_path must be a list of strings "
                                                          f"as long as human_preference ({len(prefs)})")]
        if entry["prompt"] is not None and not isinstance(entry["prompt"], str):
            return [_problem(identity, "wrong_type", f"entry {index}: prompt {entry['prompt']!r} is not a string")]
        preferred = [i for i, p in enumerate(prefs) if p == 1]
        others = [i for i, p in enumerate(prefs) if p != 1]
        if not preferred or not others:
            return [_problem(identity, "unlabelled", f"entry {index}: human_preference {entry['human_preference']} "
                                                     "has no preferred or no non-preferred image")]
        rows = []
        for w in preferred:
            for l in others:
                i, j = min(w, l), max(w, l)  # keep file order: image_0 is the image listed first
                rows.append({"row_identity": f"{index}:{paths[i]}:{paths[j]}", "prompt": entry["prompt"],
                             "image_0_uid": paths[i], "image_1_uid": paths[j],
                             "label_0": 1.0 if i == w else 0.0, "ranking_id": f"{name}:{index}"})
        return rows

    @staticmethod
    def _test_rows(entry: Any, index: int, name: str) -> list[dict]:
        """Pairs of one test entry: every annotator's ranking (or the averaged rank) expanded to pairs."""
        if not isinstance(entry, dict) or not all(k in entry for k in TEST_KEYS):
            return [_problem(f"{index}", "malformed_entry", f"entry {index} lacks one of {list(TEST_KEYS)}")]
        paths = entry["image_path"]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            return [_problem(f"{index}", "malformed_entry", f"entry {index}: image_path is not a list of strings")]
        annotations = entry.get("raw_annotations") or []
        if not isinstance(annotations, list):
            return [_problem(f"{index}", "malformed_entry", f"entry {index}: raw_annotations is not a list")]
        if entry["prompt"] is not None and not isinstance(entry["prompt"], str):
            return [_problem(f"{index}", "wrong_type", f"entry {index}: prompt {entry['prompt']!r} is not a string")]
        # (ranking key, ranks, user, problem) per ranking; the averaged rank only when nobody's own is given.
        rankings = []
        for a, annotation in enumerate(annotations):
            if not isinstance(annotation, dict) or "rank" not in annotation:
                rankings.append((f"{index}:{a}", None, None, f"annotation {a} is not an object with a rank"))
                continue
            user = annotation.get("user_hash")
            rankings.append((f"{index}:{a}", annotation["rank"], None if user is None else str(user), None))
        if not annotations:
            rankings.append((f"{index}:avg", entry["rank"], None, None))
        rows = []
        for key, raw_ranks, user, problem in rankings:
            prefix = f"{key}:{user}" if user is not None else key
            if problem is not None:
                rows.append(_problem(prefix, "malformed_entry", f"entry {index}: {problem}"))
                continue
            ranks = _numbers(raw_ranks)
            if ranks is None:
                rows.append(_problem(prefix, "wrong_type",
                                     f"entry {index}: rank {raw_ranks!r} is not a list of numbers"))
                continue
            if len(ranks) != len(paths):
                rows.append(_problem(prefix, "malformed_entry", f"entry {index}: {len(ranks)} ranks for "
                                                                f"{len(paths)} images"))
                continue
            for i, j, label in rank_pairs(ranks):
                rows.append({"row_identity": f"{prefix}:{paths[i]}:{paths[j]}", "prompt": entry["prompt"],
                             "image_0_uid": paths[i], "image_1_uid": paths[j], "label_0": label,
                             "user_id": user, "ranking_id": f"{name}:{key}"})
        return rows


def _problem(identity: str, reason: str, detail: str) -> dict:
    """One row standing for an entry (or annotation) that gives no pairs, so it is counted and quarantined."""
    return {"row_identity": identity, "reader_reason": reason, "reader_detail": detail}
