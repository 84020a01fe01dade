"""Curate-stage benchmark: `curate()` on a generated lake against its I/O floor, in the same run.

The lake is committed through the lake's own transaction (pairs, images with tiny placeholder bytes,
scores of 5 scorers, one ingests row): N pairs over N/5 images and N/20 prompts (both images of a pair
generated for its prompt, as in Pick-a-Pic, so every scorer votes on every pair), N/50 annotators with
heavy-tailed (Zipf) volume, 5 % ties. Measured in separate subprocesses (peak RSS is each one's own
VmHWM), alternating floor and ours `--repeats` times so that load from other processes hits both alike:

  floor: what any implementation of the stage must at least do: DuckDB reads every input column the
         stage reads (pairs: pair_id, source, prompt_id, image ids, label_0, user_id; images and
         image_refs ids; scores: image_id, prompt_id, scorer, score), streamed in the same chunks,
         and pyarrow writes the run's output files with the schemas and row counts of ours (read
         from ours' files; string columns from the chunk's real pair ids, numbers random, so they
         compress like real ones), snappy like ours. The random numbers are drawn before the clock
         starts (one chunk's worth, sliced per chunk): drawing them is no part of the I/O;
  ours:  prefcurate.curation.labels.curate.curate (votes, consensus, pair metrics, annotator statistics, the joint
         label model, written as one atomic run), from a clean curation folder.

Reported: wall and CPU seconds (user + system of the process, all threads) of each, their ratios
(min and median over the repeats), and peak RSS, for ours also per phase (`curation.labels.curate.phase_hook`:
VmHWM reset at the start of each phase, so each figure is that phase's own peak; sampled every 50 ms
where /proc/self/clear_refs cannot be written). Target (issue 13): ours at most 3x the floor at 1M
pairs; at 10M pairs peak RSS under 4 GB and the same ratio within 1.5x.

    .venv/bin/python benchmarks/bench_curate.py --pairs 1000000
    .venv/bin/python benchmarks/bench_curate.py --pairs 10000000 --repeats 1 --keep /tmp/lake10m
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


SCORERS = ["sharpness", "exposure", "prompt_colour", "colourfulness", "hpsv2"]
PROMPT_FREE = {"sharpness", "exposure", "colourfulness"}
IMAGES_PER_PROMPT = 4
GENERATE_CHUNK = 1_000_000


def make_lake(root: str, n_pairs: int, seed: int = 0) -> None:
    """Commit a generated lake of `n_pairs` pairs at `root` (memory: one chunk of 1M pairs at a time)."""
    from prefcurate.curation.store.lake import Lake
    from prefcurate.data_schemas import INGESTS, PAIRS

    rng = np.random.default_rng(seed)
    lake = Lake(root, create=True)
    n_prompts = max(n_pairs // 20, 1)
    n_images = n_prompts * IMAGES_PER_PROMPT  # image i was generated for prompt i % n_prompts
    n_users = max(n_pairs // 50, 1)
    quality = rng.normal(size=n_images)
    image_id = np.array([f"{i:032x}" for i in range(n_images)], dtype=object)
    prompt_id = np.array([f"p{i:031x}" for i in range(n_prompts)], dtype=object)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with lake.writing():
        tx = lake.begin("bench")
        for start in range(0, n_pairs, GENERATE_CHUNK):
            n = min(GENERATE_CHUNK, n_pairs - start)
            a = rng.integers(0, n_images, n)
            b = (a + n_prompts * rng.integers(1, IMAGES_PER_PROMPT, n)) % n_images  # same prompt, other image
            users = np.minimum(rng.zipf(1.6, n), n_users) - 1
            p_first = 1 / (1 + np.exp(-(quality[a] - quality[b])))
            label = np.where(rng.random(n) < 0.05, 0.5, (rng.random(n) < p_first).astype(float))
            nulls = pa.nulls(n, pa.string())
            tx.write("pairs", pa.table({
                "pair_id": [f"{i:032x}" for i in range(start, start + n)], "source": ["bench"] * n,
                "split": ["train"] * n, "prompt": ["a prompt"] * n, "prompt_id": prompt_id[a % n_prompts],
                "image_0_id": image_id[a], "image_1_id": image_id[b], "image_0_uid": nulls, "image_1_uid": nulls,
                "label_0": label, "user_id": users.astype(str),
                "created_at": pa.array([now] * n, PAIRS.field("created_at").type), "model_0": nulls,
                "model_1": nulls, "ranking_id": nulls, "ingest_id": ["bench"] * n,
            }), partition="bench")
        tx.write("images", pa.table({"image_id": image_id, "bytes": [b"x"] * n_images, "format": ["PNG"] * n_images,
                                     "width": np.full(n_images, 64, np.int32),
                                     "height": np.full(n_images, 64, np.int32), "ingest_id": ["bench"] * n_images}))
        image_prompt = prompt_id[np.arange(n_images) % n_prompts]
        for k, scorer in enumerate(SCORERS):
            score = quality + rng.normal(scale=1.0 + k * 0.3, size=n_images)
            tx.write("scores", pa.table({
                "image_id": image_id, "prompt_id": [""] * n_images if scorer in PROMPT_FREE else image_prompt,
                "scorer": [scorer] * n_images, "scorer_version": [f"{scorer}-bench"] * n_images, "score": score,
            }), partition=scorer)
        ingest = {f.name: None for f in INGESTS}
        ingest.update(ingest_id="bench", source="bench", format="pickapic", source_file="generated", fingerprint="0",
                      n_read=n_pairs, n_accepted=n_pairs, n_duplicates=0, n_quarantined=0, n_images_new=n_images,
                      started_at=now, finished_at=now, prefcurate_version="bench")
        tx.commit({"ingests": [ingest]})


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def random_column(field: pa.Field, n: int, rng: np.random.Generator, strings: pa.Array | None = None) -> pa.Array:
    """n values of `field`'s type: strings from `strings` (real ids), numbers random."""
    t = field.type
    if is_string(t):
        return pa.concat_arrays([strings.cast(t)] * (n // len(strings) + 1)).slice(0, n) if len(strings) else \
            pa.nulls(n, t)
    if pa.types.is_floating(t):
        return pa.array(rng.normal(size=n), t)
    if pa.types.is_integer(t):
        return pa.array(rng.integers(0, 5, n), t)
    if pa.types.is_boolean(t):
        return pa.array(rng.random(n) < 0.5, t)
    return pa.nulls(n, t)


def run_floor(root: str) -> dict:
    import duckdb

    from prefcurate.curation.labels.curate import CHUNK_PAIRS, CURRENT, DUCKDB_MEMORY_LIMIT
    from prefcurate.curation.store.lake import Lake

    lake = Lake(root)
    run_dir = lake.join("curation", json.loads(open(lake.join(CURRENT)).read())["run_id"])
    shapes = {name: (pq.read_schema(f"{run_dir}/{name}.parquet"), pq.ParquetFile(f"{run_dir}/{name}.parquet")
                     .metadata.num_rows) for name in ("votes", "consensus", "pair_metrics", "annotators")}
    rng = np.random.default_rng(0)
    total = shapes["consensus"][1]
    # the numbers of the largest chunk of each table, drawn now (off the clock) and sliced per chunk
    pool = {name: {f.name: random_column(f, int(np.ceil(rows / max(total, 1) * CHUNK_PAIRS)) + 1, rng)
                   for f in schema if not is_string(f.type)}
            for name, (schema, rows) in shapes.items() if name != "annotators"}
    started, cpu = time.perf_counter(), cpu_seconds()
    out = tempfile.mkdtemp(dir=root)
    con = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY_LIMIT, "temp_directory": f"{out}/spill"})
    files = {t: lake.sql_file_list(lake.files(t)) for t in ("pairs", "images", "scores")}
    for column_sql in (f"SELECT image_id FROM read_parquet({files['images']})",
                       f"SELECT image_id, prompt_id, scorer, score FROM read_parquet({files['scores']})"):
        for _ in con.sql(column_sql).to_arrow_reader(CHUNK_PAIRS):
            pass
    writers = {name: pq.ParquetWriter(f"{out}/{name}.parquet", schema, compression="snappy")
               for name, (schema, _) in shapes.items()}
    n_pairs = 0
    reader = con.sql(f"SELECT pair_id, source, prompt_id, image_0_id, image_1_id, label_0, user_id "
                     f"FROM read_parquet({files['pairs']})").to_arrow_reader(CHUNK_PAIRS)
    for batch in reader:
        ids = batch.column("pair_id")
        for name in ("votes", "consensus", "pair_metrics"):  # rows in proportion to this chunk's pairs
            schema, rows = shapes[name]
            n = round(rows * (n_pairs + batch.num_rows) / total) - round(rows * n_pairs / total)
            assert all(n <= len(column) for column in pool[name].values()), "a chunk larger than CHUNK_PAIRS"
            writers[name].write_table(pa.table([random_column(f, n, rng, ids) if is_string(f.type)
                                                else pool[name][f.name].slice(0, n) for f in schema], schema=schema))
        n_pairs += batch.num_rows
    schema, rows = shapes["annotators"]
    writers["annotators"].write_table(pa.table([random_column(f, rows, rng, pa.array([str(i) for i in range(rows)]))
                                                for f in schema], schema=schema))
    for writer in writers.values():
        writer.close()
    con.close()
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    shutil.rmtree(out)
    return {"seconds": seconds, "cpu_seconds": cpu, "pairs": n_pairs}


