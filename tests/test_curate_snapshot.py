"""The curate stage on the embedded sample, measured against its truth table, and snapshots."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from prefcurate.curation.labels.annotators import auroc
from prefcurate.curation.labels.curate import CurateConfig, curate, current_run
from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
from prefcurate.curation.store.lake import Lake
from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample
from prefcurate.curation.scorers.runner import run_scoring
from prefcurate.curation.snapshot import (
    SnapshotError, SnapshotPolicy, resolve_snapshot, verify_snapshot, write_snapshot,
)
from prefcurate.curation.store.sql import query_polars
from prefcurate.data_schemas import SNAPSHOT_PAIRS, snapshot_contract
from prefcurate.data_schemas.adaptive import manifest_record
from prefcurate.data_schemas.vocab import SCORER_TRAITS, WEIGHT_FREE_SCORERS
from tests.shared_data import shared_data


PIXEL_SCORERS = list(WEIGHT_FREE_SCORERS)


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """The default embedded sample (the demo's), ingested, scored by the pixel scorers, curated."""
    root = tmp_path_factory.mktemp("curate")
    paths = generate_sample(str(root / "sample"), SampleConfig(seed=0))
    shards = sorted(glob.glob(os.path.join(paths.pickapic_dir, "*.parquet")))
    lake = Lake(str(root / "lake"), create=True)
    for shard in shards[:-1]:  # the last shard arrives later (test_new_pairs_...)
        ingest_file(lake, shard, IngestConfig("pickapic", "pickapic"), make_reader("pickapic"))
    run_scoring(lake, PIXEL_SCORERS, workers=0)
    curate(lake)
    return {"lake": lake, "paths": paths, "last_shard": shards[-1], "root": root}


def _truth_rows(paths) -> pl.DataFrame:
    return pl.read_parquet(paths.rows).with_columns(pl.col("ranking_id").cast(pl.String),
                                                   pl.col("user_id").cast(pl.String))


def test_unreliable_annotators_rank_above_reliable_ones(curated):
    annotators = query_polars(curated["lake"], "SELECT user_id, reliability FROM annotators")
    truth = pl.read_parquet(curated["paths"].annotators).with_columns(pl.col("user_id").cast(pl.String))
    frame = annotators.join(truth, on="user_id").filter(
        pl.col("annotator_type").is_in(["reliable", "minority", "spammer"]))
    unreliable = frame["annotator_type"].is_in(["minority", "spammer"]).to_numpy()
    assert unreliable.sum() >= 6 and (~unreliable).sum() >= 20
    score = auroc(-frame["reliability"].to_numpy(), unreliable)
    assert score >= 0.9, f"AUROC of unreliability, minority+spammer vs reliable = {score:.3f}"


def test_minority_scores_separate_minority_labels_from_majority_ones(curated):
    lake = curated["lake"]
    metrics = query_polars(lake, "SELECT p.ranking_id, m.minority_score FROM pair_metrics m "
                                 "JOIN pairs p USING (pair_id) WHERE m.minority_score IS NOT NULL")
    truth = _truth_rows(curated["paths"]).filter(pl.col("planted_defect").is_null()).select(
        "ranking_id", "label_agrees_with_majority")
    frame = metrics.join(truth, on="ranking_id").filter(pl.col("label_agrees_with_majority").is_not_null())
    against_majority = (~frame["label_agrees_with_majority"]).to_numpy()
    assert against_majority.sum() >= 100
    score = auroc(frame["minority_score"].to_numpy(), against_majority)
    assert score >= 0.8, f"AUROC of minority score, labels against vs with the majority = {score:.3f}"


def test_curation_tables_have_the_documented_columns(curated):
    lake = curated["lake"]
    required = {
        "votes": {"pair_id", "scorer", "margin", "vote"},
        "pair_metrics": {"pair_id", "consensus_label", "vote_fraction", "confidence", "stability",
                         "minority_score", "weight", "margin"},
        "annotators": {"user_id", "n_labels", "tie_rate", "left_rate", "consensus_agreement", "minority_rate",
                       "reliability"},
    }
    for table, columns in required.items():
        got = set(query_polars(lake, f"SELECT * FROM {table} LIMIT 1").columns)
        assert columns <= got, f"{table} lacks {columns - got}"
    n_pairs = query_polars(lake, "SELECT count(*) AS n FROM pairs")["n"][0]
    assert query_polars(lake, "SELECT count(*) AS n FROM votes")["n"][0] == 4 * n_pairs
    bad_weights = query_polars(lake, "SELECT count(*) AS n FROM pair_metrics WHERE weight <= 0 OR weight > 1")
    assert bad_weights["n"][0] == 0  # W = 1 / (10 u + 1) with u in [0, 1]


def test_curate_is_a_noop_until_new_pairs_arrive_then_right_again(curated, tmp_path):
    lake = curated["lake"]
    before = current_run(lake)
    again = curate(lake)
    assert again.reused and again.run_id == before["run_id"]
    # A copy of the lake receives the last shard; one curate run covers the new pairs.
    import shutil

    copy = Lake(shutil.copytree(lake.path, tmp_path / "lake"))
    ingest_file(copy, curated["last_shard"], IngestConfig("pickapic", "pickapic"), make_reader("pickapic"))
    run_scoring(copy, PIXEL_SCORERS, workers=0)
    result = curate(copy)
    assert not result.reused
    n_pairs = query_polars(copy, "SELECT count(*) AS n FROM pairs")["n"][0]
    assert result.counts["pairs"] == n_pairs > before["counts"]["pairs"]
    assert query_polars(copy, "SELECT count(*) AS n FROM pair_metrics")["n"][0] == n_pairs
    labels = query_polars(copy, "SELECT sum(n_labels) AS n FROM annotators")["n"][0]
    assert labels == query_polars(copy, "SELECT count(*) AS n FROM pairs WHERE user_id IS NOT NULL")["n"][0]


def test_scorer_traits_match_the_scorers(tmp_path):
    from prefcurate.curation.scorers import SCORERS, MissingWeightsError, build_scorer

    assert set(SCORER_TRAITS) == set(SCORERS)
    for name in PIXEL_SCORERS:  # the neural ones need weights to build; their traits are in the README table
        scorer = build_scorer(name)
        assert SCORER_TRAITS[name] == (scorer.higher_is_better, not scorer.uses_prompt, False)
    for name in set(SCORERS) - set(PIXEL_SCORERS):  # the rest refuse to build without their checkpoint files
        with pytest.raises(MissingWeightsError):
            build_scorer(name, weights_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown scorer"):
        CurateConfig(scorers=("nope",))


@pytest.mark.parametrize("kind", ["plain", "filter", "adaptive", "balanced", "reliability"])
def test_snapshot_policies(curated, tmp_path, kind):
    lake = curated["lake"]
    info = write_snapshot(lake, f"t-{kind}", SnapshotPolicy(kind=kind, pairs_per_shard=700), str(tmp_path))
    manifest = verify_snapshot(info.path)
    assert manifest["counts"]["pairs"] == info.counts["pairs"] == sum(s["rows"] for s in manifest["shards"])
    table = pq.read_table([os.path.join(info.path, s["path"]) for s in manifest["shards"]])
    assert table.schema.names == SNAPSHOT_PAIRS.names
    frame = pl.from_arrow(table.drop_columns(["winner_image", "loser_image"]))
    assert frame["pair_id"].n_unique() == frame.height
    pairs = query_polars(lake, "SELECT pair_id, label_0, image_0_id, image_1_id FROM pairs")
    joined = frame.join(pairs, on="pair_id")
    winner_is_0 = joined["winner_image_id"] == joined["image_0_id"]
    if kind == "balanced":
        consensus = query_polars(lake, "SELECT pair_id, consensus_label FROM pair_metrics")
        joined = joined.join(consensus, on="pair_id")
        winner_is_0 = joined["winner_image_id"] == joined["image_0_id"]
        assert (winner_is_0 == (joined["consensus_label"] == 1.0)).all()
        assert (frame["vote_fraction"] > 0.5).all()  # the majority voted for the winner
    else:
        assert (winner_is_0 == (joined["label_0"] == 1.0)).all() and (joined["label_0"] != 0.5).all()
    if kind == "adaptive":
        metrics = query_polars(lake, "SELECT pair_id, weight, margin, minority_score FROM pair_metrics")
        check = frame.join(metrics, on="pair_id", suffix="_m")
        ratio = (check["weight"] / check["weight_m"]).to_numpy()
        assert np.allclose(ratio, ratio[0]) and ratio[0] > 1  # W rescaled, never reordered
        assert check.filter(pl.col("minority_score_m") <= 0.5)["weight"].mean() == pytest.approx(1.0)
        assert (frame["weight"] < 0.5).any()  # the suspect pairs stay down-weighted
        # the constants W and Gamma were computed with, for the trainer's beta check
        assert manifest["adaptive"] == manifest_record(current_run(lake)["config"]["pair_metrics"])
        assert manifest["adaptive"]["beta"] == 2 * manifest["adaptive"]["beta_dpo"] == 2000.0
    elif kind == "reliability":
        metrics = query_polars(lake, "SELECT pair_id, label_posterior FROM pair_metrics")
        check = frame.join(metrics, on="pair_id")
        assert (check["label_posterior"] >= 0.5).all() and info.counts["filtered"] > 0
        ratio = (check["weight"] / check["label_posterior"]).to_numpy()
        assert np.allclose(ratio, ratio[0]) and frame["weight"].mean() == pytest.approx(1.0)
        assert (frame["label_smoothing"] == 0.0).all() and (frame["margin"] == 0.0).all()
    else:
        assert (frame["weight"] == 1.0).all() and (frame["margin"] == 0.0).all()
        assert (frame["label_smoothing"] == 0.0).all()
    if kind != "adaptive":
        assert manifest["adaptive"] is None
    if kind == "filter":
        assert (frame["minority_score"] <= 0.5).all() and info.counts["filtered"] > 0


def test_snapshot_is_immutable_content_addressed_and_verified(curated, tmp_path):
    lake = curated["lake"]
    first = write_snapshot(lake, "clean", SnapshotPolicy(kind="filter"), str(tmp_path))
    files = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(first.path, "**", "*"), recursive=True)}
    again = write_snapshot(lake, "clean", SnapshotPolicy(kind="filter"), str(tmp_path))
    assert again.reused and again.snapshot_id == first.snapshot_id
    assert {p: os.path.getmtime(p) for p in files} == files  # nothing rewritten
    other = write_snapshot(lake, "clean", SnapshotPolicy(kind="filter", max_minority_score=0.3), str(tmp_path))
    assert other.snapshot_id != first.snapshot_id and os.path.exists(first.path)
    assert resolve_snapshot(str(tmp_path), "clean") == other.path  # a name points to its newest
    assert resolve_snapshot(str(tmp_path), "latest") == other.path
    assert resolve_snapshot(str(tmp_path), first.snapshot_id) == first.path
    with pytest.raises(SnapshotError, match="no snapshot named 'nope'"):
        resolve_snapshot(str(tmp_path), "nope")
    shard = os.path.join(first.path, "shards", "shard-00000.parquet")
    with open(shard, "r+b") as f:  # tamper with one byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SnapshotError, match="does not match its manifest"):
        verify_snapshot(first.path)
    with pytest.raises(SnapshotError, match="does not match its manifest"):
        write_snapshot(lake, "clean", SnapshotPolicy(kind="filter"), str(tmp_path))
    os.remove(shard)
    with pytest.raises(SnapshotError, match="missing"):
        verify_snapshot(first.path)


