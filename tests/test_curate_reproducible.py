"""Reproducible curation: the same lake curated twice gives byte-identical curation files, however many
threads DuckDB uses (its joins emit rows in a varying order, and parallel float sums, DuckDB's and
polars' group_by, vary in the last bits), and the label model does not depend on the order of its rows."""
from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from prefcurate.curation.labels.annotators import annotator_rows, annotator_table, dawid_skene_pairs
from prefcurate.curation.labels.curate import (
    CurateConfig, compute_tables, curate, current_run, load_pairs, load_scores,
)
from prefcurate.curation.store.lake import Lake
from prefcurate.curation.labels.reliability import label_reliability
from tests.test_curate_chunks import small_lake

TABLES = ("votes", "consensus", "pair_metrics", "annotators", "scorer_reliability")


def _run_files(lake: Lake) -> dict[str, bytes]:
    run = current_run(lake)["run_id"]
    return {name: open(lake.join("curation", run, f"{name}.parquet"), "rb").read() for name in TABLES}


@pytest.mark.parametrize("chunk_pairs", [37, 10_000])
def test_curating_copies_of_a_lake_gives_byte_identical_files(tmp_path, chunk_pairs):
    lake = small_lake(tmp_path / "lake", n_pairs=600, seed=4)
    files = []
    for i, threads in enumerate((1, 8, 8, 3)):
        copy = shutil.copytree(lake.root, tmp_path / f"copy{i}")
        curate(Lake(str(copy)), chunk_pairs=chunk_pairs, duckdb_threads=threads)
        files.append(_run_files(Lake(str(copy))))
    for other in files[1:]:
        for name in TABLES:
            assert other[name] == files[0][name], name
    votes = pl.read_parquet(glob.glob(os.path.join(str(tmp_path / "copy0"), "curation", "*", "votes.parquet"))[0])
    assert votes.height > 1000  # the lake has votes worth comparing


def test_the_label_model_and_annotator_table_do_not_depend_on_row_order(tmp_path):
    lake = small_lake(tmp_path / "lake", n_pairs=600, seed=5)
    pairs, scores = load_pairs(lake), load_scores(lake, None)
    tables = compute_tables(pairs, scores, ["exposure", "hpsv2", "sharpness"], CurateConfig())
    votes = tables["votes"]
    want_pairs, want_scorers = label_reliability(pairs, votes)
    want_annotators = annotator_table(annotator_rows(pairs, tables["consensus"], tables["pair_metrics"]))
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(pairs.height)
        shuffled = pairs[order]
        got_pairs, got_scorers = label_reliability(shuffled, votes.sample(fraction=1.0, shuffle=True, seed=seed))
        assert got_scorers.equals(want_scorers)
        assert got_pairs.equals(want_pairs[order])
        # the annotator table sums over rows in their order (curate gives it a fixed one): equal up to rounding
        rows = annotator_rows(shuffled, tables["consensus"][order], tables["pair_metrics"][order])
        assert_frame_equal(annotator_table(rows), want_annotators, rel_tol=1e-12, abs_tol=1e-15)


def test_dawid_skene_sufficient_statistics_do_not_depend_on_label_order():
    rng = np.random.default_rng(0)
    n, workers, items = 3000, 40, 900
    worker, item = rng.integers(0, workers, n), rng.integers(0, items, n)
    flipped, chose_0 = rng.random(n) < 0.5, rng.random(n) < 0.6
    prior = rng.choice([0.25, 0.5, 0.75], items)
    want = dawid_skene_pairs(worker, item, flipped, chose_0, prior, n_workers=workers)
    order = rng.permutation(n)
    got = dawid_skene_pairs(worker[order], item[order], flipped[order], chose_0[order], prior, n_workers=workers)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-12)  # per-item sums: up to summation order
