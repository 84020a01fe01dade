"""The scoring stage: every image the pairs table needs, scored once per (scorer version, image, prompt).

Three concerns, three modules:
1. planning (curation/scorers/plan.py): `plan_work` lists the (image, prompt) work the pairs need, minus what
   `scores` holds for the same scorer AND scorer_version; `WorkPlan.shards` cuts it between images;
2. the worker side (curation/scorers/worker.py): `make_pool` starts the decode/preprocess processes, which get
   the picklable `image_transform`, or the weight-free pixel scorer, never a model;
3. running (this module): `score_shard` reads only the needed rows of the images table (the Parquet files the
   plan names, with an IN filter on image_id that DuckDB applies inside the scan), feeds the workers, runs the
   scorer's batched inference path, and writes `scores/<scorer>/` in lake transactions of `commit_every`
   batches: a crash loses at most the batches since the last commit. `run_scoring` does it all in-process.

Concurrency and crash safety. Each commit is one `Lake.transaction` (the lake's writer lock, waiting up to
`lock_timeout_s` for another writer, then one transaction), and only then: scoring itself holds no lock and
leaves nothing staged. So shards scored in parallel (threads of one process, or processes) serialise only
their short commits, and an ingest is never kept waiting for a whole scoring run. Under the lock, each commit
first drops the rows that the scores table already holds for the same (image, prompt, scorer, version):
another `score` run planned at the same moment may have committed them since our plan, and two runs at once
must never store a key twice (`Lake.committed_keys` reads only the score files that appeared since its last
look). `run_scoring` (and the flow) call `Lake.recover` before planning (waiting for the lock like a commit),
so a transaction committed just before a crash is rolled forward before the plan is computed: it is never
scored twice.

Failures are never silent. An image that does not decode, or whose header claims more pixels than
`max_image_pixels` (a decompression bomb, refused before any decode), and a scorer output that is NaN
are stored as NaN (so the image is not retried by the same scorer version) and counted by reason in
`ShardResult.failures` and the summary line. Child processes (the decode workers) die with the process
that started them, even after `kill -9` (prefcurate.curation.scorers.child_guard).
"""
from __future__ import annotations

import inspect
import time
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import torch

from prefcurate.curation.store.lake import DEFAULT_WAIT_S, Lake
from prefcurate.curation.scorers import SCORERS, NeuralScorer, Scorer, build_scorer
from prefcurate.curation.scorers.plan import plan_work, sql_str
from prefcurate.curation.scorers.worker import MAX_IMAGE_PIXELS, _prepare, _ready, make_pool


@dataclass
class ScoringConfig:
    batch_size: int = 64            # images per preprocessing job and per model call (GPU: as large as fits)
    workers: int = 2                # decode + preprocess processes; 0 = in the calling process (tests, tiny runs)
    shard_size: int = 4096          # work items per shard (one flow task each); shards never split an image
    commit_every: int = 8           # batches per lake transaction: what a crash can lose, vs. files per run
    mp_context: str = "forkserver"  # workers fork from a clean server process, never from a parent that
                                    # runs threads (Prefect, Ray, CUDA), which plain fork does not survive
    lock_timeout_s: float = DEFAULT_WAIT_S  # how long a commit waits for another writer (an ingest) to finish
    max_image_pixels: int = MAX_IMAGE_PIXELS  # images claiming more are not decoded (failure image_too_large)


@dataclass
class ShardResult:
    n_scores: int = 0
    n_images: int = 0
    n_undecodable: int = 0  # images with a failure (any FAILURES reason): stored with NaN scores (votes skip NaN)
    n_commits: int = 0
    n_dropped: int = 0      # rows another run committed first (same key): not written again
    failures: dict = field(default_factory=dict)  # FAILURES reason -> images (nan_score: scores)


@dataclass
class ScorerSummary:
    name: str
    version: str
    n_pairs: int
    n_pairs_skipped: int
    n_needed: int
    n_done_before: int
    n_scores: int = 0      # rows written by this run
    n_images: int = 0      # distinct images decoded and scored by this run
    n_undecodable: int = 0  # of those, images with a failure (NaN scores, not retried)
    seconds: float = 0.0   # wall time of the scoring (planning excluded)
    failures: dict = field(default_factory=dict)  # FAILURES reason -> count

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.name}: {self.n_scores} scores of {self.n_images} images in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s); {self.n_done_before} of {self.n_needed} already scored; "
                f"{self.n_pairs_skipped} pairs skipped: images not in the lake yet" + self._failure_text())

    def _failure_text(self) -> str:
        if self.failures:
            return "; failures stored as NaN: " + ", ".join(f"{n} {r}" for r, n in sorted(self.failures.items()))
        return f"; {self.n_undecodable} images undecodable (NaN scores)" if self.n_undecodable else ""


