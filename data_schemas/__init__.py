"""Arrow schemas of the prefcurate lake tables, and their validation."""
from data_schemas.tables import (
    IMAGE_REFS, IMAGES, INGESTS, PAIRS, QUARANTINE, SCHEMA_VERSION, SCORES, SNAPSHOT_PAIRS, TABLES, UNIQUE_KEYS,
    describe,
)
from data_schemas.validate import SchemaError, conform, validate

__all__ = [
    "IMAGES", "IMAGE_REFS", "INGESTS", "PAIRS", "QUARANTINE", "SCHEMA_VERSION", "SCORES", "SNAPSHOT_PAIRS", "TABLES",
    "UNIQUE_KEYS", "SchemaError", "conform", "describe", "validate",
]
