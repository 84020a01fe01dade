"""The lake: a directory (local path or fsspec URL) of Parquet files, one folder per table.

Layout::

    LAKE/
      _lake.json                          marker: format name and schema version
      pairs/<source>/part-<txid>-<n>.parquet
      images/part-<txid>-<n>.parquet      each distinct image once (content-addressed)
      image_refs/part-<txid>-<n>.parquet  '<source>:<uid>' -> content hash, for metadata-only pairs
      quarantine/<source>/part-<txid>-<n>.parquet
      ingests/part-<txid>.parquet         one row per ingested file: the commit record
      scores/<scorer>/part-<txid>-<n>.parquet
      _staging/<txid>/...                 work in flight; never read by queries

Writes are transactions. Files are first written under `_staging/<txid>/`; when all are
complete, `_staging/<txid>/COMMIT.json` (the list of moves and the commit records) is written
atomically; then the files are renamed into place and the commit records (e.g. the `ingests`
row) are written. A crash before COMMIT.json leaves only staging files, which recovery deletes;
a crash after it is rolled forward by recovery. Queries only glob `<table>/**/*.parquet`, and
every file appears there by an atomic rename, so no reader ever sees a half-written file.
The partition folders are plain names (not `key=value`), so DuckDB does not invent columns.

One writer at a time per lake (a lock file guards local lakes); any number of readers.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import SCHEMA_VERSION, TABLES, conform


LAKE_MARKER = "_lake.json"
STAGING = "_staging"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class LakeError(RuntimeError):
    """A lake is missing, of an unknown format, or in a state we refuse to touch."""


def check_partition_name(kind: str, value: str) -> str:
    if not _SAFE_NAME.match(value or ""):
        raise ValueError(f"{kind} {value!r} must be 1-128 characters of letters, digits, '_', '.', '-'")
    return value


class Lake:
    """Handle on a lake directory. `Lake(root)` opens an existing lake; `Lake(root, create=True)`
    creates it if needed. Opening for writing runs crash recovery first."""

    def __init__(self, root: str, create: bool = False):
        self.root = str(root).rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        marker = self._join(LAKE_MARKER)
        if not self.fs.exists(marker):
            if not create:
                raise LakeError(f"no lake at {self.root} (missing {LAKE_MARKER}); create one with `prefcurate ingest`")
            self.fs.makedirs(self.path, exist_ok=True)
            self._atomic_write_bytes(marker, json.dumps({"format": "prefcurate-lake", "schema_version": SCHEMA_VERSION}).encode())
        info = json.loads(self.fs.cat_file(marker))
        if info.get("format") != "prefcurate-lake":
            raise LakeError(f"{marker} is not a prefcurate lake marker")
        if int(info.get("schema_version", 0)) > SCHEMA_VERSION:
            raise LakeError(f"lake {self.root} has schema version {info['schema_version']}; "
                            f"this prefcurate reads up to {SCHEMA_VERSION}: upgrade prefcurate")

    # -- paths ---------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def local_path(self, *parts: str) -> str:
        """A path DuckDB can read (local lakes only; remote lakes need DuckDB's httpfs)."""
        return self._join(*parts) if self.is_local else "/".join([self.root, *parts])

    def sql_file_list(self, files: list[str]) -> str:
        """`files` (as listed by `files`) as a DuckDB list literal of readable paths, quotes escaped."""
        paths = [self.local_path(*f[len(self.path) + 1:].split("/")) for f in files]
        return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"

    def files(self, table: str) -> list[str]:
        """Committed Parquet files of `table`, sorted (deterministic reads)."""
        if table not in TABLES:
            raise KeyError(f"unknown table {table!r}; tables: {sorted(TABLES)}")
        return self.glob_parquet(table)

    def glob_parquet(self, folder: str) -> list[str]:
        """Parquet files anywhere under `folder`, each once, sorted. (fsspec's '**' also matches
        zero folders, so the top-level files would otherwise be listed twice.)"""
        found = self.fs.glob(self._join(folder, "**", "*.parquet")) + self.fs.glob(self._join(folder, "*.parquet"))
        return sorted(set(found))

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """The whole table (or some columns of it) as Arrow; empty, with the right schema, if absent."""
        files = self.files(table)
        schema = TABLES[table]
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        if not files:
            return schema.empty_table()
        parts = [pq.read_table(f, columns=columns, filesystem=self.fs, schema=None) for f in files]
        return pa.concat_tables([p.select(schema.names).cast(schema) for p in parts])

    # -- atomic file writes --------------------------------------------------------------
    def _atomic_write_bytes(self, dest: str, data: bytes) -> None:
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
            if self.is_local:
                f.flush()
                os.fsync(f.fileno())
        self.fs.mv(tmp, dest)

    def write_table_atomic(self, dest_rel: str, table: pa.Table) -> None:
        """Write one Parquet file at `dest_rel` (relative to the lake) atomically."""
        dest = self._join(dest_rel)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self._atomic_write_bytes(dest, sink.getvalue().to_pybytes())

    def write_frame_atomic(self, dest_rel: str, frame) -> None:
        """Write a Polars frame as one Parquet file at `dest_rel`, atomically. Snappy: derived tables
        are rewritten by every curation run, where write speed matters more than ~15 % of size."""
        dest = self._join(dest_rel)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            frame.write_parquet(tmp, compression="snappy")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        else:
            sink = pa.BufferOutputStream()
            pq.write_table(frame.to_arrow(), sink, compression="snappy")
            self._atomic_write_bytes(dest, sink.getvalue().to_pybytes())

    # -- transactions --------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[Lake]:
        """Hold the single-writer lock and recover from any earlier crash first."""
        if self.is_local:
            lock_path = self._join("_lake.lock")
            with open(lock_path, "a+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise LakeError(f"another process is writing to {self.root}") from None
                try:
                    self.recover()
                    yield self
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        else:
            self.recover()
            yield self

    def begin(self, txid: str) -> Transaction:
        check_partition_name("transaction id", txid)
        staging = self._join(STAGING, txid)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        self.fs.makedirs(staging, exist_ok=True)
        return Transaction(self, txid)

    def recover(self) -> list[str]:
        """Finish or discard transactions left by a crash. Returns what was done, one line each."""
        actions = []
        staging_root = self._join(STAGING)
        if not self.fs.exists(staging_root):
            return actions
        for txdir in sorted(self.fs.ls(staging_root, detail=False)):
            txid = txdir.rstrip("/").rsplit("/", 1)[-1]
            commit = f"{txdir}/COMMIT.json"
            if self.fs.exists(commit):
                plan = json.loads(self.fs.cat_file(commit))
                self._apply(txid, plan)
                actions.append(f"rolled forward committed transaction {txid}")
            else:
                actions.append(f"discarded unfinished transaction {txid}")
            self.fs.rm(txdir, recursive=True)
        return actions

    def _apply(self, txid: str, plan: dict) -> None:
        """Move staged files into place and write the commit records; safe to repeat."""
        for staged_rel, final_rel in plan["moves"]:
            staged, final = self._join(STAGING, txid, staged_rel), self._join(final_rel)
            if self.fs.exists(staged):
                self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(staged, final)
        for table, rows in plan["records"].items():
            record = conform(pa.Table.from_pylist(_decode_record_rows(table, rows)), TABLES[table])
            self.write_table_atomic(f"{table}/part-{txid}.parquet", record)


@dataclass
class Transaction:
    lake: Lake
    txid: str
    _writers: dict = field(default_factory=dict)
    _pending: dict = field(default_factory=dict)
    _moves: list = field(default_factory=list)
    _counter: int = 0

    def write(self, table: str, batch: pa.Table, partition: str | None = None,
              max_file_bytes: int = 256 << 20, row_group_bytes: int = 32 << 20) -> None:
        """Append `batch` (conformed to the table schema) to a staged part file of `table`, under
        folder `partition` if given. Small batches are buffered into row groups of about
        `row_group_bytes` (or 128k rows); a part file is closed after about `max_file_bytes`."""
        if batch.num_rows == 0:
            return
        batch = conform(batch, TABLES[table])
        key = (table, partition)
        pending = self._pending.setdefault(key, {"batches": [], "bytes": 0, "rows": 0})
        pending["batches"].append(batch)
        pending["bytes"] += batch.get_total_buffer_size()  # O(columns); .nbytes walks every chunk
        pending["rows"] += batch.num_rows
        if pending["bytes"] >= row_group_bytes or pending["rows"] >= 128_000:
            self._flush(key, max_file_bytes)

    def _flush(self, key: tuple, max_file_bytes: int = 256 << 20) -> None:
        pending = self._pending.pop(key, None)
        if not pending:
            return
        table, partition = key
        batch = pa.concat_tables(pending["batches"])
        state = self._writers.get(key)
        if state is None or state["bytes"] >= max_file_bytes:
            if state is not None:
                state["writer"].close()
                state["file"].close()
            self._counter += 1
            name = f"part-{self.txid}-{self._counter:05d}.parquet"
            final_rel = "/".join(p for p in (table, partition, name) if p)
            staged = self.lake._join(STAGING, self.txid, final_rel)
            self.lake.fs.makedirs(staged.rsplit("/", 1)[0], exist_ok=True)
            handle = self.lake.fs.open(staged, "wb")
            state = {"file": handle, "writer": pq.ParquetWriter(handle, TABLES[table], compression="zstd"),
                     "bytes": 0}
            self._writers[key] = state
            self._moves.append([final_rel, final_rel])
        state["writer"].write_table(batch, row_group_size=max(1, batch.num_rows))
        state["bytes"] += pending["bytes"]

    def commit(self, records: dict[str, list[dict]]) -> None:
        """Close the part files, write COMMIT.json, move files into place, write `records`."""
        for key in list(self._pending):
            self._flush(key)
        for state in self._writers.values():
            state["writer"].close()
            if self.lake.is_local:
                state["file"].flush()
                os.fsync(state["file"].fileno())
            state["file"].close()
        self._writers.clear()
        plan = {"moves": self._moves, "records": {t: _encode_record_rows(rows) for t, rows in records.items()}}
        self.lake._atomic_write_bytes(self.lake._join(STAGING, self.txid, "COMMIT.json"), json.dumps(plan).encode())
        self.lake._apply(self.txid, plan)
        self.lake.fs.rm(self.lake._join(STAGING, self.txid), recursive=True)

    def abort(self) -> None:
        self._pending.clear()
        for state in self._writers.values():
            state["writer"].close()
            state["file"].close()
        self._writers.clear()
        staging = self.lake._join(STAGING, self.txid)
        if self.lake.fs.exists(staging):
            self.lake.fs.rm(staging, recursive=True)


def _encode_record_rows(rows: list[dict]) -> list[dict]:
    """Commit records go through JSON: timestamps become ISO strings."""
    return [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()} for row in rows]


def _decode_record_rows(table: str, rows: list[dict]) -> list[dict]:
    import datetime as dt

    ts_cols = {f.name for f in TABLES[table] if pa.types.is_timestamp(f.type)}
    return [{k: (dt.datetime.fromisoformat(v) if k in ts_cols and isinstance(v, str) else v) for k, v in row.items()}
            for row in rows]
