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
    _field("reason", pa.string(), "machine-readable reason code (see curation.ingest.REASONS)", False),
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
    _field("label_source", pa.string(), "what decided the winner: human, consensus, human_fallback", False),
    _field("weight", pa.float64(), "per-pair loss weight W (1.0 = plain DPO)", False),
    _field("margin", pa.float64(), "offline adaptive margin term (0.0 = none); see training.losses", False),
    _field("minority_score", pa.float64(), "offline minority score u in [0, 1] (0 when not computed)", False),
    _field("confidence", pa.float64(), "offline confidence c (NaN when not computed)"),
    _field("stability", pa.float64(), "offline stability v (NaN when not computed)"),
    _field("vote_fraction", pa.float64(), "share of voters for the winner (NaN when no votes)"),
    _field("user_id", pa.string(), "human annotator of the pair, if any"),
])

TABLES: dict[str, pa.Schema] = {
    "pairs": PAIRS,
    "images": IMAGES,
    "image_refs": IMAGE_REFS,
    "quarantine": QUARANTINE,
    "ingests": INGESTS,
    "scores": SCORES,
}


def describe(table: str) -> str:
    """A plain-text listing of a table's columns, types and meanings."""
    schema = TABLES[table]
    lines = [f"{table} (schema version {SCHEMA_VERSION})"]
    for f in schema:
        doc = (f.metadata or {}).get(b"doc", b"").decode()
        lines.append(f"  {f.name:<14} {str(f.type):<22} {'' if f.nullable else 'not null'}  {doc}")
    return "\n".join(lines)
