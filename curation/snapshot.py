"""Immutable, content-addressed training snapshots.

A snapshot is a folder::

    SNAPSHOTS/<snapshot_id>/manifest.json
    SNAPSHOTS/<snapshot_id>/shards/shard-00000.parquet ...   (data_schemas.SNAPSHOT_PAIRS, winner first)

where SNAPSHOTS defaults to LAKE/snapshots. `snapshot_id` hashes the policy and the selected pairs
(pair id, winner, weight, margin, metrics): the same selection always has the same id, so writing it
again is a no-op, and a different selection can never overwrite it. The manifest holds the policy,
the curation run and input versions it came from, counts, and the sha256 and row count of every
shard; `verify_snapshot` refuses a folder whose files no longer match. The format, the manifest and that
verification are `prefcurate.data_schemas.snapshot_contract`, which the training reader uses too. The folder is
written under a temporary name and renamed into place when complete. `SNAPSHOTS/_names/<name>.json` lists the
snapshots written under each name (newest last), which `resolve_snapshot` uses for "latest".

Policies:
- plain:    human labels, ties dropped, weight 1, margin 0 (Diffusion-DPO's data).
- filter:   plain, minus pairs whose minority score exceeds `max_minority_score` and pairs of
            annotators whose reliability is below `min_reliability`.
- adaptive: human labels, ties dropped, with the offline Adaptive-DPO weight W, margin Γ and
            minority score u of each pair (prefcurate.curation.labels.pair_metrics); W normalised so that the trusted
            pairs (u <= 1/2) average 1.
- balanced: the scorers' consensus label (BalancedDPO), pairs without one dropped, with the vote
            fraction for the winner (the soft target of prefcurate.training.losses.balanced_dpo_loss);
            `consensus="calibrated"` takes the reliability-weighted scorer vote instead.
- reliability: human labels, ties dropped, each pair's posterior probability p that its label is
            right (prefcurate.curation.labels.reliability: the annotator's Dawid-Skene confusion and the calibrated
            scorer evidence) as the weight (normalised so that pairs with p >= 1/2 average 1) and/or
            the soft target (label_smoothing = 1 - p, conservative DPO); pairs with p below
            `min_posterior` dropped; optionally flipped where p <= 1 - `flip_above`.
            With `annotator_group`, a preference-group snapshot instead: only those annotators'
            pairs, their own labels, weight 1 (the posterior measures agreement with the majority
            taste, which a consistent minority group departs from on purpose).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import uuid
from dataclasses import asdict, dataclass
from typing import Literal

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from prefcurate.curation.labels.curate import current_run, load_pairs
from prefcurate.curation.store.lake import Lake, check_partition_name
from prefcurate.curation.labels.reliability import normalise_weights, winner_truth_share
from prefcurate.data_schemas import SNAPSHOT_PAIRS, adaptive, conform
from prefcurate.data_schemas import snapshot_contract as contract
from prefcurate.data_schemas.snapshot_contract import SnapshotError, verify_snapshot  # noqa: F401  (re-exported)
from prefcurate.data_schemas.vocab import DEFAULT_SNAPSHOT_POLICY, MINORITY_THRESHOLD, SNAPSHOT_POLICIES


POLICIES = SNAPSHOT_POLICIES
POSTERIOR_USES = ("weight", "soft_target", "both")
CONSENSUS_KINDS = ("majority", "calibrated")
TRUSTED_MINORITY_SCORE = MINORITY_THRESHOLD  # adaptive: u <= 1/2 (mean confidence in the label >= 1/2) is trusted
TRUSTED_POSTERIOR = 0.5  # reliability: the label is at least as likely right as wrong


@dataclass(frozen=True)
class SnapshotPolicy:
    kind: Literal[SNAPSHOT_POLICIES] = DEFAULT_SNAPSHOT_POLICY  # the CLI's, serve's and the pipeline's default too
    max_minority_score: float | None = MINORITY_THRESHOLD
    """filter: drop pairs with u above this (u > 0.5 means the scorers' mean confidence in the label is < 1/2)."""
    min_reliability: float | None = None
    """filter: drop pairs of annotators whose reliability is below this (None: keep all annotators)."""
    consensus: Literal["majority", "calibrated"] = "majority"
    """balanced: "majority" is BalancedDPO's equal-vote scorer majority (the paper baseline);
    "calibrated" weights each scorer's vote by its estimated reliability (scorer_log_odds)."""
    min_posterior: float | None = 0.5
    """reliability: drop pairs whose label is more likely wrong than right (p < 0.5); None keeps all.
    On the embedded sample (seed 0, pixel scorers) it removes 72 % of the wrong labels (474 of 659)
    and 5 % of the right ones (88 of 1853)."""
    posterior_use: Literal["weight", "soft_target", "both"] = "weight"
    """reliability: p as the loss weight, as the conservative-DPO target (label_smoothing = 1 - p,
    weight 1), or both. "weight" by default: it is what the winner-share measure and every loss in
    training/ read; "soft_target" needs a loss that reads label_smoothing."""
    flip_above: float | None = None
    """reliability: flip the label where P(the other image is better) >= this (then p becomes 1 - p).
    Off by default: a flip asserts the opposite preference for the annotator, and a wrong flip costs
    more than a dropped pair; with min_posterior 0.5 such pairs are dropped instead."""
    annotator_group: tuple[str, ...] | None = None
    """reliability: user ids of a preference group (e.g. a consistent minority taste) whose own
    labels make a separate snapshot, weight 1, the posterior not applied. None: majority snapshot, in
    which minority-taste annotators are down-weighted as noise (prefcurate.curation.labels.reliability, module doc)."""
    splits: tuple[str, ...] = ("train",)
    """Source splits that go into the snapshot; validation/test pairs stay out of training."""
    pairs_per_shard: int = 4096
    """Rows per shard file: a few hundred MB at Pick-a-Pic image sizes, so a trainer streams them."""

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise SnapshotError(f"unknown policy {self.kind!r}; policies: {', '.join(POLICIES)}")
        if self.pairs_per_shard < 1:
            raise SnapshotError("pairs_per_shard must be at least 1")
        if self.posterior_use not in POSTERIOR_USES:
            raise SnapshotError(f"unknown posterior_use {self.posterior_use!r}; expected one of {POSTERIOR_USES}")
        if self.consensus not in CONSENSUS_KINDS:
            raise SnapshotError(f"unknown consensus {self.consensus!r}; expected one of {CONSENSUS_KINDS}")
        if self.min_posterior is not None and not 0 <= self.min_posterior <= 1:
            raise SnapshotError(f"min_posterior must lie in [0, 1], got {self.min_posterior}")
        if self.flip_above is not None and not 0.5 < self.flip_above <= 1:
            raise SnapshotError(f"flip_above must lie in (0.5, 1], got {self.flip_above}")
        if self.annotator_group is not None and not self.annotator_group:
            raise SnapshotError("annotator_group is empty: give at least one user id (or None)")


@dataclass
class SnapshotInfo:
    snapshot_id: str
    path: str
    name: str
    reused: bool
    counts: dict

    def line(self) -> str:
        c = self.counts
        head = "snapshot exists, nothing written:" if self.reused else "snapshot written:"
        return (f"{head} {self.name} = {self.snapshot_id} at {self.path}: {c['pairs']} pairs in {c['shards']} "
                f"shard(s); left out: {c['ties']} ties, {c['no_label']} without a label, {c['filtered']} "
                f"filtered, {c['no_images']} without images, {c.get('unscorable_images', 0)} with an undecodable "
                f"image, {c['other_splits']} of other splits")


def _failed_image_ids(lake: Lake) -> pl.Series:
    """Ids of images with a NaN score from any scorer: scoring's record of an image that failed to decode."""
    files = lake.files("scores")
    if not files:
        return pl.Series("image_id", [], dtype=pl.String)
    return (pl.scan_parquet(files).filter(pl.col("score").is_nan()).select("image_id").unique()
            .collect()["image_id"])


def select_pairs(lake: Lake, policy: SnapshotPolicy) -> tuple[pl.DataFrame, dict]:
    """The training rows of the policy, without image bytes, and the counts of what was left out."""
    run = current_run(lake)
    if run is None and policy.kind != "plain":
        raise SnapshotError(f"policy {policy.kind!r} needs curation statistics: run `prefcurate curate` first")
    frame = load_pairs(lake, extra_columns=("prompt", "split"))
    counts = {"candidates": frame.height}
    in_split = frame["split"].is_in(list(policy.splits))
    counts["other_splits"] = int((~in_split).sum())
    frame = _with_statistics(lake, frame.filter(in_split), run, policy)
    frame = _labelled_and_filtered(frame, policy, counts)
    counts["no_images"] = int((~frame["images_available"]).sum())
    frame = frame.filter(pl.col("images_available"))
    # Scoring stores NaN for an image whose bytes do not decode (or whose score is NaN): such a pair would
    # crash or poison training, so it is left out here and counted.
    failed = _failed_image_ids(lake).to_list()
    unscorable = frame["image_0_id"].is_in(failed) | frame["image_1_id"].is_in(failed)
    counts["unscorable_images"] = int(unscorable.sum())
    rows = _training_rows(frame.filter(~unscorable), policy)
    counts["pairs"] = rows.height
    counts["curation_run"] = run["run_id"] if run else None
    return rows, counts


def _with_statistics(lake: Lake, frame: pl.DataFrame, run: dict | None, policy: SnapshotPolicy) -> pl.DataFrame:
    """The pairs with the current run's pair metrics and annotator reliability joined (nulls without a run)."""
    if run is not None:
        metrics = pl.read_parquet(lake.join("curation", run["run_id"], "pair_metrics.parquet"))
        frame = frame.join(metrics, on="pair_id", how="left")
        annotators = pl.read_parquet(lake.join("curation", run["run_id"], "annotators.parquet"))
        frame = frame.join(annotators.select("user_id", pl.col("reliability").alias("annotator_reliability")),
                           on="user_id", how="left")
    else:
        frame = frame.with_columns(**{c: pl.lit(None, pl.Float64) for c in
                                      ("consensus_label", "vote_fraction", "confidence", "stability",
                                       "minority_score", "weight", "margin", "annotator_reliability",
                                       "scorer_log_odds", "calibrated_label", "label_posterior")})
    needed = {"reliability": "label_posterior", "balanced": "calibrated_label"}.get(policy.kind)
    if needed and (policy.kind == "reliability" or policy.consensus == "calibrated") and needed not in frame.columns:
        raise SnapshotError(f"the current curation run has no {needed}: run `prefcurate curate` again")
    return frame


def _labelled_and_filtered(frame: pl.DataFrame, policy: SnapshotPolicy, counts: dict) -> pl.DataFrame:
    """The policy's training label (train_label, _flipped), ties and unlabelled pairs dropped, then the policy's
    filters; counts ties, no_label, filtered and flipped."""
    calibrated = policy.kind == "balanced" and policy.consensus == "calibrated"
    if policy.kind == "balanced":
        label = pl.col("calibrated_label") if calibrated else pl.col("consensus_label")
    else:
        label = pl.col("label_0")
    frame = frame.with_columns(train_label=label, _flipped=pl.lit(False))
    if calibrated:  # P(image_0 better | scorers) is the calibrated consensus' vote fraction
        frame = frame.with_columns(vote_fraction=1.0 / (1.0 + (-pl.col("scorer_log_odds")).exp()))
    counts["ties"] = int((frame["train_label"] == 0.5).sum())
    counts["no_label"] = int(frame["train_label"].is_null().sum())
    frame = frame.filter(pl.col("train_label").is_in([0.0, 1.0]))
    before = frame.height
    if policy.kind == "filter":
        if policy.max_minority_score is not None:
            frame = frame.filter(pl.col("minority_score").is_null() | (pl.col("minority_score") <=
                                                                      policy.max_minority_score))
        if policy.min_reliability is not None:
            frame = frame.filter(pl.col("annotator_reliability").is_null() | (pl.col("annotator_reliability") >=
                                                                             policy.min_reliability))
    posterior = pl.col("label_posterior")
    if policy.kind == "reliability" and policy.annotator_group is not None:
        frame = frame.filter(pl.col("user_id").is_in(list(policy.annotator_group))).with_columns(
            label_posterior=pl.lit(1.0))
    elif policy.kind == "reliability":
        if policy.flip_above is not None:
            flip = (1.0 - posterior) >= policy.flip_above
            frame = frame.with_columns(train_label=pl.when(flip).then(1.0 - pl.col("train_label"))
                                       .otherwise(pl.col("train_label")),
                                       label_posterior=pl.when(flip).then(1.0 - posterior).otherwise(posterior),
                                       _flipped=flip)
        if policy.min_posterior is not None:
            frame = frame.filter(posterior >= policy.min_posterior)
    counts["filtered"] = before - frame.height
    counts["flipped"] = int(frame["_flipped"].sum())
    return frame


def _weights(frame: pl.DataFrame, policy: SnapshotPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair loss weight and soft target (P,), normalised over the final rows (trusted pairs average 1)."""
    weight, smoothing = np.ones(frame.height), np.zeros(frame.height)
    if policy.kind == "adaptive":
        u = frame["minority_score"].fill_null(0.0).to_numpy()
        weight = normalise_weights(frame["weight"].fill_null(1.0).to_numpy(), u <= TRUSTED_MINORITY_SCORE)
    elif policy.kind == "reliability" and policy.annotator_group is None:
        p = frame["label_posterior"].fill_null(1.0).to_numpy()
        if policy.posterior_use in ("weight", "both"):
            weight = normalise_weights(p, p >= TRUSTED_POSTERIOR)
        if policy.posterior_use in ("soft_target", "both"):
            smoothing = np.clip(1.0 - p, 0.0, 1.0)
    return weight, smoothing


def _training_rows(frame: pl.DataFrame, policy: SnapshotPolicy) -> pl.DataFrame:
    """The snapshot rows (SNAPSHOT_PAIRS without image bytes), winner first, sorted by pair_id."""
    weight, smoothing = _weights(frame, policy)
    calibrated = policy.kind == "balanced" and policy.consensus == "calibrated"
    source = {"balanced": "calibrated_consensus" if calibrated else "consensus"}.get(policy.kind, "human")
    winner_is_0 = pl.col("train_label") == 1.0
    frame = frame.with_columns(_w=pl.Series(weight, dtype=pl.Float64), _ls=pl.Series(smoothing, dtype=pl.Float64))
    return frame.select(
        "pair_id", "prompt",
        winner_image_id=pl.when(winner_is_0).then("image_0_id").otherwise("image_1_id"),
        loser_image_id=pl.when(winner_is_0).then("image_1_id").otherwise("image_0_id"),
        label_source=pl.when(pl.col("_flipped")).then(pl.lit("human_flipped")).otherwise(pl.lit(source)),
        weight="_w",
        margin=(pl.col("margin").fill_null(0.0) if policy.kind == "adaptive" else pl.lit(0.0)),
        minority_score=pl.col("minority_score").fill_null(0.0),
        confidence=pl.col("confidence").fill_null(math.nan),
        stability=pl.col("stability").fill_null(math.nan),
        vote_fraction=pl.when(winner_is_0).then(pl.col("vote_fraction")).otherwise(1.0 - pl.col("vote_fraction"))
        .fill_null(math.nan),
        user_id="user_id",
        label_smoothing="_ls",
    ).sort("pair_id")


def pair_truth_from_sample(lake: Lake, truth_rows: pl.DataFrame) -> pl.DataFrame:
    """DataFrame[pair_id, better_image_id] of the embedded sample: its truth table (curation.synthetic.sample,
    rows.parquet: ranking_id, true_label_0) matched to the lake's pairs by ranking_id."""
    pairs = load_pairs(lake, extra_columns=("ranking_id",))
    truth = truth_rows.select(pl.col("ranking_id").cast(pl.String), "true_label_0").unique("ranking_id")
    return pairs.join(truth, on="ranking_id").select(
        "pair_id", better_image_id=pl.when(pl.col("true_label_0") == 1.0).then("image_0_id")
        .when(pl.col("true_label_0") == 0.0).then("image_1_id"))


def compare_policies(lake: Lake, truth: pl.DataFrame, policies: dict[str, SnapshotPolicy]) -> pl.DataFrame:
    """One row per named policy: how much of its snapshot points at the truly better image
    (`prefcurate.curation.labels.reliability.winner_truth_share`) and how many pairs it keeps. `truth` is
    DataFrame[pair_id, better_image_id] (e.g. `pair_truth_from_sample`). Nothing is written."""
    records = []
    for name, policy in policies.items():
        rows, counts = select_pairs(lake, policy)
        records.append({"policy": name, "pairs": rows.height, **winner_truth_share(rows, truth)})
    return pl.DataFrame(records)


def _snapshot_id(rows: pl.DataFrame, policy: SnapshotPolicy) -> str:
    """Hash of the policy and the selected rows' values. Values, not an IPC dump: Arrow buffers of
    equal frames differ with chunking and string-view layout, which thread timing decides. Floats
    are hashed as float32: parallel sums in the statistics can differ in the last bits of a float64
    between two lakes holding the same data, and that must not make a different snapshot."""
    digest = hashlib.sha256(json.dumps(asdict(policy), sort_keys=True).encode())
    for name in rows.columns:
        column = rows[name]
        digest.update(name.encode() + b"\x00")
        if column.dtype == pl.String:
            digest.update("\x1f".join(v if v is not None else "\x1e" for v in column.to_list()).encode())
        else:
            digest.update(column.is_null().to_numpy().tobytes())
            digest.update(column.fill_null(0).cast(pl.Float32).to_numpy().tobytes())
    return digest.hexdigest()[:24]


def write_snapshot(lake: Lake, name: str, policy: SnapshotPolicy = SnapshotPolicy(),
                   out_root: str | None = None) -> SnapshotInfo:
    """Select, then write (or find) the snapshot of `policy` over the lake's current curation run, holding the
    lake's writer lock (whose recovery removes staging folders a crash left), from lake files whose sha256
    still matches their commit."""
    with lake.writing():
        lake.verify_tables(("pairs", "image_refs", "images"))
        return _write_snapshot(lake, name, policy, out_root)


def _write_snapshot(lake: Lake, name: str, policy: SnapshotPolicy, out_root: str | None) -> SnapshotInfo:
    check_partition_name("snapshot name", name)
    rows, counts = select_pairs(lake, policy)
    if rows.height == 0:
        raise SnapshotError(f"policy {policy.kind!r} selects no pairs: {counts}")
    snapshot_id = _snapshot_id(rows, policy)
    root = out_root or lake.join("snapshots")
    fs = lake.fs
    final = f"{root}/{snapshot_id}"
    if fs.exists(f"{final}/manifest.json"):
        manifest = verify_snapshot(final, fs)
        _record_name(fs, root, name, snapshot_id)
        return SnapshotInfo(snapshot_id, final, name, True, manifest["counts"])

    staging = f"{root}/_staging-{snapshot_id}-{uuid.uuid4().hex[:8]}"
    fs.makedirs(f"{staging}/shards", exist_ok=True)
    images = lake.files("images")
    shards = []
    con = duckdb.connect()
    try:
        for start in range(0, rows.height, policy.pairs_per_shard):
            table = _with_image_bytes(con, rows.slice(start, policy.pairs_per_shard), lake.sql_file_list(images))
            shards.append(contract.write_shard(fs, staging, len(shards), table, row_group_size=256))
    finally:
        con.close()
    counts["shards"] = len(shards)
    run = current_run(lake)
    # The offline W and Gamma of the adaptive policy depend on these constants (Gamma on beta): the trainer
    # compares them with its own (prefcurate.training.snapshot_reader.margin_beta_warning).
    constants = adaptive.manifest_record(run["config"]["pair_metrics"]) if run and policy.kind == "adaptive" else None
    manifest = contract.build_manifest(name=name, snapshot_id=snapshot_id, shards=shards, policy=asdict(policy),
                                       counts=counts, curation_run=run["run_id"] if run else None,
                                       inputs=run["inputs"] if run else None, adaptive=constants)
    contract.write_manifest(fs, staging, manifest)
    if fs.exists(final):  # a concurrent writer finished the same snapshot first
        fs.rm(staging, recursive=True)
    else:
        fs.mv(staging, final, recursive=True)
    _record_name(fs, root, name, snapshot_id)
    return SnapshotInfo(snapshot_id, final, name, False, counts)


def _with_image_bytes(con: duckdb.DuckDBPyConnection, chunk: pl.DataFrame, image_files: str) -> pa.Table:
    """Attach winner/loser image bytes to a chunk of rows, reading only the images it needs."""
    wanted = pa.table({"image_id": pa.array(sorted(set(chunk["winner_image_id"]) | set(chunk["loser_image_id"])))})
    con.register("wanted", wanted)
    found = con.sql(f"SELECT i.image_id, any_value(i.bytes) AS bytes FROM read_parquet({image_files}) i "
                    f"SEMI JOIN wanted w ON w.image_id = i.image_id GROUP BY i.image_id").pl()
    con.unregister("wanted")
    with_bytes = (chunk.join(found.rename({"image_id": "winner_image_id", "bytes": "winner_image"}),
                             on="winner_image_id", how="left")
                  .join(found.rename({"image_id": "loser_image_id", "bytes": "loser_image"}),
                        on="loser_image_id", how="left"))
    missing = with_bytes.filter(pl.col("winner_image").is_null() | pl.col("loser_image").is_null()).height
    if missing:
        raise SnapshotError(f"{missing} selected pairs have images missing from the images table")
    return conform(with_bytes.select(SNAPSHOT_PAIRS.names).to_arrow(), SNAPSHOT_PAIRS)


def _record_name(fs, root: str, name: str, snapshot_id: str) -> None:
    path = f"{root}/_names/{name}.json"
    history = json.loads(fs.cat_file(path)) if fs.exists(path) else []
    if not history or history[-1]["snapshot_id"] != snapshot_id:
        history.append({"snapshot_id": snapshot_id, "at": dt.datetime.now(dt.timezone.utc).isoformat()})
        fs.makedirs(f"{root}/_names", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(json.dumps(history, indent=1).encode())
        fs.mv(tmp, path)


def resolve_snapshot(lake_or_root: Lake | str, name: str = "latest") -> str:
    """Path of a snapshot: a snapshot id, a name (its newest snapshot) or "latest" (the newest of all)."""
    import fsspec

    if isinstance(lake_or_root, Lake):
        fs, root = lake_or_root.fs, lake_or_root.join("snapshots")
    else:
        fs, root = fsspec.core.url_to_fs(lake_or_root)
    if fs.exists(f"{root}/{name}/manifest.json"):
        return f"{root}/{name}"
    histories = {}
    for path in fs.glob(f"{root}/_names/*.json"):
        histories[path.rsplit("/", 1)[-1][:-5]] = json.loads(fs.cat_file(path))
    if name == "latest":
        entries = [e for h in histories.values() for e in h]
        if not entries:
            raise SnapshotError(f"no snapshots under {root}: write one with `prefcurate snapshot`")
        return f"{root}/{max(entries, key=lambda e: e['at'])['snapshot_id']}"
    if name not in histories:
        known = ", ".join(sorted(histories)) or "none"
        raise SnapshotError(f"no snapshot named {name!r} under {root} (names: {known})")
    return f"{root}/{histories[name][-1]['snapshot_id']}"
