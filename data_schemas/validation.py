"""Check a batch against a table schema and report every problem at once."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from prefcurate.data_schemas.tables import SCHEMA_VERSION


class SchemaError(ValueError):
    """A batch does not fit its table schema; `problems` lists every mismatch found."""

    def __init__(self, table: str, problems: list[str]):
        self.table = table
        self.problems = problems
        super().__init__(f"{table}: {len(problems)} schema problem(s): " + "; ".join(problems))


def validate(batch: pa.Table | pa.RecordBatch, schema: pa.Schema) -> list[str]:
    """Every way `batch` differs from `schema`: missing, extra or mistyped columns, nulls where
    none are allowed, and a newer schema version in the batch's own metadata. Empty list = valid."""
    problems: list[str] = []
    meta = batch.schema.metadata or {}
    version = meta.get(b"prefcurate.schema_version")
    if version is not None and int(version) > SCHEMA_VERSION:
        problems.append(f"written with schema version {int(version)}, this prefcurate reads up to {SCHEMA_VERSION}")
    names = set(batch.schema.names)
    for field in schema:
        if field.name not in names:
            problems.append(f"missing column {field.name!r} ({field.type})")
            continue
        column = batch.column(field.name)
        if not column.type.equals(field.type):
            problems.append(f"column {field.name!r} has type {column.type}, expected {field.type}")
        if not field.nullable and column.null_count:
            problems.append(f"column {field.name!r} has {column.null_count} null(s) but is not nullable")
    extra = sorted(names - set(schema.names))
    if extra:
        problems.append(f"unexpected column(s) {extra}")
    return problems


def conform(batch: pa.Table | pa.RecordBatch, schema: pa.Schema) -> pa.Table:
    """Return `batch` as a Table in `schema`'s column order, with safe casts applied
    (e.g. int32 -> int64, large_string -> string). Raises SchemaError listing every problem
    that a safe cast cannot fix."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    problems: list[str] = []
    columns = []
    for field in schema:
        if field.name not in table.schema.names:
            problems.append(f"missing column {field.name!r} ({field.type})")
            continue
        column = table.column(field.name)
        if not column.type.equals(field.type):
            try:
                column = pc.cast(column, field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                problems.append(f"column {field.name!r} of type {column.type} cannot become {field.type}: {exc}")
                continue
        if not field.nullable and column.null_count:
            problems.append(f"column {field.name!r} has {column.null_count} null(s) but is not nullable")
        columns.append(column)
    extra = sorted(set(table.schema.names) - set(schema.names))
    if extra:
        problems.append(f"unexpected column(s) {extra}")
    if problems:
        raise SchemaError(schema.metadata.get(b"prefcurate.table", b"?").decode(), problems)
    return pa.Table.from_arrays(columns, schema=schema)
