"""Scoring, the worker side: decode and preprocess (or score, for weight-free scorers) in worker processes.

Workers get the picklable `image_transform` of a neural scorer, or the weight-free pixel scorer itself, never
a model. An image that does not decode, or whose header claims more pixels than `max_image_pixels` (a
decompression bomb, refused before any decode), is reported by FAILURES reason, not raised. Workers die with
the process that started them, even after `kill -9` (prefcurate.curation.scorers.child_guard).
"""
from __future__ import annotations

import io
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

from prefcurate.curation.scorers.child_guard import die_with_parent


# Pillow's decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS, ~89.5 Mpx): the same default as ingest.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# Failure reasons (ShardResult.failures keys); each such (image, prompt) is stored with a NaN score.
FAILURES = {
    "undecodable_image": "the stored bytes do not decode (damage the ingest's structure check cannot see)",
    "image_too_large": "the image header claims more than max_image_pixels pixels: refused before decoding",
    "nan_score": "the scorer returned NaN for a decodable image",
}


def _worker_init() -> None:
    die_with_parent()  # a kill -9 of the scoring process must not leave its workers running
    torch.set_num_threads(1)  # one thread per worker: the workers are the parallelism


def _ready() -> bool:
    return True


def _decode(data: bytes, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """(decoded image, None) or (None, FAILURES reason). The size comes from the header, before any decode."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return None, "image_too_large"
    except Exception:  # any decoder failure: the image cannot be scored, the rest of the batch can
        return None, "undecodable_image"
    if image.width * image.height > max_pixels:
        return None, "image_too_large"
    try:
        image.load()
    except Exception:
        return None, "undecodable_image"
    return image, None


def _prepare(job: tuple) -> tuple[np.ndarray | None, list[str | None]]:
    """Worker body. job = (fn, is_neural, blobs, prompt_lists, max_pixels) -> (array, failure reason or None
    per image). Neural: fn is the image transform; array (n_decoded, 3, H, W) float32 of the decodable images.
    Pixel: fn is the scorer; array holds one float64 per (image, prompt), NaN for a failed image.
    Ingest checks headers and file structure; damage it cannot see only shows here."""
    fn, is_neural, blobs, prompt_lists, max_pixels = job
    images, bad = [], []
    for data in blobs:
        image, reason = _decode(data, max_pixels)
        images.append(image)
        bad.append(reason)
    if is_neural:
        decoded = [fn(im).numpy() for im in images if im is not None]
        return (np.stack(decoded) if decoded else None), bad
    scores = [np.full(len(prompts), np.nan) if im is None else fn.score([im] * len(prompts),
                                                                      None if prompts == [None] else prompts)
              for im, prompts in zip(images, prompt_lists)]
    return np.concatenate(scores), bad


def make_pool(workers: int, mp_context: str = "forkserver") -> ProcessPoolExecutor | None:
    """The decode/preprocess worker pool (None for workers=0). Forkserver workers start from a server
    that has imported this module once, so each new worker costs a fork, not a torch import."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        return None
    context = multiprocessing.get_context(mp_context)
    if mp_context == "forkserver":
        # the whole stage (torch, PIL, the scorer classes whose transforms the jobs unpickle), imported once
        context.set_forkserver_preload(["prefcurate.curation.scorers.runner"])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init)


def worker_pids(pool: ProcessPoolExecutor | None) -> list[int]:
    """Process ids of the pool's started workers (for tests and diagnostics)."""
    return sorted((getattr(pool, "_processes", None) or {}).keys()) if pool is not None else []
