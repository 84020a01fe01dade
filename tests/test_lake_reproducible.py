"""Reproducible rows: the same input into two lakes gives byte-identical tables, apart from ingest times."""
from __future__ import annotations

import glob
import os
import re

import pyarrow as pa

from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
from prefcurate.curation.store.lake import Lake
from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample
from prefcurate.curation.scorers.runner import run_scoring
from prefcurate.data_schemas import TABLES

TIMES = ("started_at", "finished_at")  # ingest times: the only columns allowed to differ


def _table_bytes(lake: Lake, table: str) -> bytes:
    rows = lake.read(table)
    rows = rows.drop_columns([c for c in TIMES if c in rows.column_names])
    rows = rows.sort_by([(c, "ascending") for c in rows.column_names
                         if not pa.types.is_binary(rows.schema.field(c).type)])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    return sink.getvalue().to_pybytes()


def test_the_same_input_twice_gives_byte_identical_tables(tmp_path):
    # the sample plants every ingest defect (corrupt images, NaN labels, empty prompts, ...): quarantine has rows
    paths = generate_sample(str(tmp_path / "sample"), SampleConfig(seed=3, n_prompts=16, n_rows=240,
                                                                   n_annotators=20, image_size=32))
    shards = sorted(glob.glob(os.path.join(str(paths.pickapic_dir), "*.parquet")))[:2]
    lakes = []
    for name in ("a", "b"):
        lake = Lake(str(tmp_path / name), create=True)
        for shard in shards:
            ingest_file(lake, shard, IngestConfig("pickapic", "pickapic"), make_reader("pickapic", batch_rows=50))
        run_scoring(lake, ["sharpness", "exposure"], workers=0)
        lakes.append(lake)
    a, b = lakes
    assert a.read("quarantine").num_rows > 0 and a.read("scores").num_rows > 0
    for table in TABLES:
        assert _table_bytes(a, table) == _table_bytes(b, table), table
    # (a clock reading in a content column would already differ above; `raw` keeps the source's created_at)
    for column in ("detail", "raw"):  # no memory addresses
        for text in a.read("quarantine").column(column).to_pylist():
            assert not re.search(r" at 0x[0-9a-f]+", text), text
