"""One Diffusion-DPO training step: this project's trainer vs the design of the public Diffusion-DPO scripts.

Designs, each measured in its own subprocess (clean peak memory), on the same model, snapshot and batch:
  ours            LoRA policy, reference = the same UNet with adapters disabled, latent/text cache
  lora-nocache    the same without the cache: VAE encode and text encoding every step
  reference       Salesforce ``train.py`` design: full fine-tune, a deep-copied frozen reference UNet,
                  VAE encode and text encoding every step, AdamW over every UNet weight
  ncp-ours        NCP-DPO with our trainer (the frozen-encoder perceptual loss), beside DPO's cost

Time per step: mean over ``--steps`` steps after ``--warmup`` (policy fwd + reference fwd + backward + AdamW),
as wall-clock time and as the process's CPU time (user + system, all threads: with ``--threads 1`` the work
itself, which other jobs on a shared machine slow down far less than they slow the wall clock).
Peak memory: CUDA ``max_memory_allocated`` after resetting it before the timed steps; on the CPU the process's
peak RSS (VmHWM) after resetting it via /proc/self/clear_refs before the timed steps (weights, optimizer state
and the step's activations), and the whole process's VmHWM (model loading included) as ``vmhwm_total_mib``.

  python benchmarks/bench_train_step.py                 # CPU: SD1.5-shaped UNet at 1/5 width, 32x32 latents
  python benchmarks/bench_train_step.py --sd15          # SD1.5 UNet/VAE/text-encoder architecture, 512 px (GPU)
  python benchmarks/bench_train_step.py --sd15-cpu      # the real SD1.5 architecture on the CPU, fp32, 1 pair,
                                                        # 128 px (latent 4x16x16); about 20 GB for the reference
  python benchmarks/bench_train_step.py --loss-sweep    # every loss with gradient checkpointing off and on
  python benchmarks/bench_train_step.py --sd15-cpu --rounds 2 --threads 1   # ours, reference, ours, reference:
                                                        # per-round ratios, then their min and median
  python benchmarks/bench_train_step.py --profile       # + each design's top operators (torch.profiler, 1 step)

The SD1.5 configurations below are written from the public runwayml/stable-diffusion-v1-5 unet/, vae/ and
text_encoder/ config.json files; weights are random (the step's cost does not depend on their values). A child
process exits (code 137, reported) when the machine's available memory falls below ``--min-free-gb``, so a
design that does not fit never drives the machine into the out-of-memory killer.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD15_UNET = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "act_fn": "silu",
    "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05,
}
SD15_VAE = {  # runwayml/stable-diffusion-v1-5 vae/config.json
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
SD15_TEXT = {  # openai/clip-vit-large-patch14 text tower, as SD1.5's text_encoder
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}
SMALL_UNET = {  # SD1.5's layout (3 cross-attention down blocks + 1 plain, 2 layers each) at 1/5 of its width
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [64, 128, 256, 256],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 128, "attention_head_dim": 8, "norm_num_groups": 32,
}
SMALL_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [32, 64, 64],
             "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
             "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 128}
SMALL_TEXT = {"vocab_size": 49408, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
              "num_hidden_layers": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
              "eos_token_id": 49407, "pad_token_id": 49407}


def write_snapshot(root: Path, n_pairs: int, image_size: int, row_group_size: int = 8) -> Path:
    """A training snapshot (manifest.json + one Parquet shard in ``SNAPSHOT_PAIRS``) of random blocky PNG pairs,
    written through ``data_schemas.snapshot_contract``; columns the benchmark does not vary get neutral values."""
    import fsspec
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from prefcurate.data_schemas import snapshot_contract as contract
    from prefcurate.data_schemas.tables import SNAPSHOT_PAIRS
    rng = np.random.default_rng(0)

    def png() -> bytes:
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(blocks).resize((image_size, image_size), Image.NEAREST).save(buf, format="PNG")
        return buf.getvalue()

    neutral = {"weight": 1.0, "label_source": "human", "user_id": "bench"}
    rows: dict[str, list] = {f.name: [] for f in SNAPSHOT_PAIRS}
    for i in range(n_pairs):
        images = {"winner_image": png(), "loser_image": png()}
        for f in SNAPSHOT_PAIRS:
            if f.name in images:
                value = images[f.name]
            elif f.name.endswith("_image_id"):
                value = hashlib.blake2b(images[f.name[:-3]], digest_size=16).hexdigest()
            elif f.name == "pair_id":
                value = f"pair-{i:05d}"
            elif f.name == "prompt":
                value = ("a red cube", "a cat on a mat", "two blue birds")[i % 3]
            elif f.name in neutral:
                value = neutral[f.name]
            else:
                value = 0.0 if pa.types.is_floating(f.type) else None
            rows[f.name].append(value)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    fs = fsspec.filesystem("file")
    shard = contract.write_shard(fs, str(root), 0, pa.Table.from_pydict(rows, schema=SNAPSHOT_PAIRS),
                                 row_group_size=row_group_size, compression="snappy")
    contract.write_manifest(fs, str(root), contract.build_manifest(
        name="bench", snapshot_id="bench-0", shards=[shard], policy={"benchmark": True}, counts={"pairs": n_pairs}))
    return root


def build_pipeline(out: Path, sd15: bool) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from prefcurate.training.components import CLIP_TOKENIZER_DIR
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15_UNET if sd15 else SMALL_UNET))
    vae = AutoencoderKL(**(SD15_VAE if sd15 else SMALL_VAE))
    text = CLIPTextModel(CLIPTextConfig(**(SD15_TEXT if sd15 else SMALL_TEXT)))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon")
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
                            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)


def reset_peak() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


def peak_mib() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def run_trainer(args, design: str) -> dict:
    import torch

    from prefcurate.training.config import TrainConfig
    from prefcurate.training.trainer import Trainer
    loss = "ncp-dpo" if design == "ncp-ours" else (args.loss or "dpo")
    cfg = TrainConfig(snapshot=args.snapshot, model=args.model, output=tempfile.mkdtemp(), loss=loss,
                      resolution=args.resolution, train_batch_size=args.pairs, max_steps=10**6,
                      latent_cache=design != "lora-nocache",
                      mixed_precision=args.mixed_precision if torch.cuda.is_available() else "no",  # CUDA only
                      gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.rank,
                      cache_dir=args.cache_dir, ref_update_every=1, ema_warmup_steps=0,
                      normalize_logits=args.pairs > 1)
    trainer = Trainer(cfg)
    batches = trainer._batches()

    def step() -> float:
        batch = next(batches)
        with trainer.accelerator.accumulate(trainer.model):
            loss_value, _ = trainer.loss(batch)
            trainer.accelerator.backward(loss_value)
            trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), 1.0)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss_value)

    trainable = sum(p.numel() for p in trainer.unet.parameters() if p.requires_grad)
    return measure(step, args, trainable, torch)


def run_reference(args, with_optimizer: bool = True) -> dict:
    """The Salesforce design, written compactly on the same components and the same batches.
    ``with_optimizer=False`` (design ``reference-no-opt``): the same step without the AdamW update, so without
    AdamW's two fp32 moments per weight; ``reference-opt-only`` times that update alone."""
    import torch

    from prefcurate.training import losses as L
    from prefcurate.training.components import encode_prompts, load_components
    from prefcurate.training.snapshot_reader import PairStream, open_snapshot
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    dtype = dtype if device.type == "cuda" else torch.float32
    comp = load_components(args.model)
    unet = comp.unet.to(device).train()  # trained in fp32 (mixed precision = autocast), as the public script
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ref_unet = copy.deepcopy(unet).requires_grad_(False).to(dtype)
    comp.vae.to(device, dtype)
    comp.text_encoders[0].to(device, dtype)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2) if with_optimizer else None
    acp = comp.noise_scheduler
    batches = PairStream(open_snapshot(args.snapshot), batch_size=args.pairs, resolution=args.resolution,
                         seed=0).batches()
    g = torch.Generator().manual_seed(0)

    def step() -> float:
        batch = next(batches)
        with torch.no_grad():
            pixels = torch.cat([batch.winner_pixels, batch.loser_pixels]).to(device, dtype)
            latents = comp.vae.encode(pixels).latent_dist.sample() * comp.vae.config.scaling_factor
            text, _ = encode_prompts(comp, batch.prompts, device, dtype)
        b = len(batch.prompts)
        noise = torch.randn((b, *latents.shape[1:]), generator=g).repeat(2, 1, 1, 1).to(device)
        t = torch.randint(0, 1000, (b,), generator=g).repeat(2).to(device)
        x_t = acp.add_noise(latents.float(), noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(x_t, t, encoder_hidden_states=text.repeat(2, 1, 1)).sample
            with torch.no_grad():
                ref = ref_unet(x_t, t, encoder_hidden_states=text.repeat(2, 1, 1)).sample
        mw, ml = L.split_winner_loser(L.per_sample_mse(pred, noise))
        rw, rl = L.split_winner_loser(L.per_sample_mse(ref, noise))
        loss, _ = L.diffusion_dpo_loss(mw, ml, rw, rl, beta=5000.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            unet.zero_grad(set_to_none=True)
        return float(loss)

    return measure(step, args, sum(p.numel() for p in unet.parameters()), torch)


def run_optimizer_only(args) -> dict:
    """The public design's AdamW update over every UNet weight (gradients present), alone: the part of its step
    that ``reference-no-opt`` leaves out. Holds weights, gradients and both moments (4 fp32 copies)."""
    import torch
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(Path(args.model) / "unet", local_files_only=True).train()
    params = [p for p in unet.parameters()]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-4
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)

    def step() -> float:
        optimizer.step()  # gradients stay: every step updates all 860M weights and moments, as in training
        return 0.0

    return measure(step, args, sum(p.numel() for p in params), torch)


BASELINE_MIB = 0.0  # process memory after imports, before any model exists (CPU: the torch/CUDA libraries)
TOTAL_HWM_MIB = [0.0]  # CPU: the process's VmHWM before the reset of the timed steps (model loading included)


def _status_kib(key: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1])


