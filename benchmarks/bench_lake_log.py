"""The commit log's cost: N one-row commits of `scores`, then a new reader's table listing and a cold SQL query.

    .venv/bin/python benchmarks/bench_lake_log.py 1000            # checkpoints every 100 commits (the default)
    .venv/bin/python benchmarks/bench_lake_log.py 1000 1000000000 # no checkpoint: every entry is read
"""
from __future__ import annotations

import sys
import tempfile
import time

import pyarrow as pa

import prefcurate.curation.store.lake as lake_module
from prefcurate.curation.store.lake import Lake
from prefcurate.curation.store.sql import query


def main(n: int, checkpoint_every: int | None) -> None:
    if checkpoint_every:
        lake_module.CHECKPOINT_EVERY = checkpoint_every
    with tempfile.TemporaryDirectory() as root:
        lake = Lake(f"{root}/lake", create=True)
        started = time.perf_counter()
        with lake.writing():
            for i in range(n):
                tx = lake.begin(f"t{i}")
                tx.write("scores", pa.table({"image_id": [f"i{i}"], "prompt_id": ["p"], "scorer": ["sharpness"],
                                             "scorer_version": ["1"], "score": [1.0]}), partition="sharpness")
                tx.commit({})
        print(f"{n} commits: {(time.perf_counter() - started) / n * 1000:.1f} ms each")
        started = time.perf_counter()
        files = Lake(lake.root).files("scores")
        print(f"a new reader's files('scores'): {time.perf_counter() - started:.3f} s, {len(files)} files")
        started = time.perf_counter()
        query(Lake(lake.root), "SELECT count(*) AS n FROM scores")
        print(f"cold sql count(*): {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000, int(sys.argv[2]) if len(sys.argv) > 2 else None)
