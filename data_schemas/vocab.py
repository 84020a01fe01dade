"""The project's name lists and shared thresholds, written once (plain Python: no torch, no Polars).

The CLI's choices, the trainer's dispatch table, the snapshot writer and the flows all read these, so `--help`
stays fast and no copy has to be kept in sync by a test.
"""
from __future__ import annotations

# Losses the trainer dispatches on (prefcurate.training.losses has one function per name).
LOSS_TYPES = ("dpo", "adaptive-dpo", "balanced-dpo", "ncp-dpo", "cpo", "sft", "ipo")

# Snapshot policies (prefcurate.curation.snapshot): which pairs a snapshot keeps and how it weights them.
SNAPSHOT_POLICIES = ("plain", "filter", "adaptive", "balanced", "reliability")
# The default everywhere (CLI, serve, pipeline): Adaptive-DPO's weights are the project's reason to exist, and
# `adaptive` keeps every pair (it reweights rather than drops), so it never loses data silently.
DEFAULT_SNAPSHOT_POLICY = "adaptive"

# A pair (or an annotator's label) is a minority instance when its minority score u exceeds this
# (Adaptive-DPO: u in [0, 1], 0.5 is the point where the label is as likely minority as majority).
MINORITY_THRESHOLD = 0.5

# Input formats `prefcurate ingest --format` accepts (prefcurate.curation.ingest.READERS has one reader per name),
# each with the landing-folder file pattern that `serve` and the pipeline pick up by default.
LANDING_PATTERNS = {"pickapic": "*.parquet", "hpdv2": "*.json", "jsonl": "*.jsonl", "csv": "*.csv", "wmt": "*.csv"}
INPUT_FORMATS = tuple(LANDING_PATTERNS)

# name -> (higher_is_better, prompt_free, needs_weights) of every registered scorer (curation/scorers/__init__.py
# SCORERS); here so curation and the CLI need no torch import. tests/test_curate_snapshot.py checks the first two
# against the scorer objects themselves.
SCORER_TRAITS: dict[str, tuple[bool, bool, bool]] = {
    "sharpness": (True, True, False), "exposure": (True, True, False), "prompt_colour": (True, False, False),
    "colourfulness": (True, True, False), "pickscore": (True, False, True), "hpsv2": (True, False, True),
    "hpsv2.1": (True, False, True), "clip": (True, False, True), "aesthetic": (True, True, True),
    "imagereward": (True, False, True),
}
# Scorers that need no checkpoint (pixel statistics): the demo's and the pipeline's default, and the only ones
# `prefcurate score` runs without --weights.
WEIGHT_FREE_SCORERS = tuple(name for name, (_, _, needs_weights) in SCORER_TRAITS.items() if not needs_weights)
