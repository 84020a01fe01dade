"""The synthetic Pick-a-Pic sample: exact schema, byte-determinism, a truth table that matches the shards,
planted annotator behaviour and defects that are really there, and image properties measurable from pixels."""
import hashlib
import io
import math

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from prefcurate.curation.synthetic.palette import COLOR_NAMES
from prefcurate.curation.synthetic.sample import (
    DEFECT_KINDS, SampleConfig, generate_sample, majority_utility, pickapic_arrow_schema,
)
from prefcurate.curation.synthetic.scene import luminance, render_scene


# docs/data-and-scorers.md §1.2, written out by hand so the test does not compare the schema with itself
PICKAPIC_COLUMNS = {
    "are_different": pa.bool_(), "best_image_uid": pa.string(), "caption": pa.string(),
    "created_at": pa.timestamp("ns"), "has_label": pa.bool_(), "image_0_uid": pa.string(),
    "image_0_url": pa.string(), "image_1_uid": pa.string(), "image_1_url": pa.string(), "jpg_0": pa.binary(),
    "jpg_1": pa.binary(), "label_0": pa.float64(), "label_1": pa.float64(), "model_0": pa.string(),
    "model_1": pa.string(), "ranking_id": pa.int64(), "user_id": pa.int64(), "num_example_per_prompt": pa.int64(),
    "__index_level_0__": pa.int64(),
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    config = SampleConfig.small()
    paths = generate_sample(tmp_path_factory.mktemp("sample"), config)
    shards = pl.concat([pl.read_parquet(p) for p in paths.shards]).with_row_index("row_number")
    truth = pl.read_parquet(paths.rows)
    return config, paths, shards, truth, pl.read_parquet(paths.annotators)


def decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
        return True
    except OSError:  # PIL.UnidentifiedImageError is an OSError too
        return False


def grey(data: bytes) -> np.ndarray:
    return luminance(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64))


def laplacian_variance(g: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a grey image (interior pixels)."""
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def rank_correlation(a, b) -> float:
    """Spearman correlation (no ties in continuous data)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_shards_have_the_exact_pickapic_schema(sample):
    config, paths, *_ = sample
    assert [p.name for p in paths.shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert sorted(paths.pickapic_dir.iterdir()) == list(paths.shards)
    expected = pa.schema(list(PICKAPIC_COLUMNS.items()))
    assert pickapic_arrow_schema().equals(expected)
    for path in paths.shards:
        file = pq.ParquetFile(path)
        assert file.schema_arrow.equals(expected), file.schema_arrow
        assert file.metadata.num_row_groups >= 2
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in paths.shards) == config.n_rows


def test_same_seed_gives_byte_identical_files(tmp_path):
    def digests(out, seed):
        paths = generate_sample(out, SampleConfig.small(seed=seed))
        return [hashlib.sha256(f.read_bytes()).hexdigest() for f in (*paths.shards, paths.annotators, paths.rows)]

    first = digests(tmp_path / "a", seed=3)
    assert first == digests(tmp_path / "b", seed=3)
    assert first == digests(tmp_path / "a", seed=3)  # regenerating in place overwrites
    assert all(a != b for a, b in zip(first, digests(tmp_path / "c", seed=4), strict=True))


def test_refuses_to_leave_stale_shards_beside_new_ones(tmp_path):
    generate_sample(tmp_path, SampleConfig.small())
    with pytest.raises(FileExistsError, match="train-00001-of-00002.parquet"):
        generate_sample(tmp_path, SampleConfig(n_prompts=24, n_rows=900, n_annotators=24, n_shards=1))


def test_truth_rows_match_the_shards(sample):
    config, paths, shards, truth, annotators = sample
    assert truth["row_number"].to_list() == list(range(config.n_rows))
    joined = shards.join(truth, on="row_number", suffix="_truth")
    assert joined.height == config.n_rows
    for column in ("ranking_id", "user_id", "image_0_uid", "image_1_uid"):
        assert (joined[column] == joined[f"{column}_truth"]).all(), column
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in paths.shards]
    shard_of_row = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
    assert np.array_equal(truth["shard"].to_numpy(), shard_of_row)
    given = joined["given_label_0"].to_numpy()
    assert np.array_equal(joined["label_0"].to_numpy(), given, equal_nan=True)
    assert np.array_equal(joined["label_1"].to_numpy(), joined["given_label_1"].to_numpy())
    # annotators.parquet counts every shard row of each user and holds every user once
    counts = shards.group_by("user_id").len().join(annotators, on="user_id", how="full", coalesce=True)
    assert counts.height == config.n_annotators and (counts["len"] == counts["n_rows"]).all()
    per_type = annotators.group_by("annotator_type").agg(pl.len(), pl.col("n_rows").sum())
    assert per_type.height == 5 and per_type["len"].min() >= config.min_annotators_per_type
    reliable_share = per_type.filter(pl.col("annotator_type") == "reliable")["n_rows"].item() / config.n_rows
    assert 0.55 <= reliable_share <= 0.75
    # true labels follow the majority utility stored with the row
    clean = truth.filter(pl.col("image_0_uid") != pl.col("image_1_uid"))
    assert (clean["true_label_0"] == (clean["utility_0"] > clean["utility_1"]).cast(pl.Float64)).all()
    assert truth.filter(pl.col("image_0_uid") == pl.col("image_1_uid"))["true_label_0"].is_null().all()


