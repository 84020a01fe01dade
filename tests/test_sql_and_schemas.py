"""Read-only SQL over the lake, the CLI's sql and tables commands, and schema validation."""
from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
from prefcurate.curation.store.lake import Lake, LakeError
from prefcurate.curation.store.sql import ReadOnlyError, query, query_polars
from prefcurate.data_schemas import INGESTS, PAIRS, SchemaError, conform, validate
from prefcurate.cli.main import main
from tests.test_ingest_pickapic import BLUE, GREEN, row, write_shard


@pytest.fixture
def lake(tmp_path):
    lake = Lake(str(tmp_path / "lake"), create=True)
    shard = write_shard(tmp_path / "train-0.parquet",
                        [row(0, user=1), row(1, user=1, jpg_1=GREEN, label_0=0.5), row(2, user=2, label_0=0.0),
                         row(3, caption="")])
    ingest_file(lake, shard, IngestConfig("pickapic", "pickapic"), make_reader("pickapic"))
    return lake


def test_views_answer_queries_as_arrow_and_polars(lake):
    table = query(lake, "SELECT user_id, count(*) AS n, avg(label_0) AS mean_label FROM pairs "
                        "GROUP BY user_id ORDER BY user_id")
    assert table.to_pylist() == [{"user_id": "1", "n": 2, "mean_label": 0.75}, {"user_id": "2", "n": 1,
                                                                                 "mean_label": 0.0}]
    frame = query_polars(lake, "SELECT reason FROM quarantine")
    assert frame["reason"].to_list() == ["empty_prompt"]
    joined = query(lake, "SELECT count(*) AS n FROM pairs p JOIN images i ON i.image_id = p.image_1_id")
    assert joined.to_pylist() == [{"n": 3}]


