"""Preference pairs of the small world: planted labels, a JSONL source, and curated training snapshots.

Labels (docs/methods.md §2.7): a planted annotator prefers image a over image b with the Bradley-Terry probability
sigmoid(bt_scale * (U_a - U_b)) of the true reward U; then a fraction ``flip_rate`` of the pairs, drawn
uniformly, has its label flipped (the synthetic-minority protocol of Adaptive-DPO). One uniform number per
pair decides the flip, so the flipped set at 10 % is contained in the one at 20 %, and the Bradley-Terry
draws are shared by every flip rate (common random numbers across the conditions).

Small world v2 labels come from a crowd of typed annotators instead (``smallworld.crowd``); ``plant_labels``
stays as the per-pair flip protocol's reference. The pairs then take prefcurate's own path: a generic-format
JSONL file with base64 PNG images (``curation/ingest/jsonl.py``), ``ingest_file``, pixel scoring, ``curate`` and
``write_snapshot``.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from prefcurate.curation.labels.annotators import auroc
from prefcurate.curation.labels.curate import curate
from prefcurate.curation.store.ids import pair_id
from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
from prefcurate.curation.store.lake import Lake
from prefcurate.curation.scorers.runner import run_scoring
from prefcurate.curation.snapshot import SnapshotPolicy, write_snapshot
from prefcurate.data_schemas.vocab import WEIGHT_FREE_SCORERS


SOURCE = "smallworld"
PIXEL_SCORERS = list(WEIGHT_FREE_SCORERS)


def plant_labels(reward_a: np.ndarray, reward_b: np.ndarray, flip_rate: float, bt_scale: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(label_0 (N,) with 1.0 = a preferred, flipped (N,) bool) for pairs (a, b)."""
    if not 0.0 <= flip_rate < 1.0:
        raise ValueError(f"flip_rate must lie in [0, 1), got {flip_rate}")
    rng = np.random.default_rng(seed)
    bt_draw, flip_draw = rng.random(len(reward_a)), rng.random(len(reward_a))  # drawn whatever the flip rate
    p_a = 1.0 / (1.0 + np.exp(-bt_scale * (reward_a - reward_b)))
    flipped = flip_draw < flip_rate
    label = (bt_draw < p_a).astype(np.float64)
    return np.where(flipped, 1.0 - label, label), flipped


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return "base64:" + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_jsonl(path: Path, ids: list[str], prompts: list[str], images_a: np.ndarray, images_b: np.ndarray,
                label_0: np.ndarray, annotators: list[str]) -> Path:
    """One generic-format line per pair: prompt, image_0 = a, image_1 = b (base64 PNG), label, annotator, id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, pid in enumerate(ids):
            f.write(json.dumps({"id": pid, "prompt": prompts[i], "image_0": png_base64(images_a[i]),
                                "image_1": png_base64(images_b[i]), "label": float(label_0[i]),
                                "annotator": annotators[i], "split": "train"}) + "\n")
    return path


def curate_snapshots(lake_dir: Path, jsonl: Path, policies: dict[str, dict]) -> dict[str, str]:
    """Ingest, score with the pixel scorers, curate, and write one snapshot per entry of ``policies`` (name ->
    SnapshotPolicy fields); name -> snapshot folder."""
    lake = Lake(str(lake_dir), create=True)
    result = ingest_file(lake, str(jsonl), IngestConfig(SOURCE, "jsonl"), make_reader("jsonl"))
    if result.n_quarantined:
        raise RuntimeError(f"{result.line()}: the small world's pairs should all be accepted")
    run_scoring(lake, PIXEL_SCORERS, workers=0)
    curate(lake)
    return {name: write_snapshot(lake, name, SnapshotPolicy(**{"pairs_per_shard": 1024, **fields})).path
            for name, fields in policies.items()}


def snapshot_truth(snapshot_dir: str, ids: list[str], left_better: np.ndarray, noisy: np.ndarray) -> dict:
    """How a snapshot's winners relate to the truth, label row by label row (ids[r] is row r's generic id):
    weighted share of rows whose winner has the higher true reward (Σ w·correct / Σ w), the unweighted share,
    rows kept, the share of noisy labels kept (by weight), mean weight of correct and of wrong rows, and the AUROC
    of the offline minority score u for wrong winners (when the snapshot carries u)."""
    rows = pl.read_parquet(f"{snapshot_dir}/shards/*.parquet",
                           columns=["pair_id", "winner_image_id", "weight", "minority_score"])
    index = {pair_id(SOURCE, pid): i for i, pid in enumerate(ids)}
    order = np.array([index[p] for p in rows["pair_id"]])
    lake_images = _lake_image_ids(snapshot_dir, rows)
    winner_is_left = np.array([lake_images[p][0] == w for p, w in zip(rows["pair_id"], rows["winner_image_id"])])
    correct = winner_is_left == left_better[order]
    weight = rows["weight"].to_numpy().astype(np.float64)
    kept = np.zeros(len(ids))
    kept[order] = weight
    out = {"rows": rows.height, "weighted_truly_better": float((weight * correct).sum() / max(weight.sum(), 1e-12)),
           "winner_is_truly_better": float(correct.mean()), "mean_weight": float(weight.mean()),
           "mean_weight_correct": float(weight[correct].mean()) if correct.any() else None,
           "mean_weight_wrong": float(weight[~correct].mean()) if (~correct).any() else None,
           "noisy_weight_share": float(kept[noisy].sum() / max(kept.sum(), 1e-12))}
    u = rows["minority_score"].to_numpy()
    if float(np.std(u)) > 0 and 0 < correct.sum() < len(correct):
        out["auroc_u_wrong_winner"] = auroc(u, ~correct)
    return out


def annotator_detection(lake_dir: Path, kinds: list[str], min_labels: int) -> dict:
    """AUROC of 1 - reliability (the annotators table of the lake's current curation run) for non-reliable vs
    reliable annotators with at least min_labels labels; overall and per non-reliable kind. kinds[j] is the type of
    annotator ``user-{j:03d}`` (``smallworld.crowd.user_id``)."""
    from prefcurate.curation.labels.curate import current_run

    lake = Lake(str(lake_dir))
    table = pl.read_parquet(lake.join("curation", current_run(lake)["run_id"], "annotators.parquet"))
    table = table.filter(pl.col("n_labels") >= min_labels)
    kind = np.array([kinds[int(u.split("-")[1])] for u in table["user_id"]])
    score = 1.0 - table["reliability"].to_numpy()
    reliable = kind == "reliable"
    out = {"n_reliable": int(reliable.sum()), "n_noisy": int((~reliable).sum()), "auroc": None,
           "method": table["reliability_method"][0] if table.height else None,
           "reliability_by_kind": {k: float(np.mean(1.0 - score[kind == k])) for k in sorted(set(kind))}}
    if reliable.any() and (~reliable).any():
        out["auroc"] = auroc(score, ~reliable)
        out["auroc_by_kind"] = {k: auroc(score[reliable | (kind == k)], kind[reliable | (kind == k)] == k)
                                for k in sorted(set(kind) - {"reliable"})}
    return out


def _lake_image_ids(snapshot_dir: str, rows: pl.DataFrame) -> dict[str, tuple[str, str]]:
    """pair_id -> (image_0_id, image_1_id) from the lake the snapshot came from (LAKE/snapshots/<id>)."""
    lake = Lake(str(Path(snapshot_dir).parents[1]))
    pairs = pl.from_arrow(lake.read("pairs", columns=["pair_id", "image_0_id", "image_1_id"]))
    wanted = set(rows["pair_id"])
    return {p: (a, b) for p, a, b in pairs.iter_rows() if p in wanted}