def test_a_truncated_shard_fails_on_its_row_count_on_both_sides(curated, tmp_path):
    """A pairs file cut short and re-hashed (its digest matches the manifest, its row count does not) is refused
    by the writer-side verify_snapshot and by the training reader, with the row-count message: both run the one
    verification of prefcurate.data_schemas.snapshot_contract."""
    from prefcurate.training.snapshot_reader import open_snapshot

    info = write_snapshot(curated["lake"], "short", SnapshotPolicy(kind="plain", pairs_per_shard=700),
                          str(tmp_path))
    manifest_path = os.path.join(info.path, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    entry = manifest["shards"][0]
    shard = os.path.join(info.path, entry["path"])
    data = snapshot_contract.encode_shard(pq.read_table(shard).slice(0, entry["rows"] - 5), row_group_size=256)
    with open(shard, "wb") as f:
        f.write(data)
    entry["sha256"] = snapshot_contract.shard_entry(entry["path"], data, 0)["sha256"]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    message = rf"{entry['path']}: {entry['rows'] - 5} rows != manifest {entry['rows']}"
    with pytest.raises(SnapshotError, match=message):
        verify_snapshot(info.path)
    with pytest.raises(SnapshotError, match=message):
        open_snapshot(info.path)


def test_policies_that_need_statistics_refuse_an_uncurated_lake(tmp_path):
    lake = Lake(str(tmp_path / "lake"), create=True)
    with pytest.raises(SnapshotError, match="prefcurate curate"):
        write_snapshot(lake, "x", SnapshotPolicy(kind="adaptive"))
    with pytest.raises(SnapshotError, match="unknown policy"):
        SnapshotPolicy(kind="nope")


def test_annotator_statistics_on_real_wmt13_judgements(tmp_path):
    """Real labels with no images and no scorers: 218 WMT13 judges ranking translations. Reliability
    must then come from the judges' agreement with each other (Dawid-Skene on peer labels)."""
    lake = Lake(str(tmp_path / "lake"), create=True)
    ingest_file(lake, str(shared_data("wmt13_fr-en_rankings_train.csv")), IngestConfig("wmt13", "wmt"),
                make_reader("wmt"))
    result = curate(lake)
    assert result.counts["scorers"] == 0 and result.counts["human_agreement"] is None
    stats = query_polars(lake, "SELECT * FROM annotators")
    assert stats.height == 218 and stats["consensus_agreement"].is_null().all()
    assert (stats["reliability"] == stats["reliability_dawid_skene"]).all()
    ties = query_polars(lake, "SELECT avg((label_0 = 0.5)::INT) AS t FROM pairs")["t"][0]
    assert abs((stats["tie_rate"] * stats["n_labels"]).sum() / stats["n_labels"].sum() - ties) < 1e-9
    overlapping = stats.filter(pl.col("n_peer_pairs") >= 20)
    assert overlapping.height >= 100
    assert 0.6 < overlapping["peer_agreement"].median() < 0.8  # judges agree on about 2 of 3 decisive calls
    correlation = np.corrcoef(overlapping["peer_agreement"], overlapping["reliability"])[0, 1]
    assert correlation > 0.6, f"reliability vs peer agreement correlation {correlation:.2f}"


# --- label reliability (prefcurate.curation.labels.reliability) and the reliability policy ---

def test_label_posterior_closed_forms():
    from prefcurate.curation.labels.reliability import label_posterior, log_likelihood_ratio

    scorer = np.array([0.8, -1.3, 0.0])  # scorer log-odds toward image_0
    p_scorer_0 = 1 / (1 + np.exp(-scorer))
    one = np.ones(3)
    # a perfect annotator (a = b = 1) is right whatever the scorers say
    assert np.allclose(label_posterior(scorer, one, one, [True, False, True]), 1.0)
    # a coin-flip annotator (a = b = 1/2) or an always-left clicker (a = 1, b = 0) adds nothing
    for a, b in ((0.5, 0.5), (1.0, 0.0), (0.7, 0.3)):
        # (a = 1 is clipped to 1 - 1e-12, whose float complement is off by ~1e-16: 1e-4 in the log-ratio)
        assert np.allclose(label_posterior(scorer, a * one, b * one, [True] * 3), p_scorer_0, atol=1e-4)
        assert np.allclose(label_posterior(scorer, a * one, b * one, [False] * 3), 1 - p_scorer_0, atol=1e-4)
    # a left-biased annotator (a = 0.9, b = 0.5): "left" is weak evidence, "right" strong
    left, right = log_likelihood_ratio(0.9, 0.5, True), log_likelihood_ratio(0.9, 0.5, False)
    assert left == pytest.approx(np.log(0.9 / 0.5)) and right == pytest.approx(np.log(0.1 / 0.5))
    assert 0 < left < -right
    # Bayes by hand: prior log-odds 0, a = b = 0.8, says image_1: posterior of image_1 = 0.8
    assert label_posterior(np.array([0.0]), np.array([0.8]), np.array([0.8]), [False])[0] == pytest.approx(0.8)


def test_normalise_weights_makes_trusted_pairs_average_one():
    from prefcurate.curation.labels.reliability import normalise_weights

    w = normalise_weights(np.array([0.9, 0.7, 0.2, 0.1]), np.array([True, True, False, False]))
    assert w[:2].mean() == pytest.approx(1.0) and w[2] < w[1] and np.allclose(w / w[0], [1, 7 / 9, 2 / 9, 1 / 9])
    assert normalise_weights(np.array([0.5, 0.25]), np.array([False, False])).mean() == pytest.approx(1.0)
    assert normalise_weights(np.zeros(0), np.zeros(0, bool)).size == 0


def test_label_reliability_on_a_hand_made_crowd():
    """Two scorers (one 90 % right, one noise) and two annotators: a reliable one on 200 items and a
    contrarian (right 20 % of the time) on 120 of them, a minority of the labels (the label model
    takes the majority's taste as the truth; at exactly half the labels either could be it)."""
    from prefcurate.curation.labels.reliability import label_reliability

    rng = np.random.default_rng(0)
    n = 200
    truth_0 = rng.random(n) < 0.5  # image_0 truly better
    ids = [f"p{i}" for i in range(n)]
    good = np.where(rng.random(n) < 0.9, truth_0, ~truth_0)
    noise = rng.random(n) < 0.5
    votes = pl.DataFrame({
        "pair_id": ids * 2, "scorer": ["good"] * n + ["noise"] * n,
        "vote": np.concatenate([good, noise]).astype(float)})
    reliable = np.where(rng.random(n) < 0.9, truth_0, ~truth_0)
    k = 120
    contrarian = np.where(rng.random(k) < 0.2, truth_0[:k], ~truth_0[:k])
    pairs = pl.DataFrame({
        "pair_id": ids + [f"c{i}" for i in range(k)],
        "user_id": ["rel"] * n + ["con"] * k,
        "label_0": np.concatenate([reliable, contrarian]).astype(float),
        "image_0_id": [f"a{i}" for i in range(n)] + [f"a{i}" for i in range(k)],
        "image_1_id": [f"b{i}" for i in range(n)] + [f"b{i}" for i in range(k)]})
    per_pair, per_scorer = label_reliability(pairs, votes)
    assert per_scorer["scorer"].to_list() == ["good", "noise"]
    good_row, noise_row = per_scorer.row(0, named=True), per_scorer.row(1, named=True)
    # 0.9 drawn; measured against the model's posterior truth, which is itself wrong on a few items: 0.86
    assert good_row["reliability"] == pytest.approx((good == truth_0).mean(), abs=0.05)
    assert abs(noise_row["reliability"] - 0.5) < 0.1
    assert good_row["log_odds_for_0"] > 3 * abs(noise_row["log_odds_for_0"])
    right = np.concatenate([reliable == truth_0, contrarian == truth_0[:k]])
    posterior = per_pair["label_posterior"].to_numpy()
    assert auroc(posterior, right) > 0.9
    # the peer term: the contrarian's items are the reliable annotator's, so its evidence shows up there
    peer = per_pair["peer_log_odds"].to_numpy()
    assert (np.abs(peer[n:]) > 0.5).all() and (peer[k:n] == 0).all()
    assert per_pair["calibrated_label"].to_list()[:k] == per_pair["calibrated_label"].to_list()[n:]
    # a pair with a tie has no posterior; the calibrated label does not need a human label
    tied = pairs.with_columns(label_0=pl.lit(0.5))
    assert label_reliability(tied, votes)[0]["label_posterior"].is_null().all()


def test_reliability_policy_beats_adaptive_and_filter_on_the_planted_truth(curated):
    """Issue 11: the weighted share of truly better winners, reliability > adaptive and filter > plain."""
    from prefcurate.curation.snapshot import compare_policies, pair_truth_from_sample

    lake = curated["lake"]
    truth = pair_truth_from_sample(lake, pl.read_parquet(curated["paths"].rows))
    table = compare_policies(lake, truth, {k: SnapshotPolicy(kind=k) for k in ("plain", "filter", "adaptive",
                                                                               "reliability")})
    share = dict(zip(table["policy"], table["weighted_share"], strict=True))
    assert share["reliability"] > max(share["adaptive"], share["filter"]) + 0.04, share
    assert min(share["adaptive"], share["filter"]) > share["plain"]
    assert table.filter(pl.col("policy") == "reliability")["pairs"][0] > 0.7 * table["pairs"][0]


def test_reliability_policy_options(curated, tmp_path):
    from prefcurate.curation.snapshot import select_pairs

    lake = curated["lake"]
    soft, _ = select_pairs(lake, SnapshotPolicy(kind="reliability", posterior_use="soft_target"))
    assert (soft["weight"] == 1.0).all() and soft["label_smoothing"].is_between(0.0, 0.5).all()
    assert (soft["label_smoothing"] > 0.2).any()
    kept, _ = select_pairs(lake, SnapshotPolicy(kind="reliability", min_posterior=None))
    flipped, counts = select_pairs(lake, SnapshotPolicy(kind="reliability", min_posterior=None, flip_above=0.9))
    assert counts["flipped"] > 0 and kept.height == flipped.height
    changed = kept.join(flipped, on="pair_id").filter(pl.col("winner_image_id") != pl.col("winner_image_id_right"))
    assert changed.height == counts["flipped"] and (changed["label_source_right"] == "human_flipped").all()
    # a preference-group snapshot: only the group's pairs, its own labels, weight 1
    truth = pl.read_parquet(curated["paths"].annotators).with_columns(pl.col("user_id").cast(pl.String))
    minority = truth.filter(pl.col("annotator_type") == "minority")["user_id"].to_list()
    group, _ = select_pairs(lake, SnapshotPolicy(kind="reliability", annotator_group=tuple(minority)))
    assert group.height > 0 and set(group["user_id"]) <= set(minority) and (group["weight"] == 1.0).all()
    majority, _ = select_pairs(lake, SnapshotPolicy(kind="reliability"))
    assert majority.filter(pl.col("user_id").is_in(minority)).height < 0.5 * group.height  # down-weighted as noise
    with pytest.raises(SnapshotError, match="flip_above"):
        SnapshotPolicy(kind="reliability", flip_above=0.4)
    with pytest.raises(SnapshotError, match="posterior_use"):
        SnapshotPolicy(kind="reliability", posterior_use="both_ways")


def test_scorer_reliability_table_and_calibrated_consensus(curated):
    lake = curated["lake"]
    table = query_polars(lake, "SELECT * FROM scorer_reliability ORDER BY reliability DESC")
    assert sorted(table["scorer"]) == sorted(PIXEL_SCORERS) and (table["n_votes"] > 0).all()
    # prompt_colour measures the largest share of the planted utility (0.45): the most reliable
    assert table["scorer"][0] == "prompt_colour" and (table["reliability"] > 0.5).all()
    truth = pair_truth_from_sample_frame(curated)
    metrics = query_polars(lake, "SELECT m.pair_id, m.calibrated_label, c.consensus_label, p.image_0_id "
                                 "FROM pair_metrics m JOIN consensus c USING (pair_id) JOIN pairs p USING (pair_id)"
                           ).join(truth, on="pair_id")
    both = metrics.filter(pl.col("consensus_label").is_not_null() & pl.col("better_image_id").is_not_null())
    better_0 = both["better_image_id"] == both["image_0_id"]
    calibrated = ((both["calibrated_label"] == 1.0) == better_0).mean()
    majority = ((both["consensus_label"] == 1.0) == better_0).mean()
    assert calibrated >= majority - 0.01, (calibrated, majority)


def pair_truth_from_sample_frame(curated) -> pl.DataFrame:
    from prefcurate.curation.snapshot import pair_truth_from_sample

    return pair_truth_from_sample(curated["lake"], pl.read_parquet(curated["paths"].rows))


def test_curation_tables_are_described(curated):
    from prefcurate.data_schemas import describe
    from prefcurate.data_schemas.tables import CURATION_TABLES

    lake = curated["lake"]
    for name in ("votes", "consensus", "pair_metrics", "scorer_reliability"):
        got = query_polars(lake, f"SELECT * FROM {name} LIMIT 1").columns
        assert got == CURATION_TABLES[name].names, name
        assert describe(name).count("\n") == len(got)
    got = set(query_polars(lake, "SELECT * FROM annotators LIMIT 1").columns)
    assert set(CURATION_TABLES["annotators"].names) <= got


def test_dense_codes_match_the_keys_exactly():
    from prefcurate.curation.labels.reliability_votes import _dense_codes

    keys = pl.DataFrame({"lo": ["x", "y", "x", "z", "y", "x"], "hi": ["1", "1", "1", "2", "2", "2"]})
    codes = _dense_codes(keys)
    assert sorted(set(codes.tolist())) == list(range(5))  # 5 distinct (lo, hi) keys, codes 0..4
    pairs = list(zip(keys["lo"], keys["hi"], strict=True))
    assert all((codes[i] == codes[j]) == (pairs[i] == pairs[j]) for i in range(6) for j in range(6))
    assert _dense_codes(keys.head(0)).size == 0
