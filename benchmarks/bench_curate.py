"""Curate-stage benchmark: `curate()` on a generated lake of 1M pairs, against the I/O floor.

The lake is written directly in the lake schemas (pairs, images with tiny placeholder bytes, scores of
5 scorers, one ingests row): 1M pairs over 200k images and 50k prompts, 20k annotators with
heavy-tailed volume. Measured in separate subprocesses (peak RSS is each one's own):
  reference: the I/O floor, reading the same input columns with DuckDB and writing tables of the
             same shapes as the outputs (what any implementation must at least do);
  ours:      curation.curate.curate (votes, consensus, pair metrics, annotator statistics, written
             as one atomic run).
Target (issue 4): ours under 10 s on two cores.

    .venv/bin/python benchmarks/bench_curate.py --pairs 1000000
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


SCORERS = ["sharpness", "exposure", "prompt_colour", "colourfulness", "hpsv2"]


def make_lake(root: str, n_pairs: int, seed: int = 0) -> None:
    from curation.lake import Lake
    from data_schemas import IMAGES, INGESTS, PAIRS, SCORES

    rng = np.random.default_rng(seed)
    Lake(root, create=True)
    n_images, n_prompts, n_users = n_pairs // 5, n_pairs // 20, n_pairs // 50
    image_prompt = rng.integers(0, n_prompts, n_images)  # each image was generated for one prompt
    quality = rng.normal(size=n_images)
    a = rng.integers(0, n_images, n_pairs)
    b = (a + 1 + rng.integers(0, n_images - 1, n_pairs)) % n_images
    users = np.minimum(rng.zipf(1.6, n_pairs), n_users) - 1
    p_first = 1 / (1 + np.exp(-(quality[a] - quality[b])))
    label = np.where(rng.random(n_pairs) < 0.05, 0.5, (rng.random(n_pairs) < p_first).astype(float))
    image_id = np.array([f"{i:032x}" for i in range(n_images)], dtype=object)
    prompt_id = np.array([f"p{i:031x}" for i in range(n_prompts)], dtype=object)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    pairs = pa.table({
        "pair_id": [f"{i:032x}" for i in range(n_pairs)], "source": ["bench"] * n_pairs, "split": ["train"] * n_pairs,
        "prompt": ["a prompt"] * n_pairs, "prompt_id": prompt_id[image_prompt[a]],
        "image_0_id": image_id[a], "image_1_id": image_id[b], "image_0_uid": pa.nulls(n_pairs, pa.string()), "image_1_uid": pa.nulls(n_pairs, pa.string()),
        "label_0": label, "user_id": users.astype(str), "created_at": pa.array([now] * n_pairs, PAIRS.field(
            "created_at").type), "model_0": pa.nulls(n_pairs, pa.string()), "model_1": pa.nulls(n_pairs, pa.string()),
        "ranking_id": pa.nulls(n_pairs, pa.string()), "ingest_id": ["bench"] * n_pairs,
    }, schema=PAIRS)
    os.makedirs(f"{root}/pairs/bench", exist_ok=True)
    pq.write_table(pairs, f"{root}/pairs/bench/part-bench-00001.parquet", row_group_size=131072)
    images = pa.table({"image_id": image_id, "bytes": [b"x"] * n_images, "format": ["PNG"] * n_images,
                       "width": np.full(n_images, 64, np.int32), "height": np.full(n_images, 64, np.int32),
                       "ingest_id": ["bench"] * n_images}, schema=IMAGES)
    os.makedirs(f"{root}/images", exist_ok=True)
    pq.write_table(images, f"{root}/images/part-bench-00001.parquet")
    for k, scorer in enumerate(SCORERS):
        prompt_free = scorer in ("sharpness", "exposure", "colourfulness")
        score = quality + rng.normal(scale=1.0 + k * 0.3, size=n_images)
        table = pa.table({"image_id": image_id,
                          "prompt_id": [""] * n_images if prompt_free else prompt_id[image_prompt],
                          "scorer": [scorer] * n_images, "scorer_version": [f"{scorer}-bench"] * n_images,
                          "score": score}, schema=SCORES)
        os.makedirs(f"{root}/scores/{scorer}", exist_ok=True)
        pq.write_table(table, f"{root}/scores/{scorer}/part-bench-00001.parquet")
    ingest = {f.name: None for f in INGESTS}
    ingest.update(ingest_id="bench", source="bench", format="pickapic", source_file="generated", fingerprint="0",
                  n_read=n_pairs, n_accepted=n_pairs, n_duplicates=0, n_quarantined=0, n_images_new=n_images,
                  started_at=now, finished_at=now, prefcurate_version="bench")
    os.makedirs(f"{root}/ingests", exist_ok=True)
    pq.write_table(pa.Table.from_pylist([ingest], schema=INGESTS), f"{root}/ingests/part-bench.parquet")


def run_reference(root: str) -> dict:
    import duckdb
    import polars as pl

    started = time.perf_counter()
    con = duckdb.connect()
    pairs = con.sql(f"SELECT pair_id, prompt_id, image_0_id, image_1_id, label_0, user_id "
                    f"FROM read_parquet('{root}/pairs/**/*.parquet')").pl()
    scores = con.sql(f"SELECT image_id, prompt_id, scorer, score FROM read_parquet('{root}/scores/**/*.parquet')").pl()
    out = tempfile.mkdtemp(dir=root)
    pl.DataFrame({"pair_id": pl.concat([pairs["pair_id"]] * len(SCORERS)),
                  "margin": np.zeros(pairs.height * len(SCORERS))}).write_parquet(f"{out}/votes.parquet")
    pairs.select("pair_id", "label_0").write_parquet(f"{out}/pair_metrics.parquet")
    pairs.select("user_id").unique().write_parquet(f"{out}/annotators.parquet")
    return {"seconds": time.perf_counter() - started, "pairs": pairs.height, "scores": scores.height}


def run_ours(root: str) -> dict:
    from curation.curate import curate
    from curation.lake import Lake

    started = time.perf_counter()
    result = curate(Lake(root))
    return {"seconds": time.perf_counter() - started, "pairs": result.counts["pairs"],
            "annotators": result.counts["annotators"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "LAKE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        which, root = args.child
        result = run_reference(root) if which == "reference" else run_ours(root)
        from bench_ingest import peak_rss_mb

        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "lake")
        started = time.perf_counter()
        make_lake(root, args.pairs)
        print(f"lake: {args.pairs:,} pairs, {args.pairs // 5:,} images, {len(SCORERS)} scorers, "
              f"made in {time.perf_counter() - started:.1f} s")
        results = {}
        for which in ("reference", "ours"):
            proc = subprocess.run([sys.executable, __file__, "--child", which, root], capture_output=True, text=True,
                                  check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
            results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
        ref, ours = results["reference"], results["ours"]
        print(f"{'I/O floor (read inputs, write outputs)':<42} {ref['seconds']:6.2f} s  peak RSS {ref['peak_rss_mb']:6.0f} MB")
        print(f"{'prefcurate curate':<42} {ours['seconds']:6.2f} s  peak RSS {ours['peak_rss_mb']:6.0f} MB  "
              f"({ours['annotators']:,} annotators)")
        print(f"ratio ours / I/O floor: {ours['seconds'] / ref['seconds']:.2f}x; target < 10 s: "
              f"{'met' if ours['seconds'] < 10 else 'MISSED'}")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")


if __name__ == "__main__":
    main()
