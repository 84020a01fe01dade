"""Stable ids: content hashes for images, normalized-text hashes for prompts, source-scoped pair ids.

All ids are lowercase hex of a blake2b digest: 128 bits (32 hex) for content and pair ids,
so collisions stay negligible at billions of rows; blake2b is the fastest hashlib digest
on CPUs without SHA extensions.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata


_WHITESPACE = re.compile(r"\s+")


def content_id(data: bytes) -> str:
    """Content hash of encoded bytes (images): the same bytes always give the same id."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def normalize_prompt(prompt: str) -> str:
    """NFKC, whitespace collapsed and trimmed, lower case: 'A  Cat ' and 'a cat' are one prompt."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", prompt)).strip().lower()


def prompt_id(prompt: str) -> str:
    return hashlib.blake2b(normalize_prompt(prompt).encode("utf-8"), digest_size=16).hexdigest()


def pair_id(source: str, row_identity: str) -> str:
    """Hash of (source, the row's identity in that source). The separator cannot occur in
    `source` (checked at ingest), so ('a', 'b|c') and ('a|b', 'c') never collide."""
    return hashlib.blake2b(f"{source}|{row_identity}".encode("utf-8"), digest_size=16).hexdigest()


def ref_id(source: str, uid: str) -> str:
    """Id of an image known only by the source's own uid (metadata-only pairs)."""
    return f"{source}:{uid}"


def file_fingerprint(open_file, chunk_bytes: int = 8 << 20) -> str:
    """sha256 of a file's whole content, read in chunks (bounded memory)."""
    digest = hashlib.sha256()
    while chunk := open_file.read(chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()
