"""`prefcurate sql`: a read-only DuckDB query over the lake tables, printed as a table, CSV or JSON."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

from prefcurate.cli.errors import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("sql", help="run a read-only SQL query over the lake",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="DuckDB over the lake tables as views (pairs, images, image_refs, quarantine, "
                                   "ingests, scores, and the curation tables when present). Read-only: "
                                   "statements that write, attach or copy out are refused.",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefcurate sql --lake lake "SELECT reason, count(*) FROM quarantine GROUP BY 1"
                             prefcurate sql --lake lake --format csv "SELECT * FROM ingests" > ingests.csv"""))
    p.add_argument("--lake", required=True)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="output format (csv and json write binary columns as hex)")
    p.add_argument("--memory-limit", help="DuckDB memory limit for the query, e.g. 2GB (default: 80%% of RAM)")
    p.add_argument("--threads", type=int, help="DuckDB threads for the query (default: one per core)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the query after this many seconds")
    p.add_argument("query", help="SQL text")


def print_table(table, fmt: str) -> None:
    """Print a pyarrow Table as `fmt` (table, csv or json) on stdout."""
    import polars as pl

    frame = pl.from_arrow(table) if table.num_columns else pl.DataFrame()
    if fmt != "table":  # CSV has no binary type; JSON has no bytes: hex is exact and easy to decode
        frame = frame.with_columns(pl.col(pl.Binary).bin.encode("hex"))
    if fmt == "csv":
        sys.stdout.write(frame.write_csv())
    elif fmt == "json":
        sys.stdout.write(json.dumps(frame.to_dicts(), default=str) + "\n")
    else:
        with pl.Config(tbl_rows=50, tbl_cols=20, fmt_str_lengths=60, tbl_hide_dataframe_shape=False):
            print(frame)


def run(args) -> int:
    from prefcurate.curation.store.lake import Lake
    from prefcurate.curation.store.sql import SqlLimits, query

    limits = SqlLimits(memory_limit=args.memory_limit, threads=args.threads, timeout_s=args.timeout)
    print_table(query(Lake(args.lake), args.query, limits), args.format)
    return EXIT_OK
