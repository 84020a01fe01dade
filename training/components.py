"""Diffusion model components for training: load a local diffusers pipeline folder, or build a tiny one offline.

Nothing here reaches a hub: ``load_components`` reads ``from_pretrained(dir, local_files_only=True)`` and refuses
a missing folder or file with one error naming what is expected; ``build_tiny_pipeline`` builds a real
``StableDiffusionPipeline`` at tiny size from configuration (random weights) for the demo, tests and benchmark,
with the CLIP tokenizer committed under ``training/assets/clip_tokenizer`` (docs/environment.md §6).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from prefcurate.training.losses import PREDICTION_TYPES


CLIP_TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"

# Sub-folders every trainable pipeline needs, and where each comes from in the public checkpoints
# (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0).
REQUIRED = {
    "model_index.json": "the pipeline index written by save_pretrained",
    "unet/config.json": "UNet2DConditionModel config",
    "vae/config.json": "AutoencoderKL config",
    "text_encoder/config.json": "CLIP text encoder config",
    "tokenizer/tokenizer_config.json": "CLIP tokenizer config (with vocab.json + merges.txt or tokenizer.json)",
    "scheduler/scheduler_config.json": "noise scheduler config",
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")


@dataclass
class Components:
    """What the trainer needs from a pipeline. SDXL has two text encoders; SD1.5/2.1 have one."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list[CLIPTokenizer]
    noise_scheduler: DDPMScheduler

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2


def _missing_files(model_dir: Path) -> list[str]:
    missing = [f"{name} ({why})" for name, why in REQUIRED.items() if not (model_dir / name).is_file()]
    for sub in ("unet", "vae"):
        if (model_dir / sub).is_dir() and not any((model_dir / sub / w).is_file() for w in WEIGHT_FILES):
            missing.append(f"{sub}/{WEIGHT_FILES[0]} ({sub} weights)")
    return missing


