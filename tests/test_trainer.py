"""Trainer tests on the CPU: real tiny diffusers components, 2-4 optimiser steps at 32 px, 2 pairs per step."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.snapshot_fixture import write_test_snapshot
from prefcurate.training.checkpoint import checkpoint_dir, load_checkpoint
from prefcurate.training.components import build_tiny_pipeline, load_components
from prefcurate.training.config import TrainConfig, parse_args
from prefcurate.data_schemas import snapshot_contract
from prefcurate.data_schemas.adaptive import manifest_record
from prefcurate.data_schemas.vocab import LOSS_TYPES
from prefcurate.training.lora import POLICY, add_policy_lora, ema_decay, encoder_features, lora_tensors
from prefcurate.training.preflight import PreflightError, check_train_inputs
from prefcurate.training.snapshot_reader import PairStream, SnapshotError, margin_beta_warning, open_snapshot
from prefcurate.training.tracking import latest_validation
from prefcurate.training.trainer import LOSS_DISPATCH, Trainer, main, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on 2 shared cores two threads thrash (4x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trainer")
    return {"snapshot": write_test_snapshot(root / "snapshot", n_pairs=8, n_shards=2, row_group_size=3),
            "model": build_tiny_pipeline(root / "model", resolution=32), "root": root}


def config(assets, name: str, **kw) -> TrainConfig:
    base = dict(snapshot=str(assets["snapshot"]), model=str(assets["model"]), output=str(assets["root"] / name),
                resolution=32, train_batch_size=2, max_steps=2, learning_rate=1e-3, seed=0,
                use_snapshot_weights=False, cache_dir=str(assets["root"] / "cache"))
    return TrainConfig(**{**base, **kw})


def metrics(output: str) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- snapshot

def test_stream_is_seeded_resumable_and_covers_each_epoch(assets):
    snap = open_snapshot(assets["snapshot"])
    stream = PairStream(snap, batch_size=3, resolution=32, seed=7, buffer_rows=2, decode_images=False)
    it = stream.batches()
    first = [next(it) for _ in range(8)]  # 24 rows = 3 epochs of 8 pairs
    rows = [pid for b in first for pid in b.pair_ids]
    for epoch in range(3):
        assert sorted(rows[8 * epoch:8 * epoch + 8]) == [f"pair-{i:04d}" for i in range(8)]
    assert len({tuple(rows[8 * e:8 * e + 8]) for e in range(3)}) > 1  # the permutation changes with the epoch
    again = PairStream(snap, batch_size=3, resolution=32, seed=7, buffer_rows=2, decode_images=False).batches()
    assert [next(again).pair_ids for _ in range(8)] == [b.pair_ids for b in first]
    resumed = stream.batches(first[2].position)
    assert [next(resumed).pair_ids for _ in range(5)] == [b.pair_ids for b in first[3:]]
    other = PairStream(snap, batch_size=3, resolution=32, seed=8, buffer_rows=2, decode_images=False).batches()
    assert [next(other).pair_ids for _ in range(3)] != [b.pair_ids for b in first[:3]]
    pixels = next(PairStream(snap, batch_size=2, resolution=32, seed=7).batches()).winner_pixels
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1 and pixels.std() > 0.1


def test_tampered_or_incomplete_snapshot_is_refused(assets, tmp_path):
    bad = Path(shutil.copytree(assets["snapshot"], tmp_path / "bad"))
    shard = bad / "shards" / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-9] + b"tampered!")
    with pytest.raises(SnapshotError, match="shard-00001.parquet does not match its manifest hash"):
        open_snapshot(bad)
    with pytest.raises(SnapshotError, match="shard-00001.parquet does not match its manifest hash"):
        train(config(assets, "bad", snapshot=str(bad)))
    shard.unlink()
    with pytest.raises(SnapshotError, match="file missing"):
        open_snapshot(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["shards"][0]["rows"] += 1
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="rows != manifest"):
        open_snapshot(bad)
    for version in (0, 2):  # readers accept exactly the versions they know (snapshot_contract.READABLE_VERSIONS)
        (bad / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
        with pytest.raises(SnapshotError, match=f"version 1, got 'prefcurate-snapshot' version {version}"):
            open_snapshot(bad)


def test_a_truncated_shard_with_a_matching_hash_fails_on_its_row_count(assets, tmp_path):
    """The contract's verification checks row counts, not only digests: a shard rewritten with fewer rows (and
    its hash updated, as a buggy writer would) is refused by the training reader."""
    bad = Path(shutil.copytree(assets["snapshot"], tmp_path / "short"))
    manifest = json.loads((bad / "manifest.json").read_text())
    shard = bad / manifest["shards"][0]["path"]
    table = pq.read_table(shard)
    data = snapshot_contract.encode_shard(table.slice(0, table.num_rows - 1), row_group_size=3)
    shard.write_bytes(data)
    manifest["shards"][0]["sha256"] = snapshot_contract.shard_entry("x", data, 0)["sha256"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    message = rf"{manifest['shards'][0]['path']}: {table.num_rows - 1} rows != manifest {table.num_rows}"
    with pytest.raises(SnapshotError, match=message):
        open_snapshot(bad)


def test_the_snapshots_margin_beta_is_checked_against_the_run(tmp_path):
    """An adaptive snapshot records the β its offline margins were computed for (2·beta_dpo = 2000); plain dpo
    with the snapshot's weights at another β gets a warning naming both, nothing otherwise."""
    snap = open_snapshot(write_test_snapshot(tmp_path / "s", n_pairs=2, n_shards=1, adaptive=manifest_record(
        {"beta": 1000.0, "k1": 10.0, "c1": 1.0})))
    assert snap.adaptive["beta"] == 2000.0
    assert "beta 2000" in margin_beta_warning(snap, "dpo", 5000.0, True)
    assert margin_beta_warning(snap, "dpo", 2000.0, True) is None
    assert margin_beta_warning(snap, "dpo", 5000.0, False) is None  # margins not read
    assert margin_beta_warning(snap, "adaptive-dpo", 5000.0, True) is None  # computes its own margins
    plain = open_snapshot(write_test_snapshot(tmp_path / "p", n_pairs=2, n_shards=1))
    assert plain.adaptive is None and margin_beta_warning(plain, "dpo", 5000.0, True) is None


