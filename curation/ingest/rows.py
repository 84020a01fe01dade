"""Helpers shared by the file readers (hpdv2, jsonl/csv, wmt): bounded RAW batches, rankings to
pairs, image files under a root folder, and the split named by a file name."""
from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa

from prefcurate.curation.ingest.raw import RAW, raw_table


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


# An image file larger than this is not read (reason image_too_large): 64 MB is ~10x the largest
# Pick-a-Pic/HPDv2 PNGs, and bounds what one row can make the ingest hold in memory.
MAX_IMAGE_FILE_BYTES = 64 << 20


class ImageFolder:
    """Image files under a root folder (a local path or any fsspec URL), read as contained inputs.

    A path is resolved against the root and must stay inside it: absolute paths and `..` escapes
    (after resolving symlinks, on local disks) give reason 'image_outside_root' unless
    `allow_outside_root=True`. Only regular files of at most `max_bytes` are read: a device, a FIFO
    or a directory gives 'not_a_regular_file' (checked with stat before any open, and the open is
    non-blocking, so a FIFO can never hang the ingest), a bigger file 'image_too_large'."""

    def __init__(self, root: str, fs: Any | None = None, allow_outside_root: bool = False,
                 max_bytes: int = MAX_IMAGE_FILE_BYTES):
        if fs is None:
            fs, root = fsspec.core.url_to_fs(root)
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self.allow_outside_root = allow_outside_root
        self.max_bytes = max_bytes
        self.local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        self._real_root = os.path.realpath(self.root) if self.local else posixpath.normpath(self.root)

    def _resolve(self, rel_path: str) -> tuple[str | None, str]:
        """(the path to open, or None if it leaves the root; the path as joined, for messages)."""
        joined = posixpath.join(self.root, rel_path)  # an absolute rel_path replaces the root
        resolved = os.path.realpath(joined) if self.local else posixpath.normpath(joined)
        if self.allow_outside_root:
            return resolved, joined
        inside = resolved == self._real_root or resolved.startswith(self._real_root.rstrip("/") + "/")
        return (resolved if inside else None), joined

    def read(self, rel_path: str) -> tuple[bytes | None, str | None, str | None]:
        """(bytes, None, None), or (None, reason, detail) when the file is not read: reason
        'image_outside_root', 'missing_image_file', 'not_a_regular_file', 'image_too_large' or
        'unreadable_image_file' (any other OS error). Details name the path as written in the source."""
        full, joined = self._resolve(rel_path)
        if full is None:
            return None, "image_outside_root", (f"image path {rel_path!r} resolves outside the image root "
                                                f"{self.root} (pass --allow-outside-root to allow it)")
        try:
            return (self._read_local(full, joined) if self.local else self._read_remote(full, joined)), None, None
        except FileNotFoundError:
            return None, "missing_image_file", f"image file {joined} does not exist"
        except _Refused as refused:
            return None, refused.reason, refused.detail
        except OSError as exc:  # no permission, a broken remote read: this row only
            return None, "unreadable_image_file", f"image file {joined}: {type(exc).__name__}: {exc.strerror or exc}"

    def _check(self, is_regular: bool, size: int, joined: str) -> None:
        if not is_regular:
            raise _Refused("not_a_regular_file", f"image path {joined} is not a regular file")
        if size > self.max_bytes:
            raise _Refused("image_too_large", f"image file {joined} has {size} bytes, more than the limit "
                                              f"of {self.max_bytes}")

    def _read_local(self, full: str, joined: str) -> bytes:
        info = os.stat(full)
        self._check(stat.S_ISREG(info.st_mode), info.st_size, joined)  # before any open: never open a FIFO
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            info = os.fstat(fd)  # the file opened may not be the one checked (replaced in between)
            self._check(stat.S_ISREG(info.st_mode), info.st_size, joined)
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(self.max_bytes + 1)  # never more than the limit, even if the file grows
        finally:
            os.close(fd)
        self._check(True, len(data), joined)
        return data

    def _read_remote(self, full: str, joined: str) -> bytes:
        info = self.fs.info(full)
        self._check(info.get("type") == "file", int(info.get("size") or 0), joined)
        with self.fs.open(full, "rb") as f:
            data = f.read(self.max_bytes + 1)
        self._check(True, len(data), joined)
        return data


class _Refused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail
