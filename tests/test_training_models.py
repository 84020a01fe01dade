"""Training for real model families on the CPU: v-prediction (SD2.x), SDXL micro-conditioning, paper recipes,
Adaptive-DPO's minimum batch and the 8-bit Adam error. Tiny real diffusers pipelines built from configuration."""
from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from tests.snapshot_fixture import write_test_snapshot
from prefcurate.training import losses as L
from prefcurate.training.components import (
    build_tiny_pipeline, build_tiny_sdxl_pipeline, center_crop_box, load_components, sdxl_micro_conditioning,
)
from prefcurate.training.config import ADAPTIVE_RECIPE_BATCH, TrainConfig, build_parser, parse_args
from prefcurate.training.recipes import RECIPES
from prefcurate.training.snapshot_reader import PairStream, open_snapshot
from prefcurate.training.trainer import Trainer, main, train


REQUIRED = ["--snapshot", "s", "--model", "m", "--output", "o"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    # images are 46 x 40 (width x height): non-square, so the centre crop has a non-zero offset
    return {"snapshot": write_test_snapshot(root / "snapshot", n_pairs=6, n_shards=2, row_group_size=3),
            "vpred": build_tiny_pipeline(root / "vpred", resolution=32, prediction_type="v_prediction"),
            "root": root}


def config(assets, name: str, **kw) -> TrainConfig:
    base = dict(snapshot=str(assets["snapshot"]), model=str(assets["vpred"]), output=str(assets["root"] / name),
                resolution=32, train_batch_size=2, max_steps=2, learning_rate=1e-3, seed=0,
                use_snapshot_weights=False, cache_dir=str(assets["root"] / "cache"))
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------- v-prediction

def test_v_prediction_target_is_the_schedulers_velocity(assets):
    trainer = Trainer(config(assets, "vpred-target", latent_cache=False))
    scheduler = trainer.components.noise_scheduler
    assert trainer.prediction_type == "v_prediction"
    inp = trainer._inputs(next(trainer._batches()))
    abar = scheduler.alphas_cumprod[inp["t"]].view(-1, 1, 1, 1)
    x0 = (inp["x_t"].float() - (1 - abar).sqrt() * inp["noise"]) / abar.sqrt()  # invert x_t = α·x0 + σ·ε
    expected = scheduler.get_velocity(x0, inp["noise"], inp["t"])
    torch.testing.assert_close(inp["target"], expected, rtol=1e-4, atol=1e-4)
    assert (inp["target"] - inp["noise"]).abs().max() > 0.1  # v is not ε


@pytest.mark.parametrize("loss", ["dpo", "ncp-dpo", "sft"])
def test_tiny_v_prediction_pipeline_trains(assets, loss):
    result = train(config(assets, f"vpred-{loss}", loss=loss))
    assert result.global_step == 2 and all(math.isfinite(x) for x in result.losses)
    if loss != "sft":  # LoRA B = 0: policy == reference, loss ln 2
        assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert result.losses[1] != result.losses[0]


def test_unsupported_prediction_type_is_refused(tmp_path):
    model = build_tiny_pipeline(tmp_path / "sample", resolution=32)
    cfg = model / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"prediction_type": "sample"}))
    with pytest.raises(ValueError, match="predicts 'sample'.*epsilon and v_prediction"):
        load_components(model)


# ---------------------------------------------------------------- SDXL micro-conditioning

def test_center_crop_box_and_micro_conditioning_rows():
    # 46 x 40 to 32 px: scale 0.8 -> 36.8 -> 37 x 32, crop left (37 − 32) // 2 = 2, top 0
    assert center_crop_box(46, 40, 32) == (37, 32, 2, 0)
    assert center_crop_box(512, 768, 512) == (512, 768, 0, 128)  # portrait: the crop moves down
    assert center_crop_box(512, 768, 32) == (32, 48, 0, 8)  # scale 1/16: 32 x 48, top (48 − 32) // 2 = 8
    rows = sdxl_micro_conditioning(torch.tensor([[46, 40], [512, 768]]), 32, 2)
    assert rows.tolist() == [[40, 46, 0, 2, 32, 32], [768, 512, 8, 0, 32, 32]]  # (h, w, top, left, res, res)
    assert sdxl_micro_conditioning(None, 1024, 3).tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 3
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        sdxl_micro_conditioning(torch.tensor([[46, 40]]), 32, 2)


