"""The curate stage: lake pairs + scores -> votes, consensus, pair metrics and annotator statistics.

A run is a full recompute, written as one folder per run:

    LAKE/curation/<run_id>/votes.parquet         (pair_id, scorer, score_0, score_1, margin, vote, normalized_margin)
    LAKE/curation/<run_id>/consensus.parquet     (pair_id, n_scorers, votes_for_0, vote_fraction, consensus_label, ...)
    LAKE/curation/<run_id>/pair_metrics.parquet  (pair_id, consensus_label, vote_fraction, confidence, stability,
                                                  minority_score, weight, margin, ...)
    LAKE/curation/<run_id>/annotators.parquet    (user_id, n_labels, tie_rate, left_rate, consensus_agreement,
                                                  minority_rate, reliability, ...)
    LAKE/curation/CURRENT.json                   {"run_id", "inputs", "config", "counts"}

The stage runs out of core: DuckDB (memory-limited, spilling under the lake's `_staging/`) resolves
the pairs' images and looks up their scores, and streams the pairs in chunks of `CHUNK_PAIRS`. A
first pass takes each scorer's margin spread (one DuckDB aggregate, `curation.labels.votes.rms_spreads`); the
second computes each chunk's votes, consensus and pair metrics as column-wise sums over its wide score
columns (`prefcurate.curation.labels.votes.WideVotes`) and appends them to the run's files, staging on disk the compact
rows that the joint label model and the annotator statistics read at the end, over all pairs, one
after the other. Memory is therefore DuckDB's limit plus one chunk's arrays in the loop, and each
whole-lake phase's own arrays after it (BENCHMARKS.md).

The run folder is complete before CURRENT.json is (atomically) replaced, so readers see the old run
or the new one, never a mix. run_id hashes the inputs (committed ingests, score files) and the
configuration: rerunning with nothing new is a no-op, and after new pairs are ingested one
`prefcurate curate` makes every statistic right again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefcurate.curation.labels.annotators import (
    AnnotatorStatsConfig, annotator_rows, annotator_stats, annotator_table,
)
from prefcurate.curation.labels.consensus import TiePolicy, consensus, consensus_from_counts
from prefcurate.curation.store.lake import STAGING, Lake
from prefcurate.curation.labels.pair_metrics import PairMetricsConfig, pair_metrics, pair_metrics_from_sums, wide_sums
from prefcurate.curation.labels.reliability import LabelModelConfig, label_model
from prefcurate.curation.labels.votes import (
    VOTES_SCHEMA, WideVotes, compute_votes, create_score_tables, rms_spreads, score_lookup_sql,
)
from prefcurate.data_schemas.vocab import SCORER_TRAITS


CURRENT = "curation/CURRENT.json"
RUNS_KEPT = 3  # older run folders are deleted; a snapshot copies what it needs, so nothing depends on them
CHUNK_PAIRS = 122_880
"""Pairs per chunk of the curate pass: DuckDB's Arrow reader yields at most its row group size (122,880
rows) a batch, so a larger value changes nothing. A chunk's arrays and frames (wide scores, up to 5 votes
a pair, consensus, pair metrics) take roughly 1 KB a pair at 5 scorers, ~0.12 GB."""
DUCKDB_MEMORY_LIMIT = "2.5GB"
"""DuckDB's memory cap during curate (score lookup hash tables, image resolution, the sort by pair_id);
beyond it DuckDB spills to the run's staging folder instead of growing. The connection is closed before
the whole-lake phases, so this is the lookup's and chunk loop's budget alone. Measured at 10M pairs (a
generated lake, 2M images, 5 scorers; load ~9 on 2 cores): "1GB" ran out of memory in the sorted
materialisation, "2GB" took 45 s of CPU there (peak RSS 2.25 GB), "2.5GB" 36.5 s (2.6 GB)."""
PAIR_COLUMNS = ["pair_id", "image_0_id", "image_1_id", "label_0", "user_id", "images_available"]
"""The pair columns the chunk loop reads (with the scores): what the tables and the later phases use."""


@dataclass(frozen=True)
class CurateConfig:
    scorers: tuple[str, ...] | None = None
    """Scorers that vote; None = every scorer with scores in the lake."""
    tie_policy: TiePolicy = "drop"
    """Split scorer votes give no consensus label: BalancedDPO's scorer-only majority (arXiv 2503.12575),
    whose text states no tie rule; the human never votes, so agreement with it is not circular."""
    pair_metrics: PairMetricsConfig = field(default_factory=PairMetricsConfig)
    annotators: AnnotatorStatsConfig = field(default_factory=AnnotatorStatsConfig)
    label_model: LabelModelConfig = field(default_factory=LabelModelConfig)
    """Joint Dawid-Skene over annotators and scorers: label posteriors, calibrated consensus, scorer_reliability."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.scorers or ()) - set(SCORER_TRAITS))
        if unknown:
            raise ValueError(f"unknown scorer(s) {unknown}; scorers: {', '.join(sorted(SCORER_TRAITS))}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CurateResult:
    run_id: str
    reused: bool
    counts: dict
    seconds: float

    def line(self) -> str:
        c = self.counts
        head = "nothing new, kept curation run" if self.reused else "curation run"
        agreement = ("no scorer votes yet (run `prefcurate score`)" if c["human_agreement"] is None else
                     f"human agrees with consensus on {c['human_agreement']:.1%} of decisive pairs")
        return (f"{head} {self.run_id}: {c['pairs']} pairs ({c['pairs_with_votes']} with scorer votes, "
                f"{c['scorers']} scorers), {c['annotators']} annotators, {agreement}, {c['minority_pairs']} "
                f"minority pairs (u > {c['minority_threshold']})")


def stored_images_sql(lake: Lake, files: dict[str, list[str]]) -> str:
    """DuckDB SQL of the distinct image_id of the images with bytes (`files`: lake.files() of images)."""
    return (f"SELECT DISTINCT image_id FROM read_parquet({lake.sql_file_list(files['images'])})" if files["images"]
            else "SELECT NULL::VARCHAR AS image_id WHERE false")


def resolved_pairs_sql(lake: Lake, files: dict[str, list[str]], extra_columns: tuple[str, ...] = (),
                       availability: bool = True) -> str:
    """DuckDB SQL of every pair (PAIR_COLUMNS + extra_columns) with its image ids resolved: metadata-only
    ids ('<source>:<uid>') become content hashes when the images have arrived (image_refs);
    `images_available` says whether both have bytes (`availability`; False: no such column, the curate pass
    finds it with the prompt-free scores, `create_score_tables`). `files`: lake.files() of pairs (non-empty),
    image_refs and images."""
    refs = (f"SELECT ref_id, min(image_id) AS image_id FROM read_parquet({lake.sql_file_list(files['image_refs'])}) "
            f"GROUP BY ref_id" if files["image_refs"] else
            "SELECT NULL::VARCHAR AS ref_id, NULL::VARCHAR AS image_id WHERE false")
    available = ("(s0.image_id IS NOT NULL AND s1.image_id IS NOT NULL) AS images_available" if availability else
                 "")
    joins = ("LEFT JOIN s s0 ON s0.image_id = coalesce(r0.image_id, p.image_0_id) "
             "LEFT JOIN s s1 ON s1.image_id = coalesce(r1.image_id, p.image_1_id)" if availability else "")
    return f"""
        WITH p AS (SELECT * FROM read_parquet({lake.sql_file_list(files['pairs'])})),
             r AS ({refs}){f", s AS ({stored_images_sql(lake, files)})" if availability else ""}
        SELECT p.pair_id, p.source, p.prompt_id,
               coalesce(r0.image_id, p.image_0_id) AS image_0_id,
               coalesce(r1.image_id, p.image_1_id) AS image_1_id,
               p.label_0, p.user_id{"".join(f", p.{c}" for c in extra_columns)}{", " if available else ""}{available}
        FROM p
        LEFT JOIN r r0 ON r0.ref_id = p.image_0_id
        LEFT JOIN r r1 ON r1.ref_id = p.image_1_id
        {joins}"""


def load_pairs(lake: Lake, extra_columns: tuple[str, ...] = ()) -> pl.DataFrame:
    """Every pair with its image ids resolved (`resolved_pairs_sql`), in memory.
    `extra_columns` (of the pairs table, e.g. prompt and split) come along from the same scan."""
    import duckdb

    files = {t: lake.files(t) for t in ("pairs", "image_refs", "images")}
    if not files["pairs"]:
        return pl.DataFrame(schema={"pair_id": pl.String, "source": pl.String, "prompt_id": pl.String,
                                    "image_0_id": pl.String, "image_1_id": pl.String, "label_0": pl.Float64,
                                    "user_id": pl.String, "images_available": pl.Boolean,
                                    **{c: pl.String for c in extra_columns}})
    con = duckdb.connect()
    try:
        return con.sql(resolved_pairs_sql(lake, files, extra_columns)).pl()
    finally:
        con.close()


def load_scores(lake: Lake, scorers: tuple[str, ...] | None) -> pl.DataFrame:
    files = lake.files("scores")
    if scorers is not None:
        files = [f for f in files if f.split("/")[-2] in scorers]
    if not files:
        return pl.DataFrame(schema={"image_id": pl.String, "prompt_id": pl.String, "scorer": pl.String,
                                    "score": pl.Float64})
    return pl.scan_parquet(files).select("image_id", "prompt_id", "scorer", "score").collect()


def input_versions(lake: Lake) -> dict:
    """What a curation run depends on: the committed ingests and the score files (names carry their
    transaction ids, and files are never rewritten)."""
    ingests = sorted(lake.read("ingests", columns=["ingest_id"]).column(0).to_pylist())
    score_files = sorted(f.rsplit("/", 2)[-2] + "/" + f.rsplit("/", 1)[-1] for f in lake.files("scores"))
    return {"ingests": ingests, "score_files": score_files}


def current_run(lake: Lake) -> dict | None:
    path = lake.join(CURRENT)
    return json.loads(lake.fs.cat_file(path)) if lake.fs.exists(path) else None


def curate(lake: Lake, config: CurateConfig = CurateConfig(), *, chunk_pairs: int = CHUNK_PAIRS,
           duckdb_threads: int | None = None) -> CurateResult:
    """Recompute votes, consensus, pair metrics and annotator statistics, unless nothing changed.
    `duckdb_threads`: DuckDB's worker threads (None: one per core); the tables do not depend on it."""
    import duckdb

    started = time.perf_counter()
    if chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be >= 1, got {chunk_pairs}")
    if config.pair_metrics.margin_offset == "dataset_mean":
        chunk_pairs = 2**62  # a dataset-wide mean inside pair_metrics: one chunk (in memory)
    inputs = input_versions(lake)
    run_id = hashlib.blake2b(json.dumps({"inputs": inputs, "config": config.as_dict()}, sort_keys=True,
                                        default=str).encode(), digest_size=10).hexdigest()
    previous = current_run(lake)
    if previous is not None and previous["run_id"] == run_id:
        return CurateResult(run_id, True, previous["counts"], time.perf_counter() - started)

    files = {t: lake.files(t) for t in ("pairs", "image_refs", "images", "scores")}
    if config.scorers is not None:
        files["scores"] = [f for f in files["scores"] if f.split("/")[-2] in config.scorers]
    with lake.writing():
        scratch = (lake.join(STAGING, f"curate-{run_id}-{uuid.uuid4().hex[:8]}") if lake.is_local
                   else tempfile.mkdtemp(prefix="prefcurate-curate-"))
        os.makedirs(scratch, exist_ok=True)
        con = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY_LIMIT, "temp_directory": f"{scratch}/spill",
                                     **({"threads": int(duckdb_threads)} if duckdb_threads else {})})
        try:
            scores_sql = ("SELECT image_id, prompt_id, scorer, score FROM "
                          f"read_parquet({lake.sql_file_list(files['scores'])})"
                          if files["scores"] else None)
            present = sorted(r[0] for r in con.sql(f"SELECT DISTINCT scorer FROM ({scores_sql})").fetchall()) \
                if scores_sql else []
            unknown = sorted(set(present) - set(SCORER_TRAITS))
            if unknown:
                raise ValueError(f"the scores table has scorer(s) {unknown} this prefcurate does not know")
            scorers = [s for s in (config.scorers or present) if s in present]
            counts = _curate_pass(lake, con, files, scores_sql, scorers, config, f"curation/{run_id}", scratch,
                                  chunk_pairs) if files["pairs"] else None
            if counts is None:  # no pairs: empty tables of the right schemas
                counts = _write_tables(lake, f"curation/{run_id}", compute_tables(
                    load_pairs(lake), pl.DataFrame(schema=SCORES_SCHEMA), [], config), config)
        finally:
            con.close()
            shutil.rmtree(scratch, ignore_errors=True)
        counts["scorers"] = len(scorers)
        record = {"run_id": run_id, "inputs": inputs, "config": config.as_dict(), "counts": counts,
                  "scorers": scorers}
        lake.atomic_write_bytes(lake.join(CURRENT), json.dumps(record, default=str).encode())
        _prune_runs(lake, keep=run_id)
    return CurateResult(run_id, False, counts, time.perf_counter() - started)