def test_every_loss_type_has_a_dispatch_entry():
    assert set(LOSS_DISPATCH) == set(LOSS_TYPES)


# ---------------------------------------------------------------- config and components

def test_config_boolean_flags_and_validation():
    required = ["--snapshot", "s", "--model", "m", "--output", "o"]
    assert parse_args(required + ["--loss", "adaptive-dpo"]).use_margin is True
    assert parse_args(required + ["--loss", "adaptive-dpo", "--no-use-margin"]).use_margin is False
    assert parse_args(required + ["--no-latent-cache", "--gradient-checkpointing"]).latent_cache is False
    cfg = parse_args(required + ["--loss", "adaptive-dpo"])
    assert cfg.beta == 2000.0 and parse_args(required).beta == 5000.0  # per-loss canonical β defaults
    with pytest.raises(ValueError, match="rho"):
        TrainConfig(snapshot="s", model="m", output="o", rho=0.0)
    with pytest.raises(SystemExit):
        parse_args(required + ["--loss", "orpo"])
    from prefcurate.training.config import build_parser
    loss_action = next(a for a in build_parser()._actions if a.dest == "loss")
    assert tuple(loss_action.choices) == LOSS_TYPES


def test_missing_model_folder_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_components(tmp_path / "nope")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"unet/config.json.*runwayml/stable-diffusion-v1-5"):
        load_components(tmp_path / "half")


def test_ncp_encoder_equals_the_unet_down_path(assets):
    comp = load_components(assets["model"])
    unet = comp.unet
    add_policy_lora(unet, 4, 4, ("to_q", "to_k", "to_v", "to_out.0"))
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    seen = {}
    def keep(name: str):
        def hook(module, inputs, output) -> None:
            seen[name] = output[0] if isinstance(output, tuple) else output
        return hook

    hooks = [unet.down_blocks[-1].register_forward_hook(keep("down")),
             unet.mid_block.register_forward_hook(keep("mid"))]
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=text)
        down = encoder_features(unet, x, t, text, "last_down")
        mid = encoder_features(unet, x, t, text, "mid")
        every = encoder_features(unet, x, t, text, "all_down")
    for h in hooks:
        h.remove()
    torch.testing.assert_close(down[0], seen["down"])
    torch.testing.assert_close(mid[0], seen["mid"])
    assert len(every) == len(unet.down_blocks) and every[-1].shape == down[0].shape