def test_sdxl_time_ids_come_from_the_images_real_sizes(assets):
    sdxl = build_tiny_sdxl_pipeline(assets["root"] / "sdxl")
    expected = torch.tensor([[40, 46, 0, 2, 32, 32]] * 4, dtype=torch.float32)  # 2 pairs, winners then losers
    for cache in (False, True):
        trainer = Trainer(config(assets, f"sdxl-{cache}", model=str(sdxl), latent_cache=cache))
        batch = next(trainer._batches())
        assert (batch.winner_sizes is None) == cache  # cached: sizes come from the cache, not the stream
        inp = trainer._inputs(batch)
        torch.testing.assert_close(inp["added"]["time_ids"], expected, rtol=0, atol=0)
    stream = PairStream(open_snapshot(assets["snapshot"]), batch_size=2, resolution=32, seed=0).batches()
    assert next(stream).winner_sizes.tolist() == [[46, 40], [46, 40]]


# ---------------------------------------------------------------- recipes

def test_recipe_values_and_explicit_flags_override_them():
    cfg = parse_args(REQUIRED + ["--recipe", "adaptive-dpo", "--loss", "adaptive-dpo", "--rho", "10",
                                 "--train-batch-size", "32"])
    assert cfg.recipe == "adaptive-dpo" and cfg.recipe_overrides == ("rho", "train_batch_size")
    assert (cfg.rho, cfg.train_batch_size) == (10.0, 32)  # explicit
    assert (cfg.beta, cfg.learning_rate, cfg.gradient_accumulation_steps, cfg.lora_rank) == (2000.0, 1e-5, 2, 8)
    sd15 = parse_args(REQUIRED + ["--recipe", "diffusion-dpo-sd15"])
    assert (sd15.loss, sd15.train_batch_size, sd15.max_steps, sd15.beta, sd15.gradient_checkpointing) == (
        "dpo", 16, 10_000, 5000.0, True)
    assert sd15.recipe_overrides == ()
    ncp = parse_args(REQUIRED + ["--recipe", "ncp-dpo", "--learning-rate", "3e-5", "--lora-rank", "32"])
    # the NCP paper publishes no LoRA learning rate, so giving one overrides nothing of the recipe
    assert (ncp.loss, ncp.lora_rank, ncp.learning_rate, ncp.recipe_overrides) == ("ncp-dpo", 32, 3e-5,
                                                                                  ("lora_rank",))
    plain = parse_args(REQUIRED + ["--lora-rank", "4"])
    assert plain.recipe is None and plain.lora_rank == 4 and plain.learning_rate == 1e-5
    with pytest.raises(ValueError, match="recipe ncp-dpo is for --loss ncp-dpo, got --loss dpo"):
        parse_args(REQUIRED + ["--recipe", "ncp-dpo", "--loss", "dpo"])
    with pytest.raises(SystemExit):
        parse_args(REQUIRED + ["--recipe", "orpo-paper"])
    with pytest.raises(ValueError, match="from_recipe"):
        TrainConfig(snapshot="s", model="m", output="o", recipe="ncp-dpo")
    assert TrainConfig.from_recipe("ncp-dpo", snapshot="s", model="m", output="o", max_steps=3).lora_rank == 64


