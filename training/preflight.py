"""Input checks before training starts, in well under a second, WITHOUT importing torch, diffusers or peft.

``check_train_inputs(model=..., snapshot=..., output=..., ...)`` reads only small JSON files and directory
listings: the diffusers pipeline folder layout (model_index.json, unet/, vae/, text encoder(s), tokenizer(s),
scheduler/, and the weight files), the snapshot's manifest.json (format, version, shards present with the
sizes it names; the sha256 of every shard is verified later by ``training.snapshot_reader.open_snapshot``), the
output folder (writable; not an earlier run unless resuming it) and the optional packages asked for
(bitsandbytes for 8-bit AdamW, wandb / tensorboard trackers). Every problem raises ``PreflightError`` whose
message is one line naming all problems found, so the CLI can print it and exit 3.

It also reads the model's defaults that need no weights: the native resolution (UNet ``sample_size`` × VAE
scale factor 2^(len(block_out_channels) − 1): 512 for SD1.5, 768 for SD2.1-768, 1024 for SDXL), the
scheduler's ``prediction_type`` and whether the pipeline is SDXL (two text encoders).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prefcurate.data_schemas.snapshot_contract import SnapshotError, read_manifest



# Files every trainable pipeline folder holds, as diffusers ``save_pretrained`` / a hub download writes them
# for runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-xl-base-1.0.
MODEL_CONFIGS = {
    "model_index.json": "the pipeline index written by save_pretrained",
    "unet/config.json": "UNet2DConditionModel config",
    "vae/config.json": "AutoencoderKL config",
    "text_encoder/config.json": "CLIP text encoder config",
    "scheduler/scheduler_config.json": "noise scheduler config",
}
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json",
                     "diffusion_pytorch_model.fp16.safetensors.index.json")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin",
                        "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))  # slow BPE pair, or the fast file

# Files of an earlier run in an output folder (prefcurate.training.trainer writes them); --overwrite-output removes
# RUN_FILES, never the latent cache (keyed by snapshot and model, so still valid).
RUN_MARKERS = ("metrics.jsonl", "train_config.json", "checkpoints")
RUN_FILES = (*RUN_MARKERS, "logs", "validation", "pytorch_lora_weights.safetensors")
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to value -> package it needs


class PreflightError(ValueError):
    """Training inputs are missing or inconsistent; the message is one line listing every problem."""


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline folder says about itself, read from its JSON configs only."""

    path: Path
    is_sdxl: bool  # text_encoder_2/ + tokenizer_2/ present (SDXL)
    resolution: int  # native training resolution in pixels: unet sample_size × VAE scale factor
    prediction_type: str  # scheduler's "epsilon" (SD1.5, SDXL, SD2.1-base) or "v_prediction" (SD2.1-768)


@dataclass(frozen=True)
class Preflight:
    model: ModelInfo
    snapshot_pairs: int  # rows the manifest lists over all shards
    resume_checkpoint: Path | None  # the checkpoint folder --resume-from resolves to, if any


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.append(f"{path} unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path} is not a JSON object")
        return None
    return value


def _weights_missing(folder: Path, names: tuple[str, ...], what: str) -> list[str]:
    if folder.is_dir() and not any((folder / n).is_file() for n in names):
        return [f"{folder.name}/{names[0]} ({what} weights)"]
    return []


def _tokenizer_missing(folder: Path) -> list[str]:
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        return [f"{folder.name}/tokenizer_config.json (CLIP tokenizer config)"]
    if not any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES):
        return [f"{folder.name}/vocab.json + merges.txt or tokenizer.json (CLIP tokenizer vocabulary)"]
    return []