def load_components(model_dir: str | Path) -> Components:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and a DDPM training scheduler from a local pipeline folder.

    The folder is what ``StableDiffusionPipeline.save_pretrained`` (or ``huggingface-cli download``) writes for
    SD1.5 (runwayml/stable-diffusion-v1-5), SD2.1 (stabilityai/stable-diffusion-2-1) or SDXL
    (stabilityai/stable-diffusion-xl-base-1.0, which adds text_encoder_2/ and tokenizer_2/). The training
    scheduler is always DDPM built from the folder's scheduler config (Diffusion-DPO trains with DDPM noise).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist: expected a local diffusers pipeline "
                                f"folder (e.g. a download of runwayml/stable-diffusion-v1-5) with unet/, vae/, "
                                f"text_encoder/, tokenizer/, scheduler/ and model_index.json")
    missing = _missing_files(model_dir)
    if missing:
        raise FileNotFoundError(f"model folder {model_dir} is not a complete diffusers pipeline; missing: "
                                f"{', '.join(missing)} (as in runwayml/stable-diffusion-v1-5 or "
                                f"stabilityai/stable-diffusion-xl-base-1.0)")
    kw = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **kw)
    text_encoders: list[torch.nn.Module] = [CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", **kw)]
    tokenizers = [CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer", **kw)]
    if (model_dir / "text_encoder_2").is_dir():
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2", **kw))
        tokenizers.append(CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2", **kw))
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler", **kw)
    if noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{model_dir}/scheduler predicts {noise_scheduler.config.prediction_type!r}; training "
                         f"supports {' and '.join(PREDICTION_TYPES)} (SD1.5/SDXL: epsilon, SD2.x-768: v_prediction)")
    for module in (vae, *text_encoders):
        module.requires_grad_(False)
    return Components(unet, vae, text_encoders, tokenizers, noise_scheduler)


def encode_prompts(components: Components, prompts: list[str], device: torch.device,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Prompts -> (text embeddings (N, 77, D), SDXL pooled embeddings (N, P) or None), under no_grad.

    SD1.5/2.1: last hidden state of the one encoder. SDXL (as its pipeline's ``encode_prompt``): the
    penultimate hidden states of both encoders concatenated on the feature axis, pooled from encoder 2.
    """
    hidden, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            if components.is_sdxl:
                out = encoder(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                if isinstance(encoder, CLIPTextModelWithProjection):
                    pooled = out.text_embeds.to(dtype)
            else:
                hidden.append(encoder(ids)[0])
    return torch.cat(hidden, dim=-1).to(dtype), pooled


def center_crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """The geometry of ``training.snapshot_reader.load_image``: resize the short side to ``resolution`` (bilinear),
    then centre-crop a square. Returns (resized width, resized height, crop left, crop top), in pixels."""
    if width < 1 or height < 1 or resolution < 1:
        raise ValueError(f"image and target sizes must be >= 1, got {width}x{height} -> {resolution}")
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    return new_w, new_h, (new_w - resolution) // 2, (new_h - resolution) // 2


def sdxl_micro_conditioning(sizes: Tensor | None, resolution: int, n: int) -> Tensor:
    """SDXL micro-conditioning rows (N, 6) = (original h, original w, crop top, crop left, target h, target w),
    Podell et al. 2023 (arXiv 2307.01952) §2.2, in the order of the SDXL pipeline's ``add_time_ids``.

    ``sizes`` (N, 2): each image's (width, height) before preprocessing, from its encoded bytes; the crop is
    where ``center_crop_box`` cut it (the diffusers SDXL training scripts record the same two). Without sizes
    (an image of unknown size) the row is ``[res, res, 0, 0, res, res]``, the fixed row of the Salesforce SDXL
    script. float32 on the CPU; the caller moves and casts it.
    """
    if sizes is None:
        return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32).expand(
            n, 6).clone()
    if sizes.shape != (n, 2):
        raise ValueError(f"sizes must be (N, 2) = (width, height) per image with N = {n}, got {tuple(sizes.shape)}")
    rows = []
    for width, height in sizes.long().tolist():
        _, _, left, top = center_crop_box(width, height, resolution)
        rows.append([height, width, top, left, resolution, resolution])
    return torch.tensor(rows, dtype=torch.float32)


def tiny_unet_config(sample_size: int = 8, cross_attention_dim: int = 32,
                     block_out_channels: tuple[int, ...] = (32, 64)) -> dict:
    """The docs/environment.md §7.1 UNet at a given latent size: one plain and one cross-attention down block."""
    return {
        "sample_size": sample_size, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": list(block_out_channels),
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(block_out_channels) - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (len(block_out_channels) - 1) + ["UpBlock2D"],
        "cross_attention_dim": cross_attention_dim, "attention_head_dim": 8, "norm_num_groups": 8,
    }


def build_tiny_pipeline(out_dir: str | Path, *, resolution: int = 32, seed: int = 0,
                        prediction_type: str = "epsilon") -> Path:
    """Build and save a tiny SD-style pipeline (random weights, offline) that ``load_components`` and
    ``StableDiffusionPipeline.from_pretrained`` read back; returns ``out_dir``.

    VAE with three blocks (32, 32, 32): latents 4 × res/4 × res/4 (8×8 at 32 px, 16×16 at 64 px).
    UNet (32, 64) blocks with cross-attention dim 32; CLIP text encoder of hidden size 32 with the committed
    real CLIP vocabulary (so prompts tokenise as in SD). Training scheduler DDPM 1000 steps (scaled-linear betas,
    as SD1.5); the pipeline's sampling scheduler is DDIM with the same betas and ``prediction_type``
    (``v_prediction``: the SD2.x-768 parametrisation).
    """
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=resolution)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size=resolution // 4))
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    betas = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "prediction_type": prediction_type}
    scheduler = DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    with open(out_dir / "prefcurate_tiny.json", "w") as f:  # provenance: this folder holds random weights
        json.dump({"built_by": "prefcurate.training.components.build_tiny_pipeline", "seed": seed,
                   "resolution": resolution, "weights": "random"}, f)
    return out_dir


def build_tiny_sdxl_pipeline(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny SDXL-layout pipeline (random weights, offline): two CLIP text encoders (the second
    with a projection, giving the pooled embedding), a UNet with ``addition_embed_type="text_time"`` (pooled
    text + the six micro-conditioning numbers), a three-block VAE (latents res/4). Returns ``out_dir``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32, use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    ).save_pretrained(out_dir)
    return out_dir
