"""Reader for Pick-a-Pic v1/v2 Parquet shards (with images, or the metadata-only variant).

Columns (docs/data-and-scorers.md §1.2): caption, jpg_0, jpg_1, label_0, label_1, user_id, ranking_id,
image_0_uid, image_1_uid, best_image_uid, model_0, model_1, created_at, has_label, are_different,
num_example_per_prompt, image_0_url, image_1_url, __index_level_0__. The dead URL columns and the
pandas index are not read. Without jpg_0/jpg_1 (the published no-images variant) the pairs are
metadata-only: their images are known by image_*_uid until a shard with the bytes is ingested.
Ties (label_0 = label_1 = 0.5) are kept as 0.5.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefcurate.curation.ingest.raw import UnreadableSourceError, raw_table


SPLITS = ("train", "validation_unique", "test_unique", "validation", "test")
_WANTED = {
    "caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64(),
    "label_1": pa.float64(), "user_id": pa.int64(), "ranking_id": pa.int64(), "image_0_uid": pa.string(),
    "image_1_uid": pa.string(), "model_0": pa.string(), "model_1": pa.string(),
    "created_at": pa.timestamp("us", tz="UTC"), "has_label": pa.bool_(), "are_different": pa.bool_(),
    "split": pa.string(),
}


def split_from_name(path: str) -> str:
    name = os.path.basename(path)
    for split in SPLITS:  # longest names first, so validation_unique is not read as validation
        if name.startswith(split + "-") or name.startswith(split + "."):
            return split
    return "train"


def _coerce(column: pa.ChunkedArray | pa.Array, type_: pa.DataType) -> tuple[pa.Array, list[int]]:
    """Cast `column` to `type_`; values that cannot be cast become null and their indices are returned."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.type.equals(type_):
        return column, []
    if pa.types.is_timestamp(type_) and pa.types.is_timestamp(column.type):
        if column.type.tz is None:  # Pick-a-Pic's created_at is naive; it is UTC
            column = pc.assume_timezone(column, "UTC")
        return column.cast(type_), []
    try:
        return pc.cast(column, type_, safe=True), []
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        values, bad = [], []
        for i, value in enumerate(column.to_pylist()):
            try:
                values.append(pa.scalar(value).cast(type_).as_py() if value is not None else None)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError, ValueError):
                values.append(None)
                bad.append(i)
        return pa.array(values, type=type_), bad


class PickAPicReader:
    format = "pickapic"

    def __init__(self, batch_rows: int | None = None, batch_bytes: int = 48 << 20):
        # Batches hold about `batch_bytes` of (uncompressed) row data, estimated from the file's
        # metadata: ~100 rows of 512-768 px Pick-a-Pic JPEGs, ~20k rows of 64 px ones, at most 65,536
        # (pyarrow's default) metadata-only rows. Fewer, larger batches mean fewer per-batch steps and an
        # image repeated in nearby rows hashed once. Memory stays bounded whatever the shard size;
        # `batch_rows` fixes the count instead.
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes

    def _rows_per_batch(self, parquet: pq.ParquetFile, columns: list[str]) -> int:
        if self.batch_rows:
            return self.batch_rows
        meta = parquet.metadata
        if meta.num_rows == 0:
            return 1024
        wanted = set(columns)
        size = sum(rg.column(c).total_uncompressed_size for r in range(meta.num_row_groups)
                   for rg in [meta.row_group(r)] for c in range(rg.num_columns)
                   if rg.column(c).path_in_schema in wanted)
        per_row = max(1, size // meta.num_rows)
        return int(min(65_536, max(16, self.batch_bytes // per_row)))

    def batches(self, path: str, fs) -> Iterator[pa.Table]:
        try:
            # pre_buffer keeps every row group it has read cached: RSS would grow with the shard.
            parquet = pq.ParquetFile(fs.open(path, "rb"), pre_buffer=False)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UnreadableSourceError(path, f"not a Parquet file ({exc})") from None
        names = set(parquet.schema_arrow.names)
        missing = [c for c in ("caption", "label_0") if c not in names]
        has_bytes = {"jpg_0", "jpg_1"} <= names
        if not has_bytes and not {"image_0_uid", "image_1_uid"} <= names:
            missing.append("jpg_0/jpg_1 or image_0_uid/image_1_uid")
        if missing:
            raise UnreadableSourceError(path, f"not a Pick-a-Pic shard: required column(s) missing: {missing}")
        columns = [c for c in _WANTED if c in names]
        split = split_from_name(path)
        offset = 0
        for batch in parquet.iter_batches(batch_size=self._rows_per_batch(parquet, columns), columns=columns):
            yield self._to_raw(batch, split, offset)
            offset += batch.num_rows

    def _to_raw(self, batch: pa.RecordBatch, split: str, offset: int) -> pa.Table:
        """The batch in the RAW schema, column-wise (Arrow kernels; Python only for rows with a problem)."""
        n = batch.num_rows
        cols, bad_rows = {}, {}
        for name in batch.schema.names:
            array, bad = _coerce(batch.column(name), _WANTED[name])
            cols[name] = array
            for i in bad:
                bad_rows.setdefault(i, f"column {name!r}: value of type {batch.column(name).type} "
                                       f"cannot be read as {_WANTED[name]}")
        uid0 = cols.get("image_0_uid", pa.nulls(n, pa.string()))
        uid1 = cols.get("image_1_uid", pa.nulls(n, pa.string()))
        ranking = pc.cast(cols.get("ranking_id", pa.nulls(n, pa.int64())), pa.string())
        # Identity: the ranking event plus the two images ('<ranking_id>:<uid0>:<uid1>', a missing uid
        # written 'None'); rows lacking a ranking id use their position in the file ('row<n>').
        event = ranking
        if ranking.null_count:
            event = pc.coalesce(ranking, pa.array([f"row{offset + i}" for i in range(n)], pa.string()))
        identity = pc.binary_join_element_wise(event, pc.fill_null(uid0, "None"), pc.fill_null(uid1, "None"), ":")
        # Reader reasons, first match wins: a value of the wrong type, has_label false, are_different false.
        flagged = {}
        for name, reason, detail in (("are_different", "identical_images", "are_different is false"),
                                     ("has_label", "unlabelled", "has_label is false")):
            if name in cols:
                for i in np.flatnonzero(pc.fill_null(pc.invert(cols[name]), False).to_numpy(zero_copy_only=False)):
                    flagged[int(i)] = (reason, detail)
        flagged.update((i, ("wrong_type", detail)) for i, detail in bad_rows.items())
        reasons = details = None
        if flagged:
            reasons, details = [None] * n, [None] * n
            for i, (reason, detail) in flagged.items():
                reasons[i], details[i] = reason, detail
        user = cols.get("user_id")
        return raw_table({
            "row_identity": identity,
            "split": cols["split"] if "split" in cols else pa.repeat(pa.scalar(split, pa.string()), n),
            "prompt": cols["caption"],
            "image_0_bytes": cols.get("jpg_0"), "image_1_bytes": cols.get("jpg_1"),
            "image_0_uid": uid0, "image_1_uid": uid1,
            "label_0": cols["label_0"], "label_1": cols.get("label_1"),
            "user_id": user.cast(pa.string()) if user is not None else None,
            "created_at": cols.get("created_at"),
            "model_0": cols.get("model_0"), "model_1": cols.get("model_1"),
            "ranking_id": ranking,
            "reader_reason": reasons, "reader_detail": details,
        })
