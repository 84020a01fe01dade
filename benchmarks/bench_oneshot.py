"""One-shot command overhead: `prefcurate score` of ~100 images with a pixel scorer against the same work
called as a Python function, with no Prefect server configured (PREFECT_API_URL unset).

  cli:      `prefcurate score --lake L --scorers S --workers W` in a subprocess: interpreter start, the CLI's
            imports, argument checks, then flows.stages.run_score -> curation.scorers.runner.run_scoring.
  function: `python -c "...run_scoring(Lake(L), [S], workers=W)"` in a subprocess: interpreter start, the
            same library imports (curation.scorers.runner imports torch), the same call. The child also reports the
            call's own time (imports excluded), printed as `work`.
Each timed run gets a fresh copy of the same unscored lake (the copy is made before the clock starts), so
both sides score exactly the same images. Sides run interleaved (cli, function, cli, function, ...) so that
load on the shared machine hits both alike; the ratio is taken per pair, and min and median are reported.
`--track-repeats N` also times `prefcurate score --track` (the flow, which starts Prefect's temporary server
without PREFECT_API_URL), the path every one-shot command took before.

    .venv/bin/python benchmarks/bench_oneshot.py                 # 100 images, sharpness, 5 pairs of runs
    .venv/bin/python benchmarks/bench_oneshot.py --repeats 9 --track-repeats 1
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


FUNCTION = """
import sys, time
started = time.perf_counter()
from prefcurate.curation.store.lake import Lake
from prefcurate.curation.scorers.runner import run_scoring
imported = time.perf_counter()
result = run_scoring(Lake(sys.argv[1]), [sys.argv[2]], workers=int(sys.argv[3]))
print(f"work {time.perf_counter() - imported:.3f} imports {imported - started:.3f} images "
      f"{result.scorers[0].n_images}")
"""


def build_lake(root: str, n_images: int, size: int, seed: int) -> str:
    """A lake whose pairs need about `n_images` distinct images: prompts of 5 images each."""
    from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
    from prefcurate.curation.store.lake import Lake
    from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample

    prompts = max(1, round(n_images / 5))
    config = SampleConfig(seed=seed, n_prompts=prompts, images_per_prompt=(5, 5), n_rows=prompts * 20,
                          n_annotators=12, image_size=size, n_shards=1, row_groups_per_shard=1,
                          min_annotators_per_type=1)
    paths = generate_sample(os.path.join(root, "sample"), config)
    lake = Lake(os.path.join(root, "lake"), create=True)
    for shard in sorted(glob.glob(str(paths.pickapic_dir / "*.parquet"))):
        ingest_file(lake, shard, IngestConfig("pickapic", "pickapic"), make_reader("pickapic"))
    return lake.root


def timed(argv: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds, done.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="distinct images to score (about)")
    parser.add_argument("--image-size", type=int, default=64, help="px (the embedded sample's size)")
    parser.add_argument("--scorer", default="sharpness", help="a weight-free pixel scorer")
    parser.add_argument("--workers", type=int, default=2, help="decode processes, both sides (CLI default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs (cli, function)")
    parser.add_argument("--track-repeats", type=int, default=0, help="also time `score --track` this often")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # no server configured
    root = tempfile.mkdtemp(prefix="bench-oneshot-")
    env["PREFECT_HOME"] = os.path.join(root, "prefect-home")  # --track's temporary server keeps its db here
    try:
        source = build_lake(root, args.images, args.image_size, args.seed)
        cli = [os.path.join(os.path.dirname(sys.executable), "prefcurate"), "score", "--scorers", args.scorer,
               "--workers", str(args.workers)]
        rows, works, n_images = [], [], None

        def fresh() -> str:
            target = os.path.join(root, "run")
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
            return target

        for i in range(args.repeats):
            lake = fresh()
            t_cli, out = timed([*cli[:2], "--lake", lake, *cli[2:]], env)
            assert f"{args.scorer}: " in out, out
            lake = fresh()
            t_fn, out = timed([sys.executable, "-c", FUNCTION, lake, args.scorer, str(args.workers)], env)
            fields = out.split()
            works.append(float(fields[1]))
            n_images = int(fields[5])
            rows.append((t_cli, t_fn))
            print(f"pair {i + 1}: cli {t_cli:.2f} s, function {t_fn:.2f} s (work {works[-1]:.2f} s, imports "
                  f"{float(fields[3]):.2f} s), ratio {t_cli / t_fn:.2f}", flush=True)
        tracked, track_failures = [], []
        for _ in range(args.track_repeats):
            lake = fresh()
            started = time.perf_counter()
            done = subprocess.run([*cli[:2], "--lake", lake, *cli[2:], "--track"], env=env, capture_output=True,
                                  text=True)
            if done.returncode == 0:
                tracked.append(time.perf_counter() - started)
            else:  # e.g. "Timed out while attempting to connect to ephemeral Prefect API server" under load
                track_failures.append(f"exit {done.returncode} after {time.perf_counter() - started:.1f} s: "
                                      + (done.stderr.strip().splitlines() or ["?"])[-1])
        ratios = [c / f for c, f in rows]
        load = os.getloadavg()[0]
        print(f"\n{n_images} images of {args.image_size} px, {args.scorer}, workers {args.workers}, "
              f"{args.repeats} interleaved pairs, load average {load:.1f}, {os.cpu_count()} CPUs")
        print(f"cli       min {min(c for c, _ in rows):.2f} s  median {statistics.median(c for c, _ in rows):.2f} s")
        print(f"function  min {min(f for _, f in rows):.2f} s  median {statistics.median(f for _, f in rows):.2f} s"
              f"  (of which the call itself: median {statistics.median(works):.2f} s)")
        print(f"ratio cli/function (per pair): min {min(ratios):.2f}  median {statistics.median(ratios):.2f}")
        if tracked:
            print(f"score --track (flow + temporary Prefect server): min {min(tracked):.2f} s  "
                  f"median {statistics.median(tracked):.2f} s")
        for failure in track_failures:
            print(f"score --track failed: {failure}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
