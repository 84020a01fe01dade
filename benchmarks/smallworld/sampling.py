"""Sample images from a small-world pipeline folder (optionally with a trained LoRA), seeded per image.

DDIM with η = 0 is deterministic given the initial noise, and the initial noise of image i comes from
``torch.Generator().manual_seed(seeds[i])``: the base model and every fine-tuned model draw the same noise
for the same (prompt, seed), so their rewards are compared pair by pair (common random numbers).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from prefcurate.training.checkpoint import LORA_FILE
from prefcurate.training.components import Components, encode_prompts
from prefcurate.training.lora import POLICY, add_policy_lora, lora_tensors


def load_pipeline(model_dir: str | Path) -> StableDiffusionPipeline:
    """The saved small-world pipeline, offline, on the CPU, in fp32."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_with_lora(base: UNet2DConditionModel, checkpoint: str | Path, rank: int, alpha: float,
                   targets: tuple[str, ...]) -> UNet2DConditionModel:
    """A copy of ``base`` carrying the policy adapter of a trainer checkpoint (``training.checkpoint`` layout:
    tensors named as ``prefcurate.training.lora.lora_tensors``). Read directly rather than through diffusers'
    ``load_lora_weights``, which drops the attention layers of a LoRA that also adapts convolutions."""
    unet = copy.deepcopy(base)
    add_policy_lora(unet, rank, alpha, targets)
    params, weights = lora_tensors(unet, POLICY), load_file(Path(checkpoint) / LORA_FILE)
    if set(params) != set(weights):
        raise ValueError(f"{checkpoint}/{LORA_FILE} does not match the adapter (rank {rank}, targets {targets}): "
                         f"{len(set(params) ^ set(weights))} tensor names differ")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    return unet.eval()


@torch.no_grad()
def sample(pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], *, steps: int = 20,
           guidance: float = 3.0, batch_size: int = 128) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for N (prompt, seed) pairs: classifier-free guidance against the empty
    caption, DDIM ``steps`` steps (η = 0), VAE posterior decode."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    unet, vae = pipe.unet, pipe.vae
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latent_size = unet.config.sample_size
    components = Components(unet, vae, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler)
    empty, _ = encode_prompts(components, [""], torch.device("cpu"), torch.float32)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = prompts[start:start + batch_size], seeds[start:start + batch_size]
        text, _ = encode_prompts(components, chunk, torch.device("cpu"), torch.float32)  # (B, T, D)
        cond = torch.cat([empty.expand(len(chunk), -1, -1), text])
        latents = torch.stack([torch.randn((unet.config.in_channels, latent_size, latent_size),
                                           generator=torch.Generator().manual_seed(int(s))) for s in chunk_seeds])
        scheduler.set_timesteps(steps)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps_uncond, eps_text = unet(torch.cat([latents, latents]), t, encoder_hidden_states=cond).sample.chunk(2)
            eps = eps_uncond + guidance * (eps_text - eps_uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
        pixels = vae.decode(latents / vae.config.scaling_factor).sample  # (B, 3, H, W) in about [-1, 1]
        out.append(((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)
