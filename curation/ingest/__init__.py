"""Streaming ingest of preference-pair sources into the lake."""
from curation.ingest.engine import REASONS, IngestConfig, IngestResult, ingest_file, inspect_image, quarantine_reasons
from curation.ingest.pickapic import PickAPicReader
from curation.ingest.raw import RAW, UnreadableSourceError


# format name -> reader factory; the CLI's --format choices are these keys.
READERS = {
    "pickapic": PickAPicReader,
}


def make_reader(fmt: str, **options):
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(sorted(READERS))}")
    return READERS[fmt](**options)


__all__ = ["RAW", "READERS", "REASONS", "IngestConfig", "IngestResult", "PickAPicReader", "UnreadableSourceError",
           "ingest_file", "inspect_image", "make_reader", "quarantine_reasons"]
