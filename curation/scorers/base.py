"""The `Scorer` interface, the batched neural-scorer base class, and safe checkpoint loading.

A scorer maps (image, prompt) pairs to one float64 each. Neural scorers split that into
`preprocess` (CPU, per image: PIL -> (3, H, W) float32 tensor; the `image_transform` object it
delegates to is picklable, so a runner can decode and preprocess in worker processes) and
`score_tensors` (device, batched), and cache each prompt's text embedding so it is computed once.
"""
from __future__ import annotations

import contextlib
import hashlib
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError


class MissingWeightsError(FileNotFoundError):
    """A checkpoint file a scorer needs is not in the weights directory."""

    def __init__(self, scorer: str, path: Path, source: str):
        self.scorer, self.path, self.source = scorer, Path(path), source
        super().__init__(f"scorer {scorer!r} needs {self.path} (not found); it comes from the public "
                         f"checkpoint {source}. Download it yourself and put it at that path: "
                         f"prefcurate never downloads weights.")


class CheckpointFormatError(ValueError):
    """A checkpoint file exists but is not in the expected format (or does not fit the model)."""


class Scorer(ABC):
    """One float per (image, prompt). `version` changes with the code and with the checkpoint bytes,
    so scores computed from different checkpoints are never mixed."""

    name: str
    version: str
    higher_is_better: bool = True
    uses_prompt: bool = True
    device: str = "cpu"

    @abstractmethod
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> np.ndarray:
        """(N,) float64 scores; `prompts` must have one entry per image when `uses_prompt`."""

    def _check_inputs(self, n_images: int, prompts: Sequence[str] | None) -> list[str]:
        if prompts is None:
            if self.uses_prompt:
                raise ValueError(f"scorer {self.name!r} uses the prompt: pass one prompt per image")
            return [""] * n_images
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, one per image, not a single string {prompts!r}")
        if len(prompts) != n_images:
            raise ValueError(f"scorer {self.name!r}: got {n_images} images but {len(prompts)} prompts")
        return list(prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, device={self.device!r})"


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); full fp32 on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class NeuralScorer(Scorer):
    """Batched torch scorer. Subclasses set `image_transform` and implement `_encode_texts` and
    `_score_batch`; they get `preprocess`, `score_tensors`, `score` and the text cache from here."""

    batch_size: int = 32
    image_transform: Callable[[Image.Image], torch.Tensor]

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._device = torch.device(device)
        self.device = str(self._device)
        self.batch_size = batch_size
        self._text_cache: dict[str, object] = {}

    # ---- subclass hooks -------------------------------------------------------------------------
    @abstractmethod
    def _encode_texts(self, prompts: list[str]) -> list[object]:
        """One cache entry per prompt (an L2-normalised embedding, or token ids for cross-attention models)."""

    @abstractmethod
    def _score_batch(self, pixels: torch.Tensor, text_entries: list[object]) -> torch.Tensor:
        """pixels (B, 3, H, W) on the device -> (B,) scores; runs under inference_mode and autocast."""

    # ---- public API -----------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, H, W) float32 CPU tensor. For worker processes, ship `image_transform`
        (picklable), not this bound method (it would pickle the model)."""
        return self.image_transform(image)

    def text_entries(self, prompts: Sequence[str]) -> list[object]:
        """Cached per-prompt text entries; prompts not seen before are encoded together in one batch."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        for chunk in _chunks(len(missing), self.batch_size):
            new = missing[chunk]
            with torch.inference_mode(), autocast_for(self._device):
                self._text_cache.update(zip(new, self._encode_texts(new)))
        return [self._text_cache[p] for p in prompts]

    def score_tensors(self, pixel_batch: torch.Tensor, prompts: Sequence[str] | None = None) -> np.ndarray:
        """Score preprocessed images: pixel_batch (N, 3, H, W) from `preprocess`, any N (chunked by
        `batch_size`). Returns (N,) float64."""
        if pixel_batch.ndim != 4 or pixel_batch.shape[1] != 3:
            raise ValueError(f"pixel_batch must be (N, 3, H, W), got shape {tuple(pixel_batch.shape)}")
        prompt_list = self._check_inputs(pixel_batch.shape[0], prompts)
        out = np.empty(pixel_batch.shape[0], dtype=np.float64)
        for chunk in _chunks(pixel_batch.shape[0], self.batch_size):
            entries = self.text_entries(prompt_list[chunk]) if self.uses_prompt else []
            pixels = pixel_batch[chunk].to(self._device, non_blocking=True)
            with torch.inference_mode(), autocast_for(self._device):
                scores = self._score_batch(pixels, entries)
            out[chunk] = scores.float().cpu().numpy()
        return out

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> np.ndarray:
        prompt_list = self._check_inputs(len(images), prompts)
        out = np.empty(len(images), dtype=np.float64)
        for chunk in _chunks(len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[chunk]])
            out[chunk] = self.score_tensors(pixels, prompt_list[chunk] if prompts is not None else None)
        return out


class ScoreMLP(torch.nn.Module):
    """The reward head shared by the LAION aesthetic predictor v2 and ImageReward: Linear 1024-128-64-16-1
    with Dropouts at indices 1, 3, 5, so checkpoint keys are layers.{0,2,4,6,7}. Both reference codes have
    their ReLUs commented out, so at inference the head is one affine map (docs/data-and-scorers.md §4.2)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        nn = torch.nn
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, 1)
        return self.layers(embedding)


# ---- checkpoint files ---------------------------------------------------------------------------

def require_file(scorer: str, path: Path, source: str) -> Path:
    if not Path(path).is_file():
        raise MissingWeightsError(scorer, path, source)
    return Path(path)


def file_digest(*paths: Path, n_hex: int = 16) -> str:
    """blake2b over the bytes of the given files, in order (streamed, 8 MiB at a time)."""
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
    return h.hexdigest()[:n_hex]


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch pickle loaded with weights_only=True.
    Unwraps {'state_dict': ...} and strips DataParallel's 'module.' prefix."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, UnicodeDecodeError,
            SafetensorError) as err:
        raise CheckpointFormatError(
            f"{path} is not a loadable checkpoint (expected safetensors, or a torch.save'd dict of tensors "
            f"that torch.load(weights_only=True) accepts): {type(err).__name__}: {str(err)[:300]}") from err
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointFormatError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load with a short, clear error instead of torch's multi-page one."""
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointFormatError(f"{path} does not fit {type(module).__name__}: {str(err)[:500]}") from err
    if missing or unexpected:
        raise CheckpointFormatError(
            f"{path} does not fit {type(module).__name__}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
