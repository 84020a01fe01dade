"""Adaptive-DPO pair metrics against hand-computed values (docs/methods.md §2.3-2.4)."""
import dataclasses
import math
import statistics

import polars as pl
import pytest

from prefcurate.curation.labels.pair_metrics import PAIR_METRICS_SCHEMA, PairMetricsConfig, pair_metrics


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def votes_frame(rows: dict[str, list[float]]) -> pl.DataFrame:
    """{pair_id: [normalized margins of its scorers]} -> a votes frame (only normalized_margin is read)."""
    return pl.DataFrame(
        [{"pair_id": p, "scorer": f"s{i}", "normalized_margin": m}
         for p, ms in rows.items() for i, m in enumerate(ms)],
        schema={"pair_id": pl.String, "scorer": pl.String, "normalized_margin": pl.Float64},
    )


def pairs_frame(labels: dict[str, float]) -> pl.DataFrame:
    return pl.DataFrame({"pair_id": list(labels), "label_0": list(labels.values())})


def row(frame: pl.DataFrame, pair_id: str) -> dict:
    return frame.filter(pl.col("pair_id") == pair_id).row(0, named=True)


def test_one_pair_three_annotators_by_hand():
    # Two scorers (normalized margins +1, -1) and the human (label image_0, pseudo-margin +1).
    # s = rho / sqrt(B) * margin toward the label = 15 / 4 * (+1, -1, +1).
    out = pair_metrics(votes_frame({"a": [1.0, -1.0]}), pairs_frame({"a": 1.0}))
    s = [3.75, -3.75, 3.75]
    c = sum(map(sigmoid, s)) / 3
    v = min(statistics.stdev(s), 1.0)  # unbiased std 4.33, capped at 1
    u = (1 - c) * v
    got = row(out, "a")
    assert got["n_annotators"] == 3
    assert got["confidence"] == pytest.approx(c) and got["stability"] == pytest.approx(v)
    assert got["minority_score"] == pytest.approx(u) and got["minority_score"] == pytest.approx(0.340992, abs=1e-6)
    assert got["weight"] == pytest.approx(1 / (10 * u + 1))
    assert got["margin"] == pytest.approx(-(u**2) / 1000)


def test_label_image_1_scores_margins_toward_image_1():
    # Label 0 (image_1 wins): a scorer margin of -1 now supports the label.
    official = PairMetricsConfig(stability_term="capped_std")
    out = pair_metrics(votes_frame({"a": [-1.0, -1.0]}), pairs_frame({"a": 0.0}), official)
    assert row(out, "a")["confidence"] == pytest.approx(sigmoid(3.75))
    assert row(out, "a")["minority_score"] == pytest.approx(0.0)  # all agree: std 0
    assert row(out, "a")["weight"] == pytest.approx(1.0)


def test_uncapped_std_scorers_only():
    config = PairMetricsConfig(use_human_annotator=False, stability_term="capped_std")
    out = pair_metrics(votes_frame({"a": [0.1, 0.2, 0.3]}), pairs_frame({"a": 1.0}), config)
    s = [0.375, 0.75, 1.125]
    c = sum(map(sigmoid, s)) / 3
    got = row(out, "a")
    assert got["n_annotators"] == 3 and got["stability"] == pytest.approx(0.375)
    assert got["minority_score"] == pytest.approx((1 - c) * 0.375)


def test_false_flag_really_turns_the_human_annotator_off():
    votes, pairs = votes_frame({"a": [1.0, -1.0]}), pairs_frame({"a": 1.0})
    on = row(pair_metrics(votes, pairs, PairMetricsConfig(use_human_annotator=True)), "a")
    off = row(pair_metrics(votes, pairs, PairMetricsConfig(use_human_annotator=False)), "a")
    assert (on["n_annotators"], off["n_annotators"]) == (3, 2)
    assert off["confidence"] == pytest.approx(0.5)


def test_reference_batch_size_sets_the_scale():
    config = PairMetricsConfig(use_human_annotator=False, reference_batch_size=1)
    out = pair_metrics(votes_frame({"a": [0.1, -0.1]}), pairs_frame({"a": 1.0}), config)
    assert row(out, "a")["stability"] == 1.0  # s = 15 * (0.1, -0.1): std 2.12, capped at 1
    config = dataclasses.replace(config, reference_batch_size=100)  # s = 1.5 * (0.1, -0.1)
    out = pair_metrics(votes_frame({"a": [0.1, -0.1]}), pairs_frame({"a": 1.0}), config)
    assert row(out, "a")["stability"] == pytest.approx(statistics.stdev([0.15, -0.15]))


@pytest.mark.parametrize(("weight_type", "formula"), [
    ("linear", lambda u: 1 / (10 * u + 1)),
    ("quadratic", lambda u: 1 / (10 * u**2 + 1)),
    ("sigmoid", lambda u: 1 / (math.exp(10 * u) + 1)),
    ("sqrt", lambda u: 1 / (math.exp(10 * math.sqrt(u)) + 1)),
])
def test_weight_types(weight_type, formula):
    config = PairMetricsConfig(weight_type=weight_type)
    out = pair_metrics(votes_frame({"a": [1.0, -1.0]}), pairs_frame({"a": 1.0}), config)
    got = row(out, "a")
    assert got["weight"] == pytest.approx(formula(got["minority_score"]))