def check_model(model: str | Path) -> ModelInfo:
    """Check a local diffusers pipeline folder's layout and read its native resolution and prediction type."""
    root = Path(model)
    if not root.is_dir():
        raise PreflightError(f"model folder {root} does not exist: expected a local diffusers pipeline folder "
                             f"(e.g. a download of runwayml/stable-diffusion-v1-5) with model_index.json, unet/, "
                             f"vae/, text_encoder/, tokenizer/, scheduler/")
    missing = [f"{name} ({why})" for name, why in MODEL_CONFIGS.items() if not (root / name).is_file()]
    missing += _tokenizer_missing(root / "tokenizer")
    missing += _weights_missing(root / "unet", DIFFUSERS_WEIGHTS, "UNet")
    missing += _weights_missing(root / "vae", DIFFUSERS_WEIGHTS, "VAE")
    missing += _weights_missing(root / "text_encoder", TRANSFORMERS_WEIGHTS, "text encoder")
    is_sdxl = (root / "text_encoder_2").is_dir() or (root / "tokenizer_2").is_dir()
    if is_sdxl:
        if not (root / "text_encoder_2" / "config.json").is_file():
            missing.append("text_encoder_2/config.json (SDXL second text encoder config)")
        missing += _weights_missing(root / "text_encoder_2", TRANSFORMERS_WEIGHTS, "second text encoder")
        missing += _tokenizer_missing(root / "tokenizer_2")
    if missing:
        raise PreflightError(f"model folder {root} is not a complete diffusers pipeline; missing: "
                             f"{', '.join(missing)} (as in runwayml/stable-diffusion-v1-5 or "
                             f"stabilityai/stable-diffusion-xl-base-1.0)")
    problems: list[str] = []
    unet = _read_json(root / "unet" / "config.json", problems) or {}
    vae = _read_json(root / "vae" / "config.json", problems) or {}
    sched = _read_json(root / "scheduler" / "scheduler_config.json", problems) or {}
    _read_json(root / "model_index.json", problems)
    sample = unet.get("sample_size")
    blocks = vae.get("block_out_channels")
    if isinstance(sample, (list, tuple)):
        sample = sample[0] if sample else None
    if not isinstance(sample, int) or sample < 1:
        problems.append(f"{root / 'unet' / 'config.json'}: sample_size {sample!r} is not a positive integer")
    if not isinstance(blocks, list) or not blocks:
        problems.append(f"{root / 'vae' / 'config.json'}: block_out_channels {blocks!r} is not a non-empty list")
    if problems:
        raise PreflightError(f"model folder {root} refused: {'; '.join(problems)}")
    return ModelInfo(root, is_sdxl, int(sample) * 2 ** (len(blocks) - 1),
                     str(sched.get("prediction_type", "epsilon")))


def check_snapshot(snapshot: str | Path) -> int:
    """Check ``manifest.json`` (format, version, snapshot_id, shards present with their byte-free row counts);
    returns the number of pairs it lists. Shard hashes are verified when the trainer opens the snapshot."""
    root = Path(snapshot)
    try:  # the header checks of the snapshot contract, as one-line PreflightErrors
        manifest = read_manifest(str(root))
    except SnapshotError as err:
        raise PreflightError(str(err)) from None
    problems: list[str] = []
    rows = 0
    for entry in manifest["shards"]:
        rel = entry.get("path")
        if not rel or not (root / str(rel)).is_file():
            problems.append(f"shard {rel!r} missing")
        elif not isinstance(entry.get("rows"), int) or entry["rows"] < 0:
            problems.append(f"shard {rel!r}: rows {entry.get('rows')!r} is not a count")
        else:
            rows += entry["rows"]
    if problems:
        raise PreflightError(f"snapshot {root} refused, it does not match its manifest: {'; '.join(problems)}")
    if rows == 0:
        raise PreflightError(f"snapshot {root} has no pairs (every shard lists 0 rows)")
    return rows


def _latest_checkpoint(output: Path) -> Path | None:
    done = sorted(p for p in (output / "checkpoints").glob("step-*[0-9]") if (p / "state.pt").is_file())
    return done[-1] if done else None


