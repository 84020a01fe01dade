"""Locate the team's shared real-data files: $PREFCURATE_SHARED_DATA, else ../shared/data beside the repository.

Files whose licence does not allow shipping them in the repository (the WMT13 rankings carry no
licence; provenance in docs/data-and-scorers.md §11) are read from there; a test that needs one skips,
naming the file and the folders it looked in, where it is absent. No absolute path is built in, so a
clone anywhere finds the data beside itself, as in CI.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


ENV_VAR = "PREFCURATE_SHARED_DATA"
REPO_ROOT = Path(__file__).resolve().parents[1]  # tests/ -> the repository root


def shared_data_folders() -> list[Path]:
    """Where to look, in order: the folder named by $PREFCURATE_SHARED_DATA (if set), then ../shared/data."""
    folders = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    return folders + [REPO_ROOT.parent / "shared" / "data"]


def shared_data(name: str) -> Path:
    """Path of the shared data file `name`; skips the calling test when no folder holds it."""
    candidates = shared_data_folders()
    for folder in candidates:
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"{name} not found in {', '.join(map(str, candidates))} (set {ENV_VAR})")
