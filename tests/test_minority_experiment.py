"""The small-world minority-label experiment end to end in --quick mode (toy sizes, ~30-50 s on 2 shared cores),
plus the world's pixel reward and planted labels. The quick mode checks the pipeline, never the paper's claims."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks.minority import MAIN_METHODS, bootstrap_ci, parse_args, resummarise, run
from benchmarks.smallworld import world
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


def test_quick_experiment_writes_a_row_per_method_and_flip_rate(tmp_path):
    config, _ = parse_args(["--quick", "--out", str(tmp_path / "out"), "--model", str(tmp_path / "model")])
    assert config.steps <= 5 and config.flip_rates == (0.0, 0.3)
    result = run(config)
    table = json.loads((tmp_path / "out" / "results.json").read_text())["table"]
    assert [(r["method"], r["flip_rate"]) for r in table] == [(m, f) for f in (0.0, 0.3) for m in MAIN_METHODS]
    for row in table:
        numbers = [row["gain"], row["ci_low"], row["ci_high"], *row["seed_gains"], row["gain_colour_match"],
                   row["gain_sharpness"], row["gain_exposure_quality"], row["train_labels_truly_better"]]
        assert all(math.isfinite(x) for x in numbers), row
        assert row["ci_low"] <= row["gain"] <= row["ci_high"]
    assert len(result["runs"]) == len(MAIN_METHODS) * 2
    assert result["data"]["0.3"]["flipped"] >= 1 and result["data"]["0.0"]["flipped"] == 0
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert markdown.count("\n| 30% |") == len(MAIN_METHODS) + 1  # the method rows and the label-quality row
    assert (tmp_path / "out" / "gain_vs_flip.png").stat().st_size > 1000
    for row in table:  # DPO's paired difference to itself is exactly zero
        assert row["vs_dpo_ci_low"] <= row["vs_dpo"] <= row["vs_dpo_ci_high"]
        if row["method"] == "dpo":
            assert row["vs_dpo"] == 0.0 == row["vs_dpo_ci_low"] == row["vs_dpo_ci_high"]
    again = resummarise(tmp_path / "out")  # the report rebuilt from results.json alone gives the same table
    assert again["table"] == table


def test_two_level_bootstrap_covers_seed_spread():
    rng = np.random.default_rng(0)
    same_seeds = np.tile(rng.normal(0.05, 0.02, size=40), (2, 1))  # two identical seeds: only caption noise
    spread = same_seeds + np.array([[-0.03], [0.03]])  # seeds disagree by 0.06: the interval must widen
    low, high = bootstrap_ci(same_seeds, 2000, seed=1)
    assert low < 0.05 < high and high - low < 0.02
    low2, high2 = bootstrap_ci(spread, 2000, seed=1)
    assert high2 - low2 > 0.04 and abs((low2 + high2) / 2 - same_seeds.mean()) < 0.01
