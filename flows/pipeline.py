"""The whole pipeline as one Prefect flow: landing folder -> ingest -> score -> curate -> snapshot -> (gate)
-> training run, composed from the stage flows (flows/ingest.py, score.py, curate.py, train.py) as subflows.

A repeat run redoes nothing, and it is the stages that make it so (no Prefect result cache is involved, so
nothing can go stale):
- ingest: a file's transaction id hashes its sha256, source and format, so a file already ingested is a
  no-op (`already_ingested`); the landing folder is listed whole on every run and exactly the new files
  are ingested, whatever their names or times;
- score: each scorer plans only the (image, prompt) pairs its version has not scored;
- curate: the run id hashes the committed ingests, score files and config; unchanged inputs reuse it;
- snapshot: the id hashes the policy and the selected rows; the same selection is found, not rewritten.
Training starts only for a snapshot written by this run (not a reused one) that passes the gate, through
`run_deployment` with the snapshot id as idempotency key, so a retried or repeated run never starts a
second training run for the same snapshot.

Retries: ingest retries I/O errors per file (flows/ingest.py), curate once; starting the training run
retries API errors. Each run publishes a markdown summary and a table of the least reliable annotators as
Prefect artifacts (keys below), so the UI shows every run's history.
"""
from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field, is_dataclass

import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from prefcurate.curation.labels.curate import CurateConfig
from prefcurate.curation.ingest import quarantine_reasons
from prefcurate.curation.store.lake import Lake
from prefcurate.curation.snapshot import SnapshotPolicy
from prefcurate.curation.store.sql import query
from prefcurate.data_schemas.vocab import (
    DEFAULT_SNAPSHOT_POLICY, LANDING_PATTERNS, MINORITY_THRESHOLD, WEIGHT_FREE_SCORERS,
)
from prefcurate.flows.curate import curate_flow, snapshot_flow
from prefcurate.flows.ingest import ingest_flow
from prefcurate.flows.score import score_flow
from prefcurate.flows.stages import check_served
from prefcurate.flows.train import TRAIN_DEPLOYMENT, train_flow


PIPELINE_FLOW_NAME = "prefcurate-pipeline"
SUMMARY_KEY = "prefcurate-pipeline-summary"
ANNOTATORS_KEY = "prefcurate-least-reliable-annotators"
# The weight-free scorers: no checkpoint needed, so a pipeline with defaults runs anywhere.
PIXEL_SCORERS = WEIGHT_FREE_SCORERS
LEAST_RELIABLE = """
SELECT user_id, n_labels, round(reliability, 3) AS reliability, round(consensus_agreement, 3) AS agreement,
       round(left_rate, 3) AS left_rate, round(tie_rate, 3) AS tie_rate, round(minority_rate, 3) AS minority_rate
FROM annotators WHERE n_labels >= {min_labels} ORDER BY reliability, user_id LIMIT {limit}
"""


@dataclass(frozen=True)
class TrainGate:
    min_pairs: int = 1000
    """Fewer pairs than this are not worth a training run (Diffusion-DPO trained on 851k Pick-a-Pic pairs)."""
    max_minority_share: float | None = 0.5
    """Refuse a snapshot where more than this share of pairs has minority score u > `minority_threshold`:
    most labels contested means a broken scorer or a bad batch of annotations, not data to learn from."""
    minority_threshold: float = MINORITY_THRESHOLD
    """u above which a pair counts as minority (the curate stage's own threshold)."""

    def failures(self, n_pairs: int, minority_share: float) -> list[str]:
        """Why a snapshot of `n_pairs` with `minority_share` may not train; empty when it passes."""
        out = []
        if n_pairs < self.min_pairs:
            out.append(f"{n_pairs} pairs < min_pairs {self.min_pairs}")
        if self.max_minority_share is not None and minority_share > self.max_minority_share:
            out.append(f"minority share {minority_share:.3f} > max_minority_share {self.max_minority_share}")
        return out


@dataclass(frozen=True)
class TrainRequest:
    model: str
    """Local diffusers pipeline folder to fine-tune."""
    output_root: str
    """Each snapshot trains into output_root/<snapshot_id>, so runs never share an output folder."""
    loss: str = "dpo"
    options: tuple[str, ...] = ()
    """The trainer's own options, verbatim: e.g. ("--max-steps", "2000", "--lora-rank", "8")."""
    num_processes: int = 1
    """Training processes (accelerate launch when above 1): one per GPU of the machine that trains."""
    deployment: str | None = TRAIN_DEPLOYMENT
    """Start a run of this deployment (served by `prefcurate serve --train-model`) and return at once;
    None: train inside this pipeline run, as a subflow."""
    gate: TrainGate = field(default_factory=TrainGate)


