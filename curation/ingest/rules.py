"""The ingest's validation rules, written once.

Every rule is a reason code, its human message, a vectorised predicate over a batch (an Arrow boolean
array, True where the row breaks the rule, never null) and the detail text for one row that breaks it.
A row is quarantined with the reason of the FIRST rule (in RULES order) it breaks. The engine's fast
path evaluates every predicate over the whole batch (`first_broken`); the per-row explanation
(`explain`) evaluates the same predicates on a one-row slice, so the two can never disagree.

Readers flag rows they could not map (`reader_reason`, with codes from READER_REASONS); the first rule
passes those on with the reader's own reason and detail.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


# Reason codes set by the readers (curation/ingest/*.py) for rows they could not map.
READER_REASONS = {
    "reader_error": "the reader could not map the row (see detail)",
    "wrong_type": "a value has a type the column cannot hold (e.g. text in a label column)",
    "missing_image_file": "an image path in the source does not exist under the image root",
    "unreadable_image_file": "an image file exists but could not be read",
    "malformed_entry": "an HPDv2 entry is not an object, lacks a key, or has lists of different lengths",
    "malformed_json": "a JSONL line is not valid JSON or not an object",
    "malformed_csv_row": "a CSV row has the wrong number of cells",
    "fewer_than_two_ranked": "a ranking row has fewer than two items to compare",
    "unlabelled": "the source marks the row as carrying no preference (Pick-a-Pic has_label = false)",
    "image_outside_root": "an image path is absolute or leaves the image root (symlinks resolved)",
    "not_a_regular_file": "an image path names a device, a FIFO, a folder or another non-regular file",
    "identical_images": "both sides are the same image",
    "image_too_large": "an image has more pixels (by its header) or more bytes than the configured limit",
}


@dataclass
class RuleInput:
    """One batch as the rules see it: Arrow arrays of n rows (RAW columns, plus the content ids of the
    two images: hex strings, null where a row has no bytes), the prompt limit, and the images refused
    so far (content id -> (reason, detail), reason corrupt_image or image_too_large)."""
    prompt: pa.Array
    label_0: pa.Array
    label_1: pa.Array
    content: tuple[pa.Array, pa.Array]
    uid: tuple[pa.Array, pa.Array]
    reader_reason: pa.Array
    reader_detail: pa.Array
    max_prompt_bytes: int
    bad_images: dict[str, tuple[str, str]]

    def __len__(self) -> int:
        return len(self.prompt)

    def row(self, i: int) -> RuleInput:
        """Row i alone (zero-copy slices)."""
        def one(a: pa.Array) -> pa.Array:
            return a.slice(i, 1)
        return RuleInput(one(self.prompt), one(self.label_0), one(self.label_1),
                         (one(self.content[0]), one(self.content[1])), (one(self.uid[0]), one(self.uid[1])),
                         one(self.reader_reason), one(self.reader_detail), self.max_prompt_bytes, self.bad_images)

    def values(self, i: int) -> dict:
        """Row i's values as Python objects, for the detail texts."""
        return {"prompt": self.prompt[i].as_py(), "label_0": self.label_0[i].as_py(),
                "label_1": self.label_1[i].as_py(), "content": [c[i].as_py() for c in self.content],
                "uid": [u[i].as_py() for u in self.uid], "reader_reason": self.reader_reason[i].as_py(),
                "reader_detail": self.reader_detail[i].as_py(), "max_prompt_bytes": self.max_prompt_bytes,
                "bad_images": self.bad_images}


@dataclass(frozen=True)
class Rule:
    reason: str | None                            # the quarantine reason code (None: the reader's own)
    message: str                                  # what the code means (REASONS)
    broken: Callable[[RuleInput], pa.Array]       # True where a row breaks the rule; never null
    detail: Callable[[dict], str]                 # the detail text, from RuleInput.values of a breaking row


def _false_if_null(mask) -> pa.Array:
    return pc.fill_null(mask, False)


def _refused(reason: str, side: int) -> Callable[[RuleInput], pa.Array]:
    """Predicate: image_<side>'s content id is one refused with `reason`."""
    def broken(x: RuleInput) -> pa.Array:
        ids = pa.array([i for i, (r, _) in x.bad_images.items() if r == reason], pa.string())
        return _false_if_null(pc.is_in(x.content[side], value_set=ids))
    return broken


