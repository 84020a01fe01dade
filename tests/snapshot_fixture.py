"""Test fixture: write a small training snapshot (manifest.json + Parquet shards in SNAPSHOT_PAIRS) from tiny
PIL images. The real snapshot writer belongs to the curation stage; this one exists only so training tests
have input, and follows the format documented in training/snapshot.py."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_schemas.tables import SNAPSHOT_PAIRS


def _png(rng: np.random.Generator, size: int) -> bytes:
    """A random blocky RGB image (4×4 blocks upscaled), so resizing keeps visible structure."""
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(blocks).resize((size + 6, size), Image.NEAREST)  # non-square: exercises the crop
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_test_snapshot(root: str | Path, *, n_pairs: int = 12, n_shards: int = 2, image_size: int = 40,
                        row_group_size: int = 3, seed: int = 0, label_smoothing: float = 0.0,
                        drop_columns: tuple[str, ...] = ()) -> Path:
    """``drop_columns`` writes a snapshot of an older format that lacked those (optional) columns."""
    root = Path(root)
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
        path = root / "shards" / f"shard-{s:05d}.parquet"
        table = pa.Table.from_pydict(rows, schema=SNAPSHOT_PAIRS).drop_columns(list(drop_columns))
        pq.write_table(table, path, row_group_size=row_group_size)
        entries.append({"path": f"shards/{path.name}", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "rows": len(ids)})
    manifest = {"format": "prefcurate-snapshot", "version": 1, "name": "test", "snapshot_id": f"test-{seed}",
                "policy": {"fixture": True}, "counts": {"pairs": n_pairs}, "shards": entries}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
