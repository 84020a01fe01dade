"""Streaming ingest of preference-pair sources into the lake."""
from prefcurate.curation.ingest.engine import (
    IngestConfig, IngestResult, ingest_file, inspect_image, quarantine_reasons,
)
from prefcurate.curation.ingest.hpdv2 import HPDv2Reader
from prefcurate.curation.ingest.jsonl import CsvReader, JsonlReader
from prefcurate.curation.ingest.pickapic import PickAPicReader
from prefcurate.curation.ingest.raw import RAW, UnreadableSourceError
from prefcurate.curation.ingest.rules import REASONS
from prefcurate.curation.ingest.wmt import WMTRankingsReader
from prefcurate.data_schemas.vocab import INPUT_FORMATS


# format name -> reader factory, one per name of data_schemas.vocab.INPUT_FORMATS (the CLI's --format choices);
# a name without a reader fails at import.
_BY_FORMAT = {reader.format: reader for reader in (PickAPicReader, HPDv2Reader, JsonlReader, CsvReader,
                                                   WMTRankingsReader)}
READERS = {fmt: _BY_FORMAT[fmt] for fmt in INPUT_FORMATS}


def make_reader(fmt: str, **options):
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(sorted(READERS))}")
    return READERS[fmt](**options)


__all__ = ["RAW", "READERS", "REASONS", "IngestConfig", "IngestResult", "PickAPicReader", "UnreadableSourceError",
           "ingest_file", "inspect_image", "make_reader", "quarantine_reasons"]