@dataclass
class ScoringResult:
    scorers: list[ScorerSummary] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [s.line() for s in self.scorers]


# ---- running -----------------------------------------------------------------------------------------------

def _image_batches(lake: Lake, shard: pa.Table, batch_rows: int):
    """(image_ids, blobs) batches of the shard's images: only the files the plan names, only the rows the
    IN filter passes (DuckDB reads the bytes column only where the image_id filter holds)."""
    ids = sorted(set(shard.column("image_id").to_pylist()))
    files = sorted(set(shard.column("file").to_pylist()))
    if not ids:
        return
    con = duckdb.connect(":memory:")
    try:
        listing = "[" + ", ".join(sql_str(f) for f in files) + "]"
        relation = con.sql(f"SELECT image_id, bytes FROM read_parquet({listing}) "
                           f"WHERE image_id IN ({', '.join(sql_str(i) for i in ids)})")
        seen: set[str] = set()
        ids_out, blobs_out = [], []
        for batch in relation.to_arrow_reader(batch_rows):  # DuckDB's batch sizes vary: re-cut to batch_rows
            for image_id, data in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if image_id in seen:
                    continue
                seen.add(image_id)
                ids_out.append(image_id)
                blobs_out.append(data)
                if len(ids_out) == batch_rows:
                    yield ids_out, blobs_out
                    ids_out, blobs_out = [], []
        if ids_out:
            yield ids_out, blobs_out
    finally:
        con.close()


def _ordered(pool: ProcessPoolExecutor | None, jobs, depth: int):
    """(meta, _prepare(job)) in job order; with a pool, up to `depth` jobs run ahead of the consumer."""
    if pool is None:
        for meta, job in jobs:
            yield meta, _prepare(job)
        return
    pending: deque = deque()
    for meta, job in jobs:
        pending.append((meta, pool.submit(_prepare, job)))
        if len(pending) >= depth:
            head_meta, future = pending.popleft()
            yield head_meta, future.result()
    while pending:
        head_meta, future = pending.popleft()
        yield head_meta, future.result()


def commit_scores(lake: Lake, scorer_name: str, rows: pa.Table, timeout_s: float = DEFAULT_WAIT_S) -> int:
    """One lake transaction appending `rows` (SCORES columns) to scores/<scorer_name>/, under the writer lock
    (waiting up to `timeout_s` for another writer). Rows whose (image, prompt, scorer, version) the table
    already holds (another run committed them since our plan) are dropped; returns how many."""
    with lake.transaction(f"score-{uuid.uuid4().hex}", timeout_s) as tx:
        return tx.write("scores", rows, partition=scorer_name, skip_existing=True)


def score_shard(lake: Lake, scorer: Scorer, shard: pa.Table, config: ScoringConfig | None = None,
                pool: ProcessPoolExecutor | None = None, progress=None) -> ShardResult:
    """Score one shard of `plan_work` items and commit the rows every `config.commit_every` batches.
    `pool` from `make_pool` (None: decode in this process); `progress`: a tqdm-like bar, advanced per row."""
    config = config or ScoringConfig()
    neural = isinstance(scorer, NeuralScorer)
    fn = scorer.image_transform if neural else scorer
    prompts_of: dict[str, list[tuple[str, str | None]]] = {}
    columns = (shard.column(c).to_pylist() for c in ("image_id", "prompt_id", "prompt"))
    for image_id, prompt_id, prompt in zip(*columns):
        prompts_of.setdefault(image_id, []).append((prompt_id, prompt if scorer.uses_prompt else None))

    def jobs():
        for ids, blobs in _image_batches(lake, shard, config.batch_size):
            lists = [[p for _, p in prompts_of[i]] for i in ids]
            yield ids, (fn, neural, blobs, lists, config.max_image_pixels)

    result, pending = ShardResult(), []
    for ids, prepared in _ordered(pool, jobs(), depth=2 * max(1, config.workers) + 1):
        prepared, bad = prepared
        counts = [len(prompts_of[i]) for i in ids]
        keys = [k for i in ids for k in prompts_of[i]]
        failed = np.array([b is not None for b in bad])
        if neural:  # score the decodable images, each once per prompt it needs; NaN for the others
            scores = np.full(len(keys), np.nan)
            good_rows = np.repeat(~failed, counts)
            if prepared is not None:
                good_counts = [c for c, b in zip(counts, bad) if b is None]
                index = torch.from_numpy(np.repeat(np.arange(len(prepared)), good_counts))
                prompts = [p for (_, p), ok in zip(keys, good_rows) if ok] if scorer.uses_prompt else None
                scores[good_rows] = scorer.score_tensors(torch.from_numpy(prepared)[index], prompts)
        else:
            scores = prepared
        scores = np.asarray(scores, dtype=np.float64)
        n_nan = int(np.isnan(scores[np.repeat(~failed, counts)]).sum())  # NaN from the scorer itself
        for reason in [b for b in bad if b is not None] + ["nan_score"] * n_nan:
            result.failures[reason] = result.failures.get(reason, 0) + 1
        pending.append(pa.table({
            "image_id": pa.array(np.repeat(np.array(ids, dtype=object), counts).tolist(), pa.string()),
            "prompt_id": pa.array([k for k, _ in keys], pa.string()),
            "scorer": pa.array([scorer.name] * len(keys), pa.string()),
            "scorer_version": pa.array([scorer.version] * len(keys), pa.string()),
            "score": pa.array(scores),
        }))
        result.n_undecodable += int(failed.sum())
        result.n_images += len(ids)
        result.n_scores += len(keys)
        if progress is not None:
            progress.update(len(keys))
        if len(pending) >= config.commit_every:
            result.n_dropped += commit_scores(lake, scorer.name, pa.concat_tables(pending), config.lock_timeout_s)
            result.n_commits += 1
            pending = []
    if pending:
        result.n_dropped += commit_scores(lake, scorer.name, pa.concat_tables(pending), config.lock_timeout_s)
        result.n_commits += 1
    result.n_scores -= result.n_dropped
    return result


