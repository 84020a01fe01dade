"""The ingest's one table of rules (prefcurate.curation.ingest.rules.RULES): for every rule, a batch holding one
row that breaks exactly that rule is quarantined with the rule's reason by the engine's fast path, and
the per-row explanation of the same row gives the same reason. Parametrised over RULES, so a new rule
without an example here fails."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from prefcurate.curation.ingest import IngestConfig, ingest_file, rules
from prefcurate.curation.ingest.raw import raw_table
from prefcurate.curation.store.lake import Lake


def jpeg(color, size=24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


RED, BLUE = jpeg((220, 30, 30)), jpeg((30, 30, 220))
# A 64 px noise JPEG: valid, and bigger than the byte limit the tests configure.
_buffer = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(_buffer, "JPEG")
BIG = _buffer.getvalue()
MAX_IMAGE_BYTES, MAX_PROMPT_BYTES = 2048, 64
assert len(BIG) > MAX_IMAGE_BYTES > max(len(RED), len(BLUE))


def good_row(i: int) -> dict:
    return {"row_identity": f"row{i}", "prompt": "a red bicycle", "image_0_bytes": RED, "image_1_bytes": BLUE,
            "image_0_uid": "red", "image_1_uid": "blue", "label_0": 1.0, "label_1": 0.0}


def side(s: int, **values) -> dict:
    return {f"image_{s}_{k}": v for k, v in values.items()}


# (reason, n-th rule with that reason) -> the values that make a good row break that rule alone.
# The reader's rule has reason None.
EXAMPLES = {
    (None, 0): {"reader_reason": "wrong_type", "reader_detail": "column 'label_0': text"},
    ("empty_prompt", 0): {"prompt": " \t "},
    ("prompt_too_long", 0): {"prompt": "é" * MAX_PROMPT_BYTES},
    ("missing_label", 0): {"label_0": None, "label_1": None},
    ("nan_label", 0): {"label_0": float("nan"), "label_1": float("nan")},
    ("label_out_of_range", 0): {"label_0": 1.5, "label_1": -0.5},
    ("inconsistent_labels", 0): {"label_0": 1.0, "label_1": 1.0},
    ("missing_image", 0): side(0, bytes=None, uid=None),
    ("missing_image", 1): side(1, bytes=None, uid=None),
    ("corrupt_image", 0): side(0, bytes=b"not an image at all"),
    ("corrupt_image", 1): side(1, bytes=RED[: len(RED) // 2]),
    ("image_too_large", 0): side(0, bytes=BIG),
    ("image_too_large", 1): side(1, bytes=BIG),
    ("identical_images", 0): side(1, bytes=RED, uid="red"),
}


def rule_keys() -> list[tuple[str | None, int]]:
    seen: dict[str | None, int] = {}
    keys = []
    for rule in rules.RULES:
        keys.append((rule.reason, seen.get(rule.reason, 0)))
        seen[rule.reason] = seen.get(rule.reason, 0) + 1
    return keys


class _Reader:
    format = "jsonl"

    def __init__(self, table):
        self.table = table

    def batches(self, path, fs):
        yield self.table


def run(tmp_path, rows: list[dict], monkeypatch):
    """Ingest `rows` (RAW values) as one batch; (result, lake, the RuleInput the engine checked)."""
    seen = []
    first_broken = rules.first_broken
    monkeypatch.setattr(rules, "first_broken", lambda x: seen.append(x) or first_broken(x))
    columns = {name: [r.get(name) for r in rows] for name in {k for r in rows for k in r}}
    source = tmp_path / "source.bin"
    source.write_bytes(repr(rows).encode())  # the file's bytes are its identity, nothing more
    lake = Lake(str(tmp_path / "lake"), create=True)
    config = IngestConfig("test", "jsonl", max_image_bytes=MAX_IMAGE_BYTES, max_prompt_bytes=MAX_PROMPT_BYTES)
    result = ingest_file(lake, str(source), config, _Reader(raw_table(columns)))
    return result, lake, seen[0]


def test_every_rule_has_an_example_and_every_reason_a_message():
    assert set(rule_keys()) == set(EXAMPLES)
    assert all(rule.reason is None or rule.reason in rules.REASONS for rule in rules.RULES)


@pytest.mark.parametrize("key", rule_keys(), ids=lambda key: f"{key[0] or 'reader'}-{key[1]}")
def test_a_row_breaking_one_rule_is_quarantined_with_its_reason_by_both_paths(tmp_path, monkeypatch, key):
    k = rule_keys().index(key)
    reason = key[0] or EXAMPLES[key]["reader_reason"]
    rows = [good_row(0), {**good_row(1), **EXAMPLES[key]}, good_row(2)]
    result, lake, checked = run(tmp_path, rows, monkeypatch)

    # The fast path: the row is quarantined, with this rule's reason; the good rows are accepted.
    assert (result.n_read, result.n_accepted, result.n_quarantined) == (3, 2, 1)
    assert result.n_accepted + result.n_duplicates + result.n_quarantined == result.n_read
    quarantine = lake.read("quarantine").to_pylist()
    assert [(q["row_identity"], q["reason"]) for q in quarantine] == [("row1", reason)]
    assert quarantine[0]["detail"]

    # The row breaks exactly this rule, and the per-row explanation says the same as the fast path.
    broken = [j for j, rule in enumerate(rules.RULES) if rule.broken(checked).to_pylist()[1]]
    assert broken == [k]
    assert rules.explain(checked, 1) == (reason, quarantine[0]["detail"])
    assert rules.explain(checked, 0) == rules.explain(checked, 2) == (None, None)


def test_a_row_breaking_several_rules_gets_the_first_and_counts_add_up(tmp_path, monkeypatch):
    """Blank prompt and NaN label and a missing image: the earliest rule (empty_prompt) wins."""
    bad = {**good_row(1), "prompt": "", "label_0": float("nan"), **side(1, bytes=None, uid=None)}
    dup = {**good_row(0)}  # the same row identity twice: the second is a duplicate
    result, lake, checked = run(tmp_path, [good_row(0), bad, dup, good_row(3)], monkeypatch)
    assert (result.n_read, result.n_accepted, result.n_duplicates, result.n_quarantined) == (4, 2, 1, 1)
    assert result.n_accepted + result.n_duplicates + result.n_quarantined == result.n_read
    assert lake.read("quarantine").column("reason").to_pylist() == ["empty_prompt"]
    assert rules.explain(checked, 1)[0] == "empty_prompt"
    assert list(rules.first_broken(checked)) == [-1, 1, -1, -1]