SCORES_SCHEMA = {"image_id": pl.String, "prompt_id": pl.String, "scorer": pl.String, "score": pl.Float64}


PhaseHook = Callable[[str], None]
phase_hook: PhaseHook | None = None
"""Called with the name of each phase of the curate pass as it starts ("lookup", "chunks",
"label_model", "annotators", "write") and with "end"; benchmarks/bench_curate.py measures peak
memory and time per phase with it. None (default): nothing is called."""


def _phase(name: str) -> None:
    if phase_hook is not None:
        phase_hook(name)


def _curate_pass(lake: Lake, con, files: dict, scores_sql: str | None, scorers: list[str], config: CurateConfig,
                 run_dir: str, scratch: str, chunk_pairs: int) -> dict | None:
    """The streaming computation of `curate` (module docstring); returns the run's counts (None, with
    nothing written, when the pairs files hold no row)."""
    traits = {s: SCORER_TRAITS[s][0] for s in scorers}
    prompt_free = [s for s in scorers if SCORER_TRAITS[s][1]]
    spreads: dict[str, float] = {}
    if scorers:
        _phase("lookup")
        # the prompt-free score table lists the stored images too: one join per side finds both (at 1M pairs
        # 0.1-0.2 s less CPU than a join for each)
        create_score_tables(con, scores_sql, scorers, prompt_free, stored_sql=stored_images_sql(lake, files))
        lookup = score_lookup_sql(resolved_pairs_sql(lake, files, availability=False), scorers, prompt_free,
                                  [c for c in PAIR_COLUMNS if c != "images_available"], stored=True)
        # The pairs with their scores, materialised once (DuckDB spills beyond its memory limit): the
        # spreads are an aggregate over it, then it is streamed in chunks. Sorted by pair_id (unique),
        # because the joins emit rows in an order that varies between runs, and every later step (the
        # float sums of the spreads, annotator statistics and label model; the files' row order) would
        # inherit it: the same lake must give byte-identical tables.
        con.execute(f"CREATE TEMP TABLE _wide AS {lookup} ORDER BY pair_id")
        spreads = rms_spreads(con, "SELECT * FROM _wide", traits, deterministic=True)
        query = "SELECT * FROM _wide"  # insertion order (DuckDB's preserve_insertion_order): by pair_id
    else:
        query = f"SELECT {', '.join(PAIR_COLUMNS)} FROM ({resolved_pairs_sql(lake, files)}) ORDER BY pair_id"
    run = _ChunkedRun(lake, run_dir, scratch, traits, spreads, config)
    _phase("chunks")
    try:
        for batch in con.sql(query).to_arrow_reader(chunk_pairs):
            if batch.num_rows:
                run.add(batch)
        con.close()  # DuckDB's buffers (up to DUCKDB_MEMORY_LIMIT) go before the whole-lake models start
        if not run.counts["pairs"]:
            run.abort()
            return None
        return run.finish()
    except BaseException:
        run.abort()
        raise


