"""The lake: a directory (local path or fsspec URL) of Parquet files, one folder per table, and a commit log.

Layout::

    LAKE/
      _lake.json                          marker: format name and lake format version
      _log/<seq>.json                     the commit log: one JSON entry per committed transaction
      _log/<seq>.checkpoint.json          every 100th commit: the live file list as of <seq>
      _lake.lock                          local lakes: the writer lock (flock), holder written inside
      _lock.json                          remote lakes: the writer lock object (exclusive create, expiry)
      pairs/<source>/part-<txid>-<n>.parquet
      images/part-<txid>-<n>.parquet      each distinct image once (content-addressed)
      image_refs/part-<txid>-<n>.parquet  '<source>:<uid>' -> content hash, for metadata-only pairs
      quarantine/<source>/part-<txid>-<n>.parquet
      ingests/part-<txid>.parquet         one row per ingested file
      scores/<scorer>/part-<txid>-<n>.parquet
      _staging/<txid>/...                 work in flight; never read by queries

Readers never list table folders: a table is exactly the files the committed log entries name (the union
of every entry's `files`, minus its `removes`, in `seq` order), in the manner of Delta Lake's
`_delta_log` and Iceberg's manifests. A log entry records each file's table, path, row count, byte size
and sha256, so a changed file is detected and named (`Lake.verify`, `prefcurate verify`).

A transaction (`Lake.begin`) stages its Parquet files under `_staging/<txid>/` (hashing them as they are
written), then commits in four steps:

  1. `_staging/<txid>/COMMIT.json` (the plan: every file with its sha256) is written atomically: from
     here on the transaction is decided and is only ever rolled forward, never undone;
  2. each staged file is renamed into place (still invisible: no log entry names it yet);
  3. `_log/<seq>.json` is created with an exclusive create (a hard link locally, `mode="xb"` on object
     stores): the instant the transaction becomes visible, all of it at once;
  4. the staging folder is removed.

A crash (or an exception) at any step leaves readers answering as before the transaction; the next writer
(or `Lake.recover()`) deletes undecided staging folders and rolls decided ones forward. The `seq` of a log
entry is unique by construction: the exclusive create fails for a second writer of the same `seq`, which
then re-reads the log and takes the next one.

Lake format versions: 1 (no log; tables were whatever the folders held) and 2 (this). A version-1 lake is
migrated on its first write (one log entry, txid `migrate-v1`, naming every file found, each hashed); until
then readers list its folders as version 1 did. A lake of a newer version is refused with one line.

One writer at a time per lake, any number of readers. `Lake.writing(wait_s=600)` takes the writer lock,
waiting up to `wait_s` for another holder (then one line naming it), and is re-entrant within a thread;
taking it first recovers from any earlier crash (call `Lake.recover(wait_s)` where recovery is the point).
`Lake.transaction(txid, wait_s)` is the usual write: the lock, one transaction, commit or abort.
Local lakes use `flock` on `_lake.lock`; remote lakes an exclusive create of `_lock.json` that carries an
expiry, renewed by a heartbeat while held, and broken by a waiter once expired (a holder that died).

Fault injection (tests, `make faults`): set PREFCURATE_FAULT=<point>[:<n>] to act at the n-th (default 1st)
time the process passes `fault_point(<point>)`; PREFCURATE_FAULT_ACTION is `kill` (SIGKILL itself, the
default), `raise` (InjectedFault) or `interrupt` (KeyboardInterrupt). Points: before_flush, after_flush,
before_commit_record, after_commit_record, after_move, before_log, after_log, after_cleanup, and
after_derived_file (each `write_frame_atomic`: the curation tables).

Path helpers for modules that write next to the tables (curation runs, snapshots): `Lake.join(*parts)` (a
path for `lake.fs`), `Lake.atomic_write_bytes(dest, data)`, and `Lake.exists(root)` (is there a lake at a
local path or fsspec URL, before opening one).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from prefcurate.data_schemas import SCHEMA_VERSION, TABLES, UNIQUE_KEYS, conform


LAKE_MARKER = "_lake.json"
STAGING = "_staging"
LOG = "_log"
LAKE_VERSION = 2
"""Lake format version, written to the marker as `schema_version` (the key older prefcurate checks, so a
version-1 reader refuses a version-2 lake instead of listing folders the log does not vouch for)."""
DEFAULT_WAIT_S = 600.0
"""How long a writer waits for the lock: longer than any single commit, short enough to notice a hang."""
CHECKPOINT_EVERY = 100
"""A log checkpoint after every 100th commit: a reader then reads one checkpoint and at most 99 entries."""
REMOTE_LOCK_TTL_S = 120.0
"""Remote lock expiry; renewed every TTL/4 while held, so only a holder that died lets it lapse."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_MIGRATION_TXID = "migrate-v1"


