"""The chunked, out-of-core curate stage gives the tables of the in-memory computation, whatever the chunk size."""
import datetime as dt

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from prefcurate.curation.labels.curate import (
    CurateConfig, compute_tables, curate, current_run, load_pairs, load_scores,
)
from prefcurate.curation.store.lake import Lake
from prefcurate.data_schemas import INGESTS


def small_lake(root, n_pairs: int = 120, seed: int = 0, missing_bytes: tuple[int, ...] = ()) -> Lake:
    """Pairs over 30 images of 6 prompts (images 5k + j belong to prompt j), some image pairs labelled by
    several users, ties, a null user, two prompt-free scorers and one prompt-dependent scorer that
    lacks the scores of two images. `missing_bytes`: images (indices) left out of the images table."""
    rng = np.random.default_rng(seed)
    lake = Lake(str(root), create=True)
    image = [f"img{i:02d}" for i in range(30)]
    a = rng.integers(0, 30, n_pairs)
    b = (a + 6 * rng.integers(1, 5, n_pairs)) % 30
    label = rng.choice([0.0, 1.0, 0.5], n_pairs, p=[0.45, 0.45, 0.1])
    users = rng.choice(["u1", "u2", "u3", "u4", None], n_pairs, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with lake.writing():
        tx = lake.begin("tiny")
        tx.write("pairs", pa.table({
            "pair_id": [f"pair-{i:04d}" for i in range(n_pairs)], "source": ["tiny"] * n_pairs,
            "split": ["train"] * n_pairs, "prompt": ["p"] * n_pairs,
            "prompt_id": [f"prompt{k % 6}" for k in a], "image_0_id": [image[k] for k in a],
            "image_1_id": [image[k] for k in b], "label_0": label, "user_id": list(users),
            "created_at": pa.array([now] * n_pairs, pa.timestamp("us", tz="UTC")), "ingest_id": ["tiny"] * n_pairs,
            **{c: pa.nulls(n_pairs, pa.string()) for c in ("image_0_uid", "image_1_uid", "model_0", "model_1",
                                                            "ranking_id")},
        }), partition="tiny")
        stored = [image[i] for i in range(30) if i not in missing_bytes]
        n = len(stored)
        tx.write("images", pa.table({"image_id": stored, "bytes": [b"x"] * n, "format": ["PNG"] * n,
                                     "width": pa.array([8] * n, pa.int32()), "height": pa.array([8] * n, pa.int32()),
                                     "ingest_id": ["tiny"] * n}))
        for scorer, prompt_free in (("sharpness", True), ("exposure", True), ("hpsv2", False)):
            keep = [i for i in range(30) if prompt_free or i not in (3, 17)]
            score = np.round(rng.normal(size=30), 1)  # rounded: some exact ties between images
            tx.write("scores", pa.table({
                "image_id": [image[i] for i in keep],
                "prompt_id": ["" if prompt_free else f"prompt{i % 6}" for i in keep],
                "scorer": [scorer] * len(keep), "scorer_version": ["v"] * len(keep), "score": score[keep],
            }), partition=scorer)
        ingest = {f.name: None for f in INGESTS}
        ingest.update(ingest_id="tiny", source="tiny", format="jsonl", source_file="x", fingerprint="0",
                      n_read=n_pairs, n_accepted=n_pairs, n_duplicates=0, n_quarantined=0, n_images_new=30,
                      started_at=now, finished_at=now, prefcurate_version="test")
        tx.commit({"ingests": [ingest]})
    return lake


def run_tables(lake: Lake) -> dict[str, pl.DataFrame]:
    run = current_run(lake)["run_id"]
    return {name: pl.read_parquet(lake.join("curation", run, f"{name}.parquet"))
            for name in ("votes", "consensus", "pair_metrics", "annotators", "scorer_reliability")}


def assert_same(got: pl.DataFrame, want: pl.DataFrame, keys: list[str]) -> None:
    assert got.columns == want.columns
    got, want = got.sort(keys), want.sort(keys)
    for column in got.columns:
        g, w = got[column], want[column]
        if g.dtype.is_float():
            assert (g.is_null() == w.is_null()).all(), column
            np.testing.assert_allclose(g.drop_nulls().to_numpy(), w.drop_nulls().to_numpy(), rtol=1e-9, atol=1e-12,
                                       err_msg=column)
        else:
            assert g.cast(w.dtype).equals(w), column


@pytest.mark.parametrize("chunk_pairs", [7, 1000])
def test_chunked_curate_equals_the_in_memory_tables(tmp_path, chunk_pairs):
    lake = small_lake(tmp_path / "lake")
    result = curate(lake, chunk_pairs=chunk_pairs)
    got = run_tables(lake)
    pairs = load_pairs(lake)
    scorers = sorted(load_scores(lake, None)["scorer"].unique().to_list())
    want = compute_tables(pairs, load_scores(lake, None), scorers, CurateConfig())
    keys = {"votes": ["pair_id", "scorer"], "consensus": ["pair_id"], "pair_metrics": ["pair_id"],
            "annotators": ["user_id"], "scorer_reliability": ["scorer"]}
    for name, key in keys.items():
        assert_same(got[name], want[name], key)
    unscored = pl.col("image_0_id").is_in(["img03", "img17"]) | pl.col("image_1_id").is_in(["img03", "img17"])
    per_scorer = dict(got["votes"].group_by("scorer").len().iter_rows())
    assert per_scorer == {"sharpness": 120, "exposure": 120, "hpsv2": pairs.filter(~unscored).height}
    assert result.counts["pairs"] == 120 and result.counts["scorers"] == 3
    assert result.counts["annotators"] == 4  # the null user is nobody's
    judged = want["consensus"].filter(pl.col("human_agrees").is_not_null() & (pl.col("n_scorers") > 0))
    assert result.counts["human_agreement"] == pytest.approx(judged["human_agrees"].mean())
    assert not list((tmp_path / "lake" / "_staging").glob("curate-*"))  # the scratch folder is gone


def test_curate_of_a_lake_without_scores_or_pairs(tmp_path):
    lake = Lake(str(tmp_path / "empty"), create=True)
    result = curate(lake)
    assert result.counts["pairs"] == 0 and run_tables(lake)["votes"].height == 0


@pytest.mark.parametrize("scorers", [None, ("hpsv2",)])
def test_pairs_without_image_bytes_are_counted_as_the_pairs_table_says(tmp_path, scorers):
    """images_available comes from the prompt-free score table's join (which also lists the stored images);
    the count must match the plain resolution of load_pairs, with prompt-free scorers and without any."""
    lake = small_lake(tmp_path / "lake", missing_bytes=(3, 5))  # img03 lacks hpsv2 scores too
    result = curate(lake, CurateConfig(scorers=scorers))
    pairs = load_pairs(lake)
    want = int((~pairs["images_available"]).sum())
    assert 0 < want < pairs.height
    assert result.counts["pairs_without_images"] == want