class _ChunkedRun:
    """The chunk loop's state: the run's Parquet sinks, the files staged on disk for the whole-lake phases
    (pair metrics to complete, the annotator table's rows, the label model's inputs) and the counts."""

    def __init__(self, lake: Lake, run_dir: str, scratch: str, traits: dict[str, bool], spreads: dict[str, float],
                 config: CurateConfig):
        self.lake, self.run_dir, self.scratch = lake, run_dir, scratch
        self.traits, self.spreads, self.config = traits, spreads, config
        self.sinks = {name: _ParquetSink(lake, f"{run_dir}/{name}.parquet") for name in ("votes", "consensus")}
        self.staged_metrics: list[str] = []  # pair_metrics chunks, completed by the label model at the end
        self.label_rows: list[str] = []  # the annotator table's compact rows, read after the label model
        self.model_files: dict[str, list[str]] = {"pairs": [], "votes": []}  # the label model's inputs
        self.counts = {"pairs": 0, "pairs_with_votes": 0, "minority_pairs": 0, "pairs_without_images": 0}
        self.agree, self.decided = 0, 0

    def _staged(self, kind: str, files: list[str]) -> str:
        files.append(f"{self.scratch}/{kind}-{len(files):05d}.arrow")
        return files[-1]

    def add(self, batch: pa.RecordBatch) -> None:
        """Votes, consensus and pair metrics of one chunk as column-wise sums over its wide score columns
        (M scorers x P pairs): no group-by or join on the 32-character pair ids."""
        config, counts = self.config, self.counts
        wide = WideVotes.from_arrow(batch, self.traits, self.spreads)
        pair_id = batch.column("pair_id").cast(pa.large_string())
        human = pl.from_arrow(batch.column("label_0")).cast(pl.Float64)  # NULL stays null (no label)
        agreed = consensus_from_counts(pl.DataFrame({"human_label": human, **wide.counts()}), config.tie_policy)
        label = human if config.pair_metrics.label_source == "human" else agreed["consensus_label"]
        metrics = pair_metrics_from_sums(pl.DataFrame({
            "human": human, "label": label,
            **wide_sums(wide.normalized_margin, wide.voted, config.pair_metrics)}), config.pair_metrics)
        metrics = pl.concat([metrics, agreed.select("consensus_label", "vote_fraction", "human_agrees")],
                            how="horizontal")
        self.sinks["votes"].write(wide.table(pair_id))
        self.sinks["consensus"].write(_with_pair_id(pair_id, agreed))
        _write_ipc(self._staged("pair_metrics", self.staged_metrics), _with_pair_id(pair_id, metrics))
        frame = pl.from_arrow(batch.select(["pair_id", "user_id", "label_0", "image_0_id", "image_1_id"]))
        ids = frame["pair_id"]
        annotator_rows(frame, agreed.with_columns(pair_id=ids), metrics.with_columns(pair_id=ids)).write_ipc(
            self._staged("annotator-rows", self.label_rows))
        self._stage_model_inputs(frame, wide)
        counts["pairs"] += batch.num_rows
        counts["pairs_with_votes"] += int((agreed["n_scorers"] > 0).sum())
        counts["minority_pairs"] += int((metrics["minority_score"] > config.annotators.minority_threshold).sum())
        counts["pairs_without_images"] += int(pc.sum(pc.invert(batch.column("images_available"))).as_py() or 0)
        judged = agreed.filter(pl.col("human_agrees").is_not_null() & (pl.col("n_scorers") > 0))["human_agrees"]
        self.agree, self.decided = self.agree + int(judged.sum()), self.decided + judged.len()

    def _stage_model_inputs(self, frame: pl.DataFrame, wide: WideVotes) -> None:
        """The joint label model gets integer surrogate pair ids (the global row number, which orders the
        pairs as their ids do: the pairs stream in pair_id order), hashed image ids and categorical scorer
        names: the same model at a fraction of the memory of the lake's strings. Staged on disk, it is read
        only when the model runs, after the chunk loop. Call before counting the chunk's pairs."""
        offset = self.counts["pairs"]
        row_id = pl.Series(np.arange(offset, offset + frame.height, dtype=np.int64))
        frame.select(pair_id=row_id, user_id="user_id", label_0="label_0",
                     image_0_id=pl.col("image_0_id").hash(),
                     image_1_id=pl.col("image_1_id").hash()).write_ipc(
            self._staged("model-pairs", self.model_files["pairs"]))
        decisive = wide.voted & (wide.vote != 0.5)  # (M, P); its True cells in row-major order: scorer by scorer
        scorer_of_row = np.repeat(np.arange(len(wide.names)), decisive.sum(axis=1))
        pl.DataFrame({
            "pair_id": np.broadcast_to(row_id.to_numpy(), decisive.shape)[decisive],
            "scorer": pl.Series(wide.names, dtype=pl.Categorical).gather(scorer_of_row),  # no string per vote
            "vote": wide.vote[decisive],
            "normalized_margin": wide.normalized_margin[decisive],
        }).write_ipc(self._staged("model-votes", self.model_files["votes"]))

    def finish(self) -> dict:
        """The whole-lake phases after the chunk loop (label model, annotator table), then the run's files;
        returns the run's counts."""
        config, lake, run_dir = self.config, self.lake, self.run_dir
        _phase("label_model")
        posterior, scorer_reliability, joint = label_model(pl.scan_ipc(self.model_files["pairs"]),
                                                           pl.scan_ipc(self.model_files["votes"]), config.label_model)
        _phase("annotators")
        rows = pl.scan_ipc(self.label_rows).collect()  # ~60 bytes a labelled pair, on disk until now
        annotators = annotator_table(rows, config.annotators, joint)
        del rows
        _phase("write")
        metrics_sink, offset = _ParquetSink(lake, f"{run_dir}/pair_metrics.parquet"), 0
        for path in self.staged_metrics:
            with pa.memory_map(path) as source:
                chunk = pl.from_arrow(pa.ipc.open_file(source).read_all())
            metrics_sink.write(pl.concat([chunk, posterior.slice(offset, chunk.height).drop("pair_id")],
                                         how="horizontal"))
            offset += chunk.height
            os.remove(path)
        self.sinks["pair_metrics"] = metrics_sink
        for sink in self.sinks.values():
            sink.close()
        lake.write_frame_atomic(f"{run_dir}/annotators.parquet", annotators)
        lake.write_frame_atomic(f"{run_dir}/scorer_reliability.parquet", scorer_reliability)
        _phase("end")
        self.counts.update(annotators=annotators.height,
                           human_agreement=self.agree / self.decided if self.decided else None,
                           minority_threshold=config.annotators.minority_threshold)
        return self.counts

    def abort(self) -> None:
        for sink in self.sinks.values():
            sink.abort()


