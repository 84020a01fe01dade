"""One Arrow schema per lake table: the single source of truth for column names and types.

Every table carries its name and schema version in the schema metadata, so a Parquet file
written by a later version of prefcurate can be recognised (and refused) by an older one.
Column meanings are documented as field metadata (`doc`), which `describe()` prints.
"""
from __future__ import annotations

import pyarrow as pa


SCHEMA_VERSION = 1


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


def _schema(table: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"prefcurate.table": table, "prefcurate.schema_version": str(SCHEMA_VERSION)})


TIMESTAMP = pa.timestamp("us", tz="UTC")

PAIRS = _schema("pairs", [
    _field("pair_id", pa.string(), "stable hash of (source, the row's identity in that source)", False),
    _field("source", pa.string(), "source label given at ingest (e.g. pickapic, hpdv2, wmt13)", False),
    _field("split", pa.string(), "split in the source (train, validation, test, ...)", False),
    _field("prompt", pa.string(), "the caption / prompt, as given", False),
    _field("prompt_id", pa.string(), "hash of the normalized prompt (NFKC, whitespace collapsed, lower case)", False),
    _field("image_0_id", pa.string(),
           "content hash of image_0's bytes, or '<source>:<uid>' for metadata-only pairs (resolved via image_refs)", False),
    _field("image_1_id", pa.string(), "as image_0_id, for image_1", False),
    _field("image_0_uid", pa.string(), "the source's own id of image_0 (Pick-a-Pic image_0_uid, a file path, ...)"),
    _field("image_1_uid", pa.string(), "the source's own id of image_1"),
    _field("label_0", pa.float64(), "1 = image_0 preferred, 0 = image_1 preferred, 0.5 = tie", False),
    _field("user_id", pa.string(), "annotator id (Pick-a-Pic user_id, HPDv2 user_hash, WMT judge); null if unknown"),
    _field("created_at", TIMESTAMP, "time of the judgement, if the source has it"),
    _field("model_0", pa.string(), "model that generated image_0, if known"),
    _field("model_1", pa.string(), "model that generated image_1, if known"),
    _field("ranking_id", pa.string(), "the source's id of the ranking event the pair came from, if any"),
    _field("ingest_id", pa.string(), "ingest that accepted this row (see the ingests table)", False),
])

IMAGES = _schema("images", [
    _field("image_id", pa.string(), "content hash (blake2b-128, hex) of the encoded bytes", False),
    _field("bytes", pa.binary(), "the encoded image, as it came (JPEG, PNG, WebP, ...)", False),
    _field("format", pa.string(), "PIL format name: JPEG, PNG, WEBP, ...", False),
    _field("width", pa.int32(), "pixels", False),
    _field("height", pa.int32(), "pixels", False),
    _field("ingest_id", pa.string(), "ingest that first stored this image", False),
])

IMAGE_REFS = _schema("image_refs", [
    _field("ref_id", pa.string(), "'<source>:<uid>': the id a metadata-only pair uses for this image", False),
    _field("image_id", pa.string(), "content hash of the image's bytes (a key of the images table)", False),
    _field("ingest_id", pa.string(), "ingest that recorded this reference", False),
])

QUARANTINE = _schema("quarantine", [
    _field("source", pa.string(), "source label given at ingest", False),
    _field("source_file", pa.string(), "path or URL of the file the row came from", False),
    _field("row_identity", pa.string(), "the row's identity in the source (row number, ranking_id, ...)", False),
    _field("reason", pa.string(), "machine-readable reason code (see prefcurate.curation.ingest.REASONS)", False),
    _field("detail", pa.string(), "human-readable explanation", False),
    _field("raw", pa.string(), "the row's values as JSON (image bytes summarised by length and hash)", False),
    _field("ingest_id", pa.string(), "ingest that quarantined the row", False),
])

INGESTS = _schema("ingests", [
    _field("ingest_id", pa.string(), "hash of (fingerprint, source, format): the same file ingests to the same id", False),
    _field("source", pa.string(), "source label", False),
    _field("format", pa.string(), "reader used: pickapic, hpdv2, jsonl, csv, wmt", False),
    _field("source_file", pa.string(), "path or URL ingested", False),
    _field("fingerprint", pa.string(), "sha256 of the file's bytes", False),
    _field("n_read", pa.int64(), "rows read from the file (pairs, after expanding rankings)", False),
    _field("n_accepted", pa.int64(), "rows written to pairs", False),
    _field("n_duplicates", pa.int64(), "rows whose pair_id was already in the lake or earlier in the file", False),
    _field("n_quarantined", pa.int64(), "rows written to quarantine", False),
    _field("n_images_new", pa.int64(), "distinct images newly stored", False),
    _field("started_at", TIMESTAMP, "", False),
    _field("finished_at", TIMESTAMP, "", False),
    _field("prefcurate_version", pa.string(), "", False),
])

