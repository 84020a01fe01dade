"""The latent cache under concurrent builders: two runs (or ranks) that build the same cache at once both end with
one complete cache and neither fails (each writes its own partial folder; the first rename wins)."""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from tests.snapshot_fixture import write_test_snapshot
from prefcurate.training.components import build_tiny_pipeline, load_components
from prefcurate.training.latent_cache import COMPLETE, LatentCache, build_cache
from prefcurate.training.snapshot_reader import open_snapshot


def test_two_builders_of_one_cache_both_succeed(tmp_path: Path):
    model = build_tiny_pipeline(tmp_path / "model", resolution=32)
    snapshot = open_snapshot(write_test_snapshot(tmp_path / "snap", n_pairs=6, n_shards=1, image_size=32))
    components = load_components(model)
    root = tmp_path / "cache" / snapshot.snapshot_id
    errors: list[BaseException] = []

    def build() -> None:
        try:
            build_cache(components, snapshot, root, 32, torch.device("cpu"))
        except BaseException as exc:  # noqa: BLE001 - the test reports any failure of either builder
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (root / COMPLETE).is_file()
    assert not [p for p in root.parent.iterdir() if ".partial" in p.name]  # the loser's folder is gone
    LatentCache(root, snapshot)  # readable