def load_scorers(names: list[str], weights_dir: str | Path | None, device: str, batch_size: int,
                 options: dict[str, dict] | None = None) -> list[Scorer]:
    """Build every named scorer before any work starts, so an unknown name or a missing checkpoint fails at
    once. `options[name]` holds extra build_scorer keywords (arch, checkpoint, ...)."""
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer(s) {', '.join(map(repr, unknown))}; "
                         f"valid names: {', '.join(sorted(SCORERS))}")
    if len(set(names)) != len(names):
        raise ValueError(f"scorer names repeat: {names}")
    scorers = []
    for name in names:
        kwargs = dict((options or {}).get(name, {}))
        if "batch_size" in inspect.signature(SCORERS[name]).parameters:
            kwargs.setdefault("batch_size", batch_size)
        scorers.append(build_scorer(name, weights_dir=weights_dir, device=device, **kwargs))
    return scorers


def run_scoring(lake: Lake, scorer_names: list[str], weights_dir: str | Path | None = None, device: str = "cpu",
                batch_size: int = 64, workers: int = 2, shard_size: int = 4096, *,
                scorer_options: dict[str, dict] | None = None, config: ScoringConfig | None = None,
                progress: bool = False) -> ScoringResult:
    """Plan and score everything missing for each scorer, in this process (the flow spreads shards instead).
    `config`, if given, replaces batch_size, workers and shard_size; `progress` shows a tqdm bar per scorer."""
    config = config or ScoringConfig(batch_size=batch_size, workers=workers, shard_size=shard_size)
    result = ScoringResult()
    pool = make_pool(config.workers, config.mp_context)
    try:
        warm = [pool.submit(_ready) for _ in range(config.workers)] if pool is not None else []  # workers start
        scorers = load_scorers(scorer_names, weights_dir, device, config.batch_size, scorer_options)  # meanwhile
        lake.recover(config.lock_timeout_s)  # a commit a crash left half-applied is rolled forward, not rescored
        for future in warm:  # throughput figures exclude the one-time worker start
            future.result()
        for scorer in scorers:
            plan = plan_work(lake, scorer)
            summary = ScorerSummary(scorer.name, scorer.version, plan.n_pairs, plan.n_pairs_skipped, plan.n_needed,
                                    plan.n_done)
            bar = _progress_bar(plan.items.num_rows, scorer.name) if progress else None
            started = time.perf_counter()
            for shard in plan.shards(config.shard_size):
                done = score_shard(lake, scorer, shard, config, pool, bar)
                summary.n_scores += done.n_scores
                summary.n_images += done.n_images
                summary.n_undecodable += done.n_undecodable
                for reason, n in done.failures.items():
                    summary.failures[reason] = summary.failures.get(reason, 0) + n
            summary.seconds = time.perf_counter() - started
            if bar is not None:
                bar.close()
            result.scorers.append(summary)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return result


def _progress_bar(total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="score", dynamic_ncols=True)