class PhaseMeter:
    """Per phase of curate (curation.labels.curate.phase_hook): wall and CPU seconds and peak RSS (MB). The peak
    is VmHWM after resetting it (/proc/self/clear_refs 5) when the phase starts; where that file cannot
    be written, the largest VmRSS sampled every 50 ms."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self.current: str | None = None
        self.reset_works = self._reset()
        self.sampled = 0.0
        if not self.reset_works:
            import threading

            self.stop = threading.Event()
            threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        return float("nan")

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        while not self.stop.wait(0.05):
            self.sampled = max(self.sampled, self._status("VmRSS:"))

    def __call__(self, name: str) -> None:
        now, cpu = time.perf_counter(), cpu_seconds()
        if self.current is not None:
            phase = self.phases[self.current]
            phase["peak_rss_mb"] = self._status("VmHWM:") if self.reset_works else max(self.sampled,
                                                                                      self._status("VmRSS:"))
            phase["seconds"], phase["cpu_seconds"] = now - phase.pop("_t"), cpu - phase.pop("_c")
            print(f"    [{self.current} done: {phase['seconds']:.1f} s wall, {phase['cpu_seconds']:.1f} s CPU, "
                  f"peak RSS {phase['peak_rss_mb']:.0f} MB]", file=sys.stderr, flush=True)
        if name == "end":
            self.current = None
            return
        self.current = name
        self.phases[name] = {"entry_rss_mb": self._status("VmRSS:"), "_t": now, "_c": cpu}
        if self.reset_works:
            self._reset()
        else:
            self.sampled = 0.0


def run_ours(root: str) -> dict:
    import prefcurate.curation.labels.curate
    from prefcurate.curation.store.lake import Lake

    shutil.rmtree(os.path.join(root, "curation"), ignore_errors=True)  # a full recompute, not a reused run
    meter = PhaseMeter()
    prefcurate.curation.labels.curate.phase_hook = meter
    started, cpu = time.perf_counter(), cpu_seconds()
    result = prefcurate.curation.labels.curate.curate(Lake(root))
    return {"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu,
            "pairs": result.counts["pairs"], "annotators": result.counts["annotators"], "phases": meter.phases}


def child_run(which: str, root: str) -> dict:
    # stdout: the result; stderr passes through (ours prints each phase as it ends, so a long run shows progress)
    proc = subprocess.run([sys.executable, __file__, "--child", which, root], stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
    if proc.returncode:
        raise SystemExit(f"{which} run failed (exit {proc.returncode}; its stderr is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2, help="floor/ours alternations (default 2)")
    parser.add_argument("--keep", metavar="DIR", help="generate the lake here (or reuse it if it is there)")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "LAKE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        which, root = args.child
        result = run_floor(root) if which == "floor" else run_ours(root)
        from bench_ingest import peak_rss_mb

        # ours resets VmHWM per phase: its whole-run peak is the largest phase peak
        result["peak_rss_mb"] = max([peak_rss_mb(), *(p["peak_rss_mb"] for p in result.get("phases", {}).values())])
        print(json.dumps(result))
        return
    tmp = None if args.keep else tempfile.mkdtemp()
    root = args.keep or os.path.join(tmp, "lake")
    try:
        if not os.path.exists(os.path.join(root, "_lake.json")):
            started = time.perf_counter()
            make_lake(root, args.pairs)
            print(f"lake: {args.pairs:,} pairs, {args.pairs // 20 * IMAGES_PER_PROMPT:,} images, "
                  f"{len(SCORERS)} scorers, made in {time.perf_counter() - started:.1f} s")
        runs: dict[str, list[dict]] = {"ours": [], "floor": []}
        for _ in range(args.repeats):
            for which in ("ours", "floor"):  # the floor reads ours' output shapes
                runs[which].append(child_run(which, root))
                r = runs[which][-1]
                print(f"  {which:<5} {r['seconds']:7.2f} s wall  {r['cpu_seconds']:7.2f} s CPU  "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
                for phase, f in r.get("phases", {}).items():
                    print(f"          {phase:<12} {f['seconds']:7.2f} s wall  {f['cpu_seconds']:7.2f} s CPU  "
                          f"peak RSS {f['peak_rss_mb']:6.0f} MB (at entry {f['entry_rss_mb']:.0f} MB)", flush=True)
        wall = [o["seconds"] / f["seconds"] for o, f in zip(runs["ours"], runs["floor"])]
        cpu = [o["cpu_seconds"] / f["cpu_seconds"] for o, f in zip(runs["ours"], runs["floor"])]
        ours = runs["ours"][-1]
        print(f"{ours['pairs']:,} pairs, {ours['annotators']:,} annotators")
        print(f"ratio ours / I/O floor: wall min {min(wall):.2f}x median {statistics.median(wall):.2f}x; "
              f"CPU min {min(cpu):.2f}x median {statistics.median(cpu):.2f}x (target <= 3x)")
        print(f"peak RSS ours {max(o['peak_rss_mb'] for o in runs['ours']):.0f} MB, "
              f"floor {max(f['peak_rss_mb'] for f in runs['floor']):.0f} MB")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"load average {os.getloadavg()[0]:.1f}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
