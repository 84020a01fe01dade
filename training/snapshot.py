"""Read a curated training snapshot: verify its manifest, then stream batches of pairs with exact resume.

A snapshot is a folder with ``manifest.json``::

    {"format": "prefcurate-snapshot", "version": 1, "name": str, "snapshot_id": str, "policy": {...},
     "counts": {...}, "shards": [{"path": "shards/shard-00000.parquet", "sha256": hex, "rows": int}, ...]}

and Parquet shards in the ``data_schemas.tables.SNAPSHOT_PAIRS`` schema (winner first). Training never
imports curation/: this module is the whole contract.

Order (deterministic given the seed, never the whole dataset in memory): per epoch the shards are permuted,
within a shard its row groups are permuted, and each row group (the unit Parquet reads, so the memory bound:
writers should keep row groups to a few hundred pairs) is cut into chunks of ``buffer_rows`` rows, whose order
and contents are both permuted. Every permutation comes from its own ``numpy`` generator seeded by
(seed, epoch, shard, row group, chunk), so a ``DataPosition`` (epoch, shard slot, rows already taken from that
shard) is enough to resume exactly: the row groups before it are skipped from the Parquet metadata alone.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor

from data_schemas.tables import SNAPSHOT_PAIRS


SNAPSHOT_FORMAT = "prefcurate-snapshot"
SNAPSHOT_VERSION = 1
IMAGE_COLUMNS = ("winner_image", "loser_image")
META_COLUMNS = ("pair_id", "prompt", "weight", "margin", "minority_score", "vote_fraction")
# Columns a snapshot may lack (written before they existed) and the value that means "absent": the
# conservative-DPO soft target ε of the reliability policy is 0 (plain DPO) in older snapshots.
OPTIONAL_COLUMNS = {"label_smoothing": 0.0}


class SnapshotError(ValueError):
    """The snapshot folder is missing, malformed or does not match its manifest."""


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

    @property
    def num_pairs(self) -> int:
        return sum(s.rows for s in self.shards)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_snapshot(root: str | Path) -> Snapshot:
    """Read and verify ``root/manifest.json``: format and version, then every shard's existence, sha256, row
    count and columns. All problems are reported together in one ``SnapshotError``."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise SnapshotError(f"{manifest_path} not found: a training snapshot is a folder with manifest.json and "
                            f"shards/*.parquet, written by the curation stage")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise SnapshotError(f"{manifest_path} is not valid JSON: {err}") from None
    if manifest.get("format") != SNAPSHOT_FORMAT or manifest.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError(f"{manifest_path}: expected format {SNAPSHOT_FORMAT!r} version {SNAPSHOT_VERSION}, got "
                            f"{manifest.get('format')!r} version {manifest.get('version')!r}")
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not entries or not manifest.get("snapshot_id"):
        raise SnapshotError(f"{manifest_path}: needs a snapshot_id and a non-empty 'shards' list")
    problems, shards = [], []
    required = set(SNAPSHOT_PAIRS.names) - set(OPTIONAL_COLUMNS)
    for entry in entries:
        path = root / str(entry.get("path", ""))
        if not path.is_file() or not entry.get("path"):
            problems.append(f"{entry.get('path')!r}: file missing")
            continue
        actual = _sha256(path)
        if actual != entry.get("sha256"):
            problems.append(f"{entry['path']}: sha256 {actual} != manifest {entry.get('sha256')}")
            continue
        meta = pq.ParquetFile(path).metadata
        if meta.num_rows != entry.get("rows"):
            problems.append(f"{entry['path']}: {meta.num_rows} rows != manifest {entry.get('rows')}")
        absent = required - set(meta.schema.names)
        if absent:
            problems.append(f"{entry['path']}: missing columns {sorted(absent)}")
        shards.append(Shard(path, actual, meta.num_rows))
    if problems:
        raise SnapshotError(f"snapshot {root} refused, it does not match its manifest: {'; '.join(problems)}")
    return Snapshot(root, str(manifest.get("name", "")), str(manifest["snapshot_id"]), tuple(shards))


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
    centre crop (the Diffusion-DPO preprocessing without the random flip, methods.md §1.2)."""
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
