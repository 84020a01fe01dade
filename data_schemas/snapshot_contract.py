"""The training-snapshot contract between curation (the writer) and training (the reader), written once.

A snapshot is a folder (local or any fsspec URL)::

    <snapshot>/manifest.json
    <snapshot>/shards/shard-00000.parquet ...   (prefcurate.data_schemas.tables.SNAPSHOT_PAIRS, winner first)

manifest.json (``build_manifest``)::

    {"format": "prefcurate-snapshot", "version": 1, "name": str, "snapshot_id": str, "created_at": ISO time,
     "policy": {...}, "curation_run": str | null, "inputs": {...} | null, "counts": {...},
     "adaptive": {...} | null,   # Adaptive-DPO constants the offline weights and margins were computed with
     "shards": [{"path": "shards/shard-00000.parquet", "sha256": hex, "rows": int}, ...]}

``verify_snapshot`` is the one check both sides run: format and version, then every shard's presence, sha256,
row count (from the Parquet footer) and required columns; every problem is reported in one ``SnapshotError``.
Plain Python and pyarrow: no torch, no Polars, no curation code.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from prefcurate.data_schemas.tables import SNAPSHOT_PAIRS


FORMAT = "prefcurate-snapshot"
VERSION = 1  # what writers write
# The version rule: a reader accepts exactly the versions listed here, older ones included only once the reader
# has been taught to read them (and a test proves it). "Older or equal" would promise that every past layout
# still reads correctly, which nobody checks; "newer" can never be read safely. Today only version 1 exists.
READABLE_VERSIONS = (1,)
MANIFEST = "manifest.json"
REQUIRED_FIELDS = ("format", "version", "snapshot_id", "shards")  # what a reader needs; the rest is provenance
# Columns a snapshot may lack (written before they existed) and the value that means "absent": the
# conservative-DPO soft target ε of the reliability policy is 0 (plain DPO) in older snapshots.
OPTIONAL_COLUMNS = {"label_smoothing": 0.0}
REQUIRED_COLUMNS = tuple(n for n in SNAPSHOT_PAIRS.names if n not in OPTIONAL_COLUMNS)


class SnapshotError(ValueError):
    """A snapshot that cannot be written, found, or trusted (missing, malformed, or not matching its manifest)."""


def shard_path(index: int) -> str:
    """The manifest path of shard ``index`` (0-based), relative to the snapshot folder."""
    return f"shards/shard-{index:05d}.parquet"


def encode_shard(table: pa.Table, row_group_size: int, compression: str = "zstd") -> bytes:
    """A SNAPSHOT_PAIRS table as Parquet bytes. A trainer reads one row group at a time, so ``row_group_size``
    (a few hundred pairs) bounds its memory."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def shard_entry(path: str, data: bytes, rows: int) -> dict:
    """The manifest entry of one shard file: its relative path, the sha256 of its bytes, its row count."""
    return {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "rows": int(rows)}


def write_shard(fs: fsspec.AbstractFileSystem, root: str, index: int, table: pa.Table, row_group_size: int = 256,
                compression: str = "zstd") -> dict:
    """Write shard ``index`` of the snapshot folder ``root`` (whose shards/ exists) and return its manifest entry."""
    rel, data = shard_path(index), encode_shard(table, row_group_size, compression)
    with fs.open(f"{root}/{rel}", "wb") as f:
        f.write(data)
    return shard_entry(rel, data, table.num_rows)


def build_manifest(*, name: str, snapshot_id: str, shards: list[dict], policy: dict, counts: dict,
                   curation_run: str | None = None, inputs: Any = None, adaptive: dict | None = None,
                   created_at: str | None = None) -> dict:
    """manifest.json's content (module docstring), in the current VERSION."""
    return {"format": FORMAT, "version": VERSION, "name": name, "snapshot_id": snapshot_id,
            "created_at": created_at or dt.datetime.now(dt.timezone.utc).isoformat(), "policy": policy,
            "curation_run": curation_run, "inputs": inputs, "counts": counts, "adaptive": adaptive,
            "shards": shards}


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: dict) -> None:
    with fs.open(f"{root}/{MANIFEST}", "wb") as f:
        f.write(json.dumps(manifest, indent=1).encode())


def read_manifest(path: str, fs: fsspec.AbstractFileSystem | None = None) -> dict:
    """The manifest of the snapshot at ``path`` after the header checks (format, readable version, snapshot_id,
    a non-empty shard list), without touching the shards. Raises ``SnapshotError``."""
    if fs is None:
        fs, path = fsspec.core.url_to_fs(str(path))
    manifest_path = f"{path}/{MANIFEST}"
    if not fs.isfile(manifest_path):
        raise SnapshotError(f"{manifest_path} not found: a training snapshot is a folder with manifest.json and "
                            f"shards/*.parquet, written by `prefcurate snapshot`")
    try:
        manifest = json.loads(fs.cat_file(manifest_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SnapshotError(f"{manifest_path} is not valid JSON: {err}") from None
    header = manifest if isinstance(manifest, dict) else {}
    if header.get("format") != FORMAT or header.get("version") not in READABLE_VERSIONS:
        raise SnapshotError(f"{manifest_path}: expected format {FORMAT!r} version "
                            f"{' or '.join(map(str, READABLE_VERSIONS))}, got {header.get('format')!r} version "
                            f"{header.get('version')!r}")
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not entries or not manifest.get("snapshot_id") or \
            not all(isinstance(e, dict) for e in entries):
        raise SnapshotError(f"{manifest_path}: needs a snapshot_id and a non-empty 'shards' list of objects")
    return manifest


def _sha256(fs: fsspec.AbstractFileSystem, file: str) -> str:
    digest = hashlib.sha256()
    with fs.open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_problems(fs: fsspec.AbstractFileSystem, root: str, entry: dict) -> list[str]:
    """What is wrong with one shard against its manifest entry: missing, digest, row count, columns."""
    rel = str(entry.get("path") or "")
    file = f"{root}/{rel}"
    if not rel or not fs.isfile(file):
        return [f"{entry.get('path')!r}: file missing"]
    actual = _sha256(fs, file)
    if actual != entry.get("sha256"):  # the footer of a changed file is not worth reading
        return [f"{rel} does not match its manifest hash (sha256 {actual}, manifest {entry.get('sha256')}): the "
                f"snapshot was modified after it was written"]
    with fs.open(file, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        names = set(meta.schema.names)
    problems = []
    if meta.num_rows != entry.get("rows"):
        problems.append(f"{rel}: {meta.num_rows} rows != manifest {entry.get('rows')}")
    absent = sorted(set(REQUIRED_COLUMNS) - names)
    if absent:
        problems.append(f"{rel}: missing columns {absent}")
    return problems


def verify_snapshot(path: str, fs: fsspec.AbstractFileSystem | None = None) -> dict:
    """The manifest of the snapshot at ``path`` (a folder or fsspec URL; with ``fs``, a path in it), after
    checking the header and every shard (presence, sha256, row count, columns). Raises one ``SnapshotError``
    naming every problem."""
    if fs is None:
        fs, path = fsspec.core.url_to_fs(str(path))
    manifest = read_manifest(path, fs)
    problems = [p for entry in manifest["shards"] for p in shard_problems(fs, path, entry)]
    if problems:
        raise SnapshotError(f"snapshot {path} refused, it does not match its manifest: {'; '.join(problems)}")
    return manifest
