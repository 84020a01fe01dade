"""Evaluation: win-rate statistics against hand-computed values, the shipped prompt sets, deterministic sampling,
and `prefcurate eval` end to end on a tiny real pipeline with a LoRA from a 2-step training run (CPU, 32 px)."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from prefcurate.evaluation.winrate import (
    bootstrap_interval, comparison_outcomes, sign_test_pvalue, summarize, wilson_interval, win_rate,
)
from prefcurate.cli.main import main as cli
from prefcurate.evaluation.evaluate import EvalConfig, run_eval
from tests.snapshot_fixture import write_test_snapshot
from prefcurate.training.components import build_tiny_pipeline
from prefcurate.training.generate import LORA_FILE, SamplingConfig, generate, load_pipeline, lora_disabled
from prefcurate.training.prompts import PROMPT_SETS, PROMPTS_DIR, PromptFileError, load_prompts
from prefcurate.training.trainer import main as train_main


# ---------------------------------------------------------------- statistics

def test_win_rate_counts_ties_as_half_and_reports_them():
    base = np.zeros(10)
    tuned = np.array([1.0] * 7 + [-1.0] * 2 + [0.0])  # 7 wins, 2 losses, 1 tie
    s = summarize(base, tuned, n_bootstrap=200)
    assert (s.wins, s.losses, s.ties, s.n_comparisons) == (7, 2, 1, 10)
    assert s.win_rate == 0.75  # (7 + 0.5) / 10
    assert (s.mean_base, s.mean_tuned) == (0.0, 0.5)
    assert summarize(base, tuned, higher_is_better=False, n_bootstrap=200).win_rate == 0.25  # (2 + 0.5) / 10
    assert win_rate(comparison_outcomes(base, tuned)) == 0.75
    # one seed per prompt: the prompt-level sign test is 7 vs 2, p = 2·(C(9,0)+C(9,1)+C(9,2))/2^9 = 92/512
    assert s.sign_test_p == 92 / 512


def test_wilson_interval_matches_the_formula_by_hand():
    z = 1.959963984540054  # Φ⁻¹(0.975)
    n, p = 20, 15 / 20
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = wilson_interval(15, 20)
    assert low == pytest.approx(centre - half, abs=1e-12) and high == pytest.approx(centre + half, abs=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.5313, 0.8881)  # the textbook values for 15/20
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(0, 20)[0] == 0.0
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(21, 20)


def test_sign_test_exact_values():
    assert sign_test_pvalue(10, 0) == 2 / 2 ** 10
    assert sign_test_pvalue(5, 5) == 1.0
    assert sign_test_pvalue(0, 0) == 1.0  # all ties: no evidence either way
    assert sign_test_pvalue(60, 40) == pytest.approx(2 * sum(math.comb(100, k) for k in range(41)) / 2 ** 100)


def test_bootstrap_degenerate_cases_and_seeded_reproducibility():
    assert bootstrap_interval(np.ones((12, 3)), n_resamples=300) == (1.0, 1.0)
    assert bootstrap_interval(np.full((12, 3), 0.5), n_resamples=300) == (0.5, 0.5)
    rng = np.random.default_rng(3)
    outcomes = rng.choice([0.0, 0.5, 1.0], size=(40, 2))
    first = bootstrap_interval(outcomes, n_resamples=1000, seed=5)
    assert bootstrap_interval(outcomes, n_resamples=1000, seed=5) == first
    assert bootstrap_interval(outcomes, n_resamples=1000, seed=6) != first
    assert first[0] < win_rate(outcomes) < first[1]


def test_bootstrap_resamples_prompts_not_comparisons():
    # 10 prompts × 10 seeds, perfectly clustered: 6 prompts always won, 4 always lost.
    clustered = np.repeat(np.array([1.0] * 6 + [0.0] * 4)[:, None], 10, axis=1)
    one_seed = clustered[:, :1]
    # the statistic only sees per-prompt means, so the replicates (and the interval) equal the 1-seed case
    assert bootstrap_interval(clustered, 2000, seed=1) == bootstrap_interval(one_seed, 2000, seed=1)
    base = np.full_like(clustered, 0.5)  # tuned 1 beats it, tuned 0 loses to it
    s = summarize(base, clustered, n_bootstrap=2000)
    boot_width, wilson_width = s.bootstrap_ci[1] - s.bootstrap_ci[0], s.wilson_ci[1] - s.wilson_ci[0]
    assert s.ci == s.bootstrap_ci and boot_width > 1.5 * wilson_width  # Wilson counts 100 "independent" trials
    assert summarize(base, clustered, ci_method="wilson", n_bootstrap=10).ci == s.wilson_ci
    assert (s.prompt_wins, s.prompt_losses) == (6, 4)


def test_statistics_refuse_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        summarize(np.array([0.0, np.nan]), np.zeros(2))
    with pytest.raises(ValueError, match="same shape"):
        summarize(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="ci_method"):
        summarize(np.zeros(3), np.zeros(3), ci_method="normal")


# ---------------------------------------------------------------- prompt sets

def test_shipped_prompt_sets_have_the_documented_sizes():
    parti = load_prompts("parti")
    assert len(parti) == 1632 and parti.n_duplicates == 0
    counts = {c: parti.categories.count(c) for c in set(parti.categories)}
    assert len(counts) == 12 and counts["Animals"] == 314 and counts["Indoor Scenes"] == 40
    assert len(load_prompts("imagereward")) == 100
    geneval = load_prompts("geneval")
    assert len(geneval) == 553 and set(geneval.categories) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert len(load_prompts("parti", categories=["animals", "Vehicles"])) == 314 + 104
    limited = load_prompts("parti", limit=24)
    assert len(limited) == 24 and len(set(limited.categories)) > 5  # spread through the file, not its head
    assert limited.prompts[0] == parti.prompts[0]
    with pytest.raises(PromptFileError, match="unknown categories"):
        load_prompts("parti", categories=["Dinosaurs"])


def test_notice_records_each_shipped_file_and_its_checksum():
    notice = (PROMPTS_DIR / "NOTICE.txt").read_text()
    for path in PROMPT_SETS.values():
        section = notice.split(path.name, 1)[1]
        recorded = re.search(r"sha256:\s+([0-9a-f]{64})", section).group(1)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded, path.name
    assert "drawbench" in notice.lower() and not (PROMPTS_DIR / "drawbench.csv").exists()


def test_prompt_files_of_every_supported_kind(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \na cat\n")
    txt = load_prompts(str(tmp_path / "p.txt"))
    assert (txt.prompts, txt.n_in_file, txt.n_duplicates) == (["a cat", "a dog"], 3, 1)
    (tmp_path / "d.csv").write_text('Prompts,Category\n"A red car, parked.",Colors\nTcennis rpacket.,Misspellings\n')
    drawbench_like = load_prompts(str(tmp_path / "d.csv"), categories=["colors"])
    assert drawbench_like.prompts == ["A red car, parked."]
    (tmp_path / "t.json").write_text(json.dumps([{"text": "x y"}, {"text": "z"}]))
    assert load_prompts(str(tmp_path / "t.json")).prompts == ["x y", "z"]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps({"prompt": p, "tag": "t"}) for p in ["a", "b", "a"]))
    assert load_prompts(str(tmp_path / "g.jsonl")).prompts == ["a", "b"]
    (tmp_path / "bad.csv").write_text("caption\nhello\n")
    with pytest.raises(PromptFileError, match="no prompt field"):
        load_prompts(str(tmp_path / "bad.csv"))
    with pytest.raises(FileNotFoundError, match="parti, imagereward, geneval"):
        load_prompts(str(tmp_path / "missing.txt"))


# ---------------------------------------------------------------- sampling and the eval command

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only thrash on shared cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny pipeline, a LoRA from 2 DPO steps at a high learning rate (so it visibly changes images), and the
    same LoRA with every up-projection zeroed (exactly no effect)."""
    root = tmp_path_factory.mktemp("evaluate")
    model = build_tiny_pipeline(root / "model", resolution=32)
    snapshot = write_test_snapshot(root / "snapshot", n_pairs=4, n_shards=1)
    train_main(["--snapshot", str(snapshot), "--model", str(model), "--output", str(root / "lora"),
                "--resolution", "32", "--train-batch-size", "2", "--max-steps", "2", "--learning-rate", "1e-2",
                "--no-use-snapshot-weights", "--seed", "0"])
    lora = load_file(root / "lora" / LORA_FILE)
    up_keys = [k for k in lora if "lora_B" in k or "lora.up" in k]
    assert up_keys and any(lora[k].abs().max() > 0 for k in up_keys)
    (root / "zero_lora").mkdir()
    save_file({k: torch.zeros_like(v) if k in up_keys else v for k, v in lora.items()},
              root / "zero_lora" / LORA_FILE)
    return {"root": root, "model": model, "lora": root / "lora", "zero_lora": root / "zero_lora"}


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_sampling_is_deterministic_and_lora_toggles_exactly(assets):
    cfg = SamplingConfig(steps=3, batch_size=1)
    prompts, seeds = ["a red cube", "a cat on a mat", "a red cube"], [0, 0, 1]
    base = load_pipeline(assets["model"])
    first = pixels(generate(base, prompts, seeds, cfg))
    assert np.array_equal(first, pixels(generate(load_pipeline(assets["model"]), prompts, seeds, cfg)))
    assert not np.array_equal(first[0], first[2])  # another seed, other noise
    # a prompt's noise does not depend on its position in the list
    assert np.array_equal(first[1], pixels(generate(base, ["a cat on a mat"], [0], cfg))[0])
    tuned = load_pipeline(assets["model"], assets["lora"])
    with lora_disabled(tuned):
        assert np.array_equal(first, pixels(generate(tuned, prompts, seeds, cfg)))
    assert not np.array_equal(first, pixels(generate(tuned, prompts, seeds, cfg)))
    zero = load_pipeline(assets["model"], assets["zero_lora"])
    assert np.array_equal(first, pixels(generate(zero, prompts, seeds, cfg)))