class LakeError(RuntimeError):
    """A lake is missing, of an unknown format, locked, changed on disk, or in a state we refuse to touch."""


class LakeCorruptError(LakeError):
    """A committed lake file no longer matches its commit record (size or sha256)."""


class InjectedFault(RuntimeError):
    """Raised by `fault_point` when PREFCURATE_FAULT_ACTION=raise."""


_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: act as PREFCURATE_FAULT asks when this point is passed (see the module docstring)."""
    spec = os.environ.get("PREFCURATE_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] != int(nth or 1):
        return
    action = os.environ.get("PREFCURATE_FAULT_ACTION", "kill")
    if action == "raise":
        raise InjectedFault(f"injected fault at {name}")
    if action == "interrupt":
        raise KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGKILL)


def reset_faults() -> None:
    _fault_counts.clear()


def check_partition_name(kind: str, value: str) -> str:
    if not _SAFE_NAME.match(value or ""):
        raise ValueError(f"{kind} {value!r} must be 1-128 characters of letters, digits, '_', '.', '-'")
    return value


# Locks held by this process: lake key -> [RLock, depth, release callback]. flock is per open file
# description, so a second acquisition in the same process would wait on itself; threads queue on the RLock.
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


class Lake:
    """Handle on a lake directory. `Lake(root)` opens an existing lake; `Lake(root, create=True)`
    creates it if needed. Opening for writing (`writing()`) runs crash recovery first."""

    def __init__(self, root: str, create: bool = False):
        self.root = str(root).rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols or "local" in protocols
        self._key = f"{protocols[0]}://{os.path.realpath(self.path) if self.is_local else self.path}"
        self._log_cache: dict[int, dict] = {}  # seq -> entry, for entries after self._base
        self._base: dict | None = None  # the newest checkpoint read: {"seq", "files", "txids"}
        self._key_cache: dict[str, tuple[int, set]] = {}
        marker = self.join(LAKE_MARKER)
        if not self.fs.exists(marker):
            if not create:
                raise LakeError(f"no lake at {self.root} (missing {LAKE_MARKER}); create one with `prefcurate ingest`")
            self.fs.makedirs(self.path, exist_ok=True)
            self.atomic_write_bytes(marker, _marker_bytes())
        self.version_on_disk = self._read_marker()

    def _read_marker(self) -> int:
        marker = self.join(LAKE_MARKER)
        try:
            info = json.loads(self.fs.cat_file(marker))
        except (ValueError, OSError) as exc:
            raise LakeError(f"{marker} is not a prefcurate lake marker ({exc})") from None
        if not isinstance(info, dict) or info.get("format") != "prefcurate-lake":
            raise LakeError(f"{marker} is not a prefcurate lake marker")
        version = int(info.get("schema_version", 0))
        if version > LAKE_VERSION:
            raise LakeError(f"lake {self.root} has schema version {version}; "
                            f"this prefcurate reads up to {LAKE_VERSION}: upgrade prefcurate")
        return version

    # -- paths ---------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        """The filesystem path (for `self.fs`) of a path relative to the lake."""
        return "/".join([self.path, *parts])

    @staticmethod
    def exists(root: str) -> bool:
        """Whether a lake (its marker) is at `root`, a local path or any fsspec URL (`file://`, `s3://`, ...):
        what `os.path.exists` cannot answer for a URL."""
        fs, path = fsspec.core.url_to_fs(str(root).rstrip("/"))
        return fs.exists(f"{path}/{LAKE_MARKER}")

    def relative(self, path: str) -> str:
        return path[len(self.path) + 1:] if path.startswith(self.path + "/") else path

    def local_path(self, *parts: str) -> str:
        """A path DuckDB can read (local lakes only; remote lakes need DuckDB's httpfs)."""
        return self.join(*parts) if self.is_local else "/".join([self.root, *parts])

    def sql_file_list(self, files: list[str]) -> str:
        """`files` (as listed by `files`) as a DuckDB list literal of readable paths, quotes escaped."""
        paths = [self.local_path(*self.relative(f).split("/")) for f in files]
        return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"

    # -- the commit log ------------------------------------------------------------------
    def _load_log(self) -> None:
        """Read what is new in `_log/`: on first use the newest checkpoint (if any) and the entries after it,
        later only entries not yet read. Entries and checkpoints are immutable, so both are cached."""
        log_dir = self.join(LOG)
        try:
            names = [n.rstrip("/").rsplit("/", 1)[-1] for n in self.fs.ls(log_dir, detail=False)]
        except FileNotFoundError:
            names = []
        entries = sorted(int(n[:20]) for n in names if re.fullmatch(r"\d{20}\.json", n))  # not a *.tmp-*
        if self._base is None:
            checkpoints = sorted(int(n[:20]) for n in names if re.fullmatch(r"\d{20}\.checkpoint\.json", n))
            self._base = {"seq": -1, "files": {}, "txids": set()}
            if checkpoints:
                point = json.loads(self.fs.cat_file(f"{log_dir}/{checkpoints[-1]:020d}.checkpoint.json"))
                self._base = {"seq": point["seq"], "files": {i["path"]: i for i in point["files"]},
                              "txids": set(point["txids"])}
        for seq in entries:
            if seq > self._base["seq"] and seq not in self._log_cache:
                self._log_cache[seq] = json.loads(self.fs.cat_file(f"{log_dir}/{seq:020d}.json"))

    def log_entries(self) -> list[dict]:
        """The committed log entries after the newest checkpoint read (all of them if none), in seq order."""
        self._load_log()
        return [self._log_cache[s] for s in sorted(self._log_cache)]

    def version(self) -> int:
        """The seq of the newest committed transaction (-1: none)."""
        entries = self.log_entries()
        return entries[-1]["seq"] if entries else self._base["seq"]

    def _committed_txid(self, txid: str) -> bool:
        entries = self.log_entries()  # loads self._base first
        return txid in self._base["txids"] or any(e["txid"] == txid for e in entries)

    def committed_files(self) -> dict[str, dict]:
        """Relative path -> {table, path, rows, bytes, sha256} of every file the log names now."""
        entries = self.log_entries()
        live = dict(self._base["files"])
        for entry in entries:
            for rel in entry.get("removes", []):
                live.pop(rel, None)
            for info in entry["files"]:
                live[info["path"]] = info
        return live

    def _checkpoint(self, seq: int) -> None:
        """Every CHECKPOINT_EVERY commits: the live file list as of `seq` (and every txid so far), so a new
        reader reads one checkpoint and at most CHECKPOINT_EVERY - 1 entries instead of the whole log."""
        live = self.committed_files()  # loads self._base first
        txids = sorted(self._base["txids"] | {e["txid"] for e in self.log_entries()})
        body = {"format": "prefcurate-log-checkpoint", "version": LAKE_VERSION, "seq": seq,
                "files": sorted(live.values(), key=lambda i: i["path"]), "txids": txids}
        self.atomic_write_bytes(self.join(LOG, f"{seq:020d}.checkpoint.json"), json.dumps(body).encode())

    def _uses_log(self) -> bool:
        if self.version_on_disk < LAKE_VERSION:
            self.version_on_disk = self._read_marker()  # migrated by a writer since we opened
        return self.version_on_disk >= LAKE_VERSION

    def files(self, table: str, verify: str = "none") -> list[str]:
        """Committed Parquet files of `table`, sorted (deterministic reads). `verify`: "none", "size" (one
        stat per file: catches truncation and appends) or "sha256" (reads every byte); a mismatch raises
        LakeCorruptError naming the file."""
        if table not in TABLES:
            raise KeyError(f"unknown table {table!r}; tables: {sorted(TABLES)}")
        return self.glob_parquet(table, verify)

    def glob_parquet(self, folder: str, verify: str = "none") -> list[str]:
        """Committed Parquet files under `folder` (a table, or e.g. `scores/<scorer>`), each once, sorted."""
        if not self._uses_log():
            return self._listed_parquet(folder)
        prefix = folder.rstrip("/") + "/"
        infos = [i for rel, i in self.committed_files().items() if rel.startswith(prefix)]
        if verify != "none":
            self.check_files(infos, verify)
        return sorted(self.join(i["path"]) for i in infos)

    def _listed_parquet(self, folder: str) -> list[str]:
        # Version-1 lakes: the folder as it is. (fsspec's '**' also matches zero folders, hence the set.)
        found = self.fs.glob(self.join(folder, "**", "*.parquet")) + self.fs.glob(self.join(folder, "*.parquet"))
        return sorted(set(found))

    def check_files(self, infos: list[dict], level: str = "size") -> None:
        """Raise LakeCorruptError for the first file whose size (or sha256) differs from its commit."""
        for problem in self._file_problems(infos, level):
            raise LakeCorruptError(f"{problem}; the lake changed after it was written: "
                                   f"run `prefcurate verify --lake {self.root}`")

    def _file_problems(self, infos: list[dict], level: str) -> Iterator[str]:
        for info in infos:
            path = self.join(info["path"])
            try:
                size = self.fs.size(path)
            except FileNotFoundError:
                yield f"lake file {info['path']} is missing"
                continue
            if size != info["bytes"]:
                yield f"lake file {info['path']} has {size} bytes, its commit recorded {info['bytes']}"
            elif level == "sha256":
                with self.fs.open(path, "rb") as f:
                    digest = _sha256_of(f)
                if digest != info["sha256"]:
                    yield f"lake file {info['path']} does not match the sha256 its commit recorded"

    def verify_tables(self, tables: tuple[str, ...]) -> None:
        """sha256 of every committed file of `tables` against the log (LakeCorruptError naming the first
        that differs): what a snapshot build checks before it copies rows out of the lake."""
        if self._uses_log():
            for table in tables:
                self.files(table, verify="sha256")

    def verify(self) -> dict:
        """Hash every committed file and compare with the log. Returns {"files", "bytes", "problems"}."""
        if not self._uses_log():
            raise LakeError(f"lake {self.root} is of format version 1 (no checksums yet); "
                            f"any write (e.g. `prefcurate repair`) migrates it")
        infos = list(self.committed_files().values())
        problems = list(self._file_problems(infos, "sha256"))
        from prefcurate.data_schemas.snapshot_contract import (  # pyarrow only, on first use
            SnapshotError, verify_snapshot,
        )

        snapshots = [p for p in (self.fs.ls(self.join("snapshots"), detail=False)
                                 if self.fs.isdir(self.join("snapshots")) else [])
                     if self.fs.exists(f"{p.rstrip('/')}/manifest.json")]
        for path in sorted(snapshots):
            try:
                verify_snapshot(path.rstrip("/"), self.fs)
            except SnapshotError as exc:
                problems.append(str(exc))
        return {"files": len(infos), "bytes": sum(i["bytes"] for i in infos), "snapshots": len(snapshots),
                "problems": problems}

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """The whole table (or some columns of it) as Arrow; empty, with the right schema, if absent.
        File sizes are checked against the log, and Parquet page checksums (written by every commit)
        are verified while reading."""
        files = self.files(table, verify="size")
        schema = TABLES[table]
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        if not files:
            return schema.empty_table()
        parts = []
        for f in files:
            try:
                parts.append(pq.read_table(f, columns=columns, filesystem=self.fs, page_checksum_verification=True))
            except (OSError, pa.ArrowException) as exc:
                raise LakeCorruptError(f"lake file {self.relative(f)} cannot be read ({exc}); "
                                       f"run `prefcurate verify --lake {self.root}`") from None
        return pa.concat_tables([p.select(schema.names).cast(schema) for p in parts])

    # -- atomic file writes --------------------------------------------------------------
    def atomic_write_bytes(self, dest: str, data: bytes) -> None:
        """Write `data` at `dest` (a filesystem path) so readers see the old file or the new, never a part."""
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
            if self.is_local:
                f.flush()
                os.fsync(f.fileno())
        self.fs.mv(tmp, dest)

    def _create_exclusive(self, dest: str, data: bytes) -> None:
        """Create `dest` with `data` unless it exists (FileExistsError), atomically: a hard link of a synced
        temporary file locally; an exclusive create (`xb`, e.g. S3's If-None-Match) elsewhere."""
        if self.is_local:
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, dest)
            finally:
                os.unlink(tmp)
        else:
            with self.fs.open(dest, "xb") as f:
                f.write(data)

    def write_table_atomic(self, dest_rel: str, table: pa.Table) -> None:
        """Write one Parquet file at `dest_rel` (relative to the lake) atomically. Not a table commit: for
        files outside the log (derived tables)."""
        dest = self.join(dest_rel)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
        self.atomic_write_bytes(dest, sink.getvalue().to_pybytes())

    def write_frame_atomic(self, dest_rel: str, frame) -> None:
        """Write a Polars frame as one Parquet file at `dest_rel`, atomically. Snappy: derived tables
        are rewritten by every curation run, where write speed matters more than ~15 % of size."""
        dest = self.join(dest_rel)
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
            self.atomic_write_bytes(dest, sink.getvalue().to_pybytes())
        fault_point("after_derived_file")

    # -- the writer lock -----------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, wait_s: float = DEFAULT_WAIT_S) -> Iterator[Lake]:
        """Hold the single-writer lock (waiting up to `wait_s` seconds for another holder, then LakeError
        naming it), after recovering from any earlier crash. Re-entrant within a thread; other threads of
        this process queue for it like other processes."""
        with _HELD_GUARD:
            held = _HELD.setdefault(self._key, [threading.RLock(), 0, None])
        rlock = held[0]
        if not rlock.acquire(timeout=max(wait_s, 0.0)):
            raise LakeError(f"waited {wait_s:.0f} s for another thread writing to {self.root}")
        try:
            if held[1] == 0:
                held[2] = self._acquire_file_lock(wait_s)
                try:
                    self._recover_locked()
                except BaseException:
                    held[2]()
                    held[2] = None
                    raise
            held[1] += 1
            try:
                yield self
            finally:
                held[1] -= 1
                if held[1] == 0:
                    release, held[2] = held[2], None
                    release()
        finally:
            rlock.release()

    def _holder(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:3])[:200],
                "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def _acquire_file_lock(self, wait_s: float):
        return self._local_lock(wait_s) if self.is_local else self._remote_lock(wait_s)

    def _local_lock(self, wait_s: float):
        path = self.join("_lake.lock")
        handle = open(path, "a+")
        deadline, pause = time.monotonic() + wait_s, 0.02
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown holder"
                    handle.close()
                    raise LakeError(f"waited {wait_s:.0f} s for the writer lock of {self.root}, "
                                    f"held by {_describe_holder(holder)}") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self._holder()))
        handle.flush()

        def release():
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return release

    def _remote_lock(self, wait_s: float, ttl_s: float = REMOTE_LOCK_TTL_S):
        path = self.join("_lock.json")
        token = uuid.uuid4().hex
        deadline, pause = time.monotonic() + wait_s, 0.02

        def body() -> bytes:
            return json.dumps({**self._holder(), "token": token, "expires_at": time.time() + ttl_s}).encode()
        while True:
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(body())
                break
            except FileExistsError:
                try:
                    current = json.loads(self.fs.cat_file(path))
                except (FileNotFoundError, ValueError):
                    continue  # released (or being written) meanwhile: try again at once
                if float(current.get("expires_at", 0)) < time.time():
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm(path)  # the holder died: its lock lapsed
                    continue
                if time.monotonic() >= deadline:
                    raise LakeError(f"waited {wait_s:.0f} s for the writer lock of {self.root}, "
                                    f"held by {_describe_holder(json.dumps(current))}") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
        stop = threading.Event()

        def heartbeat():
            while not stop.wait(ttl_s / 4):
                with contextlib.suppress(Exception):
                    with self.fs.open(path, "wb") as f:
                        f.write(body())
        beat = threading.Thread(target=heartbeat, name="prefcurate-lake-lock", daemon=True)
        beat.start()

        def release():
            stop.set()
            beat.join()
            with contextlib.suppress(FileNotFoundError, ValueError):
                if json.loads(self.fs.cat_file(path)).get("token") == token:
                    self.fs.rm(path)
        return release

    # -- transactions and recovery -------------------------------------------------------
    def begin(self, txid: str) -> Transaction:
        """Start a transaction; call it while holding `writing()`."""
        check_partition_name("transaction id", txid)
        staging = self.join(STAGING, txid)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        self.fs.makedirs(staging, exist_ok=True)
        return Transaction(self, txid)

    @contextlib.contextmanager
    def transaction(self, txid: str, wait_s: float = DEFAULT_WAIT_S) -> Iterator[Transaction]:
        """Hold the writer lock (waiting up to `wait_s` seconds), begin transaction `txid` and yield it;
        commit it (no records) when the block ends, abort it if the block raises."""
        with self.writing(wait_s):
            tx = self.begin(txid)
            try:
                yield tx
                tx.commit({})
            except BaseException:
                tx.abort()
                raise

    def recover(self, wait_s: float = DEFAULT_WAIT_S) -> list[str]:
        """Take the writer lock, finish or discard transactions left by a crash, migrate a version-1
        lake, and delete temporary files left by interrupted writes. Returns what was done, one line each."""
        with self.writing(wait_s):
            return list(self._last_recovery)

    def _recover_locked(self) -> None:
        actions: list[str] = []
        staging_root = self.join(STAGING)
        txdirs = sorted(self.fs.ls(staging_root, detail=False)) if self.fs.exists(staging_root) else []
        legacy_first = self.version_on_disk < LAKE_VERSION
        for txdir in txdirs:
            txid = txdir.rstrip("/").rsplit("/", 1)[-1]
            commit = f"{txdir}/COMMIT.json"
            if self.fs.exists(commit):
                plan = json.loads(self.fs.cat_file(commit))
                if "files" in plan:
                    if legacy_first:
                        continue  # a version-2 plan in a version-1 lake: rolled forward after migration
                    self._roll_forward(txid, plan)
                else:
                    self._apply_legacy(txid, plan)
                    self.fs.rm(txdir, recursive=True)
                actions.append(f"rolled forward committed transaction {txid}")
            else:
                self.fs.rm(txdir, recursive=True)
                actions.append(f"discarded unfinished transaction {txid}")
        if legacy_first:
            actions.append(self._migrate_v1())
            for txdir in txdirs:
                txid = txdir.rstrip("/").rsplit("/", 1)[-1]
                if self.fs.exists(f"{txdir}/COMMIT.json"):
                    self._roll_forward(txid, json.loads(self.fs.cat_file(f"{txdir}/COMMIT.json")))
        actions.extend(self._remove_temporaries())
        for folder in self.fs.glob(self.join("snapshots", "_staging-*")):  # a snapshot write that crashed
            self.fs.rm(folder, recursive=True)
            actions.append(f"removed unfinished snapshot folder {self.relative(folder)}")
        self._last_recovery = actions

    def _remove_temporaries(self) -> list[str]:
        # Leftovers of atomic writes interrupted before their rename (never named by the log).
        found = self.fs.glob(self.join("**", "*.tmp-*"))
        for path in found:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path)
        return [f"removed {len(found)} temporary file(s) of interrupted writes"] if found else []

    def _roll_forward(self, txid: str, plan: dict) -> None:
        """Steps 2-4 of a commit (see the module docstring); safe to repeat after a crash at any point."""
        for info in plan["files"]:
            staged, final = self.join(STAGING, txid, info["path"]), self.join(info["path"])
            if self.fs.exists(staged):
                self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(staged, final)
                fault_point("after_move")
        if not self._committed_txid(txid):
            fault_point("before_log")
            self._append_log(txid, plan["files"], plan.get("removes", []))
            fault_point("after_log")
        for rel in plan.get("removes", []):  # files a repair replaced: no log entry names them any more
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.join(rel))
        self.fs.rm(self.join(STAGING, txid), recursive=True)
        fault_point("after_cleanup")

    def _append_log(self, txid: str, files: list[dict], removes: list[str]) -> int:
        self.fs.makedirs(self.join(LOG), exist_ok=True)
        while True:
            seq = self.version() + 1
            entry = {"format": "prefcurate-log", "version": LAKE_VERSION, "seq": seq, "txid": txid,
                     "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(), "files": files,
                     "removes": removes}
            try:
                self._create_exclusive(self.join(LOG, f"{seq:020d}.json"), json.dumps(entry, indent=1).encode())
            except FileExistsError:
                continue  # another writer took this seq (a lock that lapsed): re-read the log, take the next
            self._log_cache[seq] = entry
            if seq % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
                self._checkpoint(seq)
            return seq

    def _apply_legacy(self, txid: str, plan: dict) -> None:
        """Roll forward a version-1 COMMIT.json (moves, then the records as Parquet): before migration."""
        for staged_rel, final_rel in plan["moves"]:
            staged, final = self.join(STAGING, txid, staged_rel), self.join(final_rel)
            if self.fs.exists(staged):
                self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
                self.fs.mv(staged, final)
        for table, rows in plan["records"].items():
            record = conform(pa.Table.from_pylist(_decode_record_rows(table, rows)), TABLES[table])
            self.write_table_atomic(f"{table}/part-{txid}.parquet", record)

    def _migrate_v1(self) -> str:
        """Version 1 -> 2: one log entry naming every Parquet file in the table folders, each hashed."""
        if not self._committed_txid(_MIGRATION_TXID):
            files = []
            for table in TABLES:
                for path in self._listed_parquet(table):
                    with self.fs.open(path, "rb") as f:
                        digest = _sha256_of(f)
                    files.append({"table": table, "path": self.relative(path), "rows": pq.read_metadata(
                        path, filesystem=self.fs).num_rows, "bytes": self.fs.size(path), "sha256": digest})
            self._append_log(_MIGRATION_TXID, files, [])
        self.atomic_write_bytes(self.join(LAKE_MARKER), _marker_bytes())
        self.version_on_disk = LAKE_VERSION
        return f"migrated lake format version 1 to {LAKE_VERSION} ({len(self.committed_files())} files hashed)"

    # -- keys and repair -----------------------------------------------------------------
    def committed_keys(self, table: str) -> set:
        """The UNIQUE_KEYS of every committed row of `table` (tuples), read incrementally and cached."""
        key = UNIQUE_KEYS[table]
        seq_seen, keys = self._key_cache.get(table, (None, set()))
        later = [e for e in self.log_entries() if seq_seen is not None and e["seq"] > seq_seen]
        new = [i for e in later for i in e["files"] if i["table"] == table]
        if seq_seen is None or any(rel.startswith(table + "/") for e in later for rel in e.get("removes", [])):
            new, keys = [i for i in self.committed_files().values() if i["table"] == table], set()
        for info in new:
            part = pq.read_table(self.join(info["path"]), columns=list(key), filesystem=self.fs)
            keys.update(zip(*(part.column(c).to_pylist() for c in key)))
        self._key_cache[table] = (self.version(), keys)
        return keys

    def repair(self, wait_s: float = DEFAULT_WAIT_S) -> list[str]:
        """Recover, then remove rows whose UNIQUE_KEYS repeat (keeping the first committed), by rewriting the
        files that hold the repeats in one transaction. Returns what was done, one line each."""
        with self.writing(wait_s):
            actions = list(self._last_recovery)
            for table, key in UNIQUE_KEYS.items():
                seen: set = set()
                rewrite: dict[str, pa.Table] = {}
                n_dropped = 0
                for path in self.files(table):
                    part = pq.read_table(path, filesystem=self.fs)
                    keep = []
                    for k in zip(*(part.column(c).to_pylist() for c in key)):
                        keep.append(k not in seen)
                        seen.add(k)
                    if not all(keep):
                        rewrite[path] = part.filter(pa.array(keep))
                        n_dropped += keep.count(False)
                if not rewrite:
                    continue
                with self.transaction(f"repair-{uuid.uuid4().hex}", wait_s) as tx:
                    for path, kept in rewrite.items():
                        rel = self.relative(path)
                        partition = rel.split("/")[1] if rel.count("/") == 2 else None
                        tx.write(table, kept, partition=partition)
                        tx.removes.append(rel)
                actions.append(f"{table}: removed {n_dropped} duplicate row(s) from {len(rewrite)} file(s)")
            return actions


