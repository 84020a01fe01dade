"""Read-only SQL over the lake: DuckDB in memory, one view per table, no server.

Only queries run (SELECT, WITH ... SELECT, EXPLAIN, DESCRIBE, SHOW, SUMMARIZE, VALUES). A
statement that writes, attaches, copies out, installs, loads or changes settings is refused
before it runs, with the offending statement kind in the message; the connection is in-memory,
so even an accepted statement cannot change the lake.
"""
from __future__ import annotations

import json

import duckdb
import polars as pl
import pyarrow as pa

from curation.lake import Lake
from data_schemas import TABLES


class ReadOnlyError(ValueError):
    """A statement that is not a read-only query."""


_ALLOWED = {"SELECT", "EXPLAIN", "PRAGMA"}
# PRAGMA is allowed only for these read-only informational pragmas.
_ALLOWED_PRAGMAS = ("show_tables", "table_info", "database_size", "version", "storage_info")

# Tables of the current curation run (curation/curate.py); views are made once a run exists.
DERIVED_TABLES = ("votes", "consensus", "pair_metrics", "annotators")


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


def connect(lake: Lake) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per lake table (and per derived table found)."""
    con = duckdb.connect(":memory:")
    for name, schema in TABLES.items():
        files = lake.files(name)
        con.execute(_view_sql(name, lake.sql_file_list(files) if files else None, schema))
    current = lake._join("curation", "CURRENT.json")
    if lake.fs.exists(current):
        run_id = json.loads(lake.fs.cat_file(current))["run_id"]
        for name in DERIVED_TABLES:
            path = lake.local_path("curation", run_id, f"{name}.parquet").replace("'", "''")
            con.execute(_view_sql(name, f"['{path}']", None))
    return con


def check_read_only(sql: str) -> list:
    """Parse `sql` and refuse anything but read-only queries. Returns the parsed statements."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ReadOnlyError(f"cannot parse SQL: {exc}") from None
    if not statements:
        raise ReadOnlyError("no SQL statement given")
    for statement in statements:
        kind = statement.type.name
        if kind not in _ALLOWED:
            raise ReadOnlyError(f"refused: {kind} statements are not allowed; the lake is queried read-only "
                                f"(use SELECT, WITH, EXPLAIN, DESCRIBE, SHOW or SUMMARIZE)")
        if kind == "PRAGMA" and not statement.query.strip().lower().removeprefix("pragma").strip().startswith(
                _ALLOWED_PRAGMAS):
            raise ReadOnlyError(f"refused: PRAGMA {statement.query!r} is not a read-only pragma")
        if kind == "SELECT" and _writes_files(statement.query):
            raise ReadOnlyError("refused: the query calls a function that writes files")
    return statements


def _writes_files(query: str) -> bool:
    # No core DuckDB table function writes files from a SELECT today; this guards the known
    # side-effecting table functions should an extension be loaded.
    lowered = query.lower()
    return any(fn in lowered for fn in ("write_csv(", "write_parquet(", "copy_database("))


def query(lake: Lake, sql: str) -> pa.Table:
    """Run a read-only query over the lake and return Arrow. The last statement's result is returned."""
    statements = check_read_only(sql)
    con = connect(lake)
    try:
        result = None
        for statement in statements:
            result = con.sql(statement.query)
        if result is None:
            return pa.table({})
        arrow = result.arrow()
        return arrow.read_all() if isinstance(arrow, pa.RecordBatchReader) else arrow
    finally:
        con.close()


def query_polars(lake: Lake, sql: str) -> pl.DataFrame:
    return pl.from_arrow(query(lake, sql))