def test_planted_annotators_behave_as_their_type(sample):
    _, _, shards, truth, _ = sample
    rows = shards.join(truth.select("row_number", "annotator_type", "true_label_0", "planted_defect"),
                       on="row_number").filter(pl.col("planted_defect").is_null())
    decided = rows.filter(pl.col("label_0") != 0.5)
    stats = {r["annotator_type"]: r for r in decided.group_by("annotator_type").agg(
        agree=(pl.col("label_0") == pl.col("true_label_0")).mean(), first=(pl.col("label_0") == 1.0).mean(),
    ).iter_rows(named=True)}
    ties = dict(rows.group_by("annotator_type").agg((pl.col("label_0") == 0.5).mean()).iter_rows())
    assert stats["reliable"]["agree"] >= 0.75
    assert stats["tie_prone"]["agree"] >= 0.75
    assert stats["minority"]["agree"] <= 0.4 < stats["reliable"]["agree"] - 0.35
    assert 0.3 <= stats["spammer"]["agree"] <= 0.7
    assert stats["position_biased"]["first"] >= 0.8
    assert 0.4 <= stats["reliable"]["first"] <= 0.6
    assert ties["tie_prone"] >= 0.25 and ties["tie_prone"] > 3 * ties["reliable"]
    # ties are written as 0.5/0.5 with no best image
    tie_rows = rows.filter(pl.col("label_0") == 0.5)
    assert tie_rows.height > 0 and (tie_rows["label_1"] == 0.5).all() and (tie_rows["best_image_uid"] == "").all()
    won = decided.with_columns(winner=pl.when(pl.col("label_0") == 1).then("image_0_uid").otherwise("image_1_uid"))
    assert (won["best_image_uid"] == won["winner"]).all()


def test_minority_annotators_see_pairs_that_sharpness_decides(sample):
    config, _, _, truth, _ = sample
    w_sharp = config.utility_weights[1]
    # split the majority utility gap into its sharpness part S and the rest R; the minority's gap is R - S,
    # so the two tastes rank a pair differently exactly when |S| > |R|
    pairs = truth.filter(pl.col("planted_defect").is_null()).with_columns(
        S=w_sharp * (pl.col("sharpness_0") - pl.col("sharpness_1"))).with_columns(
        R=pl.col("utility_0") - pl.col("utility_1") - pl.col("S"))
    disputed = dict(pairs.group_by("annotator_type").agg(
        (pl.col("S").abs() > pl.col("R").abs()).mean()).iter_rows())
    assert disputed["minority"] >= 0.9 and disputed["reliable"] <= 0.6


def test_every_defect_is_planted_and_detectable(sample):
    config, _, shards, truth, _ = sample
    rows = shards.join(truth.select("row_number", "planted_defect", "defect_detail", "duplicate_of"), on="row_number")
    counts = dict(truth.group_by("planted_defect").len().drop_nulls().iter_rows())
    assert counts == config.defect_counts() and set(counts) == set(DEFECT_KINDS)
    by_kind = {kind: rows.filter(pl.col("planted_defect") == kind) for kind in DEFECT_KINDS}

    corrupt = by_kind["corrupt_image"]
    for row in corrupt.iter_rows(named=True):
        side = row["defect_detail"][:5]
        assert not decodes(row[side]) and decodes(row["jpg_1" if side == "jpg_0" else "jpg_0"])
    assert {d.split(" ")[1] for d in corrupt["defect_detail"]} == {"truncated", "replaced"}
    others = rows.filter(pl.col("planted_defect").is_null() | (pl.col("planted_defect") != "corrupt_image"))
    assert all(decodes(b) for b in others["jpg_0"].to_list() + others["jpg_1"].to_list())

    assert by_kind["nan_label"]["label_0"].is_nan().all()
    assert rows.filter(pl.col("planted_defect") != "nan_label")["label_0"].is_nan().sum() == 0
    label_sum = rows.filter(~pl.col("label_0").is_nan()).select(
        "planted_defect", s=pl.col("label_0") + pl.col("label_1"))
    assert (label_sum.filter(pl.col("planted_defect") == "inconsistent_labels")["s"] != 1).all()
    assert (label_sum.filter(pl.col("planted_defect") != "inconsistent_labels")["s"] == 1).all()

    assert (by_kind["empty_prompt"]["caption"].str.strip_chars() == "").all()
    assert (rows.filter(pl.col("planted_defect") != "empty_prompt")["caption"].str.strip_chars() != "").all()

    identical = by_kind["identical_images"]
    assert (identical["jpg_0"] == identical["jpg_1"]).all() and (~identical["are_different"]).all()
    assert (identical["image_0_uid"] == identical["image_1_uid"]).all()
    assert rows.filter(pl.col("planted_defect") != "identical_images")["are_different"].all()

    columns = list(PICKAPIC_COLUMNS)
    for row in by_kind["duplicate_row"].iter_rows(named=True):
        original = rows.row(row["duplicate_of"], named=True)
        assert original["planted_defect"] is None and row["row_number"] > row["duplicate_of"]
        assert all(row[c] == original[c] for c in columns)
    assert shards.select(columns).is_duplicated().sum() == 2 * counts["duplicate_row"]


