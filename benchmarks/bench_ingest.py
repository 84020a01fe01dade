"""Ingest benchmark: our ingest against a plain pyarrow copy of the same Pick-a-Pic-shaped shard.

Both run in the same invocation, each in a fresh subprocess (so peak RSS is each one's own):
  reference: pyarrow iter_batches -> ParquetWriter of every column, nothing else (the limit);
  ours:      prefcurate ingest (fingerprint, decode-check every new image, hash, dedup,
             quarantine, write pairs/images/refs, atomic commit).
Reports rows/s and peak RSS of each, and the ratio. Target (issue 2): ours <= 2x the copy's time.

    .venv/bin/python benchmarks/bench_ingest.py --rows 100000
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
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
from PIL import Image, ImageFilter


def make_shard(path: str, rows: int, distinct_images: int, size: int, seed: int = 0) -> None:
    """A Pick-a-Pic-shaped shard: `distinct_images` JPEGs (each different), drawn in pairs; ~1 % ties."""
    rng = np.random.default_rng(seed)
    bases = []
    for i in range(min(distinct_images, 256)):
        base = rng.integers(0, 256, size=3)
        array = np.clip(base + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(array).filter(ImageFilter.GaussianBlur(radius=1 + i % 3))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        bases.append(buffer.getvalue())
    # Distinct files from 256 drawings: a JPEG comment segment (FF FE) with the image number right
    # after the start-of-image marker changes the bytes (and the content hash), not the pixels.
    images = []
    for i in range(distinct_images):
        comment = f"image {i}".encode()
        base = bases[i % len(bases)]
        images.append(base[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + base[2:])
    writer = None
    chunk = 10_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        a = rng.integers(0, distinct_images, n)
        b = (a + 1 + rng.integers(0, distinct_images - 1, n)) % distinct_images
        label = rng.choice([0.0, 1.0, 0.5], size=n, p=[0.495, 0.495, 0.01])
        table = pa.table({
            "are_different": pa.array(np.ones(n, bool)), "best_image_uid": [f"img{x}" for x in a],
            "caption": [f"a prompt number {x % 5000}" for x in a],
            "created_at": pa.array([dt.datetime(2023, 1, 1) + dt.timedelta(seconds=int(s)) for s in
                                    range(start, start + n)], pa.timestamp("ns")),
            "has_label": pa.array(np.ones(n, bool)), "image_0_uid": [f"img{x}" for x in a],
            "image_0_url": ["https://dead"] * n, "image_1_uid": [f"img{x}" for x in b],
            "image_1_url": ["https://dead"] * n,
            "jpg_0": pa.array([images[x] for x in a], pa.binary()), "jpg_1": pa.array([images[x] for x in b],
                                                                                   pa.binary()),
            "label_0": label, "label_1": 1.0 - label, "model_0": ["sd"] * n, "model_1": ["sdxl"] * n,
            "ranking_id": np.arange(start, start + n, dtype=np.int64),
            "user_id": rng.integers(0, 2000, n).astype(np.int64), "num_example_per_prompt": np.ones(n, np.int64),
            "__index_level_0__": np.arange(start, start + n, dtype=np.int64),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=1000)
    writer.close()


def run_reference(shard: str, out_dir: str) -> dict:
    """The plain copy, at pyarrow's default batch size and at the one our reader picks; the
    faster of the two is the reference (the limit we compare against)."""
    from curation.ingest.pickapic import PickAPicReader

    source = pq.ParquetFile(shard)
    best = None
    for batch_size in (65_536, PickAPicReader()._rows_per_batch(source, source.schema_arrow.names)):
        started = time.perf_counter()
        writer = pq.ParquetWriter(os.path.join(out_dir, "copy.parquet"), source.schema_arrow, compression="zstd")
        rows = 0
        for batch in source.iter_batches(batch_size=batch_size):
            writer.write_batch(batch)
            rows += batch.num_rows
        writer.close()
        seconds = time.perf_counter() - started
        if best is None or seconds < best["seconds"]:
            best = {"rows": rows, "seconds": seconds, "batch_size": batch_size}
    return best


def run_ours(shard: str, out_dir: str) -> dict:
    from curation.ingest import IngestConfig, ingest_file, make_reader
    from curation.lake import Lake

    started = time.perf_counter()
    lake = Lake(os.path.join(out_dir, "lake"), create=True)
    result = ingest_file(lake, shard, IngestConfig("pickapic", "pickapic"), make_reader("pickapic"))
    return {"rows": result.n_read, "seconds": time.perf_counter() - started, "accepted": result.n_accepted,
            "duplicates": result.n_duplicates, "quarantined": result.n_quarantined}


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM of its address space. (ru_maxrss is not: Linux carries the
    parent's resident size at fork over the exec, so a child of a big parent would report the parent's.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(which: str, shard: str, out_dir: str) -> None:
    result = run_reference(shard, out_dir) if which == "reference" else run_ours(shard, out_dir)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--distinct-images", type=int, default=50_000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--child", nargs=3, metavar=("WHICH", "SHARD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        shard = os.path.join(tmp, "train-00000-of-00001.parquet")
        t0 = time.perf_counter()
        make_shard(shard, args.rows, args.distinct_images, args.image_size)
        print(f"shard: {args.rows} rows, {args.distinct_images} distinct {args.image_size}px JPEGs, "
              f"{os.path.getsize(shard) / 1e6:.0f} MB, made in {time.perf_counter() - t0:.1f} s")
        results = {}
        for which in ("reference", "ours"):
            out = os.path.join(tmp, which)
            os.makedirs(out)
            proc = subprocess.run([sys.executable, __file__, "--child", which, shard, out], capture_output=True,
                                  text=True, check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
            results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
        ref, ours = results["reference"], results["ours"]
        for name, r in (("plain pyarrow copy", ref), ("prefcurate ingest", ours)):
            print(f"{name:<20} {r['rows'] / r['seconds']:>10,.0f} rows/s  {r['seconds']:7.2f} s  "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB")
        ratio = ours["seconds"] / ref["seconds"]
        print(f"(reference batch size {ref['batch_size']} rows, the faster of pyarrow's default and ours)")
        print(f"time ratio ours/copy: {ratio:.2f}x (target <= 2x: {'met' if ratio <= 2 else 'MISSED'}); "
              f"RSS ratio {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x; "
              f"counts: accepted {ours['accepted']}, duplicates {ours['duplicates']}, "
              f"quarantined {ours['quarantined']}")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        return results


if __name__ == "__main__":
    main()
