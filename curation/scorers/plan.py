"""Scoring, step 1: what a scorer still has to score (`plan_work`), listed with DuckDB.

The work is the distinct (image_id, prompt_id) pairs of the pairs table, metadata-only ids ('<source>:<uid>')
resolved through image_refs, pairs with an image that has no bytes in the lake skipped and counted, minus what
`scores` already holds for the same scorer AND scorer_version. Prompt-free scorers need each image once, under
`votes.PROMPT_FREE_PROMPT_ID`. The items are ordered by images file, so a shard reads few files.
"""
from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa

from prefcurate.curation.store.lake import Lake
from prefcurate.curation.scorers import Scorer
from prefcurate.curation.labels.votes import PROMPT_FREE_PROMPT_ID


WORK_SCHEMA = pa.schema([("image_id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
                         ("file", pa.string())])  # file: the images Parquet file holding the bytes


@dataclass
class WorkPlan:
    scorer: str
    scorer_version: str
    items: pa.Table       # WORK_SCHEMA rows still to score, ordered by file, image_id, prompt_id
    n_pairs: int          # pairs in the lake
    n_pairs_skipped: int  # pairs with an image whose bytes are not in the lake yet
    n_needed: int         # distinct (image, prompt) the scorable pairs need
    n_done: int           # of those, already scored by this scorer_version

    def shards(self, shard_size: int) -> list[pa.Table]:
        """Consecutive slices of about `shard_size` items, cut only between images."""
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        image_ids = self.items.column("image_id").to_pylist()
        out, start = [], 0
        while start < len(image_ids):
            end = min(start + shard_size, len(image_ids))
            while end < len(image_ids) and image_ids[end] == image_ids[end - 1]:
                end += 1
            out.append(self.items.slice(start, end - start))
            start = end
        return out

    def skipped_line(self) -> str:
        return f"{self.n_pairs_skipped} pairs skipped: images not in the lake yet"


def sql_str(value: str) -> str:
    """`value` as a DuckDB string literal (quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def _source(lake: Lake, table: str, columns: str) -> str:
    """A FROM-clause source for a lake table's committed files, or an empty typed relation."""
    files = lake.files(table)
    if files:
        return f"(SELECT {columns} FROM read_parquet({lake.sql_file_list(files)}, filename=true))"
    cols = {"image_id": "NULL::VARCHAR AS image_id", "ref_id": "NULL::VARCHAR AS ref_id",
            "prompt_id": "NULL::VARCHAR AS prompt_id", "filename": "NULL::VARCHAR AS filename",
            "scorer": "NULL::VARCHAR AS scorer", "scorer_version": "NULL::VARCHAR AS scorer_version"}
    return "(SELECT " + ", ".join(cols[c.strip()] for c in columns.split(",")) + " WHERE false)"


def plan_work(lake: Lake, scorer: Scorer) -> WorkPlan:
    """What `scorer` (at its version) still has to score for the lake's pairs; see the module docstring."""
    con = duckdb.connect(":memory:")
    try:
        pairs = lake.files("pairs")
        if not pairs:
            return WorkPlan(scorer.name, scorer.version, WORK_SCHEMA.empty_table(), 0, 0, 0, 0)
        key = ("r.prompt_id", "min(r.prompt)") if scorer.uses_prompt else (
            sql_str(PROMPT_FREE_PROMPT_ID), "NULL::VARCHAR")
        pair_files = lake.sql_file_list(pairs)
        con.sql(f"""
            CREATE TEMP TABLE resolved AS
            WITH sides AS (
                SELECT pair_id, prompt_id, prompt, image_0_id AS ref FROM read_parquet({pair_files})
                UNION ALL
                SELECT pair_id, prompt_id, prompt, image_1_id FROM read_parquet({pair_files})),
            refs AS (SELECT ref_id, min(image_id) AS image_id FROM {_source(lake, 'image_refs', 'ref_id, image_id')}
                     GROUP BY ref_id),
            stored AS (SELECT image_id, min(filename) AS file FROM {_source(lake, 'images', 'image_id, filename')}
                       GROUP BY image_id)
            SELECT s.pair_id, s.prompt_id, s.prompt, st.image_id, st.file FROM sides s
            LEFT JOIN refs ON refs.ref_id = s.ref
            LEFT JOIN stored st ON st.image_id = coalesce(refs.image_id, s.ref)""")
        con.sql(f"""
            CREATE TEMP TABLE needed AS
            SELECT r.image_id, {key[0]} AS prompt_id, {key[1]} AS prompt, min(r.file) AS file
            FROM resolved r ANTI JOIN (SELECT pair_id FROM resolved WHERE image_id IS NULL) USING (pair_id)
            GROUP BY 1, 2""")
        n_pairs, n_skipped = con.sql("SELECT count(DISTINCT pair_id), count(DISTINCT pair_id) "
                                     "FILTER (WHERE image_id IS NULL) FROM resolved").fetchall()[0]
        done_files = lake.glob_parquet(f"scores/{scorer.name}")
        done = (f"(SELECT DISTINCT image_id, prompt_id FROM read_parquet({lake.sql_file_list(done_files)}) "
                f"WHERE scorer = {sql_str(scorer.name)} AND scorer_version = {sql_str(scorer.version)})"
                if done_files else "(SELECT NULL::VARCHAR AS image_id, NULL::VARCHAR AS prompt_id WHERE false)")
        n_needed = con.sql("SELECT count(*) FROM needed").fetchall()[0][0]
        items = con.sql(f"SELECT n.image_id, n.prompt_id, n.prompt, n.file FROM needed n "
                        f"ANTI JOIN {done} d USING (image_id, prompt_id) "
                        f"ORDER BY n.file, n.image_id, n.prompt_id").to_arrow_table()
    finally:
        con.close()
    items = items.cast(WORK_SCHEMA)
    return WorkPlan(scorer.name, scorer.version, items, int(n_pairs), int(n_skipped), int(n_needed),
                    int(n_needed) - items.num_rows)