class _ParquetSink:
    """One Parquet file of a curation run written a chunk at a time (row group per chunk), under a temporary
    name renamed into place by `close` (local lakes: synced first), so a reader never sees a part."""

    def __init__(self, lake: Lake, dest_rel: str):
        self.lake, self.dest = lake, lake.join(dest_rel)
        self.tmp = f"{self.dest}.tmp-{uuid.uuid4().hex}"
        self.writer: pq.ParquetWriter | None = None
        self.handle = None

    def write(self, frame: pl.DataFrame | pa.Table) -> None:
        table = frame if isinstance(frame, pa.Table) else _arrow(frame)
        if self.writer is None:
            self.lake.fs.makedirs(self.dest.rsplit("/", 1)[0], exist_ok=True)
            self.handle = self.lake.fs.open(self.tmp, "wb")
            self.writer = pq.ParquetWriter(self.handle, table.schema, compression="snappy")
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))  # every chunk, also empty ones

    def close(self) -> None:
        self.writer.close()
        if self.lake.is_local:
            self.handle.flush()
            os.fsync(self.handle.fileno())
        self.handle.close()
        self.lake.fs.mv(self.tmp, self.dest)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.handle.close()
            if self.lake.fs.exists(self.tmp):
                self.lake.fs.rm(self.tmp)


