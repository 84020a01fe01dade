"""The ingest flow through the CLI, in-process, against a temporary Prefect server; and the demo."""
from __future__ import annotations

import json

import pytest

from curation.lake import Lake
from curation.sql import query
from flows.cli import main
from tests.test_ingest_pickapic import GREEN, row, write_shard


def test_cli_ingest_runs_the_flow_and_reports_counts(tmp_path, capsys, prefect_server):
    good = write_shard(tmp_path / "train-0.parquet", [row(0), row(1, jpg_1=GREEN), row(1, jpg_1=GREEN),
                                                     row(2, caption="")])
    bad = tmp_path / "train-1.parquet"
    bad.write_bytes(b"definitely not parquet")
    lake = str(tmp_path / "lake")
    code = main(["ingest", "--lake", lake, "--format", "pickapic", good, str(bad)])
    out, err = capsys.readouterr()
    assert code == 3  # one file was unreadable: reported, the other still ingested
    assert "read 4 = accepted 2 + duplicates 1 + quarantined 1" in out
    assert "not a Parquet file" in err and str(bad) in err
    assert main(["ingest", "--lake", lake, "--format", "pickapic", good]) == 0
    assert "already ingested" in capsys.readouterr().out
    assert query(Lake(lake), "SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 2}]


def test_cli_user_mistakes_give_one_line_and_exit_code_3(tmp_path, capsys):
    assert main(["ingest", "--lake", str(tmp_path / "l"), "--format", "nope", "x.parquet"]) == 3
    assert capsys.readouterr().err.strip() == ("prefcurate ingest: error: unknown format 'nope'; formats: "
                                               "csv, hpdv2, jsonl, pickapic, wmt")
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--lake", "x"])  # missing SOURCE: argparse's usage error
    assert exit_info.value.code == 2


def test_demo_generates_ingests_and_summarises(tmp_path, capsys, prefect_server):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    lake = Lake(str(tmp_path / "demo" / "lake"))
    totals = query(lake, "SELECT sum(n_read) r, sum(n_accepted) a, sum(n_duplicates) d, sum(n_quarantined) q "
                         "FROM ingests").to_pylist()[0]
    assert totals["r"] == totals["a"] + totals["d"] + totals["q"] > 0
    assert f"{totals['r']} rows read = {totals['a']} accepted" in out
    assert "busiest annotators" in out and "quarantine reasons:" in out
    # Every planted defect kind of the sample was caught by the matching quarantine reason.
    truth = json.loads(query(lake, "SELECT to_json(list(DISTINCT reason ORDER BY reason)) AS r FROM quarantine")
                       .to_pylist()[0]["r"])
    assert truth == ["corrupt_image", "empty_prompt", "identical_images", "inconsistent_labels", "nan_label"]
