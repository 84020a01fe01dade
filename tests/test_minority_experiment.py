"""The small-world v2 experiment end to end in --quick mode (toy sizes, ~60-90 s on 2 shared cores), plus the
world's pixel reward, the per-pair flip protocol and the typed annotator crowd. The quick mode checks the pipeline, never the paper's claims."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks.minority import MAIN_METHODS, bootstrap_ci, parse_args, resummarise, run
from benchmarks.smallworld import crowd, world
from benchmarks.smallworld.pairs import plant_labels


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_pixel_reward_tracks_the_planted_utility():
    scenes = world.render_set(300, wrong_colour_rate=0.35, seed=3)
    named = [c.colour for c in scenes.captions]
    reward = world.true_reward(scenes.images, named)
    assert reward.shape == (300,) and reward.min() >= 0 and reward.max() <= 1
    assert np.corrcoef(reward, scenes.planted_utility())[0, 1] > 0.9
    props = world.pixel_properties(scenes.images, named)
    assert np.corrcoef(props["sharpness"], -scenes.blur)[0, 1] > 0.9
    assert np.corrcoef(props["exposure_quality"], -np.abs(scenes.exposure))[0, 1] > 0.75


def test_sharpness_constants_are_the_calibration_fit():
    a, b = world.calibrate(n=600, seed=7)  # a smaller fit than the committed one: same line within noise
    assert abs(b - world.SHARP_B) < 0.03 and abs(a - world.SHARP_A) < 0.06


def test_planted_labels_follow_bradley_terry_and_nest_the_flips():
    rng = np.random.default_rng(0)
    a, b = rng.random(20000), rng.random(20000)
    clean, none = plant_labels(a, b, 0.0, bt_scale=20.0, seed=1)
    assert not none.any()
    bins = (a - b > 0.05) & (a - b < 0.07)  # P(a wins) = sigmoid(20 * 0.06) = 0.769
    assert abs(clean[bins].mean() - 1 / (1 + math.exp(-1.2))) < 0.04
    label20, flip20 = plant_labels(a, b, 0.2, bt_scale=20.0, seed=1)
    label30, flip30 = plant_labels(a, b, 0.3, bt_scale=20.0, seed=1)
    assert abs(flip30.mean() - 0.3) < 0.02 and (flip30 | ~flip20).all()  # the 20 % flips are among the 30 %
    assert (label30[flip30] == 1 - clean[flip30]).all() and (label30[~flip30] == clean[~flip30]).all()
    with pytest.raises(ValueError, match="flip_rate"):
        plant_labels(a, b, 1.0, bt_scale=20.0, seed=1)


def _props(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.random(n) for k in crowd.PROPERTIES}


def test_annotator_types_choose_as_documented():
    left, right = _props(40000, 1), _props(40000, 2)
    draw = np.random.default_rng(3).random(40000)
    assert abs((draw < crowd.Spammer().choose_left(left, right)).mean() - 0.5) < 0.01
    assert abs((draw < crowd.PositionBiased(p_left=0.8).choose_left(left, right)).mean() - 0.8) < 0.01
    u = {k: world.UTILITY_WEIGHTS[i] for i, k in enumerate(crowd.PROPERTIES)}
    gap = sum(w * (left[k] - right[k]) for k, w in u.items())
    p = crowd.Reliable(bt_scale=20.0).choose_left(left, right)
    assert np.allclose(p, 1 / (1 + np.exp(-20.0 * gap)))
    minority = crowd.MinorityTaste(weights=(0.0, 0.0, 1.0), bt_scale=20.0).choose_left(left, right)
    assert np.allclose(minority, 1 / (1 + np.exp(-20.0 * (left["exposure_quality"] - right["exposure_quality"]))))
    with pytest.raises(ValueError, match="either a mix"):
        crowd.Scenario("bad")
    with pytest.raises(ValueError, match="sum to 1"):
        crowd.Scenario("bad", ((crowd.Spammer(), 0.5),))


def test_crowd_volume_is_heavy_tailed_and_pairs_get_distinct_annotators():
    config = crowd.CrowdConfig(n_annotators=40, zipf_exponent=0.8, multi_label_share=0.5, max_labels_per_pair=4)
    c = crowd.draw_crowd(600, config)
    volume = np.sort(np.bincount(c.annotator, minlength=40))[::-1]
    assert volume[:5].sum() > 0.3 * c.n_labels > volume[-20:].sum()  # a few users give most labels
    per_pair = np.bincount(c.pair)
    assert per_pair.min() == 1 and per_pair.max() == 4 and 0.4 < (per_pair > 1).mean() < 0.6
    assert all(len(set(c.annotator[c.pair == m])) == k for m, k in enumerate(per_pair))


def test_noise_levels_hit_their_share_nest_and_keep_reliable_labels_fixed():
    n = 600
    c = crowd.draw_crowd(n, crowd.CrowdConfig(n_annotators=40, zipf_exponent=0.8, multi_label_share=0.5,
                                              max_labels_per_pair=4))
    a, b = _props(n, 4), _props(n, 5)
    scenario = crowd.SCENARIOS["crowd"]
    chosen = crowd.non_reliable_annotators(c, scenario, (0.2, 0.4))
    assert set(chosen[0.2]) <= set(chosen[0.4])
    clean = crowd.plant_crowd_labels(c, a, b, crowd.SCENARIOS["flips"], 0.0)
    assert not clean.noisy.any() and set(clean.annotator_kind) == {"reliable"}
    for level in (0.2, 0.4):
        labels = crowd.plant_crowd_labels(c, a, b, scenario, level, chosen[level])
        assert abs(labels.noisy.mean() - level) < 0.02
        kinds = np.array(labels.annotator_kind)[c.annotator]
        assert {"spammer", "position_biased", "minority_taste"} <= set(kinds)
        assert (labels.label_left[~labels.noisy] == clean.label_left[~labels.noisy]).all()  # common random numbers
        truth = labels.truth(c)
        assert sum(x["n_labels"] for x in truth["annotators"]) == c.n_labels
        assert truth["noisy_label_share"] == labels.noisy.mean()
    flips = crowd.plant_crowd_labels(c, a, b, crowd.SCENARIOS["flips"], 0.4)
    assert abs(flips.noisy.mean() - 0.4) < 0.03
    assert (flips.label_left == np.where(flips.noisy, 1 - clean.label_left, clean.label_left)).all()
    with pytest.raises(ValueError, match="noise levels"):
        crowd.non_reliable_annotators(c, scenario, (1.0,))


def test_quick_experiment_writes_every_run_and_resummarises(tmp_path):
    config, _ = parse_args(["--quick", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "model")])
    assert config.steps <= 5 and config.conditions() == [("clean", 0.0), ("crowd", 0.4)]
    result = run(config)
    table = json.loads((tmp_path / "out" / "results.json").read_text())["table"]
    assert [(r["method"], r["scenario"], r["noise"]) for r in table] == [
        (m, s, t) for s, t in config.conditions() for m in MAIN_METHODS]
    for row in table:
        numbers = [row["gain"], row["ci_low"], row["ci_high"], *row["seed_gains"], row["gain_colour_match"],
                   row["gain_sharpness"], row["gain_exposure_quality"]]
        assert all(math.isfinite(x) for x in numbers), row
        assert row["ci_low"] <= row["gain"] <= row["ci_high"]
        assert row["vs_dpo_ci_low"] <= row["vs_dpo"] <= row["vs_dpo_ci_high"]
        if row["method"] == "dpo":  # DPO's paired difference to itself is exactly zero
            assert row["vs_dpo"] == 0.0 == row["vs_dpo_ci_low"] == row["vs_dpo_ci_high"]
    assert len(result["runs"]) == len(MAIN_METHODS) * 2 + 2 * 2  # + the headline methods on 2 conditions, seed 1
    # BalancedDPO's scorer-only labels do not depend on the crowd: its crowd run is the clean one, not retrained
    reused = {r["run"]: r.get("reused_from") for r in result["runs"]}
    assert reused["balanced-crowd40-seed0"] == "balanced-clean00-seed0"
    assert reused["dpo-crowd40-seed0"] is None and reused["calibrated-crowd40-seed0"] is None
    data = result["data"]
    assert data["clean00"]["noisy_label_share"] == 0.0 and data["crowd40"]["noisy_label_share"] > 0.2
    for d in data.values():
        for policy in ("plain", "filter", "adaptive", "balanced", "calibrated", "reliability"):
            assert 0.0 <= d["snapshots"][policy]["weighted_truly_better"] <= 1.0
        assert {a["kind"] for a in d["truth"]["annotators"]} <= {"reliable", "spammer", "position_biased",
                                                                 "minority_taste"}
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert markdown.count("\n| crowd | 40% |") == len(MAIN_METHODS)
    assert (tmp_path / "out" / "gain_vs_noise.png").stat().st_size > 1000
    again = resummarise(tmp_path / "out")  # the report rebuilt from results.json alone gives the same table
    assert again["table"] == table and again["verdicts"] == result["verdicts"]
    assert {v["claim"] for v in again["verdicts"]} >= {"plain DPO keeps < 50 % of the clean-DPO gain",
                                                       "reliability beats DPO"}
    # a run split across processes (--only) and merged gives the same table as the whole run
    whole = json.loads((tmp_path / "out" / "results.json").read_text())
    for name, keep in (("a", "clean"), ("b", "crowd")):
        part = {**whole, "runs": [r for r in whole["runs"] if r["scenario"] == keep],
                "data": {k: v for k, v in whole["data"].items() if v["scenario"] == keep}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(part))
    merged = resummarise(tmp_path / "a", merge=(tmp_path / "b",))
    assert merged["table"] == table and set(merged["data"]) == set(whole["data"])
    with pytest.raises(ValueError, match="in both results"):
        resummarise(tmp_path / "a", merge=(tmp_path / "out",))


def test_resummarise_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        resummarise(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"config": {}, "table": []}))
    with pytest.raises(ValueError, match="per-run data"):
        resummarise(tmp_path)


def test_two_level_bootstrap_covers_seed_spread():
    rng = np.random.default_rng(0)
    same_seeds = np.tile(rng.normal(0.05, 0.02, size=40), (2, 1))  # two identical seeds: only caption noise
    spread = same_seeds + np.array([[-0.03], [0.03]])  # seeds disagree by 0.06: the interval must widen
    low, high = bootstrap_ci(same_seeds, 2000, seed=1)
    assert low < 0.05 < high and high - low < 0.02
    low2, high2 = bootstrap_ci(spread, 2000, seed=1)
    assert high2 - low2 > 0.04 and abs((low2 + high2) / 2 - same_seeds.mean()) < 0.01
