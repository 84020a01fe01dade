"""Helpers shared by the file readers (hpdv2, jsonl/csv, wmt): bounded RAW batches, rankings to
pairs, image files under a root folder, and the split named by a file name."""
from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa

from curation.ingest.raw import RAW, raw_table


_SPLIT_TOKENS = {"train": "train", "test": "test", "dev": "validation", "val": "validation",
                 "valid": "validation", "validation": "validation"}


def split_from_filename(path: str) -> str | None:
    """The split a file name names as a word ('wmt13_fr-en_rankings_test.csv' -> 'test'), or None.
    The last matching word wins, so 'train_v2_test.json' is a test file."""
    words = re.split(r"[^a-z]+", os.path.basename(path).lower())
    found = [_SPLIT_TOKENS[w] for w in words if w in _SPLIT_TOKENS]
    return found[-1] if found else None


def rank_pairs(ranks: list[float]) -> Iterator[tuple[int, int, float]]:
    """All k(k-1)/2 pairs (i, j), i < j, of a ranking with label_0 for item i:
    1.0 if rank_i < rank_j (lower rank = better), 0.0 if worse, 0.5 if the ranks are equal (a tie)."""
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            a, b = ranks[i], ranks[j]
            yield i, j, 1.0 if a < b else 0.0 if a > b else 0.5


class RowBuffer:
    """Collects RAW rows (dicts of RAW column values) and hands out a RAW table every `batch_rows`."""

    def __init__(self, batch_rows: int):
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
        self.batch_rows = batch_rows
        self._columns: dict[str, list] = {name: [] for name in RAW.names}
        self._n = 0

    def add(self, **values: Any) -> pa.Table | None:
        """Append one row (unknown column names are an error); returns a full batch, or None."""
        unknown = set(values) - set(self._columns)
        if unknown:
            raise KeyError(f"not RAW columns: {sorted(unknown)}")
        for name, column in self._columns.items():
            column.append(values.get(name))
        self._n += 1
        return self.flush() if self._n >= self.batch_rows else None

    def flush(self) -> pa.Table | None:
        """The rows collected so far as one RAW table (None if there are none); empties the buffer."""
        if self._n == 0:
            return None
        table = raw_table(self._columns)
        self._columns = {name: [] for name in RAW.names}
        self._n = 0
        return table


class ImageFolder:
    """Image files under a root folder (a local path or any fsspec URL). Relative paths are
    resolved against the root; absolute paths are used as given."""

    def __init__(self, root: str, fs: Any | None = None):
        if fs is None:
            fs, root = fsspec.core.url_to_fs(root)
        self.fs = fs
        self.root = root.rstrip("/") or "/"

    def read(self, rel_path: str) -> tuple[bytes | None, str | None, str | None]:
        """(bytes, None, None), or (None, reason, detail) when the file cannot be read:
        reason 'missing_image_file' (no such file) or 'unreadable_image_file' (any other OS error)."""
        full = posixpath.join(self.root, rel_path)
        try:
            return self.fs.cat_file(full), None, None
        except FileNotFoundError:
            return None, "missing_image_file", f"image file {full} does not exist"
        except OSError as exc:  # a directory, no permission, a broken remote read: this row only
            return None, "unreadable_image_file", f"image file {full}: {type(exc).__name__}: {exc}"
