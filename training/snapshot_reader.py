"""Read a curated training snapshot: verify its manifest, then stream batches of pairs with exact resume.

The folder layout, manifest and verification are ``data_schemas.snapshot_contract`` (the same code the curation
writer uses); shards are Parquet in the ``data_schemas.tables.SNAPSHOT_PAIRS`` schema (winner first). Training
never imports curation/.

Order (deterministic given the seed, never the whole dataset in memory): per epoch the shards are permuted,
within a shard its row groups are permuted, and each row group (the unit Parquet reads, so the memory bound:
writers should keep row groups to a few hundred pairs) is cut into chunks of ``buffer_rows`` rows, whose order
and contents are both permuted. Every permutation comes from its own ``numpy`` generator seeded by
(seed, epoch, shard, row group, chunk), so a ``DataPosition`` (epoch, shard slot, rows already taken from that
shard) is enough to resume exactly: the row groups before it are skipped from the Parquet metadata alone.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor

from prefcurate.data_schemas import snapshot_contract as contract
from prefcurate.data_schemas.snapshot_contract import OPTIONAL_COLUMNS, SnapshotError  # noqa: F401  (re-exported)


IMAGE_COLUMNS = ("winner_image", "loser_image")
META_COLUMNS = ("pair_id", "prompt", "weight", "margin", "minority_score", "vote_fraction")


@dataclass(frozen=True)
class Shard:
    path: Path
    sha256: str
    rows: int


@dataclass(frozen=True)
class Snapshot:
    root: Path
    name: str
    snapshot_id: str
    shards: tuple[Shard, ...]
    adaptive: dict | None = None  # the manifest's Adaptive-DPO constants (adaptive policy), else None


def open_snapshot(root: str | Path) -> Snapshot:
    """Read and verify ``root/manifest.json`` (``data_schemas.snapshot_contract.verify_snapshot``: format and
    version, then every shard's existence, sha256, row count and columns). All problems are reported together
    in one ``SnapshotError``."""
    root = Path(root)
    manifest = contract.verify_snapshot(str(root), fsspec.filesystem("file"))
    shards = tuple(Shard(root / e["path"], e["sha256"], int(e["rows"])) for e in manifest["shards"])
    return Snapshot(root, str(manifest.get("name", "")), str(manifest["snapshot_id"]), shards,
                    manifest.get("adaptive"))


def margin_beta_warning(snapshot: Snapshot, loss: str, beta: float, use_snapshot_weights: bool) -> str | None:
    """Why the snapshot's offline margins do not fit this run, or None. Gamma's u-term was divided by the
    snapshot's beta_dpo; plain ``dpo`` with the snapshot's weights subtracts Gamma as written, so a different β
    changes what the margin means. A warning, not an error: at the default margin_scale the margin is at most
    1e-3 logits and the weights are unaffected, so a dpo run on the default (adaptive) snapshot stays valid,
    and refusing it would break the default pipeline for a negligible term."""
    recorded = (snapshot.adaptive or {}).get("beta")
    if loss != "dpo" or not use_snapshot_weights or recorded is None or math.isclose(recorded, beta):
        return None
    return (f"snapshot {snapshot.snapshot_id}: its offline margins were computed for beta {recorded:g} "
            f"(beta_dpo {snapshot.adaptive.get('beta_dpo', recorded / 2):g}) but this run uses beta {beta:g}; "
            f"pass --beta {recorded:g} to keep their meaning, or --no-use-snapshot-weights to ignore them")


@dataclass(frozen=True)
class DataPosition:
    """Where the stream continues: ``epoch``, ``shard`` = slot in that epoch's shard order, ``row`` = rows
    of that shard already taken (in its shuffled order)."""

    epoch: int = 0
    shard: int = 0
    row: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PairBatch:
    """B pairs, winner first. Pixels are None when the stream skips images (latent cache in use)."""

    pair_ids: list[str]
    prompts: list[str]
    rows: list[tuple[int, int]]  # (shard file index, row in that file): the latent-cache key
    winner_pixels: Tensor | None  # (B, 3, H, W) in [-1, 1]
    loser_pixels: Tensor | None
    weight: Tensor  # (B,) float32, per-pair loss weight from curation
    margin: Tensor  # (B,) offline margin in logit units
    minority_score: Tensor  # (B,) offline u in [0, 1]
    vote_fraction: Tensor  # (B,) share of voters for the winner; NaN when none
    label_smoothing: Tensor  # (B,) conservative-DPO ε in [0, 1]: probability the label is wrong; 0 = plain DPO
    position: DataPosition  # where the stream continues after this batch
    winner_sizes: Tensor | None = None  # (B, 2) int64 (width, height) before preprocessing; None without pixels
    loser_sizes: Tensor | None = None


def load_image(data: bytes, resolution: int) -> Tensor:
    """Encoded bytes -> (3, res, res) float32 in [-1, 1]: RGB, bilinear resize of the short side to ``res``,
    centre crop (the Diffusion-DPO preprocessing without the random flip, docs/methods.md §1.2)."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((new_w, new_h), Image.BILINEAR)
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(img, dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes, from the header only (PIL opens lazily)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _nan_to(value: float | None, fill: float) -> float:
    return fill if value is None or value != value else float(value)


class PairStream:
    """Endless, seeded stream of ``PairBatch`` over a verified snapshot (epochs follow one another).

    With several processes (``world_size`` > 1) the stream forms global batches of ``batch_size·world_size``
    pairs and each process keeps its slice, so every process reports the same position.
    """

    def __init__(self, snapshot: Snapshot, *, batch_size: int, resolution: int, seed: int,
                 buffer_rows: int = 256, decode_images: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or buffer_rows < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, buffer_rows >= 1, 0 <= rank < world_size; got {batch_size}, "
                             f"{buffer_rows}, {rank}, {world_size}")
        self.snapshot, self.batch_size, self.resolution, self.seed = snapshot, batch_size, resolution, seed
        self.buffer_rows, self.decode_images, self.rank, self.world_size = buffer_rows, decode_images, rank, world_size

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.snapshot.shards))

    def _rows_of_shard(self, epoch: int, file_index: int, skip: int) -> Iterator[tuple[int, dict]]:
        """(row in file, row values) of one shard in its shuffled order, after the first ``skip`` rows."""
        parquet = pq.ParquetFile(self.snapshot.shards[file_index].path)
        present = set(parquet.schema_arrow.names)
        columns = (list(META_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in present]
                   + (list(IMAGE_COLUMNS) if self.decode_images else []))
        starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        taken = 0
        for group in np.random.default_rng([self.seed, epoch, file_index]).permutation(parquet.num_row_groups):
            group_rows = int(starts[group + 1] - starts[group])
            if taken + group_rows <= skip:  # skipped from metadata, never read
                taken += group_rows
                continue
            table = parquet.read_row_group(int(group), columns=columns).to_pydict()
            n_chunks = -(-group_rows // self.buffer_rows)
            chunk_order = np.random.default_rng([self.seed, epoch, file_index, int(group)]).permutation(n_chunks)
            for chunk in chunk_order:
                begin = int(chunk) * self.buffer_rows
                size = min(self.buffer_rows, group_rows - begin)
                rng = np.random.default_rng([self.seed, epoch, file_index, int(group), int(chunk), 1])
                for local in begin + rng.permutation(size):
                    if taken >= skip:
                        yield int(starts[group] + local), {k: v[local] for k, v in table.items()}
                    taken += 1

    def _rows(self, start: DataPosition) -> Iterator[tuple[int, int, dict, DataPosition]]:
        epoch, slot, skip = start.epoch, start.shard, start.row
        while True:
            order = self.shard_order(epoch)
            for slot in range(slot, len(order)):
                file_index = int(order[slot])
                for i, (row, values) in enumerate(self._rows_of_shard(epoch, file_index, skip), start=skip + 1):
                    yield file_index, row, values, DataPosition(epoch, slot, i)
                skip = 0
            epoch, slot = epoch + 1, 0

    def batches(self, start: DataPosition = DataPosition()) -> Iterator[PairBatch]:
        global_size = self.batch_size * self.world_size
        pending: list[tuple[int, int, dict]] = []
        for file_index, row, values, position in self._rows(start):
            pending.append((file_index, row, values))
            if len(pending) == global_size:
                mine = pending[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                pending = []
                yield self._collate(mine, position)

    def _collate(self, rows: list[tuple[int, int, dict]], position: DataPosition) -> PairBatch:
        values = [v for _, _, v in rows]

        def column(name: str, fill: float) -> Tensor:
            return torch.tensor([_nan_to(v.get(name, fill), fill) for v in values], dtype=torch.float32)

        pixels_w = pixels_l = sizes_w = sizes_l = None
        if self.decode_images:
            pixels_w = torch.stack([load_image(v["winner_image"], self.resolution) for v in values])
            pixels_l = torch.stack([load_image(v["loser_image"], self.resolution) for v in values])
            sizes_w = torch.tensor([image_size(v["winner_image"]) for v in values], dtype=torch.int64)
            sizes_l = torch.tensor([image_size(v["loser_image"]) for v in values], dtype=torch.int64)
        return PairBatch(
            pair_ids=[v["pair_id"] for v in values], prompts=[v["prompt"] for v in values],
            rows=[(f, r) for f, r, _ in rows], winner_pixels=pixels_w, loser_pixels=pixels_l,
            weight=column("weight", 1.0), margin=column("margin", 0.0),
            minority_score=column("minority_score", 0.0), vote_fraction=column("vote_fraction", float("nan")),
            label_smoothing=column("label_smoothing", OPTIONAL_COLUMNS["label_smoothing"]),
            position=position, winner_sizes=sizes_w, loser_sizes=sizes_l)