def test_empty_tables_still_have_their_columns(tmp_path):
    fresh = Lake(str(tmp_path / "fresh"), create=True)
    assert query(fresh, "SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 0}]
    assert "pair_id" in query(fresh, "SELECT * FROM pairs").schema.names


@pytest.mark.parametrize("statement", [
    "COPY pairs TO 'out.csv'", "ATTACH 'other.db' AS other", "CREATE TABLE t AS SELECT 1", "DROP VIEW pairs",
    "INSERT INTO pairs SELECT * FROM pairs", "DELETE FROM pairs", "UPDATE pairs SET label_0 = 0",
    "INSTALL httpfs", "LOAD httpfs", "SET threads = 1", "EXPORT DATABASE 'dump'", "SELECT 1; DROP VIEW pairs",
    "PRAGMA enable_profiling",
])
def test_statements_that_write_are_refused_and_change_nothing(lake, tmp_path, statement):
    files_before = {t: lake.files(t) for t in ("pairs", "images", "quarantine", "ingests")}
    with pytest.raises(ReadOnlyError, match="refused"):
        query(lake, statement)
    assert {t: lake.files(t) for t in files_before} == files_before
    assert not (tmp_path / "out.csv").exists()


def test_cli_sql_formats_and_errors(lake, capsys):
    assert main(["sql", "--lake", lake.root, "--format", "json", "SELECT user_id, count(*) AS n FROM pairs "
                 "GROUP BY 1 ORDER BY 1"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"user_id": "1", "n": 2}, {"user_id": "2", "n": 1}]
    assert main(["sql", "--lake", lake.root, "--format", "csv", "SELECT n_read, n_accepted FROM ingests"]) == 0
    assert capsys.readouterr().out == "n_read,n_accepted\n4,3\n"
    assert main(["sql", "--lake", lake.root, "DELETE FROM pairs"]) == 3
    assert "refused: DELETE" in capsys.readouterr().err
    assert main(["sql", "--lake", lake.root, "SELECT nope FROM pairs"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("prefcurate sql: error:") and err.count("\n") == 1
    assert main(["sql", "--lake", lake.root + "-missing", "SELECT 1"]) == 3
    assert "no lake at" in capsys.readouterr().err


def test_sql_answers_well_under_a_second(lake):
    query(lake, "SELECT 1")  # warm DuckDB's import
    started = time.perf_counter()
    query(lake, "SELECT user_id, count(*) FROM pairs GROUP BY 1")
    assert time.perf_counter() - started < 1.0


def test_cli_tables_describes_columns(capsys):
    assert main(["tables", "pairs"]) == 0
    assert "label_0" in capsys.readouterr().out
    assert main(["tables", "nope"]) == 3


def test_validate_reports_every_problem_at_once():
    bad = pa.table({"pair_id": ["a", None], "source": [1, 2], "surplus": [0, 0]})
    problems = validate(bad, PAIRS)
    assert any("'pair_id' has 1 null" in p for p in problems)
    assert any("'source' has type int64" in p for p in problems)
    assert any("missing column 'prompt'" in p for p in problems)
    assert any("unexpected column(s) ['surplus']" in p for p in problems)
    with pytest.raises(SchemaError) as error:
        conform(bad, PAIRS)
    assert len(error.value.problems) >= 14  # every missing column listed, not just the first


def test_conform_applies_safe_casts_only():
    row = {f.name: None for f in INGESTS}
    row.update(ingest_id="x", source="s", format="pickapic", source_file="f", fingerprint="h", n_read=1,
               n_accepted=1, n_duplicates=0, n_quarantined=0, n_images_new=0, prefcurate_version="0")
    table = pa.Table.from_pylist([row])
    with pytest.raises(SchemaError, match="started_at"):
        conform(table, INGESTS)  # null in a non-null column
    import datetime as dt

    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    row.update(started_at=now, finished_at=now)
    table = pa.Table.from_pylist([row])
    table = table.set_column(table.schema.get_field_index("n_read"), "n_read", pa.array([1], pa.int32()))
    conformed = conform(table, INGESTS)
    assert conformed.schema.field("n_read").type == pa.int64() and conformed.column("n_read").to_pylist() == [1]
    lossy = table.set_column(table.schema.get_field_index("n_read"), "n_read", pa.array([1.5]))
    with pytest.raises(SchemaError, match="n_read"):
        conform(lossy, INGESTS)  # 1.5 -> int64 would lose data: refused


def test_newer_lake_is_refused(tmp_path):
    root = tmp_path / "lake"
    Lake(str(root), create=True)
    (root / "_lake.json").write_text(json.dumps({"format": "prefcurate-lake", "schema_version": 99}))
    with pytest.raises(LakeError, match="upgrade prefcurate"):
        Lake(str(root))


def test_files_written_carry_the_schema_version(lake):
    [f] = lake.files("pairs")
    assert pq.read_schema(f).metadata[b"prefcurate.schema_version"] == b"1"


# -- the sandbox: every escape refused by the filter, and DuckDB's own settings behind it ----------------------

ESCAPES = [
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'", "EXPLAIN COPY (SELECT 1) TO '{out}'",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "EXPLAIN ANALYZE INSERT INTO pairs SELECT * FROM pairs",
    "SELECT * FROM read_text('{secret}')", "SELECT * FROM read_blob('{secret}')",
    "SELECT * FROM read_csv('{secret}')", "SELECT * FROM read_csv_auto('{secret}')",
    "SELECT * FROM read_json('{secret}')", "SELECT * FROM sniff_csv('{secret}')",
    "SELECT * FROM read_parquet('{outside}')", "SELECT * FROM '{outside}'",
    "SELECT * FROM parquet_metadata('{outside}')",
    "SELECT * FROM glob('{dir}/*')", "SELECT * FROM read_parquet('{lake}/pairs/**/*.parquet')",
    "SELECT * FROM duckdb_extensions()",
    "ATTACH '{dir}/other.db' AS other", "DETACH memory", "USE system", "INSTALL httpfs", "LOAD httpfs",
    "SET enable_external_access = true", "RESET enable_external_access", "SET VARIABLE x = 1",
    "PRAGMA enable_profiling", "CALL pragma_version()", "COPY pairs TO '{out}'", "EXPORT DATABASE '{dir}/dump'",
    "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')", "SELECT 1; SELECT 2", "SELECT ';'; DROP VIEW pairs",
    "PREPARE p AS SELECT 1", "CHECKPOINT", "BEGIN TRANSACTION",
]


@pytest.mark.parametrize("statement", ESCAPES)
def test_every_escape_is_refused_in_one_line(lake, tmp_path, statement):
    secret = tmp_path / "secret.txt"
    secret.write_text("token=hunter2\n")
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"token": ["hunter2"]}), outside)
    out = tmp_path / "out.csv"
    text = statement.format(secret=secret, outside=outside, out=out, dir=tmp_path, lake=lake.path)
    with pytest.raises(ReadOnlyError, match="^refused: ") as error:
        query(lake, text)
    assert "\n" not in str(error.value) and "hunter2" not in str(error.value)
    assert not out.exists() and not (tmp_path / "dump").exists() and not (tmp_path / "other.db").exists()