def test_eval_against_a_zero_effect_lora_is_all_ties(assets):
    report = run_eval(EvalConfig(model=str(assets["model"]), lora=str(assets["zero_lora"]),
                                 out=str(assets["root"] / "eval-zero"), prompts="geneval", limit=5, n_seeds=2,
                                 scorers=("sharpness", "prompt_colour"), sampling=SamplingConfig(steps=2),
                                 n_bootstrap=100, save_images=False))
    for r in report["scorers"]:
        assert (r["win_rate"], r["ties"], r["n_comparisons"], r["ci"]) == (0.5, 10, 10, [0.5, 0.5])
        assert r["mean_base"] == r["mean_tuned"] and r["sign_test_p"] == 1.0
    assert not (assets["root"] / "eval-zero" / "images").exists()


def test_cli_eval_end_to_end(assets, capsys):
    out = assets["root"] / "eval-cli"
    argv = ["eval", "--model", str(assets["model"]), "--lora", str(assets["lora"]), "--prompts", "imagereward",
            "--limit", "6", "--seeds", "2", "--scorers", "sharpness,exposure,colourfulness", "--steps", "3",
            "--resolution", "32", "--bootstrap", "300", "--out", str(out)]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "6 prompts (imagereward) x 2 seed(s)" in printed and "95% CI (bootstrap)" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["format"] == "prefcurate-eval" and report["comparison"] == "tuned over base"
    assert report["model"]["lora"] == str(assets["lora"]) and len(report["model"]["lora_blake2b"]) == 32
    assert report["prompts"]["n"] == 6 and report["sampling"]["image_size"] == [32, 32]
    assert report["sampling"]["seeds"] == [0, 1] and report["sampling"]["scheduler"] == "DDIMScheduler"
    assert [r["scorer"] for r in report["scorers"]] == ["sharpness", "exposure", "colourfulness"]
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 6 * 2
    for r in report["scorers"]:
        assert r["version"] == f"{r['scorer']}-code1" and r["n_prompts"] == 6 and r["n_seeds"] == 2
        assert r["wins"] + r["losses"] + r["ties"] == r["n_comparisons"] == 12
        assert r["win_rate"] == (r["wins"] + 0.5 * r["ties"]) / 12
        assert 0 <= r["ci"][0] <= r["win_rate"] <= r["ci"][1] <= 1 and r["ci"] == r["bootstrap_ci"]
        mine = [row for row in rows if row["scorer"] == r["scorer"]]  # the CSV holds what was summarised
        base, tuned = (np.array([float(row[k]) for row in mine]) for k in ("base", "tuned"))
        assert r["mean_base"] == pytest.approx(base.mean(), rel=1e-12)
        assert r["wins"] == int((tuned > base).sum()) and r["ties"] == int((tuned == base).sum())
        assert f"| {r['scorer']} | {r['win_rate']:.3f} |" in (out / "eval.md").read_text()
    assert any(r["ties"] < 12 for r in report["scorers"])  # the trained LoRA changed the images
    assert report["average_win_rate"] == pytest.approx(np.mean([r["win_rate"] for r in report["scorers"]]))
    assert len(list((out / "images" / "base").glob("*.png"))) == 12
    assert len(list((out / "images" / "tuned").glob("*.png"))) == 12

    # base against base (no LoRA): every comparison ties
    assert cli(["eval", "--model", str(assets["model"]), "--prompts", "parti", "--limit", "4", "--scorers",
                "sharpness", "--steps", "2", "--no-images", "--out", str(assets["root"] / "eval-self")]) == 0
    self_report = json.loads((assets["root"] / "eval-self" / "eval.json").read_text())
    assert self_report["scorers"][0]["win_rate"] == 0.5 and self_report["scorers"][0]["ties"] == 4


