"""The curate stage: lake pairs + scores -> votes, consensus, pair metrics and annotator statistics.

A run is a full recompute (1M pairs take seconds: see BENCHMARKS.md), written as one folder per run:

    LAKE/curation/<run_id>/votes.parquet         (pair_id, scorer, score_0, score_1, margin, vote, normalized_margin)
    LAKE/curation/<run_id>/consensus.parquet     (pair_id, n_scorers, votes_for_0, vote_fraction, consensus_label, ...)
    LAKE/curation/<run_id>/pair_metrics.parquet  (pair_id, consensus_label, vote_fraction, confidence, stability,
                                                  minority_score, weight, margin, ...)
    LAKE/curation/<run_id>/annotators.parquet    (user_id, n_labels, tie_rate, left_rate, consensus_agreement,
                                                  minority_rate, reliability, ...)
    LAKE/curation/CURRENT.json                   {"run_id", "inputs", "config", "counts"}

The run folder is complete before CURRENT.json is (atomically) replaced, so readers see the old run
or the new one, never a mix. run_id hashes the inputs (committed ingests, score files) and the
configuration: rerunning with nothing new is a no-op, and after new pairs are ingested one
`prefcurate curate` makes every statistic right again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field

import polars as pl

from curation.annotators import AnnotatorStatsConfig, annotator_stats
from curation.consensus import TiePolicy, consensus
from curation.lake import Lake
from curation.pair_metrics import PairMetricsConfig, pair_metrics
from curation.reliability import LabelModelConfig, label_reliability
from curation.votes import compute_votes


# name -> (higher_is_better, prompt_free) of every registered scorer, kept here so the curate stage
# needs no torch import; tests/test_curate.py checks it against the scorer classes themselves.
SCORER_TRAITS: dict[str, tuple[bool, bool]] = {
    "sharpness": (True, True), "colourfulness": (True, True), "exposure": (True, True),
    "prompt_colour": (True, False), "pickscore": (True, False), "hpsv2": (True, False),
    "hpsv2.1": (True, False), "clip": (True, False), "aesthetic": (True, True), "imagereward": (True, False),
}
CURRENT = "curation/CURRENT.json"
RUNS_KEPT = 3  # older run folders are deleted; a snapshot copies what it needs, so nothing depends on them


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


def load_pairs(lake: Lake, extra_columns: tuple[str, ...] = ()) -> pl.DataFrame:
    """Every pair with its image ids resolved: metadata-only ids ('<source>:<uid>') become content
    hashes when the images have arrived (image_refs); `images_available` says whether both have bytes.
    `extra_columns` (of the pairs table, e.g. prompt and split) come along from the same scan."""
    import duckdb

    con = duckdb.connect()
    try:
        files = {t: lake.files(t) for t in ("pairs", "image_refs", "images")}
        if not files["pairs"]:
            return pl.DataFrame(schema={"pair_id": pl.String, "source": pl.String, "prompt_id": pl.String,
                                        "image_0_id": pl.String, "image_1_id": pl.String, "label_0": pl.Float64,
                                        "user_id": pl.String, "images_available": pl.Boolean,
                                        **{c: pl.String for c in extra_columns}})
        refs = (f"SELECT ref_id, min(image_id) AS image_id FROM read_parquet({lake.sql_file_list(files['image_refs'])}) "
                f"GROUP BY ref_id" if files["image_refs"] else
                "SELECT NULL::VARCHAR AS ref_id, NULL::VARCHAR AS image_id WHERE false")
        stored = (f"SELECT DISTINCT image_id FROM read_parquet({lake.sql_file_list(files['images'])})" if files["images"] else
                  "SELECT NULL::VARCHAR AS image_id WHERE false")
        return con.sql(f"""
            WITH p AS (SELECT * FROM read_parquet({lake.sql_file_list(files['pairs'])})),
                 r AS ({refs}), s AS ({stored})
            SELECT p.pair_id, p.source, p.prompt_id,
                   coalesce(r0.image_id, p.image_0_id) AS image_0_id,
                   coalesce(r1.image_id, p.image_1_id) AS image_1_id,
                   p.label_0, p.user_id,{"".join(f" p.{c}," for c in extra_columns)}
                   (s0.image_id IS NOT NULL AND s1.image_id IS NOT NULL) AS images_available
            FROM p
            LEFT JOIN r r0 ON r0.ref_id = p.image_0_id
            LEFT JOIN r r1 ON r1.ref_id = p.image_1_id
            LEFT JOIN s s0 ON s0.image_id = coalesce(r0.image_id, p.image_0_id)
            LEFT JOIN s s1 ON s1.image_id = coalesce(r1.image_id, p.image_1_id)""").pl()
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
    path = lake._join(CURRENT)
    return json.loads(lake.fs.cat_file(path)) if lake.fs.exists(path) else None


def curate(lake: Lake, config: CurateConfig = CurateConfig()) -> CurateResult:
    """Recompute votes, consensus, pair metrics and annotator statistics, unless nothing changed."""
    started = time.perf_counter()
    inputs = input_versions(lake)
    run_id = hashlib.blake2b(json.dumps({"inputs": inputs, "config": config.as_dict()}, sort_keys=True,
                                        default=str).encode(), digest_size=10).hexdigest()
    previous = current_run(lake)
    if previous is not None and previous["run_id"] == run_id:
        return CurateResult(run_id, True, previous["counts"], time.perf_counter() - started)

    pairs = load_pairs(lake)
    scores = load_scores(lake, config.scorers)
    present = sorted(set(scores["scorer"].unique().to_list()))
    unknown = sorted(set(present) - set(SCORER_TRAITS))
    if unknown:
        raise ValueError(f"the scores table has scorer(s) {unknown} this prefcurate does not know")
    scorers = [s for s in (config.scorers or present) if s in present]
    tables = compute_tables(pairs, scores, scorers, config)

    with lake.writing():
        for name, frame in tables.items():
            lake.write_frame_atomic(f"curation/{run_id}/{name}.parquet", frame)
        counts = {
            "pairs": pairs.height, "pairs_with_votes": int(tables["consensus"]["n_scorers"].gt(0).sum()),
            "scorers": len(scorers), "annotators": tables["annotators"].height,
            "human_agreement": tables["consensus"].filter(pl.col("human_agrees").is_not_null()
                                                          & (pl.col("n_scorers") > 0))["human_agrees"].mean(),
            "minority_pairs": int((tables["pair_metrics"]["minority_score"] >
                                   config.annotators.minority_threshold).sum()),
            "minority_threshold": config.annotators.minority_threshold,
            "pairs_without_images": int((~pairs["images_available"]).sum()),
        }
        record = {"run_id": run_id, "inputs": inputs, "config": config.as_dict(), "counts": counts,
                  "scorers": scorers}
        lake._atomic_write_bytes(lake._join(CURRENT), json.dumps(record, default=str).encode())
        _prune_runs(lake, keep=run_id)
    return CurateResult(run_id, False, counts, time.perf_counter() - started)


def compute_tables(pairs: pl.DataFrame, scores: pl.DataFrame, scorers: list[str],
                   config: CurateConfig) -> dict[str, pl.DataFrame]:
    """The curation tables from in-memory pairs and scores (no lake I/O: used by benchmarks)."""
    if scorers:
        votes = compute_votes(pairs, scores, {s: SCORER_TRAITS[s][0] for s in scorers},
                              prompt_free=[s for s in scorers if SCORER_TRAITS[s][1]])
    else:
        votes = pl.DataFrame(schema={"pair_id": pl.String, "scorer": pl.String, "score_0": pl.Float64,
                                     "score_1": pl.Float64, "margin": pl.Float64, "vote": pl.Float64,
                                     "normalized_margin": pl.Float64})
    agreed = consensus(votes, pairs, scorers, config.tie_policy)
    metrics = pair_metrics(votes, pairs, config.pair_metrics, consensus=agreed)
    metrics = metrics.join(agreed.select("pair_id", "consensus_label", "vote_fraction", "human_agrees"),
                           on="pair_id", how="left", maintain_order="left")
    annotators = annotator_stats(pairs, agreed, metrics, config.annotators)
    posterior, scorer_reliability = label_reliability(pairs, votes, config.label_model)
    metrics = metrics.join(posterior, on="pair_id", how="left", maintain_order="left")
    return {"votes": votes, "consensus": agreed, "pair_metrics": metrics, "annotators": annotators,
            "scorer_reliability": scorer_reliability}


def _prune_runs(lake: Lake, keep: str) -> None:
    root = lake._join("curation")
    runs = [p for p in lake.fs.ls(root, detail=True) if p["type"] == "directory"]
    runs.sort(key=lambda p: p.get("mtime", 0) or p.get("created", 0), reverse=True)
    for run in runs[RUNS_KEPT:]:
        if not run["name"].rstrip("/").endswith(keep):
            lake.fs.rm(run["name"], recursive=True)
