"""Resumable checkpoints whose contents load with ``torch.load(weights_only=True)``.

``checkpoints/step-NNNNNNNN/`` holds ``lora.safetensors`` (the policy adapter), ``state.pt`` (what every rank
shares: optimiser state, step, data position, EMA annotators, the reference adapter, the run's identity) and
one ``rank-RRRRR.pt`` per rank (what differs between ranks: that rank's noise generator and its global torch /
CUDA / numpy / python RNG states, and its data position). All are tensors, dicts, lists, ints, floats and
strings (numpy's and python's RNG states are converted to int64 tensors). The folder is written under a
temporary name by every rank (``begin_checkpoint``, ``save_rank_state``) and renamed by rank 0 once every
rank file is there (``commit_checkpoint``), so a kill mid-write never leaves a checkpoint that looks complete.
On several machines ``output`` must be a shared folder.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


STATE_FILE, LORA_FILE = "state.pt", "lora.safetensors"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


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


def partial_dir(output: str | Path, step: int) -> Path:
    final = checkpoint_dir(output, step)
    return final.with_name(final.name + ".partial")


def begin_checkpoint(output: str | Path, step: int) -> Path:
    """Rank 0, before any rank writes: an empty temporary folder for the step's checkpoint."""
    partial = partial_dir(output, step)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def save_rank_state(output: str | Path, step: int, rank: int, state: dict) -> None:
    """Every rank, into the folder ``begin_checkpoint`` made (written to a temporary name, then renamed)."""
    path = partial_dir(output, step) / rank_file(rank)
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def commit_checkpoint(output: str | Path, step: int, lora: dict[str, torch.Tensor], state: dict,
                      world_size: int) -> Path:
    """Rank 0, after every rank saved its state: write the shared files and rename the folder into place."""
    final, partial = checkpoint_dir(output, step), partial_dir(output, step)
    missing = [rank_file(r) for r in range(world_size) if not (partial / rank_file(r)).is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {partial} lacks {', '.join(missing)}: a rank did not save its state")
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
    """(policy LoRA tensors, shared state); ``weights_only`` loading: no code is unpickled."""
    return load_file(path / LORA_FILE), torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def load_rank_state(path: Path, rank: int) -> dict:
    file = path / rank_file(rank)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {path} lacks {rank_file(rank)}: written by a run with fewer ranks "
                                f"or by an older trainer, so rank {rank} cannot resume exactly")
    return torch.load(file, map_location="cpu", weights_only=True)