def test_eval_compares_two_loras_on_the_same_noise(assets):
    common = dict(model=str(assets["model"]), prompts="geneval", limit=4, n_seeds=2, scorers=("sharpness", "exposure"),
                  sampling=SamplingConfig(steps=2, resolution=32), n_bootstrap=200, save_images=False)
    # the zero LoRA changes nothing, so "lora over zero_lora" must be exactly "lora over the base model"
    over_base = run_eval(EvalConfig(lora=str(assets["lora"]), out=str(assets["root"] / "ab-base"), **common))
    over_zero = run_eval(EvalConfig(lora=str(assets["lora"]), against=str(assets["zero_lora"]),
                                    out=str(assets["root"] / "ab-zero"), **common))
    assert over_zero["comparison"] == "lora over against" and over_base["comparison"] == "tuned over base"
    assert over_zero["model"]["against"] == str(assets["zero_lora"]) and len(over_zero["model"]["against_blake2b"]) == 32
    keys = ("win_rate", "ci", "wins", "losses", "ties", "mean_base", "mean_tuned", "sign_test_p")
    for a, b in zip(over_base["scorers"], over_zero["scorers"], strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert any(r["ties"] < r["n_comparisons"] for r in over_zero["scorers"])  # the LoRA does change the images
    # B over A is the mirror image: wins and losses swap, the win rate is 1 - w
    reverse = run_eval(EvalConfig(lora=str(assets["zero_lora"]), against=str(assets["lora"]),
                                  out=str(assets["root"] / "ab-reverse"), **common))
    for a, b in zip(over_zero["scorers"], reverse["scorers"], strict=True):
        assert (a["wins"], a["losses"], a["ties"]) == (b["losses"], b["wins"], b["ties"])
        assert a["win_rate"] == pytest.approx(1 - b["win_rate"]) and a["mean_base"] == b["mean_tuned"]
    assert "over " + str(assets["lora"]) in (assets["root"] / "ab-reverse" / "eval.md").read_text()
    with pytest.raises(ValueError, match="--against needs --lora"):
        EvalConfig(against=str(assets["lora"]), out="x", **common)


def test_cli_eval_input_errors_are_one_line_exit_3(assets, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "nope")], "model folder", "does not exist"),
        (["--model", str(assets["model"]), "--lora", str(tmp_path)], "LoRA folder", LORA_FILE),
        (["--model", str(assets["model"]), "--prompts", str(tmp_path / "x.txt")], "prompt file", "not found"),
        (["--model", str(assets["model"]), "--scorers", "sharpness,nope"], "unknown scorer", "'nope'"),
        (["--model", str(assets["model"]), "--scorers", "pickscore", "--weights", str(tmp_path)],
         "pickscore", "never downloads"),
        (["--model", str(assets["model"]), "--seeds", "0"], "n_seeds", "at least 1"),
        (["--model", str(assets["model"]), "--against", str(assets["lora"])], "--against needs --lora"),
        (["--model", str(assets["model"]), "--lora", str(assets["lora"]), "--against", str(tmp_path)],
         "LoRA folder", LORA_FILE),
    ]
    for extra, *needles in cases:
        argv = ["eval", "--scorers", "sharpness", "--out", str(tmp_path / "o"), *extra]
        assert cli(argv) == 3, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("prefcurate eval: error:") and "\n" not in err, err
        assert all(n in err for n in needles), err

