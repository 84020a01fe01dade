"""What every stage agrees on, without torch: the lake tables' Arrow schemas and their validation (tables,
validation), the snapshot contract, Adaptive-DPO's constants (adaptive) and the name lists (vocab).

The names load on first use (PEP 562): `data_schemas.vocab` and `data_schemas.adaptive` are plain Python, and
a command's `--help` that reads them should not pay for pyarrow (~0.3 s) through this package's import.
"""
from __future__ import annotations

import importlib

_HOME = {
    **dict.fromkeys(("IMAGE_REFS", "IMAGES", "INGESTS", "PAIRS", "QUARANTINE", "SCHEMA_VERSION", "SCORES",
                     "SNAPSHOT_PAIRS", "TABLES", "UNIQUE_KEYS", "describe"), "tables"),
    **dict.fromkeys(("SchemaError", "conform", "validate"), "validation"),
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