SCORES = _schema("scores", [
    _field("image_id", pa.string(), "content hash of the scored image", False),
    _field("prompt_id", pa.string(), "prompt the image was scored against (a fixed id for prompt-free scorers)", False),
    _field("scorer", pa.string(), "scorer name (pickscore, hpsv2, clip, aesthetic, sharpness, ...)", False),
    _field("scorer_version", pa.string(), "scorer code version plus checkpoint hash", False),
    _field("score", pa.float64(), "the scorer's raw score; see the scorer's higher_is_better", False),
])

# Training snapshots (not lake tables): immutable folders of shards plus manifest.json, read by
# training/ without any curation code. One row per training pair, winner first.
SNAPSHOT_PAIRS = _schema("snapshot_pairs", [
    _field("pair_id", pa.string(), "lake pair id", False),
    _field("prompt", pa.string(), "caption the pair was judged for", False),
    _field("winner_image_id", pa.string(), "content hash of the preferred image", False),
    _field("loser_image_id", pa.string(), "content hash of the other image", False),
    _field("winner_image", pa.binary(), "encoded bytes of the preferred image", False),
    _field("loser_image", pa.binary(), "encoded bytes of the other image", False),
    _field("label_source", pa.string(), "what decided the winner: human, human_flipped, consensus, calibrated_consensus", False),
    _field("weight", pa.float64(), "per-pair loss weight W (1.0 = plain DPO)", False),
    _field("margin", pa.float64(), "offline adaptive margin term (0.0 = none); see prefcurate.training.losses", False),
    _field("minority_score", pa.float64(), "offline minority score u in [0, 1] (0 when not computed)", False),
    _field("confidence", pa.float64(), "offline confidence c (NaN when not computed)"),
    _field("stability", pa.float64(), "offline stability v (NaN when not computed)"),
    _field("vote_fraction", pa.float64(), "share of voters for the winner (NaN when no votes)"),
    _field("user_id", pa.string(), "human annotator of the pair, if any"),
    _field("label_smoothing", pa.float64(),
           "conservative-DPO epsilon: the target puts 1 - epsilon on the winner (0.0 = hard label; reliability "
           "policy: 1 - P(label right))"),
])