def test_images_are_jpeg_with_a_few_png(sample):
    _, _, shards, truth, _ = sample
    clean = shards.join(truth.select("row_number", "planted_defect"), on="row_number").filter(
        pl.col("planted_defect").is_null())
    blobs = clean["jpg_0"].to_list() + clean["jpg_1"].to_list()
    jpeg = sum(b.startswith(b"\xff\xd8\xff") for b in blobs)
    png = sum(b.startswith(b"\x89PNG\r\n\x1a\n") for b in blobs)
    assert jpeg + png == len(blobs) and 0 < png < 0.2 * len(blobs)
    assert {Image.open(io.BytesIO(b)).size for b in blobs} == {(64, 64)}


def test_image_properties_are_measurable_from_pixels(sample):
    _, _, shards, truth, _ = sample
    joined = shards.join(truth, on="row_number", suffix="_truth").filter(pl.col("planted_defect").is_null())
    images = pl.concat([joined.select(
        "named_colour", uid=f"image_{s}_uid", data=f"jpg_{s}", colour_match=f"colour_match_{s}",
        blur_radius=f"blur_radius_{s}", exposure=f"exposure_{s}") for s in "01"]).unique("uid", maintain_order=True)
    assert images.height > 80
    greys = [grey(b) for b in images["data"]]
    blur = images["blur_radius"].to_numpy()

    # sharpness: every clearly sharp image has a higher Laplacian variance than every clearly blurred one
    lap = np.array([laplacian_variance(g) for g in greys])
    assert lap[blur < 0.5].min() > lap[blur > 2.0].max()
    assert rank_correlation(-blur, lap) > 0.9

    # exposure: scenes average mid-grey before the gamma, so |mean - 128| follows |exposure|
    exposure = images["exposure"].to_numpy()
    mean_lum = np.array([g.mean() for g in greys])
    assert rank_correlation(np.abs(exposure), np.abs(mean_lum - 128)) > 0.85
    assert (mean_lum[exposure > 0.5] > 140).all() and (mean_lum[exposure < -0.5] < 116).all()

    # colour match: share of saturated pixels whose hue is the named colour's hue
    def named_hue_share(data: bytes, name: str) -> float:
        hsv = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").convert("HSV"), dtype=np.float64)
        target = np.asarray(Image.new("RGB", (1, 1), COLOR_NAMES[name]).convert("HSV"), dtype=np.float64)[0, 0]
        hue_gap = np.abs(hsv[..., 0] - target[0])
        hue_gap = np.minimum(hue_gap, 256 - hue_gap)  # PIL hue is 0-255 around the circle
        return float(((hue_gap < 12) & (hsv[..., 1] > 80)).mean())

    share = np.array([named_hue_share(b, n) for b, n in zip(images["data"], images["named_colour"], strict=True)])
    match = images["colour_match"].to_numpy()
    named, other = share[match == 1], share[match < 0.6]
    assert named.size and other.size and np.median(named) > 0.15 > 0.02 > np.median(other)
    auc = (named[:, None] > other[None, :]).mean()  # P(a named-colour image shows more of the colour)
    assert auc > 0.9


def test_render_scene_properties_on_one_layout():
    def render(blur: float, exposure: float) -> np.ndarray:
        image = render_scene(COLOR_NAMES["red"], "ellipse", blur, exposure, 64, np.random.default_rng(7))
        return luminance(np.asarray(image, dtype=np.float64))

    sharp, soft, softer = render(0, 0), render(1.0, 0), render(2.5, 0)
    assert np.array_equal(sharp, render(0, 0))
    assert laplacian_variance(sharp) > 5 * laplacian_variance(soft) > 5 * laplacian_variance(softer)
    assert abs(sharp.mean() - 128) < 4
    assert render(0, 1).mean() > 160 and render(0, -1).mean() < 96
    with pytest.raises(ValueError, match="unknown shape"):
        render_scene(COLOR_NAMES["red"], "hexagon", 0, 0, 64, np.random.default_rng(0))


def test_majority_utility_closed_form():
    utility = majority_utility(np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.5, 0.5]), (0.45, 0.35, 0.2))
    assert np.allclose(utility, [0.45 + 0.1, 0.35 + 0.1])


@pytest.mark.parametrize("overrides, message", [
    ({"n_annotators": 10}, "n_annotators=10"),
    ({"row_share": {"minority": 0.5}}, "row_share"),
    ({"images_per_prompt": (1, 3)}, "images_per_prompt"),
    ({"utility_weights": (0.5, 0.5, 0.5)}, "utility_weights"),
    ({"duplicate_rate": 0.5}, "defect counts"),
])
def test_bad_config_is_refused_with_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        SampleConfig(**overrides)