def _image_rules(side: int) -> list[Rule]:
    """The rules of one side's image (side 0's come before side 1's)."""
    def refused_detail(v: dict) -> str:
        return f"image_{side}: {v['bad_images'][v['content'][side]][1]}"
    return [
        Rule("missing_image", "an image has neither bytes nor a source id",
             lambda x: pc.and_(pc.is_null(x.content[side]), pc.is_null(x.uid[side])),
             lambda v: f"image_{side} has neither bytes nor a source id"),
        Rule("corrupt_image", "image bytes cannot be decoded", _refused("corrupt_image", side), refused_detail),
        Rule("image_too_large", READER_REASONS["image_too_large"], _refused("image_too_large", side),
             refused_detail),
    ]


def _identical(x: RuleInput) -> pa.Array:
    """Same content id on both sides, or (no bytes on side 0) the same source id on both."""
    same_content = _false_if_null(pc.equal(x.content[0], x.content[1]))
    same_uid = pc.and_(pc.is_null(x.content[0]), _false_if_null(pc.equal(x.uid[0], x.uid[1])))
    return pc.or_(same_content, same_uid)


def _prompt_bytes(v: dict) -> int:
    return len(v["prompt"].encode())


RULES: list[Rule] = [
    Rule(None, "the reader's reason for a row it could not map", lambda x: pc.is_valid(x.reader_reason),
         lambda v: v["reader_detail"] or READER_REASONS.get(v["reader_reason"], "")),
    Rule("empty_prompt", "prompt missing or blank",
         lambda x: _false_if_null(pc.or_kleene(pc.is_null(x.prompt), pc.equal(pc.utf8_trim_whitespace(x.prompt), ""))),
         lambda v: "prompt is missing or blank"),
    Rule("prompt_too_long", "the prompt has more UTF-8 bytes than the configured limit",
         lambda x: _false_if_null(pc.greater(pc.binary_length(x.prompt), x.max_prompt_bytes)),
         lambda v: f"prompt has {_prompt_bytes(v)} UTF-8 bytes, more than the limit of {v['max_prompt_bytes']}"),
    Rule("missing_label", "label_0 missing", lambda x: pc.is_null(x.label_0), lambda v: "label_0 is missing"),
    Rule("nan_label", "label_0 (or label_1) is NaN",
         lambda x: pc.or_(_false_if_null(pc.is_nan(x.label_0)), _false_if_null(pc.is_nan(x.label_1))),
         lambda v: f"label_0={v['label_0']}, label_1={v['label_1']}"),
    Rule("label_out_of_range", "label_0 outside [0, 1]",
         lambda x: _false_if_null(pc.or_(pc.less(x.label_0, 0.0), pc.greater(x.label_0, 1.0))),
         lambda v: f"label_0={v['label_0']} is outside [0, 1]"),
    Rule("inconsistent_labels", "label_0 + label_1 != 1",
         lambda x: _false_if_null(pc.greater(pc.abs(pc.subtract(pc.add(x.label_0, x.label_1), 1.0)), 1e-6)),
         lambda v: f"label_0 + label_1 = {v['label_0'] + v['label_1']}, expected 1"),
    *_image_rules(0),
    *_image_rules(1),
    Rule("identical_images", "both sides are the same image", _identical,
         lambda v: "image_0 and image_1 are the same image"),
]

# Every quarantine reason code and what it means (the `reason` column of `quarantine`).
REASONS = {**READER_REASONS, **{rule.reason: rule.message for rule in RULES if rule.reason is not None}}


def first_broken(x: RuleInput) -> np.ndarray:
    """Per row, the index in RULES of the first rule it breaks, or -1 (int64, n): every rule over the
    whole batch, Arrow kernels only."""
    first = np.full(len(x), -1, np.int64)
    for k, rule in enumerate(RULES):
        broken = rule.broken(x).to_numpy(zero_copy_only=False)
        first[(first < 0) & broken] = k
    return first


def reason_and_detail(x: RuleInput, i: int, k: int) -> tuple[str, str]:
    """(reason, detail) of row i, which breaks RULES[k] first."""
    values = x.values(i)
    rule = RULES[k]
    return (rule.reason or values["reader_reason"]), rule.detail(values)


def explain(x: RuleInput, i: int) -> tuple[str | None, str | None]:
    """(reason, detail) of the first rule row i breaks, or (None, None): the same predicates as the
    fast path, evaluated on the row alone."""
    k = int(first_broken(x.row(i))[0])
    return reason_and_detail(x, i, k) if k >= 0 else (None, None)
