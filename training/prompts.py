"""Evaluation prompt sets: the shipped ones by name, or any local file (standard library only).

Shipped under ``training/assets/prompts`` (origin, commit and licence in NOTICE.txt there):

| name          | file                               | prompts | licence    | category field |
|---------------|------------------------------------|---------|------------|----------------|
| `parti`       | PartiPrompts.tsv                   | 1632    | Apache-2.0 | Category       |
| `imagereward` | imagereward_benchmark_prompts.json | 100     | Apache-2.0 | none           |
| `geneval`     | geneval_prompts.json               | 553     | MIT        | tag            |

A file: ``.txt`` one prompt per line; ``.tsv``/``.csv`` with a header holding a ``Prompt``, ``prompt`` or
``Prompts`` column (DrawBench's name) and optionally ``Category``/``category``; ``.json`` a list of objects with
``prompt`` or ``text`` (and optionally ``category``/``tag``), or of strings; ``.jsonl`` one such object per line.
Blank prompts are skipped and exact duplicates dropped (first occurrence kept): a duplicated prompt would be
counted as two independent units by the bootstrap over prompts.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


PROMPTS_DIR = Path(__file__).parent / "assets" / "prompts"
PROMPT_SETS = {
    "parti": PROMPTS_DIR / "PartiPrompts.tsv",
    "imagereward": PROMPTS_DIR / "imagereward_benchmark_prompts.json",
    "geneval": PROMPTS_DIR / "geneval_prompts.json",
}
PROMPT_KEYS = ("Prompt", "prompt", "Prompts", "text")
CATEGORY_KEYS = ("Category", "category", "tag")


class PromptFileError(ValueError):
    """A prompt file that exists but cannot be read as prompts."""


@dataclass(frozen=True)
class PromptSet:
    name: str  # the set name, or the file path as given
    source: str  # the file read
    prompts: list[str]
    categories: list[str | None]  # one per prompt; None where the file has no category field
    n_in_file: int  # non-blank prompts in the file, before dropping duplicates, filtering and limiting
    n_duplicates: int

    def __len__(self) -> int:
        return len(self.prompts)


def load_prompts(spec: str, *, limit: int | None = None, categories: list[str] | None = None) -> PromptSet:
    """Prompts of a shipped set (`parti`, `imagereward`, `geneval`) or of a file.

    `categories` keeps prompts whose category is one of these (case-insensitive; Parti's Category, GenEval's
    tag). `limit` then keeps N prompts evenly spaced through the remaining list, in file order: Parti is sorted
    by category, so its first N prompts would all be "Abstract".
    """
    path = PROMPT_SETS.get(spec, Path(spec))
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found: give a set name ({', '.join(PROMPT_SETS)}) or a "
                                f".txt/.tsv/.csv/.json/.jsonl file of prompts")
    rows = _read_rows(path)
    n_in_file = len(rows)
    seen: set[str] = set()
    unique = [r for r in rows if not (r[0] in seen or seen.add(r[0]))]
    if categories:
        available = sorted({c for _, c in unique if c is not None})
        if not available:
            raise PromptFileError(f"{path} has no category field ({'/'.join(CATEGORY_KEYS)}), so --categories "
                                  f"cannot select from it")
        wanted = {c.strip().lower() for c in categories}
        unknown = sorted(wanted - {c.lower() for c in available})
        if unknown:
            raise PromptFileError(f"unknown categories {unknown} in {path}; available: {', '.join(available)}")
        unique = [r for r in unique if r[1] is not None and r[1].lower() in wanted]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if limit < len(unique):
            unique = [unique[i * len(unique) // limit] for i in range(limit)]
    return PromptSet(spec, str(path), [p for p, _ in unique], [c for _, c in unique], n_in_file,
                     n_in_file - len(seen))


def _read_rows(path: Path) -> list[tuple[str, str | None]]:
    """(prompt, category or None) per non-blank prompt, in file order."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        return [(line.strip(), None) for line in text.splitlines() if line.strip()]
    if suffix in (".tsv", ".csv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        fields = reader.fieldnames or []
        return _from_records(list(reader), path, f"columns {fields}")
    if suffix in (".json", ".jsonl"):
        try:
            data = ([json.loads(line) for line in text.splitlines() if line.strip()] if suffix == ".jsonl"
                    else json.loads(text))
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, list):
            raise PromptFileError(f"{path} must hold a JSON list of prompts, got {type(data).__name__}")
        if all(isinstance(item, str) for item in data):
            return [(p.strip(), None) for p in data if p.strip()]
        return _from_records(data, path, "objects")
    raise PromptFileError(f"{path}: unsupported prompt file type {suffix!r}; use .txt, .tsv, .csv, .json or .jsonl")


def _from_records(records: list, path: Path, what: str) -> list[tuple[str, str | None]]:
    if not records:
        raise PromptFileError(f"{path} holds no prompts")
    first = records[0]
    key = next((k for k in PROMPT_KEYS if isinstance(first, dict) and k in first), None)
    if key is None:
        raise PromptFileError(f"{path}: no prompt field among {what}; expected one of {', '.join(PROMPT_KEYS)}")
    cat_key = next((k for k in CATEGORY_KEYS if k in first), None)
    out = []
    for i, record in enumerate(records):
        prompt = record.get(key) if isinstance(record, dict) else None
        if not isinstance(prompt, str):
            raise PromptFileError(f"{path}: record {i} has no string {key!r} field")
        if prompt.strip():
            category = record.get(cat_key) if cat_key else None
            out.append((prompt.strip(), None if category is None else str(category).strip()))
    return out
