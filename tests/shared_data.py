"""Locate the team's shared real-data files (../shared/data beside the repository, as in CI).

Files whose licence does not allow shipping them in the repository (the WMT13 rankings carry no
licence) are read from there; a test that needs one skips, saying why, where it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data(name: str) -> Path:
    candidates = [Path(os.environ["PREFCURATE_SHARED_DATA"])] if "PREFCURATE_SHARED_DATA" in os.environ else []
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")]
    for folder in candidates:
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"{name} not found in {', '.join(map(str, candidates))} (set PREFCURATE_SHARED_DATA)")
