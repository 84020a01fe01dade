"""The stages as plain functions: the single definition of what each stage does, with no Prefect in it.

The Prefect tasks in flows/ingest.py, curate.py and train.py wrap these functions, and the one-shot
commands of `prefcurate` call them directly: a one-shot command then starts no Prefect server and does not
even import Prefect (about 2 s of imports, plus 8-16 s for the temporary server a flow call starts when no
server is configured). Each function returns the same JSON-able dict the flow returns.

Source checks (`check_source`) run before anything is created or locked, so a mistyped path is one line
at once, and a lake is never created for files none of which can be ingested.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict


PARQUET_MAGIC = b"PAR1"  # first and last 4 bytes of every Parquet file (Apache Parquet format spec)
# Set by `prefcurate serve` in its own environment, which its run subprocesses inherit and an API request
# cannot change: JSON {"lake", "landing", "train_model", "train_output"} of what it was started for.
SERVED_ENV = "PREFCURATE_SERVED"


class ServedParameterError(ValueError):
    """A served run asked for a lake, landing folder, model or output its serve was not started for."""


def check_served(**given: str | None) -> None:
    """Inside a run of `prefcurate serve` (SERVED_ENV set): every given path must be what the serve was started
    for (`train_output`: that folder or inside it). Outside serve: nothing to check."""
    served = os.environ.get(SERVED_ENV)
    if not served:
        return
    allowed = json.loads(served)
    for key, value in given.items():
        if value is None:
            continue
        want, got = allowed.get(key), os.path.realpath(value)
        ok = want is not None and (got == os.path.realpath(want) if key != "train_output" else
                                   os.path.commonpath([got, os.path.realpath(want)]) == os.path.realpath(want))
        if not ok:
            raise ServedParameterError(f"refused: this `prefcurate serve` was started for {key.replace('_', ' ')} "
                                       f"{want}, and the run asks for {value}; nothing was written")


class SourceError(ValueError):
    """A source file that cannot be ingested at all (missing, a directory, unreadable, wrong format)."""


def check_source(path: str, fmt: str) -> None:
    """Refuse a local source that cannot be read as `fmt` (one line naming the file); URLs are left to the
    reader. Only a header read: a Parquet file must start and end with its magic bytes."""
    if "://" in path:
        return
    if not os.path.exists(path):
        raise SourceError(f"{path}: no such file")
    if os.path.isdir(path):
        raise SourceError(f"{path}: is a directory, not a source file")
    if not os.path.isfile(path):
        raise SourceError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if fmt == "pickapic":
                size = os.fstat(f.fileno()).st_size
                f.seek(max(size - 4, 0))
                tail = f.read(4)
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if fmt == "pickapic" and (size < 12 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC):
        raise SourceError(f"{path}: not a Parquet file (--format pickapic reads Pick-a-Pic Parquet shards)")


def ingest_one(lake_root: str, path: str, fmt: str, source: str, reader_options: dict | None = None) -> dict:
    """Ingest one file (creating the lake if needed); the IngestResult as a dict, plus its summary line."""
    from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
    from prefcurate.curation.store.lake import Lake

    lake = Lake(lake_root, create=True)
    result = ingest_file(lake, path, IngestConfig(source=source, format=fmt),
                         make_reader(fmt, **(reader_options or {})))
    out = asdict(result)
    out["reasons"] = dict(result.reasons)
    out["line"] = result.line()
    return out


def run_ingest(lake_root: str, paths: list[str], fmt: str, source: str | None = None,
               reader_options: dict | None = None) -> list[dict]:
    """Ingest each file in order (one writer at a time). A file that cannot be read is reported as
    {"source_file": path, "error": line} and the others go on; the lake is created only when at least one
    file passes `check_source`."""
    from prefcurate.curation.ingest import UnreadableSourceError

    checked: dict[str, str] = {}
    for path in paths:
        try:
            check_source(path, fmt)
        except SourceError as exc:
            checked[path] = str(exc)
    results = []
    for path in paths:
        if path in checked:
            results.append({"source_file": path, "error": checked[path]})
            continue
        try:
            results.append(ingest_one(lake_root, path, fmt, source or fmt, reader_options))
        except (UnreadableSourceError, OSError) as exc:
            results.append({"source_file": path, "error": str(exc)})
    return results


def run_score(lake_root: str, scorers: list[str], weights_dir: str | None = None, device: str = "cpu",
              batch_size: int = 64, workers: int = 2, shard_size: int = 4096, progress: bool = False) -> list[dict]:
    """Score each scorer's missing work in this process: one dict per scorer, as prefcurate.flows.score.score_flow
    returns (ScorerSummary fields plus images_per_s)."""
    from prefcurate.curation.store.lake import Lake
    from prefcurate.curation.scorers.runner import run_scoring

    result = run_scoring(Lake(lake_root), scorers, weights_dir, device, batch_size, workers, shard_size,
                         progress=progress)
    return [dict(asdict(s), images_per_s=s.images_per_s) for s in result.scorers]


def run_curate(lake_root: str, config=None) -> dict:
    from prefcurate.curation.labels.curate import CurateConfig, curate
    from prefcurate.curation.store.lake import Lake

    result = curate(Lake(lake_root), config or CurateConfig())
    return {"run_id": result.run_id, "reused": result.reused, "counts": result.counts, "line": result.line()}


def run_snapshot(lake_root: str, name: str, policy=None, out_root: str | None = None) -> dict:
    from prefcurate.curation.store.lake import Lake
    from prefcurate.curation.snapshot import SnapshotPolicy, write_snapshot

    info = write_snapshot(Lake(lake_root), name, policy or SnapshotPolicy(), out_root)
    return {**asdict(info), "line": info.line()}


def resolve_snapshot_arg(snapshot: str, lake: str | None = None) -> str:
    """A snapshot folder as given; otherwise an id, a name (its newest snapshot) or "latest" in the lake."""
    if os.path.isfile(os.path.join(snapshot, "manifest.json")):
        return os.path.abspath(snapshot)
    from prefcurate.curation.store.lake import Lake
    from prefcurate.curation.snapshot import SnapshotError, resolve_snapshot

    if lake is None:
        raise SnapshotError(f"{snapshot!r} is not a snapshot folder (no manifest.json in it); to give a snapshot "
                            "name, id or 'latest', also give the lake (--lake LAKE)")
    return resolve_snapshot(Lake(lake), snapshot)


def trainer_argv(snapshot: str, model: str, output: str, loss: str, options: list[str] | tuple[str, ...]) -> list[str]:
    """The argv of ``python -m prefcurate.training.trainer``: the four inputs, then the caller's options verbatim."""
    return ["--snapshot", snapshot, "--model", model, "--output", output, "--loss", loss, *options]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_argv(num_processes: int, argv: list[str]) -> list[str]:
    """`accelerate launch` of the trainer with `num_processes` ranks on this machine. Always accelerate's
    multi-process launcher (torchrun): with `--cpu` accelerate's simple launcher starts ONE process whatever
    `--num_processes` says. Without CUDA the trainer's Accelerator(cpu=True) then joins the ranks over gloo.
    A free rendezvous port, so that two trainings on one machine do not meet on the default 29500."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "prefcurate.training.trainer", *argv]


class TrainingFailed(RuntimeError):
    """The training processes ended with an error they reported themselves: one line from the CLI, exit 1."""


def run_train(snapshot: str, model: str, output: str, loss: str = "dpo", options: list[str] | None = None,
              num_processes: int = 1) -> dict:
    """Train on a snapshot folder. One process: the trainer's own entry point in this process; N > 1:
    `accelerate launch --num_processes N -m prefcurate.training.trainer` (the trainer's options pass through unchanged;
    mixed precision stays the trainer's `--mixed-precision` option, not the launcher's)."""
    argv = trainer_argv(snapshot, model, output, loss, list(options or []))
    if num_processes <= 1:
        from prefcurate.training.trainer import main  # torch, diffusers and peft cost seconds: imported only here

        result = main(argv)
        final = result.losses[-1] if result.losses else None
        return {"snapshot": snapshot, "output": str(result.output), "lora_dir": str(result.lora_dir),
                "global_step": result.global_step, "losses": result.losses, "final_loss": final,
                "num_processes": 1}
    done = subprocess.run(launch_argv(num_processes, argv), stdout=subprocess.PIPE, text=True)
    last = None
    for line in done.stdout.splitlines():  # every rank prints the trainer's final JSON line; the rest passes on
        if line.startswith("{"):
            try:
                last = json.loads(line)
                continue
            except json.JSONDecodeError:
                pass
        print(line)
    if done.returncode != 0 or last is None:
        raise TrainingFailed(f"accelerate launch of {num_processes} training processes exited {done.returncode} "
                             "(the ranks' own messages are above)")
    metrics = os.path.join(output, "metrics.jsonl")
    losses = []
    if os.path.isfile(metrics):
        with open(metrics) as f:
            losses = [json.loads(line)["loss"] for line in f if line.strip()]
    return {"snapshot": snapshot, "output": last["output"], "lora_dir": last["output"],
            "global_step": last["global_step"], "losses": losses, "final_loss": last["final_loss"],
            "num_processes": num_processes}