def landing_files(landing: str, pattern: str) -> list[str]:
    """Every file in the landing folder matching `pattern`, sorted (the ingest order)."""
    if not os.path.isdir(landing):
        raise FileNotFoundError(f"landing folder {landing} does not exist")
    return sorted(p for p in glob.glob(os.path.join(os.path.abspath(landing), pattern)) if os.path.isfile(p))


@task(task_run_name="minority share of {path}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def minority_share(path: str, threshold: float) -> float:
    """Share of the snapshot's pairs with minority score above `threshold` (reads that one column)."""
    u = pq.read_table(os.path.join(path, "shards"), columns=["minority_score"]).column(0)
    return pc.mean(pc.greater(u, threshold).cast("float64")).as_py() if len(u) else 0.0


@task(task_run_name="start training on {snapshot_id}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def start_training_run(deployment: str, snapshot_id: str, parameters: dict) -> str:
    """Create a run of the training deployment and return its id without waiting (timeout=0). The
    idempotency key makes a retry or a repeated pipeline run get the same run back, not a second one."""
    run = run_deployment(deployment, parameters=parameters, timeout=0, idempotency_key=f"{deployment}:{snapshot_id}",
                         flow_run_name=f"train-{snapshot_id}")
    return str(run.id)


def _training(snapshot: dict, train: TrainRequest) -> dict:
    """Gate, then start (or run) training on a snapshot this run wrote."""
    if snapshot["reused"]:
        return {"started": False, "reasons": ["snapshot unchanged since an earlier run"]}
    share = minority_share(snapshot["path"], train.gate.minority_threshold)
    reasons = train.gate.failures(snapshot["counts"]["pairs"], share)
    if reasons:
        return {"started": False, "reasons": reasons, "minority_share": share}
    parameters = {"snapshot": snapshot["path"], "model": train.model, "loss": train.loss,
                  "output": os.path.join(train.output_root, snapshot["snapshot_id"]), "options": list(train.options),
                  "num_processes": train.num_processes}
    if train.deployment is None:
        result = train_flow(**parameters)
        return {"started": True, "minority_share": share, "output": result["output"],
                "final_loss": result["final_loss"]}
    run_id = start_training_run(train.deployment, snapshot["snapshot_id"], parameters)
    return {"started": True, "minority_share": share, "deployment": train.deployment, "flow_run_id": run_id,
            "output": parameters["output"]}


@flow(name=PIPELINE_FLOW_NAME, log_prints=True)
def pipeline_flow(lake: str, landing: str, fmt: str = "pickapic", pattern: str | None = None,
                  source: str | None = None, reader_options: dict | None = None,
                  scorers: list[str] | None = None, score_options: dict | None = None,
                  curate: CurateConfig | None = None, snapshot_name: str = "curated",
                  policy: SnapshotPolicy | None = None, train: TrainRequest | None = None) -> dict:
    """Ingest the landing folder's new files into `lake`, score, curate, write the `snapshot_name` snapshot
    of `policy` (default adaptive), and start training on it if `train` is given and its gate passes.
    `pattern`: the landing files to ingest, by default the format's (data_schemas.vocab.LANDING_PATTERNS).
    `source`, `reader_options`: as prefcurate.flows.ingest.ingest_flow (e.g. {"image_root": DIR}). `scorers`: default
    the pixel scorers; [] skips scoring. `score_options` go to prefcurate.flows.score.score_flow (weights_dir, device,
    batch_size, workers, shard_size)."""
    check_served(lake=lake, landing=landing)  # a run served for another lake fails here, before any write
    pattern = pattern or LANDING_PATTERNS[fmt]
    files = landing_files(landing, pattern)
    summary: dict = {"lake": lake, "landing": landing, "files": files}
    if not files and not Lake.exists(lake):
        summary["nothing_to_do"] = f"no files matching {pattern!r} in {landing} and no lake yet"
        print(summary["nothing_to_do"])
        create_markdown_artifact(key=SUMMARY_KEY, markdown=f"# prefcurate pipeline\n\n{summary['nothing_to_do']}\n",
                                 description="pipeline run summary")
        return summary
    summary["ingest"] = ingest_flow(lake, files, fmt, source, reader_options) if files else []
    scorers = list(PIXEL_SCORERS) if scorers is None else scorers
    summary["score"] = score_flow(lake, scorers, **(score_options or {})) if scorers else []
    summary["curate"] = curate_flow(lake, curate or CurateConfig())
    summary["snapshot"] = snapshot_flow(lake, snapshot_name, policy or SnapshotPolicy(kind=DEFAULT_SNAPSHOT_POLICY))
    summary["training"] = _training(summary["snapshot"], train) if train is not None else None
    publish_artifacts(lake, summary)
    errors = [r for r in summary["ingest"] if "error" in r]
    if errors:  # the rest is done and published; failing the run makes the bad files visible in the UI
        raise RuntimeError(f"{len(errors)} landing file(s) could not be ingested: "
                           + "; ".join(r["error"] for r in errors))
    return summary


@task(task_run_name="publish artifacts", cache_policy=NO_CACHE)
def publish_artifacts(lake_root: str, summary: dict, annotators_min_labels: int = 10,
                      annotators_limit: int = 20) -> None:
    lake = Lake(lake_root)
    create_markdown_artifact(key=SUMMARY_KEY, markdown=summary_markdown(summary, quarantine_reasons(lake)),
                             description="pipeline run summary")
    rows = query(lake, LEAST_RELIABLE.format(min_labels=int(annotators_min_labels),
                                             limit=int(annotators_limit))).to_pylist()
    create_table_artifact(key=ANNOTATORS_KEY, table=rows,
                          description=f"least reliable annotators with at least {annotators_min_labels} labels")
    get_run_logger().info("published %s and %s (%d annotators)", SUMMARY_KEY, ANNOTATORS_KEY, len(rows))


def summary_markdown(summary: dict, reasons: dict[str, int]) -> str:
    """The run summary as markdown: ingest counts per file, quarantine reasons, scoring, curation, snapshot."""
    lines = ["# prefcurate pipeline run", "", f"lake `{summary['lake']}`, landing `{summary['landing']}`", "",
             "## Ingest", "", "| file | status | read | accepted | duplicates | quarantined |",
             "|---|---|---|---|---|---|"]
    for r in summary["ingest"]:
        name = os.path.basename(r["source_file"])
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | |")
        else:
            status = "already ingested" if r["already_ingested"] else "new"
            lines.append(f"| {name} | {status} | {r['n_read']} | {r['n_accepted']} | {r['n_duplicates']} "
                         f"| {r['n_quarantined']} |")
    new = sum(1 for r in summary["ingest"] if "error" not in r and not r["already_ingested"])
    lines += ["", f"{new} new file(s) of {len(summary['ingest'])}.", "",
              "Quarantine reasons (whole lake): " + (", ".join(f"{k} {v}" for k, v in reasons.items()) or "none"),
              "", "## Scoring", ""]
    lines += [f"- {s['name']}: {s['n_scores']} new scores ({s['n_done_before']} already scored)"
              for s in summary["score"]]
    c = summary["curate"]["counts"]
    agreement = "no scorer votes" if c["human_agreement"] is None else f"{c['human_agreement']:.1%}"
    snap, snap_counts = summary["snapshot"], summary["snapshot"]["counts"]
    lines += ["", "## Curation", "", summary["curate"]["line"], "",
              f"Consensus agreement (human label = scorer consensus, decisive pairs): **{agreement}**; "
              f"{c['minority_pairs']} minority pairs of {c['pairs']}.", "", "## Snapshot", "",
              f"`{snap['name']}` = `{snap['snapshot_id']}` ({'reused' if snap['reused'] else 'new'}): "
              f"{snap_counts['pairs']} pairs in {snap_counts['shards']} shard(s), at `{snap['path']}`."]
    training = summary.get("training")
    if training is not None:
        lines += ["", "## Training", ""]
        if training["started"]:
            where = (f"run `{training['flow_run_id']}` of `{training['deployment']}`" if "flow_run_id" in training
                     else "in this run")
            lines.append(f"Started {where}, output `{training['output']}`.")
        else:
            lines.append("Not started: " + "; ".join(training["reasons"]) + ".")
    return "\n".join(lines) + "\n"


def pipeline_parameters(lake: str, landing: str, **options) -> dict:
    """JSON parameters of a pipeline deployment (dataclasses as dicts, paths absolute: runs execute in other
    processes)."""
    params = {"lake": os.path.abspath(lake), "landing": os.path.abspath(landing)}
    for name, value in options.items():
        params[name] = asdict(value) if is_dataclass(value) else value
    return params
