"""Streaming ingest of preference-pair sources into the lake."""
from curation.ingest.engine import REASONS, IngestConfig, IngestResult, ingest_file, inspect_image, quarantine_reasons
from curation.ingest.hpdv2 import HPDv2Reader
from curation.ingest.jsonl import CsvReader, JsonlReader
from curation.ingest.pickapic import PickAPicReader
from curation.ingest.raw import RAW, UnreadableSourceError
from curation.ingest.wmt import WMTRankingsReader


# format name -> reader factory; the CLI's --format choices are these keys.
READERS = {
    "pickapic": PickAPicReader,
    "hpdv2": HPDv2Reader,
    "jsonl": JsonlReader,
    "csv": CsvReader,
    "wmt": WMTRankingsReader,
}


def make_reader(fmt: str, **options):
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(sorted(READERS))}")
    return READERS[fmt](**options)


__all__ = ["RAW", "READERS", "REASONS", "IngestConfig", "IngestResult", "PickAPicReader", "UnreadableSourceError",
           "ingest_file", "inspect_image", "make_reader", "quarantine_reasons"]
