"""Pretrain the small world's text-to-image model and save it as a diffusers pipeline folder.

    python benchmarks/smallworld/pretrain.py                      # -> out/smallworld/base (8.5 min, 1 thread)
    python benchmarks/smallworld/pretrain.py --out DIR --unet-steps 40 --vae-steps 20 --images 256   # smoke

The folder is a ``StableDiffusionPipeline`` (what ``prefcurate.training.components.load_components`` reads):

- ``vae``: an ``AutoencoderKL`` with two blocks (16, 32): 3 x 16 x 16 pixels <-> 8 x 8 x 8 latents.
  Trained first on reconstruction (+ a small KL term); ``scaling_factor`` = 1 / std of the latent means.
- ``text_encoder`` + ``tokenizer``: a 2-layer ``CLIPTextModel`` of width 32 with the committed CLIP vocabulary
  (``training/assets/clip_tokenizer``), trained jointly with the UNet; captions are at most 16 tokens.
- ``unet``: the two-level tiny ``UNet2DConditionModel`` of ``prefcurate.training.components.tiny_unet_config``
  (8 x 8 x 8 latents, cross-attention at 4 x 4), ε-prediction, DDPM 1000 steps with SD1.5's scaled-linear betas.

The training images vary in colour (the named colour with P = 0.65), blur and exposure (``world.render_set``),
so the base model's samples vary on every taste dimension. Everything is seeded; ``smallworld.json`` records
the settings, timings and the base model's mean true reward on held-out captions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.smallworld import world  # noqa: E402
from benchmarks.smallworld.sampling import load_pipeline, sample  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from prefcurate.training.components import CLIP_TOKENIZER_DIR, tiny_unet_config  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402


DEFAULT_OUT = Path(__file__).resolve().parents[2] / "out" / "smallworld" / "base"
BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "prediction_type": "epsilon"}  # SD1.5's training noise schedule
LATENT_CHANNELS = 8  # 8 x 8 x 8 latents for 3 x 16 x 16 pixels: 1.5x compression keeps the 2 px checker
MAX_TOKENS = 16  # the longest caption ("a purple umbrella, snapshot") is 8 tokens with BOS/EOS


@dataclass
class PretrainConfig:
    out: str = str(DEFAULT_OUT)
    images: int = 6000  # rendered training images (~22 per caption), rendered in ~8 s
    wrong_colour_rate: float = 0.35  # share of training images in another colour than the caption names
    vae_steps: int = 800  # reconstruction steps of the two-block VAE (~0.09 s each on one core)
    unet_steps: int = 3000  # UNet + text encoder steps; ~0.14 s each on one core
    batch_size: int = 32
    lr: float = 1e-3  # AdamW, after a 100-step linear warm-up
    prompt_dropout: float = 0.1  # captions replaced by "" so classifier-free guidance works
    text_width: int = 32  # text encoder hidden size = UNet cross_attention_dim
    eval_captions: int = 60  # held-out captions for the summary reward
    seed: int = 0
    threads: int = 1  # tiny tensors: on 2 shared cores, 2 threads measured slower than 1


def build_modules(c: PretrainConfig) -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel]:
    torch.manual_seed(c.seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=world.IMAGE_SIZE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=c.text_width, intermediate_size=2 * c.text_width, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR, model_max_length=MAX_TOKENS)
    unet_config = tiny_unet_config(sample_size=world.IMAGE_SIZE // 2, cross_attention_dim=c.text_width)
    unet = UNet2DConditionModel(**unet_config | {"in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS})
    return vae, text_encoder, tokenizer, unet


def _warmup_lr(step: int, lr: float) -> float:
    return lr * min(1.0, (step + 1) / 100)


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, c: PretrainConfig, g: torch.Generator) -> float:
    """Reconstruction MSE + 1e-6 KL (a near-deterministic autoencoder, as SD's VAE); returns the last MSE."""
    opt = torch.optim.AdamW(vae.parameters(), lr=c.lr, weight_decay=0.0)
    vae.train()
    mse = float("nan")
    for step in range(c.vae_steps):
        x = pixels[torch.randint(len(pixels), (c.batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        for group in opt.param_groups:
            group["lr"] = _warmup_lr(step, c.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mse = F.mse_loss(recon.detach(), x).item()
    vae.eval().requires_grad_(False)
    return mse


def train_unet(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, latents_mean: torch.Tensor,
               latents_std: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor, c: PretrainConfig,
               g: torch.Generator) -> list[float]:
    """ε-prediction MSE on VAE latents, UNet and text encoder jointly; returns the loss per 100 steps."""
    scheduler = DDPMScheduler(**BETAS)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=1e-2)
    unet.train()
    text_encoder.train()
    losses, running = [], 0.0
    for step in range(c.unet_steps):
        idx = torch.randint(len(latents_mean), (c.batch_size,), generator=g)
        latents = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, BETAS["num_train_timesteps"], (c.batch_size,), generator=g)
        drop = torch.rand(c.batch_size, generator=g) < c.prompt_dropout
        ids = torch.where(drop[:, None], empty_ids, token_ids[idx])
        text = text_encoder(ids)[0]  # (B, MAX_TOKENS, text_width)
        eps = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
        loss = F.mse_loss(eps, noise)
        for group in opt.param_groups:
            group["lr"] = _warmup_lr(step, c.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % 100 == 0 or step + 1 == c.unet_steps:
            losses.append(round(running / ((step % 100) + 1), 5))
            running = 0.0
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return losses


def pretrain(c: PretrainConfig) -> dict:
    """Render, train the VAE, then the UNet and text encoder; save the pipeline and ``smallworld.json``."""
    torch.set_num_threads(c.threads)
    timings, started = {}, time.perf_counter()
    train_captions, heldout = world.split_captions(n_heldout=c.eval_captions, seed=c.seed)
    data = world.render_set(c.images, c.wrong_colour_rate, seed=c.seed)  # every caption, held-out ones included
    pixels = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, 16, 16)
    timings["render_s"] = time.perf_counter() - started
    vae, text_encoder, tokenizer, unet = build_modules(c)
    g = torch.Generator().manual_seed(c.seed)

    t0 = time.perf_counter()
    vae_mse = train_vae(vae, pixels, c, g)
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    scaling = float(1.0 / posterior.mean.std())
    vae.register_to_config(scaling_factor=scaling)
    timings["vae_s"] = time.perf_counter() - t0

    def tokens(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                         return_tensors="pt").input_ids

    t0 = time.perf_counter()
    losses = train_unet(unet, text_encoder, posterior.mean * scaling, posterior.std * scaling,
                        tokens([cap.text for cap in data.captions]), tokens([""]), c, g)
    timings["unet_s"] = time.perf_counter() - t0

    out = Path(c.out)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False,
                                                           steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)

    t0 = time.perf_counter()
    pipe = load_pipeline(out)
    prompts = [cap.text for cap in heldout for _ in range(2)]
    images = sample(pipe, prompts, list(range(len(prompts))))
    named = [cap.colour for cap in heldout for _ in range(2)]
    props = world.pixel_properties(images, named)
    timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    data_props = world.pixel_properties(data.images, [cap.colour for cap in data.captions])
    summary = {
        "config": asdict(c), "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "torch_threads": c.threads, "vae_reconstruction_mse": round(vae_mse, 5), "vae_scaling_factor": scaling,
        "unet_loss_per_100_steps": losses,
        "base_samples_heldout": {"n": len(images), "true_reward_mean": float(world.true_reward(images, named).mean()),
                                 **{f"{k}_mean": float(v.mean()) for k, v in props.items()}},
        "training_images": {"true_reward_mean": float(world.true_reward(data.images, [cap.colour for cap in
                                                                                       data.captions]).mean()),
                            **{f"{k}_mean": float(v.mean()) for k, v in data_props.items()}},
        "train_captions": len(train_captions), "heldout_captions": len(heldout),
        "size_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
    }
    (out / "smallworld.json").write_text(json.dumps(summary, indent=2))
    return summary


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(PretrainConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    return PretrainConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    print(json.dumps(pretrain(parse_args(sys.argv[1:])), indent=2))
