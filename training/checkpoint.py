"""Resumable checkpoints whose contents load with ``torch.load(weights_only=True)``.

``checkpoints/step-NNNNNNNN/`` holds ``lora.safetensors`` (the policy adapter) and ``state.pt``: optimiser
state, step, data position, EMA annotators and the reference adapter, the trainer's noise generator and the
global torch / CUDA / numpy / python RNG states, all as tensors, dicts, lists, ints, floats and strings
(numpy's and python's RNG states are converted to int64 tensors). The folder is written under a temporary
name and renamed, so a kill mid-write never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


STATE_FILE, LORA_FILE = "state.pt", "lora.safetensors"


def rng_states() -> dict:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))


def checkpoint_dir(output: str | Path, step: int) -> Path:
    return Path(output) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(output: str | Path, step: int, lora: dict[str, torch.Tensor], state: dict) -> Path:
    final = checkpoint_dir(output, step)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, partial / LORA_FILE)
    torch.save(state, partial / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def find_checkpoint(output: str | Path, resume_from: str) -> Path:
    """``resume_from`` is a checkpoint folder, or ``latest`` for the newest complete one under ``output``."""
    if resume_from != "latest":
        path = Path(resume_from)
    else:
        done = sorted(p for p in (Path(output) / "checkpoints").glob("step-*[0-9]") if (p / STATE_FILE).is_file())
        if not done:
            raise FileNotFoundError(f"resume_from='latest' but {Path(output) / 'checkpoints'} has no complete "
                                    f"checkpoint (step-*/state.pt)")
        path = done[-1]
    for name in (STATE_FILE, LORA_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} lacks {name}; expected a folder written by the trainer")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(path / LORA_FILE), torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
