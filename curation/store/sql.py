"""Read-only SQL over the lake: DuckDB in memory, one view per table, no server.

Two walls keep a query from reaching beyond the lake:

1. A statement filter, before anything runs: exactly one statement, of a read-only kind (SELECT, WITH ...
   SELECT, DESCRIBE, SHOW, SUMMARIZE, VALUES, the informational PRAGMAs, EXPLAIN of one of these; EXPLAIN
   ANALYZE runs its statement, so it gets the same check). Anything else (COPY, ATTACH, INSTALL, LOAD, SET,
   RESET, CREATE, CALL, PREPARE, ...) is refused with its kind in the message.
2. DuckDB's own sandbox, set once the views exist: `allowed_paths` = the lake files the views read (so a
   view still binds), then `enable_external_access = false` (no other file, directory listing, URL,
   ATTACH, COPY TO, secret or extension directory can be reached: read_text, read_blob, read_csv, glob,
   ... fail with a permission error), extension auto-loading and auto-installing off, and
   `lock_configuration = true` (no SET/RESET/PRAGMA can undo any of it). `getenv` does not exist outside
   DuckDB's own shell; the settings `current_setting` and `duckdb_settings()` show hold no secret (the
   connection never has one).

Optional limits for SQL exposed to others (`SqlLimits`): DuckDB's memory limit and thread count, and a
wall-clock timeout that interrupts the connection from a timer thread. Every refusal, limit hit or DuckDB
error is a `ReadOnlyError` (one line): the CLI prints it and exits 3.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass

import duckdb
import polars as pl
import pyarrow as pa

from prefcurate.curation.store.lake import Lake
from prefcurate.data_schemas import TABLES


class ReadOnlyError(ValueError):
    """A statement that is not a read-only query, that hit a limit, or that DuckDB refused: one line."""


@dataclass(frozen=True)
class SqlLimits:
    memory_limit: str | None = None
    """DuckDB memory_limit, e.g. "2GB" (None: DuckDB's default, 80 % of RAM); a query over it fails."""
    threads: int | None = None
    """DuckDB worker threads (None: one per core)."""
    timeout_s: float | None = None
    """Interrupt a query still running after this many seconds (None: no limit)."""


_ALLOWED = {"SELECT", "EXPLAIN", "PRAGMA"}
# PRAGMA is allowed only for these read-only informational pragmas.
_ALLOWED_PRAGMAS = ("show_tables", "table_info", "database_size", "version", "storage_info")

# Tables of the current curation run (curation/labels/curate.py); views are made once a run exists.
DERIVED_TABLES = ("votes", "consensus", "pair_metrics", "annotators", "scorer_reliability")


def _view_sql(name: str, listing: str | None, schema: pa.Schema | None) -> str:
    if listing:
        return f"CREATE VIEW {name} AS SELECT * FROM read_parquet({listing}, union_by_name=true)"
    # An empty table still has its columns, so queries against a fresh lake work.
    columns = ", ".join(f"CAST(NULL AS {_duck_type(f.type)}) AS {f.name}" for f in schema)
    return f"CREATE VIEW {name} AS SELECT {columns} WHERE false"


def _duck_type(type_: pa.DataType) -> str:
    if pa.types.is_string(type_):
        return "VARCHAR"
    if pa.types.is_binary(type_):
        return "BLOB"
    if pa.types.is_float64(type_):
        return "DOUBLE"
    if pa.types.is_int32(type_):
        return "INTEGER"
    if pa.types.is_int64(type_):
        return "BIGINT"
    if pa.types.is_boolean(type_):
        return "BOOLEAN"
    if pa.types.is_timestamp(type_):
        return "TIMESTAMPTZ"
    raise TypeError(f"no DuckDB type for {type_}")


def connect(lake: Lake, limits: SqlLimits | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per lake table (and per derived table found), sandboxed
    as the module docstring says. Lake file sizes are checked against the commit log on the way."""
    limits = limits or SqlLimits()
    config = {"autoload_known_extensions": False, "autoinstall_known_extensions": False}
    if limits.threads is not None:
        config["threads"] = int(limits.threads)
    if limits.memory_limit is not None:
        config["memory_limit"] = str(limits.memory_limit)
    try:
        con = duckdb.connect(":memory:", config=config)
    except duckdb.Error as exc:
        raise ReadOnlyError(f"bad SQL limit: {str(exc).splitlines()[0]}") from None
    readable: list[str] = []
    for name, schema in TABLES.items():
        files = lake.files(name, verify="size")
        readable += [lake.local_path(*lake.relative(f).split("/")) for f in files]
        con.execute(_view_sql(name, lake.sql_file_list(files) if files else None, schema))
    current = lake.join("curation", "CURRENT.json")
    if lake.fs.exists(current):
        run_id = json.loads(lake.fs.cat_file(current))["run_id"]
        for name in DERIVED_TABLES:
            if not lake.fs.exists(lake.join("curation", run_id, f"{name}.parquet")):
                continue  # a run written before this table existed; `prefcurate curate` adds it
            path = lake.local_path("curation", run_id, f"{name}.parquet")
            readable.append(path)
            con.execute(_view_sql(name, "['" + path.replace("'", "''") + "']", None))
    if not lake.is_local:
        try:  # remote lakes are read through httpfs, if installed: loaded now, before loading is locked
            con.execute("LOAD httpfs")
        except duckdb.Error:
            pass
    con.execute("SET allowed_paths = " + "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in readable) + "]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


_EXPLAIN_PREFIX = re.compile(r"^\s*explain\s+(analy[sz]e\s+)?(\([^)]*\)\s*)?", re.IGNORECASE | re.DOTALL)


def check_read_only(sql: str) -> list:
    """Parse `sql` and refuse anything but one read-only query. Returns the parsed statement (a list of one)."""
    try:
        statements = duckdb.extract_statements(sql)
    except (duckdb.Error, ValueError) as exc:
        raise ReadOnlyError(f"cannot parse SQL: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise ReadOnlyError("no SQL statement given")
    if len(statements) > 1:
        raise ReadOnlyError(f"refused: {len(statements)} statements given; run one statement at a time")
    _check_statement(statements[0])
    return statements


def _check_statement(statement, inside_explain: bool = False) -> None:
    kind = statement.type.name
    if kind not in _ALLOWED or (inside_explain and kind != "SELECT"):
        where = "under EXPLAIN " if inside_explain else ""
        raise ReadOnlyError(f"refused: {kind} statements {where}are not allowed; the lake is queried read-only "
                            f"(use SELECT, WITH, EXPLAIN, DESCRIBE, SHOW or SUMMARIZE)")
    if kind == "PRAGMA" and not statement.query.strip().lower().removeprefix("pragma").strip().startswith(
            _ALLOWED_PRAGMAS):
        raise ReadOnlyError(f"refused: PRAGMA {statement.query!r} is not a read-only pragma")
    if kind == "SELECT" and _writes_files(statement.query):
        raise ReadOnlyError("refused: the query calls a function that writes files")
    if kind == "EXPLAIN":  # EXPLAIN ANALYZE executes what it explains: the inner statement is checked too
        inner = _EXPLAIN_PREFIX.sub("", statement.query, count=1)
        try:
            parsed = duckdb.extract_statements(inner)
        except (duckdb.Error, ValueError):
            parsed = []
        if len(parsed) != 1:
            raise ReadOnlyError("refused: EXPLAIN of something that is not one read-only query")
        _check_statement(parsed[0], inside_explain=True)


def _writes_files(query: str) -> bool:
    # No core DuckDB table function writes files from a SELECT today; this guards the known
    # side-effecting table functions should an extension be loaded.
    lowered = query.lower()
    return any(fn in lowered for fn in ("write_csv(", "write_parquet(", "copy_database("))


def query(lake: Lake, sql: str, limits: SqlLimits | None = None) -> pa.Table:
    """Run one read-only query over the lake and return Arrow."""
    limits = limits or SqlLimits()
    [statement] = check_read_only(sql)
    con = connect(lake, limits)
    timer = None
    timed_out = threading.Event()
    if limits.timeout_s is not None:
        def stop():
            timed_out.set()
            con.interrupt()
        timer = threading.Timer(float(limits.timeout_s), stop)
        timer.daemon = True
        timer.start()
    try:
        arrow = con.sql(statement.query).arrow()
        return arrow.read_all() if isinstance(arrow, pa.RecordBatchReader) else arrow
    except duckdb.Error as exc:
        if timed_out.is_set():
            raise ReadOnlyError(f"refused: the query ran past the {limits.timeout_s:g} s timeout") from None
        if isinstance(exc, duckdb.PermissionException):
            raise ReadOnlyError(f"refused: {str(exc).splitlines()[0]} (only the lake's tables can be read)") from None
        raise ReadOnlyError(str(exc).splitlines()[0]) from None
    finally:
        if timer is not None:
            timer.cancel()
        con.close()


def query_polars(lake: Lake, sql: str, limits: SqlLimits | None = None) -> pl.DataFrame:
    return pl.from_arrow(query(lake, sql, limits))