# Tables of a curation run (LAKE/curation/<run_id>/<table>.parquet, written by curation/labels/curate.py and
# queryable with SQL once a run exists). Documented here for `prefcurate tables`; the writers own the types.
_F, _S, _I, _B = pa.float64(), pa.string(), pa.int64(), pa.bool_()
CURATION_TABLES: dict[str, pa.Schema] = {
    "votes": _schema("votes", [
        _field("pair_id", _S, "lake pair id"),
        _field("scorer", _S, "scorer name"),
        _field("score_0", _F, "the scorer's score of image_0"),
        _field("score_1", _F, "the scorer's score of image_1"),
        _field("margin", _F, "score_0 - score_1, sign-flipped for lower-is-better scorers: > 0 prefers image_0"),
        _field("vote", _F, "1 = prefers image_0, 0 = image_1, 0.5 = exact tie"),
        _field("normalized_margin", _F, "margin / the scorer's rms margin over all pairs: 1 = a typical margin"),
    ]),
    "consensus": _schema("consensus", [
        _field("pair_id", _S, "lake pair id"),
        _field("n_scorers", _I, "scorers with a vote on the pair"),
        _field("votes_for_0", _F, "scorer votes for image_0 (a tied scorer counts 1/2); the human never counts"),
        _field("vote_fraction", _F, "share of voters for image_0 (the human included only under tie policy "
                                    "human_vote); null without voters"),
        _field("consensus_label", _F, "1 = image_0, 0 = image_1, null = none (BalancedDPO majority of the "
                                      "scorers; splits per the tie policy, default dropped)"),
        _field("scorer_label", _F, "the label of the scorers alone, whatever the tie policy (null on a split)"),
        _field("human_label", _F, "label_0 of the pair"),
        _field("human_agrees", _B, "human_label == scorer_label: agreement with a label the human did not vote "
                                   "in; null when either is undecided"),
        _field("consensus_source", _S, "majority, a baseline's name, scorer_margin, human_fallback, split or "
                                       "no_scorer_votes"),
    ]),
    "pair_metrics": _schema("pair_metrics", [
        _field("pair_id", _S, "lake pair id"),
        _field("confidence", _F, "Adaptive-DPO c: mean sigmoid(rho * margin toward the label) over annotators"),
        _field("stability", _F, "Adaptive-DPO v: min(std of the annotators' rho * margin, cap); at the cap on ~99.8 % of "
                                 "pairs with scorers as annotators, so u leaves it out by default"),
        _field("minority_score", _F, "Adaptive-DPO u in [0, 1]: 1 - c by default, (1 - c) v with stability_term capped_std; high = likely "
                                     "a minority/wrong label"),
        _field("weight", _F, "Adaptive-DPO W = 1 / (k1 u + c1) (unnormalised; snapshots normalise it)"),
        _field("margin", _F, "Adaptive-DPO margin Gamma"),
        _field("n_annotators", _I, "annotators behind c and v (scorers, plus the human if configured)"),
        _field("consensus_label", _F, "as in the consensus table"),
        _field("vote_fraction", _F, "as in the consensus table"),
        _field("human_agrees", _B, "as in the consensus table"),
        _field("scorer_log_odds", _F, "calibrated consensus: log-odds that image_0 is better from the scorers' "
                                      "margins, weights learned against the crowd (null without votes)"),
        _field("calibrated_label", _F, "1 if scorer_log_odds > 0, 0 if < 0, else null"),
        _field("peer_log_odds", _F, "evidence toward image_0 from other annotators' labels on the same images"),
        _field("label_log_odds", _F, "evidence of the pair's own label toward its chosen image, from its "
                                     "annotator's sensitivity/specificity (null for ties)"),
        _field("label_posterior", _F, "P(the human label is right) given scorers, peers and the annotator's "
                                      "confusion (null for ties and missing labels)"),
    ]),
    "annotators": _schema("annotators", [
        _field("user_id", _S, "annotator id"),
        _field("n_labels", _I, "labels given"),
        _field("tie_rate", _F, "share of ties"),
        _field("left_rate", _F, "share of decisive labels for image_0 (position bias)"),
        _field("consensus_agreement", _F, "share of decisive labels agreeing with the scorers' majority"),
        _field("peer_agreement", _F, "agreement with other annotators on the same image pair"),
        _field("minority_rate", _F, "share of the annotator's pairs with a high minority score"),
        _field("sensitivity", _F, "Dawid-Skene P(picks image_0 | image_0 better)"),
        _field("specificity", _F, "Dawid-Skene P(picks image_1 | image_1 better)"),
        _field("reliability", _F, "the chosen reliability estimate (higher = more trustworthy)"),
        _field("reliability_method", _S, "dawid_skene or beta_binomial"),
    ]),
    "scorer_reliability": _schema("scorer_reliability", [
        _field("scorer", _S, "scorer name"),
        _field("n_votes", _I, "decisive votes, one per unordered image pair"),
        _field("sensitivity", _F, "P(votes image_0 | image_0 better), against the crowd model's posterior truth"),
        _field("specificity", _F, "P(votes image_1 | image_1 better)"),
        _field("reliability", _F, "(sensitivity + specificity) / 2: 0.5 = no information"),
        _field("log_odds_for_0", _F, "mean evidence (nats) of its votes for image_0 in the calibrated consensus"),
        _field("log_odds_for_1", _F, "mean evidence (nats) of its votes for image_1, toward image_1"),
        _field("agreement_with_humans", _F, "share of decisive human labels the scorer's vote agrees with"),
        _field("weight", _F, "learned logistic weight per unit of normalised margin (Raykar et al. 2010)"),
    ]),
}

TABLES: dict[str, pa.Schema] = {
    "pairs": PAIRS,
    "images": IMAGES,
    "image_refs": IMAGE_REFS,
    "quarantine": QUARANTINE,
    "ingests": INGESTS,
    "scores": SCORES,
}


# The columns that identify a row of each lake table: no two committed rows share them. Writers that may race
# (two scorers that planned the same work) commit with `skip_existing`; `Lake.repair` removes repeats.
UNIQUE_KEYS: dict[str, tuple[str, ...]] = {
    "pairs": ("pair_id",),
    "images": ("image_id",),
    "image_refs": ("ref_id", "image_id"),
    "quarantine": ("ingest_id", "row_identity", "reason"),
    "ingests": ("ingest_id",),
    "scores": ("image_id", "prompt_id", "scorer", "scorer_version"),
}


def describe(table: str) -> str:
    """A plain-text listing of a table's columns, types and meanings (lake or curation table)."""
    schema = TABLES[table] if table in TABLES else CURATION_TABLES[table]
    lines = [f"{table} (schema version {SCHEMA_VERSION})"]
    for f in schema:
        doc = (f.metadata or {}).get(b"doc", b"").decode()
        lines.append(f"  {f.name:<14} {str(f.type):<22} {'' if f.nullable else 'not null'}  {doc}")
    return "\n".join(lines)