def test_margin_types_scale_and_dataset_mean_offset():
    votes = votes_frame({"a": [1.0, -1.0], "b": [2.0, 2.0]})
    pairs = pairs_frame({"a": 1.0, "b": 1.0})
    base = pair_metrics(votes, pairs)
    u = base["minority_score"].to_list()
    linear = pair_metrics(votes, pairs, PairMetricsConfig(margin_type="linear", margin_scale=100.0))
    assert linear["margin"].to_list() == pytest.approx([-100 * x / 1000 for x in u])
    # offset = mean over pairs of the annotators' mean margin toward the label, / sqrt(16):
    # a: (1 - 1 + 1) / 3, b: (2 + 2 + 1) / 3
    offset = ((1 / 3) + (5 / 3)) / 2 / 4
    shifted = pair_metrics(votes, pairs, PairMetricsConfig(margin_offset="dataset_mean"))
    assert shifted["margin"].to_list() == pytest.approx([-(x**2) / 1000 + offset for x in u])


def test_consensus_label_source_turns_the_human_against_the_label():
    votes, pairs = votes_frame({"a": [1.0, 1.0]}), pairs_frame({"a": 0.0})  # scorers say image_0, human image_1
    consensus = pl.DataFrame({"pair_id": ["a"], "consensus_label": [1.0]})
    human = row(pair_metrics(votes, pairs), "a")
    config = PairMetricsConfig(label_source="consensus")
    by_consensus = row(pair_metrics(votes, pairs, config, consensus=consensus), "a")
    # human label: s = 3.75 * (-1, -1, +1); consensus label: s = 3.75 * (+1, +1, -1)
    assert human["confidence"] == pytest.approx((2 * sigmoid(-3.75) + sigmoid(3.75)) / 3)
    assert by_consensus["confidence"] == pytest.approx((2 * sigmoid(3.75) + sigmoid(-3.75)) / 3)
    assert human["minority_score"] > 0.6 > 0.35 > by_consensus["minority_score"]
    with pytest.raises(ValueError, match="consensus"):
        pair_metrics(votes, pairs, PairMetricsConfig(label_source="consensus"))


def test_ties_and_single_annotator_pairs_are_excluded():
    votes = votes_frame({"tie": [1.0, -1.0], "lone": [1.0]})
    out = pair_metrics(votes, pairs_frame({"tie": 0.5, "lone": 1.0, "none": 1.0}),
                       PairMetricsConfig(use_human_annotator=False))
    tie, lone, none = row(out, "tie"), row(out, "lone"), row(out, "none")
    assert tie["n_annotators"] == 2 and all(tie[k] is None for k in ("confidence", "minority_score", "weight"))
    assert lone["confidence"] == pytest.approx(sigmoid(3.75)) and lone["stability"] is None
    assert lone["minority_score"] == pytest.approx(1 - sigmoid(3.75))  # default stability_term "none": u = 1 - c
    assert none["n_annotators"] == 0 and none["confidence"] is None
    official = row(pair_metrics(votes, pairs_frame({"lone": 1.0}),
                                PairMetricsConfig(use_human_annotator=False, stability_term="capped_std")), "lone")
    assert official["minority_score"] is None and official["weight"] is None and official["margin"] is None


def test_stability_term_none_drops_v_and_capped_std_keeps_it():
    # margins toward the label (+0.1, -0.1) with rho / sqrt(B) = 15 / 4: s = +-0.375, std 0.53 < cap
    votes, pairs = votes_frame({"a": [0.1, -0.1]}), pairs_frame({"a": 1.0})
    c = (sigmoid(0.375) + sigmoid(-0.375)) / 2
    v = statistics.stdev([0.375, -0.375])
    dropped = row(pair_metrics(votes, pairs, PairMetricsConfig(use_human_annotator=False)), "a")
    official = row(pair_metrics(votes, pairs, PairMetricsConfig(use_human_annotator=False,
                                                                stability_term="capped_std")), "a")
    assert dropped["stability"] == official["stability"] == pytest.approx(v)
    assert dropped["minority_score"] == pytest.approx(1 - c)
    assert official["minority_score"] == pytest.approx((1 - c) * v)
    with pytest.raises(ValueError, match="stability_term"):
        PairMetricsConfig(stability_term="rank")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="weight_type"):
        PairMetricsConfig(weight_type="cubic")
    with pytest.raises(ValueError, match="label_source"):
        PairMetricsConfig(label_source="model")
    with pytest.raises(ValueError, match="rho"):
        PairMetricsConfig(rho=0.0)


def test_empty_in_empty_out():
    out = pair_metrics(votes_frame({}), pairs_frame({}).cast({"pair_id": pl.String, "label_0": pl.Float64}))
    assert out.height == 0 and out.schema == pl.Schema(PAIR_METRICS_SCHEMA)