# ---------------------------------------------------------------- training runs

@pytest.mark.parametrize("loss", LOSS_TYPES)
def test_short_run_per_loss_type(assets, loss):
    cfg = config(assets, f"run-{loss}", loss=loss, ref_update_every=1, use_snapshot_weights=loss == "dpo")
    trainer = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in lora_tensors(trainer.unet, POLICY).items()}
    frozen = {k: v.detach().clone() for k, v in trainer.unet.named_parameters() if "lora_" not in k}
    result = trainer.fit()
    assert result.global_step == 2 and len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    after = lora_tensors(trainer.unet, POLICY)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every LoRA tensor moved (B by the gradient, A by it and weight decay)
    assert all(torch.equal(v, dict(trainer.unet.named_parameters())[k]) for k, v in frozen.items())
    first = result.losses[0]
    if loss == "dpo":  # B = 0: policy == reference, z = 0, so the loss is ln 2 times the curated weights' mean
        batch = next(PairStream(open_snapshot(cfg.snapshot), batch_size=2, resolution=32, seed=0,
                                decode_images=False).batches())
        assert float(batch.weight.mean()) != 1.0
        assert first == pytest.approx(math.log(2) * float(batch.weight.mean()), abs=1e-6)
    elif loss in ("adaptive-dpo", "balanced-dpo", "ncp-dpo"):
        assert first == pytest.approx(math.log(2), abs=1e-6)
    elif loss == "ipo":
        assert first == pytest.approx((1 / (2 * cfg.beta_ipo)) ** 2, rel=1e-4)
    else:
        assert first > 0
    saved = load_file(Path(cfg.output) / "pytorch_lora_weights.safetensors")
    assert saved and all("lora" in k and k.startswith("unet.") for k in saved)
    assert len(saved) == len(before)
    log = metrics(cfg.output)
    assert [r["step"] for r in log] == [1, 2] and {"loss", "lr"} <= set(log[0])
    if loss != "sft":
        assert {"implicit_acc", "reward_margin"} <= set(log[0])


