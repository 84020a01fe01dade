"""Sampling for evaluation: load a local diffusers pipeline (optionally with a trained LoRA) and generate one
image per (prompt, seed), reproducibly (docs/methods.md §5.3-5.4).

Reproducibility: every image gets its own CPU ``torch.Generator`` seeded from (prompt text, seed) through
``generator_seed``, so its initial noise does not depend on batch composition, on the prompt's position in the
list (``--limit`` and ``--categories`` keep each prompt's noise), or on the device (CPU generators draw the same
numbers everywhere; diffusers moves the tensor to the device). Base and tuned images of one (prompt, seed) thus
start from the same noise. The pipeline's own scheduler is kept ("default scheduler" of DiffusionDPO's
``quick_samples.ipynb``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image


LORA_FILE = "pytorch_lora_weights.safetensors"  # what prefcurate.training.trainer writes (save_final_lora)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 20  # denoising steps; diffusers' DPO validation uses 25 DPMSolver steps, 20 DDIM are close
    guidance_scale: float = 7.5  # DiffusionDPO quick_samples for SD1.5 (docs/methods.md §5.3); use 5 for SDXL
    resolution: int | None = None  # square side in pixels; None: the model's native size
    batch_size: int = 4  # images per pipeline call (CFG doubles the UNet batch)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be at least 1, got {self.steps} and {self.batch_size}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")


def generator_seed(prompt: str, seed: int) -> int:
    """63-bit generator seed for one (prompt, seed): blake2b of both, so it is stable across runs and machines
    (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}\x00{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


ADAPTERS = ("tuned", "against")  # adapter names when two LoRAs share one pipeline (``use_adapter``)


def load_pipeline(model_dir: str | Path, lora_dir: str | Path | None = None, device: str = "cpu",
                  dtype: str | None = None, against_dir: str | Path | None = None) -> DiffusionPipeline:
    """A text-to-image pipeline from a local folder (SD1.5/2.1/SDXL layout, as ``save_pretrained`` or a download
    of runwayml/stable-diffusion-v1-5 writes it), with a LoRA from ``lora_dir`` when given (the output folder of
    ``python -m prefcurate.training.trainer``). ``dtype``: fp32, fp16 or bf16; default fp16 on CUDA and fp32 on
    the CPU.
    With ``against_dir`` too, both LoRAs are loaded as the adapters "tuned" (lora_dir) and "against"
    (against_dir) over one copy of the base weights; ``use_adapter`` picks the active one.

    The safety checker is not loaded: it replaces flagged images by black ones, which would score as losses
    for whichever model happened to trigger it.
    """
    model_dir = Path(model_dir)
    index = model_dir / "model_index.json"
    if not index.is_file():
        problem = "has no model_index.json" if model_dir.is_dir() else "does not exist"
        raise FileNotFoundError(f"model folder {model_dir} {problem}: expected a local diffusers pipeline folder "
                                f"(e.g. a download of "
                                f"runwayml/stable-diffusion-v1-5 or stabilityai/stable-diffusion-xl-base-1.0)")
    if against_dir is not None and lora_dir is None:
        raise ValueError("a LoRA to compare against needs the LoRA it is compared with (lora_dir)")
    for folder in (lora_dir, against_dir):
        if folder is not None and not (Path(folder) / LORA_FILE).is_file():
            raise FileNotFoundError(f"LoRA folder {folder} has no {LORA_FILE}: expected the output folder of "
                                    f"python -m prefcurate.training.trainer (prefcurate's fine-tuning)")
    dtype = dtype or ("fp16" if torch.device(device).type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    no_checker = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in json.loads(
        index.read_text()) else {}
    pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True, dtype=DTYPES[dtype],
                                             **no_checker)
    if against_dir is not None:
        pipe.load_lora_weights(str(lora_dir), adapter_name=ADAPTERS[0])
        with warnings.catch_warnings():  # peft warns on a second adapter, which is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(str(against_dir), adapter_name=ADAPTERS[1])
    elif lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@contextlib.contextmanager
def lora_disabled(pipe: DiffusionPipeline) -> Iterator[DiffusionPipeline]:
    """The pipeline with its LoRA layers bypassed (peft's disabled adapter returns the base layer's output
    exactly), then re-enabled: base and tuned images from one set of weights in memory."""
    pipe.disable_lora()
    try:
        yield pipe
    finally:
        pipe.enable_lora()


@contextlib.contextmanager
def use_adapter(pipe: DiffusionPipeline, name: str) -> Iterator[DiffusionPipeline]:
    """The pipeline with only the adapter ``name`` (one of ADAPTERS, see ``load_pipeline``) active at weight 1;
    the other one is bypassed exactly (peft computes the base layer plus the active adapters only)."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; adapters: {', '.join(ADAPTERS)}")
    pipe.set_adapters([name], adapter_weights=[1.0])
    yield pipe


def generate(pipe: DiffusionPipeline, prompts: Sequence[str], seeds: Sequence[int],
             config: SamplingConfig = SamplingConfig()) -> list[Image.Image]:
    """One image per (prompts[i], seeds[i]) (parallel lists), in order, as PIL images."""
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds are parallel lists: got {len(prompts)} prompts, {len(seeds)} seeds")
    size = {} if config.resolution is None else {"height": config.resolution, "width": config.resolution}
    images: list[Image.Image] = []
    for start in range(0, len(prompts), config.batch_size):
        batch = list(prompts[start:start + config.batch_size])
        generators = [torch.Generator("cpu").manual_seed(generator_seed(p, s))
                      for p, s in zip(batch, seeds[start:start + config.batch_size], strict=True)]
        with torch.inference_mode():
            out = pipe(prompt=batch, generator=generators, num_inference_steps=config.steps,
                       guidance_scale=config.guidance_scale, output_type="pil", **size)
        images.extend(out.images)
    return images