def check_output(output: str | Path, resume_from: str | None = None, overwrite: bool = False) -> Path | None:
    """The output folder must be creatable and writable, and hold no earlier run unless that run is resumed;
    returns the checkpoint folder ``resume_from`` resolves to (``latest``: the newest complete one)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise PreflightError(f"output {out} exists and is not a folder")
    parent = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PreflightError(f"output {out} is not writable (checked {parent})")
    if out.is_dir():  # a real write: catches read-only mounts and full quotas that os.access does not
        try:
            with tempfile.NamedTemporaryFile(dir=out, prefix=".preflight-"):
                pass
        except OSError as err:
            raise PreflightError(f"output {out} is not writable: {err.strerror or err}") from None
    if resume_from is None:
        found = [m for m in RUN_MARKERS if (out / m).exists()]
        if found and not overwrite:
            raise PreflightError(f"output {out} already holds a run ({', '.join(found)}); resume it with "
                                 f"--resume-from latest, start afresh with --overwrite-output, or choose a new "
                                 f"--output")
        return None
    if resume_from == "latest":
        ckpt = _latest_checkpoint(out)
        if ckpt is None:
            raise PreflightError(f"--resume-from latest but {out / 'checkpoints'} holds no complete checkpoint "
                                 f"(step-*/state.pt): nothing to resume")
        return ckpt
    ckpt = Path(resume_from)
    lacking = [n for n in ("state.pt", "lora.safetensors") if not (ckpt / n).is_file()]
    if lacking:
        raise PreflightError(f"checkpoint {ckpt} lacks {', '.join(lacking)}; expected a checkpoints/step-N folder "
                             f"written by the trainer")
    return ckpt


def check_packages(*, use_8bit_adam: bool = False, report_to: str | tuple[str, ...] | None = None) -> None:
    """Optional packages the options ask for must be importable (found without importing them)."""
    wanted = [report_to] if isinstance(report_to, str) else list(report_to or ())
    wanted = [name for name in wanted if name not in ("", "none")]
    problems = []
    if use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes (CUDA only)")
    for name in wanted:
        if name == "all" or name == "none":
            continue
        if name not in TRACKERS:
            problems.append(f"--report-to {name!r} is not one of {sorted(TRACKERS)}, 'all' or 'none'")
        elif importlib.util.find_spec(TRACKERS[name]) is None:
            problems.append(f"--report-to {name} needs {TRACKERS[name]}: pip install {TRACKERS[name]}")
    if problems:
        raise PreflightError("; ".join(problems))


def check_train_inputs(*, model: str | Path, snapshot: str | Path, output: str | Path,
                       resume_from: str | None = None, use_8bit_adam: bool = False,
                       report_to: str | tuple[str, ...] | None = None, overwrite_output: bool = False) -> Preflight:
    """All checks, cheapest first; raises ``PreflightError`` (one line) at the first failing group."""
    check_packages(use_8bit_adam=use_8bit_adam, report_to=report_to)
    info = check_model(model)
    pairs = check_snapshot(snapshot)
    ckpt = check_output(output, resume_from, overwrite_output)
    return Preflight(info, pairs, ckpt)


# ---------------------------------------------------------------- launching ranks (still without torch)

def cpu_launch_num_processes(environ: dict | None = None, parent_cmdline: list[str] | None = None,
                             cuda: bool = True) -> int:
    """N when this process is the single one that ``accelerate launch --cpu --num_processes N`` started (or,
    on a machine without CUDA, ``accelerate launch --num_processes N``), else 1.

    accelerate 1.15's launcher starts N CPU ranks only through mpirun (``--mpirun_hostfile``); without it, its
    simple launcher runs ONE process, giving it ``ACCELERATE_USE_CPU`` and (when N > 1) ``MASTER_ADDR`` but no
    ``RANK``/``WORLD_SIZE``, so training silently ran at world size 1. N is read from the launcher's command
    line: this process's parent (Linux ``/proc``)."""
    env = os.environ if environ is None else environ
    use_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") or not cuda
    if "ACCELERATE_USE_CPU" not in env or not use_cpu or "MASTER_ADDR" not in env:
        return 1
    if any(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        return 1
    if parent_cmdline is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return 1
        parent_cmdline = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    for i, arg in enumerate(parent_cmdline):
        if arg == "prefcurate.training.trainer" or arg.endswith("trainer.py"):  # the script's own arguments follow
            break
        name, _, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (parent_cmdline[i + 1] if i + 1 < len(parent_cmdline) else "")
            return int(value) if value.isdigit() and int(value) > 0 else 1
    return 1


def spawn_cpu_ranks(n: int, argv: list[str]) -> int:
    """Run ``python -m prefcurate.training.trainer argv`` as ``n`` ranks (RANK/WORLD_SIZE/LOCAL_RANK set, gloo through
    accelerate's MULTI_CPU state); returns the first non-zero exit status, or 0. When one rank fails the others
    get 60 s to fail with it (they do: errors are agreed on by a collective) before they are terminated."""
    base = {**os.environ, "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_PORT":
            os.environ.get("MASTER_PORT", "29500"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = [subprocess.Popen([sys.executable, "-m", "prefcurate.training.trainer", *argv],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(n)]
    status, deadline = 0, None
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and deadline is None:
            status, deadline = failed[0], time.monotonic() + 60
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(0.2)
    return status or next((p.returncode for p in procs if p.returncode), 0)


def check_config(config) -> Preflight:
    """``check_train_inputs`` for a ``TrainConfig`` (duck-typed: this module never imports torch)."""
    return check_train_inputs(model=config.model, snapshot=config.snapshot, output=config.output,
                              resume_from=config.resume_from, use_8bit_adam=config.use_8bit_adam,
                              report_to=getattr(config, "report_to", None),
                              overwrite_output=getattr(config, "overwrite_output", False))


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cli_prelude(argv: list[str]) -> None:
    """The trainer CLI's first steps, before diffusers and peft are imported (~15 s on a loaded machine): parse
    (``--help`` exits 0, a usage error 2), check the inputs (one line on stderr, exit 3), and when this is the
    one process of ``accelerate launch --cpu --num_processes N``, run N ranks and exit with their status."""
    from prefcurate.training.config import (  # no torch: names, β conventions (vocab, training.conventions)
        parse_args,
    )

    try:
        config = parse_args(argv)
        check_config(config)
    except (PreflightError, ValueError) as err:
        if is_rank_zero():
            print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    import torch  # already imported by prefcurate.training.config

    n = cpu_launch_num_processes(cuda=torch.cuda.is_available())
    if n > 1:
        sys.exit(spawn_cpu_ranks(n, argv))


def clear_run(output: str | Path) -> None:
    """Remove an earlier run's files from ``output`` (``--overwrite-output``); the latent cache stays."""
    import shutil

    for name in RUN_FILES:
        path = Path(output) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