def memory_guard(min_free_gb: float) -> None:
    """Exit this process (code 137) when the machine's MemAvailable drops below ``min_free_gb``: the design
    does not fit here, and the out-of-memory killer would otherwise pick some other process."""
    def watch() -> None:
        while True:
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            available_gb = int(info["MemAvailable"].split()[0]) / 2**20
            if available_gb < min_free_gb:
                print(f"MEMORY-GUARD available {available_gb:.2f} GB < {min_free_gb} GB at process VmRSS "
                      f"{_status_kib('VmRSS') / 2**20:.2f} GB, VmHWM {_status_kib('VmHWM') / 2**20:.2f} GB",
                      flush=True)
                os._exit(137)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


def current_mib() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def top_operators(step, torch, n: int = 10) -> list[dict]:
    """One more step under torch.profiler: the ``n`` operators with the most self CPU time (ms, calls)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1), "calls": e.count} for e in rows]


def measure(step, args, trainable: int, torch) -> dict:
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    load_before = os.getloadavg()[0]
    for _ in range(args.warmup):
        step()
    if not torch.cuda.is_available():
        TOTAL_HWM_MIB[0] = _status_kib("VmHWM") / 1024
    reset_peak()
    times, cpu = [], []
    for _ in range(args.steps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # user + system seconds of every thread of this process
    peak = peak_mib()
    return {"step_s": sum(times) / len(times), "min_step_s": min(times), "cpu_s": sum(cpu) / len(cpu),
            "min_cpu_s": min(cpu), "peak_mib": peak, "peak_above_baseline_mib": peak - BASELINE_MIB,
            "trainable_params": trainable, "threads": torch.get_num_threads(),
            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before warm-up, after
            "vmhwm_total_mib": max(TOTAL_HWM_MIB[0], peak) if not torch.cuda.is_available() else None,
            **({"top_operators": top_operators(step, torch)} if args.profile else {})}


def child(args) -> None:
    global BASELINE_MIB
    import diffusers  # noqa: F401 - imported before the baseline so library memory is not counted
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    BASELINE_MIB = current_mib()
    if args.min_free_gb > 0:
        memory_guard(args.min_free_gb)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.design == "reference":
        result = run_reference(args)
    elif args.design == "reference-no-opt":
        result = run_reference(args, with_optimizer=False)
    elif args.design == "reference-opt-only":
        result = run_optimizer_only(args)
    else:
        result = run_trainer(args, args.design)
    print("RESULT " + json.dumps(result))


def run_child(work: Path, design: str, args, resolution: int, loss: str | None = None,
              checkpointing: bool | None = None) -> dict | None:
    """One design in a fresh process; None when the memory guard stopped it (it did not fit)."""
    ckpt = args.gradient_checkpointing if checkpointing is None else checkpointing
    cmd = [sys.executable, __file__, "--design", design, "--snapshot", str(work / "snapshot"),
           "--model", str(work / "model"), "--cache-dir", str(work / "cache"), "--resolution", str(resolution),
           "--pairs", str(args.pairs), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--rank", str(args.rank), "--threads", str(args.threads), "--mixed-precision", args.mixed_precision,
           "--min-free-gb", str(args.min_free_gb), *(["--profile"] if args.profile else []),
           "--gradient-checkpointing" if ckpt else "--no-gradient-checkpointing"] + (["--loss", loss] if loss else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    guard = next((x for x in out.stdout.splitlines() if x.startswith("MEMORY-GUARD")), None)
    if guard is not None:
        print(f"{design:13s} stopped by the memory guard (does not fit): {guard}", flush=True)
        return None
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{design} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def describe(name: str, r: dict) -> str:
    total = f", process VmHWM {r['vmhwm_total_mib']:,.0f} MiB" if r.get("vmhwm_total_mib") else ""
    load = f"  load {r['load_avg_1min'][0]:.1f}->{r['load_avg_1min'][1]:.1f}" if r.get("load_avg_1min") else ""
    text = (f"{name:13s} step {r['step_s']:8.3f} s (min {r['min_step_s']:8.3f}), CPU {r['cpu_s']:8.3f} s  "
            f"peak {r['peak_mib']:9,.0f} MiB ({r['peak_above_baseline_mib']:8,.0f} above imports{total})  "
            f"trainable {r['trainable_params']:,}{load}")
    for op in r.get("top_operators", []):
        text += f"\n{'':15s}{op['self_cpu_ms']:10.1f} ms {op['calls']:6d} calls  {op['op']}"
    return text


def loss_sweep(work: Path, args, resolution: int) -> dict:
    """Every loss with our trainer, gradient checkpointing off and on: step time and peak memory."""
    from prefcurate.training.losses import LOSS_TYPES
    rows, results = [], {}
    for loss in LOSS_TYPES:
        pair = {}
        for ckpt in (False, True):
            r = run_child(work, "ours", args, resolution, loss=loss, checkpointing=ckpt)
            pair[ckpt] = r
            if r is not None:
                print(describe(f"{loss}{' +ckpt' if ckpt else ''}", r), flush=True)
        results[loss] = {"off": pair[False], "on": pair[True]}
        if pair[False] and pair[True]:
            off, on = pair[False], pair[True]
            rows.append(f"| {loss} | {off['step_s']:.3f} s | {on['step_s']:.3f} s | "
                        f"{on['step_s'] / off['step_s']:.2f}x "
                        f"| {off['peak_above_baseline_mib']:,.0f} MiB | {on['peak_above_baseline_mib']:,.0f} MiB | "
                        f"{on['peak_above_baseline_mib'] / off['peak_above_baseline_mib']:.2f}x |")
    print("| loss | step, checkpointing off | on | time on/off | peak above imports, off | on | memory on/off |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd15", action="store_true", help="SD1.5 architecture (random weights) at 512 px (GPU)")
    p.add_argument("--sd15-cpu", action="store_true",
                   help="SD1.5 architecture (random weights) on the CPU in fp32: 1 pair, latent --latent-size")
    p.add_argument("--latent-size", type=int, default=16, help="--sd15-cpu latent side (16: 128 px, 32: 256 px)")
    p.add_argument("--tiny", action="store_true",
                   help="the tests' tiny pipeline (training.components.build_tiny_pipeline) at 32 px: a dry run")
    p.add_argument("--loss-sweep", action="store_true",
                   help="every loss with our trainer, gradient checkpointing off and on (small model)")
    p.add_argument("--pairs", type=int, default=None, help="pairs per step (2 latents each); default 2, "
                                                            "--sd15-cpu 1")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--mixed-precision", default="fp16", choices=["no", "fp16", "bf16"], help="CUDA only")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--designs", nargs="+", default=None,
                   help="default: ours lora-nocache reference ncp-ours; --sd15-cpu: ours reference")
    p.add_argument("--split-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="when the whole reference design does not fit, time and size it in two processes")
    p.add_argument("--reference-in-parts", action="store_true",
                   help="measure the reference design in its two processes from the start (it is known not to fit)")
    p.add_argument("--min-free-gb", type=float, default=1.5,
                   help="a child exits when the machine's available memory falls below this (0: no guard)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the designs this many times, interleaved (A, B, A, B, ...), each in its own process, "
                        "so that other jobs' load hits them alike; prints min and median of the per-round ratios")
    p.add_argument("--profile", action="store_true",
                   help="one extra step of each design under torch.profiler: its top operators by self CPU time")
    p.add_argument("--keep-work", action="store_true", help="keep the built model, snapshot and cache folder")
    p.add_argument("--design", help=argparse.SUPPRESS)
    p.add_argument("--build-model", help=argparse.SUPPRESS)
    p.add_argument("--loss", help=argparse.SUPPRESS)
    for hidden in ("--snapshot", "--model", "--cache-dir", "--resolution"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.pairs is None:
        args.pairs = 1 if args.sd15_cpu else 2
    if args.design:
        args.resolution = int(args.resolution)
        return child(args)
    if args.build_model:
        if args.tiny:
            from prefcurate.training.components import build_tiny_pipeline
            build_tiny_pipeline(Path(args.build_model), resolution=int(args.resolution))
        else:
            build_pipeline(Path(args.build_model), args.sd15)
        return None
    work = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    try:
        run_benchmark(work, args)
    finally:  # the SD1.5 pipeline alone is 4 GB of disk
        if args.keep_work:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_benchmark(work: Path, args) -> None:
    sd15 = args.sd15 or args.sd15_cpu
    resolution = 512 if args.sd15 else 8 * args.latent_size if args.sd15_cpu else 32 if args.tiny else 128
    if args.sd15_cpu:
        args.mixed_precision = "no"
    t0 = time.perf_counter()
    # built in a child process: this parent then never imports torch and holds no model memory (about 0.8 GB
    # at SD1.5 size) while the designs run
    subprocess.run([sys.executable, __file__, "--build-model", str(work / "model"), "--resolution", str(resolution),
                    *(["--tiny"] if args.tiny else ["--sd15"] if sd15 else [])], check=True,
                   stdout=subprocess.DEVNULL)
    write_snapshot(work / "snapshot", n_pairs=max(16, args.pairs * (args.steps + args.warmup + 1)),
                   image_size=resolution)
    kind = "SD1.5" if sd15 else "tiny" if args.tiny else "small"
    print(f"built the {kind} pipeline and snapshot in {time.perf_counter() - t0:.1f} s ({work})", flush=True)
    if args.loss_sweep:
        results = loss_sweep(work, args, resolution)
        print(json.dumps({"loss_sweep": True, "resolution": resolution, "pairs": args.pairs, **results}))
        return
    designs = args.designs or (["ours", "reference"] if args.sd15_cpu else
                               ["ours", "lora-nocache", "reference", "ncp-ours"])
    rounds, whole_fits = [], not args.reference_in_parts
    for k in range(args.rounds):
        if args.rounds > 1:
            print(f"round {k + 1} of {args.rounds}", flush=True)
        results, whole_fits = run_round(work, designs, args, resolution, whole_fits)
        rounds.append(results)
    if args.rounds > 1:
        summarise_rounds(rounds, designs)
    print(json.dumps({"sd15": sd15, "resolution": resolution, "pairs": args.pairs, "threads": args.threads,
                      **(rounds[0] if args.rounds == 1 else {"rounds": rounds})}))


def combine_reference(a_part: dict, b_part: dict) -> dict:
    """The whole public step from its two measured parts: times add; memory = the no-update part's peak plus
    the AdamW moments the update part holds (2 fp32 tensors per weight), a lower bound of the whole peak."""
    moments_mib = 2 * 4 * b_part["trainable_params"] / 2**20  # AdamW exp_avg + exp_avg_sq, fp32
    return {"step_s": a_part["step_s"] + b_part["step_s"], "min_step_s": a_part["min_step_s"] + b_part["min_step_s"],
            "cpu_s": a_part["cpu_s"] + b_part["cpu_s"], "min_cpu_s": a_part["min_cpu_s"] + b_part["min_cpu_s"],
            "peak_mib": a_part["peak_mib"] + moments_mib,
            "peak_above_baseline_mib": a_part["peak_above_baseline_mib"] + moments_mib,
            "vmhwm_total_mib": (a_part["vmhwm_total_mib"] or 0) + moments_mib,
            "trainable_params": b_part["trainable_params"], "combined": True, "moments_mib": moments_mib}


def run_round(work: Path, designs: list[str], args, resolution: int, whole_fits: bool) -> tuple[dict, bool]:
    """Each design once, in order, each in its own process. When the whole reference design did not fit
    (this round or an earlier one), it is measured in two processes: the step without the AdamW update, and
    the update alone. Returns the results and whether the whole reference fitted."""
    results = {}
    for design in designs:
        if design == "reference" and not whole_fits:
            r = None
        else:
            r = results[design] = run_child(work, design, args, resolution)
            if r is not None:
                print(describe(design, r), flush=True)
        if design == "reference" and r is None and (args.split_reference or not whole_fits):
            if whole_fits:
                print("the whole reference design does not fit: measuring it in two processes (the step without "
                      "the AdamW update, and the update alone)", flush=True)
            whole_fits = False
            for part in ("reference-no-opt", "reference-opt-only"):
                results[part] = p = run_child(work, part, args, resolution)
                if p is not None:
                    print(describe(part, p), flush=True)
            a_part, b_part = results.get("reference-no-opt"), results.get("reference-opt-only")
            if a_part and b_part:
                results["reference"] = ref = combine_reference(a_part, b_part)
                print(f"reference     = no-opt step + AdamW update: {ref['step_s']:.3f} s, CPU {ref['cpu_s']:.3f} s; "
                      f"memory at least {ref['peak_mib']:,.0f} MiB (no-opt peak + {ref['moments_mib']:,.0f} MiB of "
                      f"AdamW moments)", flush=True)
    ref = results.get("reference")
    if ref:
        for design, r in results.items():
            if design != "reference" and not design.startswith("reference-") and r:
                total = (f", process VmHWM {r['vmhwm_total_mib'] / ref['vmhwm_total_mib']:.2f}x"
                         if r.get("vmhwm_total_mib") and ref.get("vmhwm_total_mib") else "")
                print(f"{design:13s} / reference: time {r['step_s'] / ref['step_s']:.2f}x, "
                      f"CPU time {r['cpu_s'] / ref['cpu_s']:.2f}x, "
                      f"peak memory {r['peak_mib'] / ref['peak_mib']:.2f}x "
                      f"({r['peak_above_baseline_mib'] / ref['peak_above_baseline_mib']:.2f}x above imports{total})",
                      flush=True)
    if results.get("ncp-ours") and results.get("ours"):
        print(f"ncp-dpo / dpo (ours): time {results['ncp-ours']['step_s'] / results['ours']['step_s']:.2f}x")
    return results, whole_fits


def summarise_rounds(rounds: list[dict], designs: list[str]) -> None:
    """Min and median over the rounds of each design's ratios to the reference of the same round."""
    import statistics
    for design in designs:
        if design == "reference":
            continue
        pairs = [(r[design], r["reference"]) for r in rounds if r.get(design) and r.get("reference")]
        if not pairs:
            print(f"{design}: no round measured both it and the reference")
            continue
        for label, key in (("time", "step_s"), ("CPU time", "cpu_s"), ("peak memory", "peak_mib")):
            ratios = [ours[key] / ref[key] for ours, ref in pairs]
            print(f"{design} / reference over {len(pairs)} rounds: {label} min {min(ratios):.2f}x, median "
                  f"{statistics.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})", flush=True)


if __name__ == "__main__":
    main()
