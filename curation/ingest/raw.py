"""The canonical raw form every reader produces, and the reader contract.

A reader turns one source file into a stream of Arrow tables in the RAW schema below:
one row per preference pair (rankings of k items are expanded to pairs by the reader).
Readers do not validate labels or decode images: the ingest engine does that, the same way
for every format. A reader sets `reader_reason`/`reader_detail` on a row it could not map
(an image file that does not exist, a value of the wrong type), and the engine quarantines it.
A file that cannot be read at all raises UnreadableSourceError before yielding anything.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, Protocol

import pyarrow as pa


RAW = pa.schema([
    pa.field("row_identity", pa.string(), nullable=False),  # unique within the source file's source
    pa.field("split", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("image_0_bytes", pa.binary()),                  # null for metadata-only pairs
    pa.field("image_1_bytes", pa.binary()),
    pa.field("image_0_uid", pa.string()),                    # the source's own image id, if any
    pa.field("image_1_uid", pa.string()),
    pa.field("label_0", pa.float64()),
    pa.field("label_1", pa.float64()),                       # null when the source has only label_0
    pa.field("user_id", pa.string()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("model_0", pa.string()),
    pa.field("model_1", pa.string()),
    pa.field("ranking_id", pa.string()),
    pa.field("reader_reason", pa.string()),                  # set by the reader for rows it could not map
    pa.field("reader_detail", pa.string()),
])


class UnreadableSourceError(ValueError):
    """The whole file cannot be ingested (not the expected format, required columns missing)."""

    def __init__(self, path: str, what: str):
        self.path = path
        self.what = what
        super().__init__(f"{path}: {what}")


class Reader(Protocol):
    format: str

    def batches(self, path: str, fs: Any) -> Iterator[pa.Table]:
        """Yield RAW tables of bounded size. Raise UnreadableSourceError before the first yield
        if the file as a whole is unusable."""
        ...


def raw_table(columns: dict[str, list | pa.Array]) -> pa.Table:
    """Build a RAW table from the columns given; the others are filled with nulls."""
    n = len(next(iter(columns.values())))
    arrays = []
    for f in RAW:
        value = columns.get(f.name)
        if value is None:
            arrays.append(pa.nulls(n, f.type))
        elif isinstance(value, (pa.Array, pa.ChunkedArray)):
            arrays.append(value.cast(f.type) if not value.type.equals(f.type) else value)
        else:
            arrays.append(pa.array(value, type=f.type))
    return pa.Table.from_arrays(arrays, schema=RAW)


def coerce_float(value: Any) -> tuple[float | None, str | None]:
    """A label value as float, or (None, problem). NaN is kept as NaN for the engine to report."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        return float(value), None
    if isinstance(value, (int, float)):
        return float(value), None
    try:
        return float(str(value).strip()), None
    except ValueError:
        return None, f"label {value!r} is not a number"


# Text values longer than this are summarised in quarantine.raw (head, length, hash), so a row
# quarantined for a 1 MB prompt costs ~300 bytes in the quarantine table, not 1 MB.
RAW_TEXT_CHARS = 200


def raw_summary(row: dict[str, Any]) -> str:
    """JSON of a raw row for the quarantine table: image bytes summarised by length, long text by
    its head, length and hash, NaN as a string. The same row always gives the same text."""
    from prefcurate.curation.store.ids import content_id

    out = {}
    for key, value in row.items():
        if isinstance(value, (bytes, bytearray)):
            out[key] = {"bytes": len(value), "blake2b": content_id(bytes(value))}
        elif isinstance(value, str) and len(value) > RAW_TEXT_CHARS:
            out[key] = {"head": value[:RAW_TEXT_CHARS], "chars": len(value),
                        "blake2b": content_id(value.encode("utf-8", "surrogatepass"))}
        elif isinstance(value, float) and math.isnan(value):
            out[key] = "NaN"
        elif hasattr(value, "isoformat"):
            out[key] = value.isoformat()
        else:
            out[key] = value
    return json.dumps(out, ensure_ascii=False, default=str)