def _arrow(frame: pl.DataFrame) -> pa.Table:
    return frame.to_arrow(compat_level=pl.CompatLevel.oldest())  # large_string, as the readers expect


def _with_pair_id(pair_id: pa.Array, frame: pl.DataFrame) -> pa.Table:
    """`frame` (row-aligned with pair_id) as Arrow, with the chunk's pair ids as its first column."""
    table = _arrow(frame)
    return pa.Table.from_arrays([pair_id, *table.columns], names=["pair_id", *table.column_names])


def _write_ipc(path: str, table: pa.Table) -> None:
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _write_tables(lake: Lake, run_dir: str, tables: dict[str, pl.DataFrame], config: CurateConfig) -> dict:
    """Write in-memory curation tables (an empty lake) and return the run's counts."""
    for name, frame in tables.items():
        lake.write_frame_atomic(f"{run_dir}/{name}.parquet", frame)
    judged = tables["consensus"].filter(pl.col("human_agrees").is_not_null() & (pl.col("n_scorers") > 0))
    return {
        "pairs": tables["consensus"].height, "pairs_with_votes": int(tables["consensus"]["n_scorers"].gt(0).sum()),
        "annotators": tables["annotators"].height, "human_agreement": judged["human_agrees"].mean(),
        "minority_pairs": int((tables["pair_metrics"]["minority_score"] > config.annotators.minority_threshold).sum()),
        "minority_threshold": config.annotators.minority_threshold, "pairs_without_images": 0,
    }


