"""Latent and text-embedding cache: encode every pair once per (snapshot, model, resolution).

The VAE posterior is cached as its mean and std (not a sample), so a training step draws the latent from the
same seeded noise as an uncached step: with or without the cache the loss is the same. One safetensors file
per (shard, row group) keeps memory bounded while building and lets steps read single rows (memory-mapped).
Files per row group: ``w_mean, w_std, l_mean, l_std`` (N, 4, h, w) float32, ``w_size, l_size`` (N, 2) int64
(width, height) of the images before preprocessing (SDXL micro-conditioning), ``text`` (N, 77, D) and, for SDXL,
``pooled`` (N, P); ``empty.safetensors`` holds the empty caption's embedding for prompt dropout.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from prefcurate.training.components import Components, encode_prompts
from prefcurate.training.snapshot_reader import Snapshot, image_size, load_image


COMPLETE = "complete.json"
CACHE_FORMAT = 2  # 2: image sizes stored; part of the key, so an older cache is rebuilt, never misread


def cache_key(snapshot: Snapshot, model_dir: str | Path, resolution: int) -> str:
    """Hash of the snapshot id, the model's VAE and text-encoder configs and weight files (path, size, mtime)
    and the resolution: a changed model or resolution gets a new cache."""
    model_dir = Path(model_dir).resolve()
    digest = hashlib.sha256(f"{snapshot.snapshot_id}|{resolution}|{model_dir}|v{CACHE_FORMAT}".encode())
    for sub in ("vae", "text_encoder", "text_encoder_2"):
        for f in sorted((model_dir / sub).glob("*")) if (model_dir / sub).is_dir() else []:
            stat = f.stat()
            digest.update(f"{f.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            if f.suffix == ".json":
                digest.update(f.read_bytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def vae_posterior(components: Components, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """(N, 3, H, W) in [-1, 1] -> VAE posterior (mean, std), each (N, 4, H/f, W/f) float32."""
    dist = components.vae.encode(pixels.to(components.vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def build_cache(components: Components, snapshot: Snapshot, root: Path, resolution: int, device: torch.device,
                batch_size: int = 16) -> Path:
    """Encode the whole snapshot into ``root`` unless ``root/complete.json`` exists; returns ``root``."""
    if (root / COMPLETE).is_file():
        return root
    # a folder of this process's own: two runs (or ranks) building the same cache at once must not share it
    partial = root.with_name(f"{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    dtype = components.unet.dtype
    empty, empty_pooled = encode_prompts(components, [""], device, dtype)
    save_file({"text": empty.float().cpu(), **({"pooled": empty_pooled.float().cpu()} if empty_pooled is not None
                                               else {})}, partial / "empty.safetensors")
    for s, shard in enumerate(snapshot.shards):
        parquet = pq.ParquetFile(shard.path)
        for g in range(parquet.num_row_groups):
            table = parquet.read_row_group(g, columns=["prompt", "winner_image", "loser_image"]).to_pydict()
            parts: dict[str, list[Tensor]] = {}
            for begin in range(0, len(table["prompt"]), batch_size):
                sl = slice(begin, begin + batch_size)
                for side in ("w", "l"):
                    images = table["winner_image" if side == "w" else "loser_image"][sl]
                    pixels = torch.stack([load_image(b, resolution) for b in images]).to(device)
                    mean, std = vae_posterior(components, pixels)
                    parts.setdefault(f"{side}_mean", []).append(mean.cpu())
                    parts.setdefault(f"{side}_std", []).append(std.cpu())
                    parts.setdefault(f"{side}_size", []).append(torch.tensor([image_size(b) for b in images],
                                                                             dtype=torch.int64))
                text, pooled = encode_prompts(components, table["prompt"][sl], device, dtype)
                parts.setdefault("text", []).append(text.float().cpu())
                if pooled is not None:
                    parts.setdefault("pooled", []).append(pooled.float().cpu())
            name = f"shard-{s:05d}-rg-{g:05d}.safetensors"
            save_file({k: torch.cat(v).contiguous() for k, v in parts.items()}, partial / name)
    (partial / COMPLETE).write_text(json.dumps({"snapshot_id": snapshot.snapshot_id, "resolution": resolution}))
    if root.exists() and not (root / COMPLETE).is_file():
        shutil.rmtree(root, ignore_errors=True)  # an unfinished cache of an older layout
    try:
        partial.rename(root)
    except OSError:
        if not (root / COMPLETE).is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process finished the same cache first: keep its copy
    return root


class LatentCache:
    """Row lookup into a built cache: ``get(rows)`` for a batch's (shard file, row) keys."""

    def __init__(self, root: Path, snapshot: Snapshot):
        if not (root / COMPLETE).is_file():
            raise FileNotFoundError(f"latent cache {root} is incomplete ({COMPLETE} missing); rebuild it")
        self.root = root
        self.group_starts = []  # per shard: first row of each row group
        for shard in snapshot.shards:
            meta = pq.ParquetFile(shard.path).metadata
            self.group_starts.append(np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]))
        with safe_open(root / "empty.safetensors", framework="pt") as f:
            self.empty = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        self._handles: dict[tuple[int, int], object] = {}

    def _handle(self, shard: int, group: int):
        key = (shard, group)
        if key not in self._handles:
            if len(self._handles) > 64:  # bounded number of open memory maps
                self._handles.clear()
            self._handles[key] = safe_open(self.root / f"shard-{shard:05d}-rg-{group:05d}.safetensors",
                                           framework="pt")
        return self._handles[key]

    def get(self, rows: list[tuple[int, int]]) -> dict[str, Tensor]:
        """Stacked cached tensors for the rows, each (B, ...)."""
        out: dict[str, list[Tensor]] = {}
        for shard, row in rows:
            starts = self.group_starts[shard]
            group = int(np.searchsorted(starts, row, side="right") - 1)
            handle = self._handle(shard, group)
            local = row - int(starts[group])
            for name in handle.keys():  # noqa: SIM118
                out.setdefault(name, []).append(handle.get_slice(name)[local:local + 1])
        return {k: torch.cat(v) for k, v in out.items()}