def _describe_holder(raw: str) -> str:
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on {holder['host']} ({holder['command']}) since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return raw[:200]


def _marker_bytes() -> bytes:
    return json.dumps({"format": "prefcurate-lake", "schema_version": LAKE_VERSION,
                       "table_schema_version": SCHEMA_VERSION}).encode()


def _sha256_of(open_file, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    while chunk := open_file.read(chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()


class _HashingSink:
    """A write-only file wrapper that hashes and counts what passes through (a Parquet part as it is written)."""

    def __init__(self, handle):
        self.handle, self.sha256, self.size, self.closed = handle, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.handle.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True  # the real handle is synced and closed by Transaction


@dataclass
class Transaction:
    lake: Lake
    txid: str
    _writers: dict = field(default_factory=dict)
    _pending: dict = field(default_factory=dict)
    _files: list = field(default_factory=list)
    removes: list = field(default_factory=list)
    """Relative paths of committed files this transaction replaces (repair)."""
    _counter: int = 0
    _decided: bool = False
    _new_keys: dict = field(default_factory=dict)

    def write(self, table: str, batch: pa.Table, partition: str | None = None,
              max_file_bytes: int = 256 << 20, row_group_bytes: int = 32 << 20, skip_existing: bool = False) -> int:
        """Append `batch` (conformed to the table schema) to a staged part file of `table`, under
        folder `partition` if given. Small batches are buffered into row groups of about
        `row_group_bytes` (or 128k rows); a part file is closed after about `max_file_bytes`.
        `skip_existing`: drop rows whose UNIQUE_KEYS are already committed (or written earlier in this
        transaction), so two writers that planned the same work cannot both store it. Returns rows dropped."""
        if batch.num_rows == 0:
            return 0
        batch = conform(batch, TABLES[table])
        dropped = 0
        if skip_existing:
            key = UNIQUE_KEYS[table]
            known, mine = self.lake.committed_keys(table), self._new_keys.setdefault(table, set())
            keep = []
            for k in zip(*(batch.column(c).to_pylist() for c in key)):
                keep.append(k not in known and k not in mine)
                mine.add(k)
            dropped = keep.count(False)
            if dropped:
                batch = batch.filter(pa.array(keep))
                if batch.num_rows == 0:
                    return dropped
        key = (table, partition)
        pending = self._pending.setdefault(key, {"batches": [], "bytes": 0, "rows": 0})
        pending["batches"].append(batch)
        pending["bytes"] += batch.get_total_buffer_size()  # O(columns); .nbytes walks every chunk
        pending["rows"] += batch.num_rows
        if pending["bytes"] >= row_group_bytes or pending["rows"] >= 128_000:
            self._flush(key, max_file_bytes)
        return dropped

    def _flush(self, key: tuple, max_file_bytes: int = 256 << 20) -> None:
        pending = self._pending.pop(key, None)
        if not pending:
            return
        fault_point("before_flush")
        table, partition = key
        batch = pa.concat_tables(pending["batches"])
        state = self._writers.get(key)
        if state is None or state["bytes"] >= max_file_bytes:
            if state is not None:
                self._close(state)
            self._counter += 1
            name = f"part-{self.txid}-{self._counter:05d}.parquet"
            final_rel = "/".join(p for p in (table, partition, name) if p)
            staged = self.lake.join(STAGING, self.txid, final_rel)
            self.lake.fs.makedirs(staged.rsplit("/", 1)[0], exist_ok=True)
            handle = self.lake.fs.open(staged, "wb")
            sink = _HashingSink(handle)
            state = {"file": handle, "sink": sink, "table": table, "path": final_rel, "rows": 0, "bytes": 0,
                     "writer": pq.ParquetWriter(sink, TABLES[table], compression="zstd", write_page_checksum=True)}
            self._writers[key] = state
        state["writer"].write_table(batch, row_group_size=max(1, batch.num_rows))
        state["bytes"] += pending["bytes"]
        state["rows"] += batch.num_rows
        fault_point("after_flush")

    def _close(self, state: dict) -> None:
        state["writer"].close()
        if self.lake.is_local:
            state["file"].flush()
            os.fsync(state["file"].fileno())
        state["file"].close()
        self._files.append({"table": state["table"], "path": state["path"], "rows": state["rows"],
                            "bytes": state["sink"].size, "sha256": state["sink"].sha256.hexdigest()})

    def commit(self, records: dict[str, list[dict]]) -> None:
        """Close the part files, stage `records` (rows of e.g. `ingests`) as Parquet, write COMMIT.json,
        and roll forward (see the module docstring). After COMMIT.json an error leaves the transaction
        to be rolled forward by the next writer; it is never undone."""
        for key in list(self._pending):
            self._flush(key)
        for state in self._writers.values():
            self._close(state)
        self._writers.clear()
        for table, rows in records.items():
            record = conform(pa.Table.from_pylist(rows), TABLES[table])
            sink = pa.BufferOutputStream()
            pq.write_table(record, sink, compression="zstd", write_page_checksum=True)
            data = sink.getvalue().to_pybytes()
            rel = f"{table}/part-{self.txid}.parquet"
            staged = self.lake.join(STAGING, self.txid, rel)
            self.lake.fs.makedirs(staged.rsplit("/", 1)[0], exist_ok=True)
            with self.lake.fs.open(staged, "wb") as f:  # staged: COMMIT.json, written after, vouches for it
                f.write(data)
                if self.lake.is_local:
                    f.flush()
                    os.fsync(f.fileno())
            self._files.append({"table": table, "path": rel, "rows": record.num_rows, "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()})
        plan = {"version": LAKE_VERSION, "txid": self.txid, "files": self._files, "removes": self.removes}
        fault_point("before_commit_record")
        self.lake.atomic_write_bytes(self.lake.join(STAGING, self.txid, "COMMIT.json"), json.dumps(plan).encode())
        self._decided = True
        fault_point("after_commit_record")
        self.lake._roll_forward(self.txid, plan)

    def abort(self) -> None:
        """Undo a transaction that is not yet decided; a decided one (COMMIT.json written) is rolled forward
        instead, now if possible, else by the next writer's recovery."""
        self._pending.clear()
        for state in self._writers.values():
            with contextlib.suppress(Exception):
                state["writer"].close()
                state["file"].close()
        self._writers.clear()
        staging = self.lake.join(STAGING, self.txid)
        if self._decided:
            with contextlib.suppress(Exception):
                self.lake._roll_forward(self.txid, json.loads(self.lake.fs.cat_file(f"{staging}/COMMIT.json")))
            return
        if self.lake.fs.exists(staging):
            self.lake.fs.rm(staging, recursive=True)


def _decode_record_rows(table: str, rows: list[dict]) -> list[dict]:
    """Version-1 commit records went through JSON: timestamps as ISO strings."""
    ts_cols = {f.name for f in TABLES[table] if pa.types.is_timestamp(f.type)}
    return [{k: (dt.datetime.fromisoformat(v) if k in ts_cols and isinstance(v, str) else v) for k, v in row.items()}
            for row in rows]