def pair_tables(votes: pl.DataFrame, pairs: pl.DataFrame, scorers: list[str],
                config: CurateConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(consensus, pair_metrics with consensus_label, vote_fraction, human_agrees) of some pairs and
    their votes; per pair only, so the curate stage computes them a chunk at a time."""
    agreed = consensus(votes, pairs, scorers, config.tie_policy)
    metrics = pair_metrics(votes, pairs, config.pair_metrics, consensus=agreed)
    joined = ["consensus_label", "vote_fraction", "human_agrees"]
    if metrics["pair_id"].equals(agreed["pair_id"]):  # both in the order of pairs: side by side
        metrics = pl.concat([metrics, agreed.select(joined)], how="horizontal")
    else:
        metrics = metrics.join(agreed.select("pair_id", *joined), on="pair_id", how="left", maintain_order="left")
    return agreed, metrics


def compute_tables(pairs: pl.DataFrame, scores: pl.DataFrame, scorers: list[str],
                   config: CurateConfig) -> dict[str, pl.DataFrame]:
    """The curation tables from in-memory pairs and scores (no lake I/O; the same functions as `curate`)."""
    if scorers:
        votes = compute_votes(pairs, scores, {s: SCORER_TRAITS[s][0] for s in scorers},
                              prompt_free=[s for s in scorers if SCORER_TRAITS[s][1]])
    else:
        votes = pl.DataFrame(schema=VOTES_SCHEMA)
    agreed, metrics = pair_tables(votes, pairs, scorers, config)
    posterior, scorer_reliability, joint = label_model(pairs, votes, config.label_model)
    annotators = annotator_stats(pairs, agreed, metrics, config.annotators, joint)
    metrics = metrics.join(posterior, on="pair_id", how="left", maintain_order="left")
    return {"votes": votes, "consensus": agreed, "pair_metrics": metrics, "annotators": annotators,
            "scorer_reliability": scorer_reliability}


def _prune_runs(lake: Lake, keep: str) -> None:
    root = lake.join("curation")
    runs = [p for p in lake.fs.ls(root, detail=True) if p["type"] == "directory"]
    runs.sort(key=lambda p: p.get("mtime", 0) or p.get("created", 0), reverse=True)
    for run in runs[RUNS_KEPT:]:
        if not run["name"].rstrip("/").endswith(keep):
            lake.fs.rm(run["name"], recursive=True)
