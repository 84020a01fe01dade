"""Test fixture: write a small training snapshot (manifest.json + Parquet shards in SNAPSHOT_PAIRS) from tiny
PIL images. The real snapshot writer belongs to the curation stage; this one exists only so training tests
have input, and writes its shards and manifest through ``data_schemas.snapshot_contract``, as curation does."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image

from prefcurate.data_schemas import snapshot_contract as contract
from prefcurate.data_schemas.tables import SNAPSHOT_PAIRS


def _png(rng: np.random.Generator, size: int) -> bytes:
    """A random blocky RGB image (4×4 blocks upscaled), so resizing keeps visible structure."""
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(blocks).resize((size + 6, size), Image.NEAREST)  # non-square: exercises the crop
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_test_snapshot(root: str | Path, *, n_pairs: int = 12, n_shards: int = 2, image_size: int = 40,
                        row_group_size: int = 3, seed: int = 0, label_smoothing: float = 0.0,
                        drop_columns: tuple[str, ...] = (), adaptive: dict | None = None) -> Path:
    """``drop_columns`` writes a snapshot of an older format that lacked those (optional) columns; ``adaptive``
    is the manifest's Adaptive-DPO record (``prefcurate.data_schemas.adaptive.manifest_record``)."""
    root, fs = Path(root), fsspec.filesystem("file")
    (root / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prompts = ["a red cube", "a cat on a mat", "two blue birds", "a lighthouse at dusk"]
    entries = []
    per_shard = np.array_split(np.arange(n_pairs), n_shards)
    for s, ids in enumerate(per_shard):
        rows = {name: [] for name in SNAPSHOT_PAIRS.names}
        for i in ids:
            rows["pair_id"].append(f"pair-{i:04d}")
            rows["prompt"].append(prompts[i % len(prompts)])
            for side in ("winner", "loser"):
                data = _png(rng, image_size)
                rows[f"{side}_image"].append(data)
                rows[f"{side}_image_id"].append(hashlib.blake2b(data, digest_size=16).hexdigest())
            rows["label_source"].append("human")
            rows["weight"].append(float(0.5 + 0.5 * (i % 2)))
            rows["margin"].append(0.0)
            rows["minority_score"].append(float((i % 5) / 5))
            rows["confidence"].append(float("nan"))
            rows["stability"].append(float("nan"))
            rows["vote_fraction"].append(float(0.75 if i % 3 else 1.0))
            rows["user_id"].append(f"user-{i % 3}")
            rows["label_smoothing"].append(label_smoothing)
        table = pa.Table.from_pydict(rows, schema=SNAPSHOT_PAIRS).drop_columns(list(drop_columns))
        entries.append(contract.write_shard(fs, str(root), s, table, row_group_size=row_group_size,
                                            compression="snappy"))  # pyarrow's default, as before
    manifest = contract.build_manifest(name="test", snapshot_id=f"test-{seed}", shards=entries,
                                       policy={"fixture": True}, counts={"pairs": n_pairs}, adaptive=adaptive)
    contract.write_manifest(fs, str(root), manifest)
    return root
