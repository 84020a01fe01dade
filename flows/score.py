"""Prefect flow for the scoring stage: a plan task per scorer, then one task per shard of work, over
prefcurate.curation.scorers.runner.

Task runners (`run_score_flow(..., task_runner=...)`):
- "threads" (default): Prefect's ThreadPoolTaskRunner runs `parallel_shards` shard tasks at once in this
  process; they share one built scorer and one decode pool per process (`_cached`).
- "ray": prefect-ray's RayTaskRunner spreads shard tasks over a Ray cluster (`ray_address`, or a local one).
  Each Ray worker process builds a scorer once and keeps it for later shards; with a CUDA device each
  shard task reserves one GPU. Needs `pip install prefect-ray` (the `[ray]` extra).

Why shards do not conflict: a shard task holds the lake's writer lock only while it commits a batch of
rows (see curation.scorers.runner: commits wait for the lock, threads of one process also queue on a process-wide
lock), never while it scores, so parallel shards serialise only their millisecond commits and recovery by
one commit never meets another shard's staged files. Shards of one plan are disjoint, so they add no
duplicate rows. A failed shard is not retried in place (the rows it already committed would be scored
again); rerunning the flow plans again and scores only what is still missing.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import asdict

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from prefcurate.curation.store.lake import Lake
from prefcurate.curation.scorers.plan import plan_work
from prefcurate.curation.scorers.runner import ScorerSummary, ScoringConfig, load_scorers, score_shard
from prefcurate.curation.scorers.worker import make_pool


_CACHE: dict = {}  # per process: built scorers and the decode pool, reused by later tasks
_CACHE_LOCK = threading.Lock()


def _cached(key: tuple, build):
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def _scorer(name: str, weights_dir: str | None, device: str, batch_size: int, options: dict | None):
    key = ("scorer", name, weights_dir, device, batch_size, repr(sorted((options or {}).items())))
    return _cached(key, lambda: load_scorers([name], weights_dir, device, batch_size, {name: options or {}})[0])


@task(task_run_name="plan {scorer_name}", cache_policy=NO_CACHE)
def plan_scorer(lake_root: str, scorer_name: str, weights_dir: str | None, device: str, batch_size: int,
                options: dict | None, shard_size: int) -> dict:
    lake = Lake(lake_root)
    lake.recover()  # first, so a commit left half-applied by a crash is not scored again (waits for the lock)
    scorer = _scorer(scorer_name, weights_dir, device, batch_size, options)
    plan = plan_work(lake, scorer)
    get_run_logger().info("%s: %d to score (%d already scored); %s", scorer_name, plan.items.num_rows,
                          plan.n_done, plan.skipped_line())
    summary = ScorerSummary(scorer.name, scorer.version, plan.n_pairs, plan.n_pairs_skipped, plan.n_needed,
                            plan.n_done)
    return {"summary": asdict(summary), "shards": plan.shards(shard_size)}


@task(task_run_name="score {scorer_name} shard {index}", cache_policy=NO_CACHE)
def score_one_shard(lake_root: str, scorer_name: str, index: int, shard, weights_dir: str | None, device: str,
                    config: ScoringConfig, options: dict | None) -> dict:
    scorer = _scorer(scorer_name, weights_dir, device, config.batch_size, options)
    pool = _cached(("pool", config.workers, config.mp_context), lambda: make_pool(config.workers, config.mp_context))
    result = score_shard(Lake(lake_root), scorer, shard, config, pool)
    return asdict(result)


@flow(name="prefcurate-score", log_prints=True)
def score_flow(lake_root: str, scorers: list[str], weights_dir: str | None = None, device: str = "cpu",
               batch_size: int = 64, workers: int = 2, shard_size: int = 4096, commit_every: int = 8,
               scorer_options: dict[str, dict] | None = None) -> list[dict]:
    """Score every scorer's missing work; returns one summary dict per scorer (ScorerSummary fields plus
    images_per_s). Shards run on the flow's task runner: use `run_score_flow` to choose it."""
    _check_names(scorers)
    config = ScoringConfig(batch_size=batch_size, workers=workers, shard_size=shard_size, commit_every=commit_every)
    options = scorer_options or {}
    summaries = []
    for name in scorers:
        plan = plan_scorer(lake_root, name, weights_dir, device, batch_size, options.get(name), shard_size)
        summary = ScorerSummary(**plan["summary"])
        started = time.perf_counter()
        futures = []
        for index, shard in enumerate(plan["shards"]):
            with _gpu_request(device):
                futures.append(score_one_shard.submit(lake_root, name, index, shard, weights_dir, device, config,
                                                      options.get(name)))
        for future in futures:
            done = future.result()
            summary.n_scores += done["n_scores"]
            summary.n_images += done["n_images"]
            summary.n_undecodable += done["n_undecodable"]
        summary.seconds = time.perf_counter() - started
        print(summary.line())
        summaries.append(dict(asdict(summary), images_per_s=summary.images_per_s))
    return summaries


def _check_names(names: list[str]) -> None:
    """Refuse unknown scorer names before any task runs (building happens in the tasks)."""
    from prefcurate.curation.scorers import SCORERS

    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer(s) {', '.join(map(repr, unknown))}; "
                         f"valid names: {', '.join(sorted(SCORERS))}")


def _gpu_request(device: str):
    """Inside a Ray run on CUDA, each shard task reserves one GPU; otherwise nothing."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    try:
        from prefect_ray.context import remote_options
    except ImportError:
        return contextlib.nullcontext()
    return remote_options(num_gpus=1)


def make_task_runner(kind: str = "threads", parallel_shards: int = 2, ray_address: str | None = None):
    """"threads": ThreadPoolTaskRunner(parallel_shards); "ray": RayTaskRunner on `ray_address` (None: a local
    Ray started for the run)."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=parallel_shards)
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as err:
            raise ImportError("task_runner='ray' needs prefect-ray and ray: pip install prefect-ray "
                              "(or pip install 'prefcurate[ray]')") from err
        return RayTaskRunner(address=ray_address) if ray_address else RayTaskRunner()
    raise ValueError(f"unknown task_runner {kind!r}; expected 'threads' or 'ray'")


def run_score_flow(lake_root: str, scorers: list[str], *, task_runner: str = "threads", parallel_shards: int = 2,
                   ray_address: str | None = None, **kwargs) -> list[dict]:
    """score_flow on the chosen task runner; kwargs are score_flow's parameters."""
    runner = make_task_runner(task_runner, parallel_shards, ray_address)
    return score_flow.with_options(task_runner=runner)(lake_root, scorers, **kwargs)