def test_every_recipe_names_real_fields_with_a_source_and_validates():
    names = {a.dest for a in build_parser()._actions}
    recipe_help = next(a.help for a in build_parser()._actions if a.dest == "recipe")
    for recipe in RECIPES.values():
        assert set(recipe.settings) <= names, recipe.name
        assert len(recipe.source) > 10 and all(s.where for s in recipe.settings.values())
        assert f"{recipe.name}: {recipe.summary} [{recipe.source}]" in recipe_help
        for name, setting in recipe.settings.items():
            assert f"{name}={setting.value} (" in recipe_help  # every number with its source in --help
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a recipe's own batch never triggers the Adaptive-DPO warning
            cfg = TrainConfig.from_recipe(recipe.name, snapshot="s", model="m", output="o")
        assert all(getattr(cfg, k) == s.value for k, s in recipe.settings.items())
    assert set(RECIPES) == {"diffusion-dpo-sd15", "diffusion-dpo-sdxl", "adaptive-dpo", "ncp-dpo", "balanced-dpo"}


def test_train_config_json_records_the_recipe_and_the_values_that_ran(assets):
    out = assets["root"] / "recipe-run"
    main(["--snapshot", str(assets["snapshot"]), "--model", str(assets["vpred"]), "--output", str(out),
          "--loss", "balanced-dpo", "--recipe", "balanced-dpo", "--max-steps", "1", "--resolution", "32",
          "--train-batch-size", "2", "--beta", "3000", "--cache-dir", str(assets["root"] / "cache")])
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["recipe"] == "balanced-dpo" and recorded["recipe_overrides"] == ["beta"]
    assert recorded["beta"] == 3000.0 and recorded["max_steps"] == 1 and recorded["loss"] == "balanced-dpo"


# ---------------------------------------------------------------- Adaptive-DPO minimum batch, 8-bit Adam

def test_online_metric_collapses_at_batch_one():
    # three annotators all reject the label (ℓ < 0): normalised over a batch of one, each ℓ̂ = −1, so
    # s = −15 for all three, c = σ(−15) ≈ 3e-7 but v = std = 0, hence u = 0: the pair is not flagged
    u = L.minority_metric(torch.tensor([[-3e-4], [-1e-4], [-2e-4]]), rho=15.0).u
    assert u.tolist() == [0.0]
    # in a batch of two the same pair is flagged: u > 0.3
    two = L.minority_metric(torch.tensor([[-3e-4, 1e-4], [-1e-4, 2e-4], [-2e-4, 1e-4]]), rho=15.0).u
    assert two[0] > 0.3


def test_adaptive_batch_below_the_minimum_is_refused_and_small_batches_warn():
    # defaults follow the official recipe: 16 pairs per device for the online metric, 1 otherwise
    assert parse_args(REQUIRED + ["--loss", "adaptive-dpo"]).train_batch_size == ADAPTIVE_RECIPE_BATCH
    assert parse_args(REQUIRED + ["--loss", "adaptive-dpo", "--u-source", "offline"]).train_batch_size == 1
    assert parse_args(REQUIRED).train_batch_size == 1
    with pytest.raises(ValueError, match="train_batch_size >= 2.*u = 0"):
        TrainConfig(snapshot="s", model="m", output="o", loss="adaptive-dpo", train_batch_size=1)
    TrainConfig(snapshot="s", model="m", output="o", loss="adaptive-dpo", train_batch_size=1,
                normalize_logits=False)  # raw logits keep their size: no collapse
    TrainConfig(snapshot="s", model="m", output="o", loss="adaptive-dpo", train_batch_size=1, u_source="offline")
    with pytest.warns(UserWarning, match=f"< {ADAPTIVE_RECIPE_BATCH}"):
        TrainConfig(snapshot="s", model="m", output="o", loss="adaptive-dpo", train_batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(snapshot="s", model="m", output="o", loss="adaptive-dpo", train_batch_size=16)
        TrainConfig(snapshot="s", model="m", output="o", loss="dpo", train_batch_size=1)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes_is_one_clear_error():
    with pytest.raises(ValueError, match="needs bitsandbytes: pip install bitsandbytes"):
        parse_args(REQUIRED + ["--use-8bit-adam"])