def test_duckdb_sandbox_holds_without_the_statement_filter(lake, tmp_path):
    """The second wall alone: statements sent straight to the connection `connect` returns."""
    import duckdb

    from prefcurate.curation.store.sql import connect

    (tmp_path / "secret.txt").write_text("token=hunter2\n")
    con = connect(lake)
    try:
        assert con.sql("SELECT count(*) FROM pairs").fetchall() == [(3,)]  # the views still bind
        for statement in (f"SELECT * FROM read_text('{tmp_path}/secret.txt')", f"SELECT * FROM glob('{tmp_path}/*')",
                          f"COPY (SELECT 1) TO '{tmp_path}/out.csv'", f"ATTACH '{tmp_path}/x.db'", "LOAD httpfs",
                          "INSTALL httpfs"):
            with pytest.raises(duckdb.PermissionException):
                con.execute(statement)
        for statement in ("SET enable_external_access = true", "RESET allowed_paths", "SET threads = 1",
                          "SET autoload_known_extensions = true"):
            with pytest.raises(duckdb.InvalidInputException, match="locked"):
                con.execute(statement)
        assert con.sql("SELECT current_setting('enable_external_access')").fetchall() == [(False,)]
    finally:
        con.close()
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("statement, expected", [
    ("SELECT ';' AS s", [{"s": ";"}]),
    ("SELECT 1 AS one;", [{"one": 1}]),
    ("WITH t AS (SELECT count(*) AS n FROM pairs) SELECT n FROM t", [{"n": 3}]),
    ("FROM ingests SELECT n_read", [{"n_read": 4}]),
    ("VALUES (1)", [{"col0": 1}]),
])
def test_read_only_queries_still_answer(lake, statement, expected):
    assert query(lake, statement).to_pylist() == expected


@pytest.mark.parametrize("statement", ["EXPLAIN SELECT * FROM pairs", "EXPLAIN ANALYZE SELECT count(*) FROM pairs",
                                       "DESCRIBE pairs", "SUMMARIZE pairs", "SHOW TABLES", "PRAGMA show_tables",
                                       "SELECT * FROM duckdb_settings()"])
def test_informational_statements_are_allowed(lake, statement):
    assert query(lake, statement).num_rows > 0


def test_limits_threads_memory_and_timeout(lake):
    from prefcurate.curation.store.sql import SqlLimits

    limited = SqlLimits(memory_limit="256MB", threads=1)
    got = query(lake, "SELECT current_setting('threads') AS t, current_setting('memory_limit') AS m", limited)
    assert got.to_pylist() == [{"t": 1, "m": "244.1 MiB"}]
    started = time.perf_counter()
    with pytest.raises(ReadOnlyError, match="0.3 s timeout"):
        query(lake, "SELECT count(*) FROM range(1000000000000) a, range(10) b WHERE a.range % 7 = b.range",
              SqlLimits(timeout_s=0.3))
    assert time.perf_counter() - started < 5
    with pytest.raises(ReadOnlyError, match="bad SQL limit"):
        query(lake, "SELECT 1", SqlLimits(memory_limit="lots"))


def test_cli_sql_limits(lake, capsys):
    assert main(["sql", "--lake", lake.root, "--threads", "1", "--memory-limit", "256MB", "--format", "csv",
                 "SELECT current_setting('threads') AS t"]) == 0
    assert capsys.readouterr().out == "t\n1\n"
    assert main(["sql", "--lake", lake.root, "--timeout", "0.3",
                 "SELECT count(*) FROM range(1000000000000) a, range(10) b WHERE a.range % 7 = b.range"]) == 3
    err = capsys.readouterr().err
    assert err == "prefcurate sql: error: refused: the query ran past the 0.3 s timeout\n"
    assert main(["sql", "--lake", lake.root, "EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'"]) == 3
    assert capsys.readouterr().err.startswith("prefcurate sql: error: refused: COPY statements under EXPLAIN")