def test_saved_lora_loads_into_the_pipeline_and_changes_it(assets):
    from diffusers import StableDiffusionPipeline
    cfg = config(assets, "run-dpo")  # written by test_short_run_per_loss_type[dpo]
    if not (Path(cfg.output) / "pytorch_lora_weights.safetensors").is_file():
        train(replace(cfg, output=str(assets["root"] / "run-dpo-2")))
        cfg = replace(cfg, output=str(assets["root"] / "run-dpo-2"))
    pipe = StableDiffusionPipeline.from_pretrained(assets["model"], local_files_only=True)

    def sample() -> np.ndarray:
        return pipe("a red cube", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = sample()
    pipe.load_lora_weights(cfg.output)
    lora = sample()
    assert np.abs(lora - base).max() > 1e-6
    pipe.unload_lora_weights()
    np.testing.assert_allclose(sample(), base, atol=1e-6)


@pytest.fixture(scope="module")
def balanced_run(assets) -> TrainConfig:
    cfg = config(assets, "balanced", loss="balanced-dpo", ref_update_every=2, max_steps=4, checkpoint_every=1,
                 proportion_empty_prompts=0.5)
    train(cfg)
    return cfg


@pytest.fixture(scope="module")
def adaptive_run(assets) -> TrainConfig:
    cfg = config(assets, "adaptive", loss="adaptive-dpo", max_steps=4, ema_warmup_steps=2, checkpoint_every=1,
                 rho=1e4, normalize_logits=False, proportion_empty_prompts=0.5)
    train(cfg)
    return cfg


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_balanced_reference_adapter_follows_the_policy_every_k_steps(balanced_run):
    cfg = balanced_run
    (lora1, st1), (lora2, st2), (lora3, st3) = (load_checkpoint(checkpoint_dir(cfg.output, s)) for s in (1, 2, 3))
    assert not same(st1["ref_adapter"], lora1)  # not updated at step 1: still the zero-B initial adapter
    assert all(float(v.abs().max()) == 0 for k, v in st1["ref_adapter"].items() if "lora_B" in k)
    assert same(st2["ref_adapter"], lora2)  # hard copy at step K = 2
    assert same(st3["ref_adapter"], st2["ref_adapter"]) and not same(st3["ref_adapter"], lora3)  # frozen between
    assert metrics(cfg.output)[2]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # ref == policy again


def test_ema_decay_follows_the_diffusers_warmup():
    assert ema_decay(1, 0.9999) == 0.0  # the first update copies
    assert ema_decay(2, 0.9999) == pytest.approx(2 / 11) and ema_decay(2, 0.5) == pytest.approx(2 / 11)
    assert ema_decay(10, 0.5) == 0.5 and ema_decay(10, 0.9999) == pytest.approx(10 / 19)


def test_adaptive_online_u_uses_ema_annotators(adaptive_run):
    cfg = adaptive_run
    log = metrics(cfg.output)
    assert [r["minority_u"] for r in log[:2]] == [0.0, 0.0]  # warm-up: u = 0
    # u > 0 needs annotators that disagree: with the policy's own weights swapped in, the std would be 0
    assert all(r["minority_u"] > 0 for r in log[2:])
    lora, state = load_checkpoint(checkpoint_dir(cfg.output, 4))
    assert [e["updates"] for e in state["emas"]] == [4, 4]
    for ema in state["emas"]:
        assert any(not torch.allclose(ema["shadow"][k], lora[k]) for k in lora if "lora_B" in k)
    # both decays are capped by the warm-up n/(9+n) for the first 9 updates, so the two EMAs still coincide
    assert same(state["emas"][0]["shadow"], state["emas"][1]["shadow"])


@pytest.mark.parametrize("name", ["balanced_run", "adaptive_run"])
def test_kill_and_resume_gives_the_same_loss_trajectory(assets, request, name):
    cfg = request.getfixturevalue(name)  # 4 uninterrupted steps, a checkpoint after each
    straight = [r["loss"] for r in metrics(cfg.output)]
    # a fresh process state: new UNet, optimiser and generator, reading only the step-2 checkpoint on disk
    out = assets["root"] / f"resumed-{name}"
    argv = ["--snapshot", cfg.snapshot, "--model", cfg.model, "--output", str(out), "--loss", cfg.loss,
            "--resume-from", str(checkpoint_dir(cfg.output, 2)), "--max-steps", "4", "--resolution", "32",
            "--train-batch-size", "2", "--learning-rate", "1e-3", "--no-use-snapshot-weights",
            "--ref-update-every", "2", "--ema-warmup-steps", "2", "--rho", "1e4", "--no-normalize-logits",
            "--proportion-empty-prompts", "0.5", "--cache-dir", cfg.cache_dir]
    resumed = main(argv).losses
    assert len(resumed) == 2
    np.testing.assert_allclose(straight[:2] + resumed, straight, rtol=0, atol=1e-6)


def test_latent_cache_gives_the_same_loss_as_encoding_every_step(assets):
    # SFT's first loss depends on the latents, noise and captions (a DPO loss starts at ln 2 either way)
    cached = train(config(assets, "cached", loss="sft", latent_cache=True, max_steps=1)).losses
    uncached = train(config(assets, "uncached", loss="sft", latent_cache=False, max_steps=1)).losses
    np.testing.assert_allclose(cached, uncached, rtol=1e-5, atol=0)
    assert not (assets["root"] / "uncached" / "latent_cache").exists()


def test_sdxl_layout_trains_and_its_lora_loads(assets, tmp_path):
    """Two text encoders, pooled embeddings and time ids: a tiny SDXL pipeline from configuration."""
    from diffusers import StableDiffusionXLPipeline

    from prefcurate.training.components import build_tiny_sdxl_pipeline
    build_tiny_sdxl_pipeline(tmp_path / "sdxl", seed=0)
    assert load_components(tmp_path / "sdxl").is_sdxl
    for loss in ("dpo", "ncp-dpo"):
        result = train(config(assets, f"sdxl-{loss}", model=str(tmp_path / "sdxl"), loss=loss,
                              cache_dir=str(tmp_path / "cache")))
        assert result.losses[0] == pytest.approx(math.log(2), abs=1e-6) and result.losses[1] != result.losses[0]
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl", local_files_only=True)
    pipe.load_lora_weights(assets["root"] / "sdxl-dpo")
    assert pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("targets", [("to_q", "to_k", "to_v", "to_out.0"),
                                     ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")])
def test_loaded_lora_reproduces_the_trained_unet_exactly(assets, targets):
    """The saved LoRA, loaded by diffusers, gives the trained UNet's output, convolution targets included
    (converting PEFT keys to diffusers' older format once made load_lora_weights drop attention layers)."""
    from diffusers import StableDiffusionPipeline

    cfg = config(assets, f"roundtrip-{len(targets)}", max_steps=3, learning_rate=1e-2, lora_target_modules=targets)
    trainer = Trainer(cfg)
    trainer.fit()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    trainer.unet.eval()
    with torch.no_grad():
        trained = trainer.unet(x, t, text).sample
    pipe = StableDiffusionPipeline.from_pretrained(assets["model"], local_files_only=True)
    with torch.no_grad():
        base = pipe.unet(x, t, text).sample
    pipe.load_lora_weights(cfg.output)
    with torch.no_grad():
        loaded = pipe.unet(x, t, text).sample
    assert (trained - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- gradient checkpointing, mixed precision

def perturbed_lora(trainer: Trainer) -> None:
    """Seeded non-zero LoRA B (the zero init makes policy = reference, a degenerate point for the DPO losses)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for k, p in lora_tensors(trainer.unet, POLICY).items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("loss,perceptual", [(name, False) for name in LOSS_TYPES] + [("cpo", True), ("sft", True)])
def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(assets, loss, perceptual):
    """One micro-step with the UNet's gradient checkpointing off, then on, from the same generator state:
    same loss and LoRA gradients (NCP-DPO and NCP-SFT once raised CheckpointError), and the blocks really
    recompute their forward in backward when it is on."""
    cfg = config(assets, f"gc-{loss}-{perceptual}", loss=loss, perceptual=perceptual, ema_warmup_steps=0,
                 ref_update_every=1)
    trainer = Trainer(cfg)
    perturbed_lora(trainer)
    batch = next(trainer._batches())
    start = trainer.generator.get_state()
    calls = []
    hook = trainer.unet.up_blocks[0].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    results = []
    for checkpointing in (False, True):
        trainer.config = replace(cfg, gradient_checkpointing=checkpointing)
        if checkpointing:
            trainer.unet.enable_gradient_checkpointing()
        else:
            trainer.unet.disable_gradient_checkpointing()
        trainer.generator.set_state(start)
        calls.clear()
        value, _ = trainer.loss(batch)
        forward_calls = len(calls)
        value.backward()
        results.append((value.detach(), {k: p.grad.clone() for k, p in lora_tensors(trainer.unet, POLICY).items()},
                        len(calls) - forward_calls))
        trainer.optimizer.zero_grad(set_to_none=True)
    hook.remove()
    (loss_off, grads_off, recomputed_off), (loss_on, grads_on, recomputed_on) = results
    assert recomputed_off == 0 and recomputed_on > 0  # checkpointing really ran
    assert any(float(g.abs().max()) > 0 for g in grads_off.values())
    torch.testing.assert_close(loss_on, loss_off, atol=1e-5, rtol=0)
    for k in grads_off:
        torch.testing.assert_close(grads_on[k], grads_off[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["dpo", "balanced-dpo"])
def test_a_step_does_only_the_lora_work(assets, loss):
    """What the design saves over a full fine-tune: the reference is one batched UNet pass (2B latents) that
    records no autograd graph, gradients reach only the policy's LoRA tensors (clipped and updated alone),
    and with the latent cache built no VAE or text encoder is kept for the steps."""
    trainer = Trainer(config(assets, f"work-{loss}", loss=loss, ref_update_every=1))
    assert trainer.components.vae is None and trainer.components.text_encoders == []
    calls = []

    def record(module, args, kwargs, output):
        calls.append((torch.is_grad_enabled(), args[0].shape[0], output.sample.requires_grad))

    handle = trainer.unet.register_forward_hook(record, with_kwargs=True)
    value, _ = trainer.loss(next(trainer._batches()))
    handle.remove()
    assert calls == [(False, 4, False), (True, 4, True)]  # reference pass, then the policy pass
    value.backward()
    with_grad = {n for n, p in trainer.unet.named_parameters() if p.grad is not None}
    trainable = {n for n, p in trainer.unet.named_parameters() if any(p is q for q in trainer.trainable)}
    assert len(trainable) == len(lora_tensors(trainer.unet, POLICY)) > 0
    assert with_grad == trainable == {n for n, p in trainer.unet.named_parameters() if p.requires_grad}


def test_bf16_on_the_cpu_runs_under_autocast_and_is_recorded(assets):
    cfg = config(assets, "bf16", loss="dpo", mixed_precision="bf16", max_steps=1, report_to="none")
    trainer = Trainer(cfg)
    seen = []
    to_q = trainer.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    hook = to_q.register_forward_hook(lambda m, i, o: seen.append((o.dtype, torch.is_autocast_enabled("cpu"))))
    result = trainer.fit()
    hook.remove()
    assert math.isfinite(result.losses[0]) and seen and set(seen) == {(torch.bfloat16, True)}
    assert all(p.dtype == torch.float32 for p in lora_tensors(trainer.unet, POLICY).values())  # LoRA stays fp32
    ran = json.loads((Path(cfg.output) / "train_config.json").read_text())
    assert ran["mixed_precision"] == "bf16" and ran["frozen_weight_dtype"] == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on CUDA")
def test_fp16_on_the_cpu_is_refused_in_one_line(assets):
    with pytest.raises(PreflightError, match=r"^mixed_precision='fp16' needs CUDA .*'bf16'"):
        Trainer(config(assets, "fp16", mixed_precision="fp16"))


# ---------------------------------------------------------------- input checks, defaults, CLI

def test_preflight_names_each_problem_in_one_line(assets, tmp_path):
    good = dict(model=assets["model"], snapshot=assets["snapshot"], output=tmp_path / "out")
    info = check_train_inputs(**good)
    assert info.model.resolution == 32 and info.model.prediction_type == "epsilon" and info.snapshot_pairs == 8
    broken = Path(shutil.copytree(assets["model"], tmp_path / "broken"))
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer")
    bad_snapshot = Path(shutil.copytree(assets["snapshot"], tmp_path / "snap"))
    (bad_snapshot / "shards" / "shard-00001.parquet").unlink()
    done = tmp_path / "done"
    (done / "checkpoints").mkdir(parents=True)
    (done / "metrics.jsonl").write_text("{}\n")
    cases = [
        (dict(good, model=tmp_path / "nowhere"), "model folder .*nowhere does not exist"),
        (dict(good, model=broken), r"missing: tokenizer/tokenizer_config.json .*unet/diffusion_pytorch_model"),
        (dict(good, snapshot=tmp_path), r"manifest.json not found"),
        (dict(good, snapshot=bad_snapshot), r"shard 'shards/shard-00001.parquet' missing"),
        (dict(good, output=done), r"already holds a run \(metrics.jsonl, checkpoints\); resume it"),
        (dict(good, output=done, resume_from="latest"), r"holds no complete checkpoint"),
        (dict(good, resume_from=str(tmp_path)), r"lacks state.pt, lora.safetensors"),
        (dict(good, report_to="nope"), r"--report-to 'nope' is not one of"),
    ]
    if importlib.util.find_spec("wandb") is None:
        cases.append((dict(good, report_to="wandb"), r"--report-to wandb needs wandb: pip install wandb"))
    if importlib.util.find_spec("bitsandbytes") is None:
        cases.append((dict(good, use_8bit_adam=True), r"--use-8bit-adam needs bitsandbytes"))
    for kwargs, message in cases:
        with pytest.raises(PreflightError, match=message) as err:
            check_train_inputs(**kwargs)
        assert "\n" not in str(err.value)


def test_preflight_imports_no_torch_and_the_cli_refuses_bad_input_in_one_line(assets, tmp_path):
    probe = ("import sys, time; t = time.perf_counter(); from training.preflight import check_train_inputs; "
             f"check_train_inputs(model={str(assets['model'])!r}, snapshot={str(assets['snapshot'])!r}, "
             f"output={str(tmp_path / 'o')!r}); print('torch' in sys.modules, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and float(out[1]) < 1.0
    cli = [sys.executable, "-m", "prefcurate.training.trainer", "--snapshot", str(assets["snapshot"]), "--output",
           str(tmp_path / "o")]
    done = subprocess.run([*cli, "--model", str(tmp_path / "missing")], capture_output=True, text=True)
    assert done.returncode == 3 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("error: model folder") and "Traceback" not in done.stderr
    helped = subprocess.run([*cli, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    checkpointing = helped.stdout[helped.stdout.index("  --gradient-checkpointing"):].split("\n  --")[0]
    assert "30% slower" in " ".join(checkpointing.split()) and "{" not in checkpointing
    # The parser (names, recipes, β conventions) needs no torch: --help answers without the slow imports.
    probe = "import sys, prefcurate.training.config; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_resolution_defaults_to_the_models_own(assets):
    cfg = replace(config(assets, "native", max_steps=1, report_to="none"), resolution=None)
    result = train(cfg)
    assert json.loads((result.output / "train_config.json").read_text())["resolution"] == 32
    again = ["--snapshot", cfg.snapshot, "--model", cfg.model, "--output", cfg.output, "--max-steps", "1",
             "--report-to", "none", "--cache-dir", cfg.cache_dir]
    with pytest.raises(PreflightError, match="already holds a run"):
        main(again)
    main([*again, "--overwrite-output"])
    assert [r["step"] for r in metrics(cfg.output)] == [1]  # the earlier run's lines are gone, not appended to


# ---------------------------------------------------------------- tracking

def test_tensorboard_scalars_and_validation_images(assets):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(assets, "tracked", loss="dpo", max_steps=2, validation_prompts=("a red cube", "a cat"),
                 validation_every=1, validation_inference_steps=2)
    train(cfg)
    out = Path(cfg.output)
    for step in (1, 2):
        folder = out / "validation" / f"step-{step:06d}"
        assert json.loads((folder / "prompts.json").read_text()) == ["a red cube", "a cat"]
        assert [Image.open(folder / f"{i:02d}.png").size for i in range(2)] == [(32, 32), (32, 32)]
    acc = EventAccumulator(str(out / "logs" / "prefcurate"), size_guidance={"images": 0})  # the run's own events file
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss", "implicit_acc", "reward_margin", "lr", "step_time_s"} <= scalars
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    np.testing.assert_allclose([e.value for e in acc.Scalars("loss")], [r["loss"] for r in metrics(cfg.output)],
                               rtol=1e-6)
    assert acc.Tags()["images"] == ["validation"] and [e.step for e in acc.Images("validation")] == [1, 2]
    latest = latest_validation(out)
    assert latest is not None and latest[0] == 2 and [p for p, _ in latest[1]] == ["a red cube", "a cat"]
    from prefcurate.curation.report.page import (  # the HTML report's section for `prefcurate report --run`
        validation_figure,
    )

    figure = validation_figure(out)
    assert figure.values == {"step": 2, "prompts": ["a red cube", "a cat"]}
    assert Image.open(io.BytesIO(figure.png)).size == (320, 160)


# ---------------------------------------------------------------- conservative-DPO soft targets

def test_snapshot_soft_target_reaches_the_dpo_loss(assets, tmp_path):
    """The reliability policy's ε = 1 − P(label right) is the conservative-DPO target. At the first step the
    policy equals the reference (LoRA B = 0), so z = 0 and dL/dz = −(1 − 2ε)/2: with ε = 0.5 on every pair the
    gradient vanishes and LoRA B stays exactly zero, with ε = 0 it moves."""
    def lora_b_after_one_step(name: str, smoothing: float) -> list[torch.Tensor]:
        snap = write_test_snapshot(tmp_path / name, n_pairs=4, n_shards=1, label_smoothing=smoothing)
        cfg = config(assets, f"soft-{name}", snapshot=str(snap), max_steps=1, use_snapshot_weights=True,
                     cache_dir=str(tmp_path / f"cache-{name}"))
        trainer = Trainer(cfg)
        trainer.fit()
        return [v for k, v in lora_tensors(trainer.unet, POLICY).items() if "lora_B" in k]

    assert all(torch.count_nonzero(b) == 0 for b in lora_b_after_one_step("half", 0.5))
    assert any(torch.count_nonzero(b) > 0 for b in lora_b_after_one_step("none", 0.0))


def test_snapshot_without_the_soft_target_column_reads_as_plain_dpo(tmp_path):
    snap = write_test_snapshot(tmp_path / "old", n_pairs=4, n_shards=1, drop_columns=("label_smoothing",))
    batch = next(PairStream(open_snapshot(snap), batch_size=2, resolution=32, seed=0, decode_images=False).batches())
    assert batch.label_smoothing.tolist() == [0.0, 0.0]
    fresh = write_test_snapshot(tmp_path / "new", n_pairs=4, n_shards=1, label_smoothing=0.25)
    batch = next(PairStream(open_snapshot(fresh), batch_size=2, resolution=32, seed=0, decode_images=False).batches())
    assert batch.label_smoothing.tolist() == [0.25, 0.25]
