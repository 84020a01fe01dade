"""The command line: one-shot commands run their stage in-process with no Prefect server (and without
importing Prefect); every input error is one line on stderr with exit code 3; concurrent ingests queue on the
lake's lock; `train --num-processes 2` runs two ranks; the demo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prefcurate.curation.store.lake import Lake
from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample
from prefcurate.curation.store.sql import query
from prefcurate.cli.main import main
from tests.test_ingest_pickapic import GREEN, _many_rows, row, write_shard


ENV = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "PYTHONPATH": os.getcwd()}


def _cli(*argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefcurate.cli", *argv], env=env or ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory):
    """The small embedded sample ingested, scored with two pixel scorers, curated: (lake root, sample paths)."""
    root = tmp_path_factory.mktemp("cli")
    sample = generate_sample(root / "sample", SampleConfig.small())
    lake = str(root / "lake")
    shards = sorted(str(p) for p in sample.pickapic_dir.glob("*.parquet"))
    assert main(["ingest", "--lake", lake, "--format", "pickapic", *shards]) == 0
    assert main(["score", "--lake", lake, "--scorers", "sharpness,exposure", "--workers", "0"]) == 0
    assert main(["curate", "--lake", lake]) == 0
    return lake, sample


def test_cli_ingest_reports_counts_and_unreadable_files(tmp_path, capsys):
    good = write_shard(tmp_path / "train-0.parquet", [row(0), row(1, jpg_1=GREEN), row(1, jpg_1=GREEN),
                                                     row(2, caption="")])
    bad = tmp_path / "train-1.parquet"
    bad.write_bytes(b"definitely not parquet")
    lake = str(tmp_path / "lake")
    code = main(["ingest", "--lake", lake, "--format", "pickapic", good, str(bad)])
    out, err = capsys.readouterr()
    assert code == 3  # one file was unreadable: reported, the other still ingested
    assert "read 4 = accepted 2 + duplicates 1 + quarantined 1" in out
    assert err.splitlines() == [f"prefcurate ingest: error: {bad}: not a Parquet file (--format pickapic reads "
                                "Pick-a-Pic Parquet shards)"]
    assert main(["ingest", "--lake", lake, "--format", "pickapic", good]) == 0
    assert "already ingested" in capsys.readouterr().out
    assert query(Lake(lake), "SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 2}]


def test_one_shot_commands_start_no_server_and_import_no_prefect(tmp_path):
    """ingest, score, curate and snapshot in one process with no server configured: Prefect is never imported
    (so no temporary server can start), and the work is done."""
    sample = generate_sample(tmp_path / "sample", SampleConfig.small())
    script = textwrap.dedent("""
        import sys
        from prefcurate.cli.main import main
        lake, shards = sys.argv[1], sys.argv[2:]
        for argv in (["ingest", "--lake", lake, "--format", "pickapic", *shards],
                     ["score", "--lake", lake, "--scorers", "colourfulness", "--workers", "0"],
                     ["curate", "--lake", lake], ["snapshot", "--lake", lake, "--name", "s", "--policy", "adaptive"]):
            assert main(argv) == 0, argv
        print("prefect imported:", sorted(m for m in sys.modules if m.split(".")[0] == "prefect"))
    """)
    shards = sorted(str(p) for p in sample.pickapic_dir.glob("*.parquet"))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lake"), *shards], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "prefect imported: []"
    assert "snapshot written: s = " in done.stdout and "colourfulness: " in done.stdout


def _one_error_line(capsys, command: str) -> str:
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, (out, err)
    assert err.startswith(f"prefcurate {command}: error: ")
    return err.strip()


def test_ingest_input_errors_are_one_line_and_create_no_lake(tmp_path, capsys):
    lake = tmp_path / "lake"
    text = tmp_path / "train-0.parquet"
    text.write_text("not parquet at all")
    cases = [(str(tmp_path / "missing.parquet"), "no such file"),
             (str(tmp_path), "is a directory, not a source file"),
             (str(text), "not a Parquet file")]
    for path, what in cases:
        assert main(["ingest", "--lake", str(lake), "--format", "pickapic", path]) == 3
        assert _one_error_line(capsys, "ingest") == f"prefcurate ingest: error: {path}: {what}" + (
            " (--format pickapic reads Pick-a-Pic Parquet shards)" if what == "not a Parquet file" else "")
    assert not lake.exists()  # nothing could be ingested: no _lake.json either
    unreadable = tmp_path / "locked.jsonl"
    unreadable.write_text("{}\n")
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # root can read anything
        assert main(["ingest", "--lake", str(lake), "--format", "jsonl", str(unreadable)]) == 3
        assert "cannot be read" in _one_error_line(capsys, "ingest")


def test_input_errors_of_other_commands_are_one_line_exit_3(tmp_path, capsys, small_lake):
    lake, _ = small_lake
    missing = str(tmp_path / "nolake")
    for argv in (["curate", "--lake", missing], ["score", "--lake", missing, "--scorers", "sharpness"],
                 ["snapshot", "--lake", missing, "--name", "a"], ["sql", "--lake", missing, "SELECT 1"]):
        assert main(argv) == 3
        assert _one_error_line(capsys, argv[0]).endswith(f"no lake at {missing} (missing _lake.json); create one "
                                                          "with `prefcurate ingest`")
    assert main(["snapshot", "--lake", lake, "--name", "bad name"]) == 3
    assert _one_error_line(capsys, "snapshot") == ("prefcurate snapshot: error: snapshot name 'bad name' must be "
                                                   "1-128 characters of letters, digits, '_', '.', '-'")
    assert main(["sql", "--lake", lake, "SELECT * FROM nope"]) == 3
    assert "Table with name nope does not exist" in _one_error_line(capsys, "sql")


def test_sql_writes_binary_columns_as_hex(capsys, small_lake):
    lake, _ = small_lake
    for fmt in ("csv", "json"):
        assert main(["sql", "--lake", lake, "--format", fmt, "SELECT image_id, bytes FROM images ORDER BY image_id "
                     "LIMIT 2"]) == 0
        out = capsys.readouterr().out
        expected = [(r["image_id"], r["bytes"].hex()) for r in
                    query(Lake(lake), "SELECT image_id, bytes FROM images ORDER BY image_id LIMIT 2").to_pylist()]
        if fmt == "csv":
            assert out.splitlines() == ["image_id,bytes", *(f"{i},{b}" for i, b in expected)]
        else:
            assert [(r["image_id"], r["bytes"]) for r in json.loads(out)] == expected
        assert expected[0][1].startswith(("ffd8", "89504e47"))  # JPEG or PNG magic, as hex


def test_tables_into_a_closed_pipe_exits_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "prefcurate.cli", "tables"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # `| head -1`: read one line, then close the pipe
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and first.startswith(b"pairs") and err == b""


def test_version_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("prefcurate ")
    assert main(["ingest", "--lake", "l", "--format", "nope", "x.parquet"]) == 3
    assert _one_error_line(capsys, "ingest") == ("prefcurate ingest: error: unknown format 'nope'; formats: "
                                                 "csv, hpdv2, jsonl, pickapic, wmt")
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--lake", "x"])  # missing SOURCE: argparse's usage error
    assert exit_info.value.code == 2


def test_version_is_the_installed_distribution_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"prefcurate {version('prefcurate')}\n"
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout == f"prefcurate {version('prefcurate')}\n", done.stderr


def test_snapshot_default_policy_and_choices_come_from_the_vocabulary(small_lake):
    from prefcurate.cli.main import build_parser
    from prefcurate.data_schemas.vocab import DEFAULT_SNAPSHOT_POLICY, LOSS_TYPES, SNAPSHOT_POLICIES

    parser = build_parser()
    assert DEFAULT_SNAPSHOT_POLICY == "adaptive"
    assert parser.parse_args(["snapshot", "--lake", "l", "--name", "n"]).policy == DEFAULT_SNAPSHOT_POLICY
    serve = parser.parse_args(["serve", "--lake", "l", "--landing", "x", "--interval", "1"])
    assert serve.policy == DEFAULT_SNAPSHOT_POLICY
    for argv in (["snapshot", "--lake", "l", "--name", "n", "--policy", "nope"],
                 ["train", "--snapshot", "s", "--model", "m", "--output", "o", "--loss", "nope"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
    assert [parser.parse_args(["snapshot", "--lake", "l", "--name", "n", "--policy", p]).policy
            for p in SNAPSHOT_POLICIES] == list(SNAPSHOT_POLICIES)
    assert [parser.parse_args(["train", "--snapshot", "s", "--model", "m", "--output", "o", "--loss", loss]).loss
            for loss in LOSS_TYPES] == list(LOSS_TYPES)
    lake, _ = small_lake
    assert main(["snapshot", "--lake", lake, "--name", "default"]) == 0  # no --policy: the written one is adaptive
    from prefcurate.curation.snapshot import resolve_snapshot

    manifest = json.loads((Path(resolve_snapshot(Lake(lake), "default")) / "manifest.json").read_text())
    assert manifest["policy"]["kind"] == DEFAULT_SNAPSHOT_POLICY


def test_cli_modules_import_nothing_heavy_and_flows_do_not_import_cli():
    """`prefcurate --help` stays fast: the cli package imports no torch, Polars, pyarrow or Prefect (the
    data_schemas package loads its Arrow schemas on first use, so reading its vocab costs nothing); and the
    flows never reach back into the command line."""
    script = ("import sys; import prefcurate.cli.main; import prefcurate.flows.stages; "
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'polars', 'pyarrow', 'prefect'}))")
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    flows_dir = Path(__file__).resolve().parents[1] / "flows"
    for path in flows_dir.glob("*.py"):
        text = path.read_text()
        assert "from cli" not in text and "import cli" not in text, path


def test_train_with_a_missing_model_is_one_line_in_under_a_second(tmp_path, small_lake):
    lake, _ = small_lake
    assert main(["snapshot", "--lake", lake, "--name", "t"]) == 0
    started = time.perf_counter()
    done = _cli("train", "--lake", lake, "--snapshot", "t", "--model", str(tmp_path / "nomodel"), "--output",
                str(tmp_path / "out"), "--max-steps", "1")
    seconds = time.perf_counter() - started
    assert done.returncode == 3 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"prefcurate train: error: model folder {tmp_path / 'nomodel'} does not exist")
    assert seconds < 5  # the interpreter's start included; the check itself imports no torch:
    code = ("import sys, time; from prefcurate.cli.main import main; t = time.perf_counter(); main(sys.argv[1:]); "
            "print(time.perf_counter() - t, 'torch' in sys.modules)")
    timed = subprocess.run([sys.executable, "-c", code, "train", "--lake", lake, "--snapshot", "t", "--model",
                            str(tmp_path / "nomodel"), "--output", str(tmp_path / "out")], env=ENV,
                           capture_output=True, text=True, timeout=120)
    seconds, torch_imported = timed.stdout.split()
    assert float(seconds) < 1 and torch_imported == "False"


def test_two_ingests_started_together_both_land(tmp_path):
    """Two `prefcurate ingest` of different shards into one new lake, started 0.2 s apart: the second queues on
    the lake's writer lock; both succeed and every row lands once."""
    shards = [write_shard(tmp_path / f"train-{i}.parquet", _many_rows(1500)[i::2]) for i in range(2)]
    lake = str(tmp_path / "lake")
    procs = []
    for shard in shards:
        procs.append(subprocess.Popen([sys.executable, "-m", "prefcurate.cli", "ingest", "--lake", lake, "--format",
                                       "pickapic", shard], env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        time.sleep(0.2)
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("read 750 = accepted 750" in out for out, _ in outputs)
    assert query(Lake(lake), "SELECT count(*) AS n, count(DISTINCT pair_id) AS d FROM pairs").to_pylist() == [
        {"n": 1500, "d": 1500}]


def test_train_with_two_processes_runs_two_ranks(tmp_path, small_lake):
    from prefcurate.training.checkpoint import find_checkpoint, load_checkpoint
    from prefcurate.training.components import build_tiny_pipeline

    lake, _ = small_lake
    assert main(["snapshot", "--lake", lake, "--name", "two"]) == 0
    model = build_tiny_pipeline(tmp_path / "model", resolution=32)
    out = tmp_path / "run"
    done = _cli("train", "--lake", lake, "--snapshot", "two", "--model", str(model), "--output", str(out),
                "--num-processes", "2", "--max-steps", "1", "--resolution", "32", "--train-batch-size", "1",
                "--no-latent-cache", env={**ENV, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("trained 1 steps on ")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
    _, state = load_checkpoint(find_checkpoint(out, "latest"))  # the final checkpoint records the run's shape
    assert state["identity"]["world_size"] == 2


def test_demo_generates_ingests_and_summarises(tmp_path, capsys):
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


def test_served_runs_are_refused_other_paths(tmp_path, monkeypatch):
    """Inside a run of `prefcurate serve` (its environment names what it serves), the pipeline and the training
    flow refuse any other lake, landing folder, model or output before writing anything."""
    from prefcurate.flows.pipeline import pipeline_flow
    from prefcurate.flows.stages import SERVED_ENV, ServedParameterError, check_served
    from prefcurate.flows.train import train_flow

    lake, landing, runs = tmp_path / "lake", tmp_path / "landing", tmp_path / "runs"
    model = tmp_path / "model"
    monkeypatch.setenv(SERVED_ENV, json.dumps({"lake": str(lake), "landing": str(landing), "train_model": str(model),
                                               "train_output": str(runs)}))
    check_served(lake=str(lake), landing=str(landing), train_output=str(runs / "abc"))  # what it serves: fine
    other = tmp_path / "other"
    with pytest.raises(ServedParameterError, match=rf"^refused: this `prefcurate serve` was started for lake "
                                                   rf"{lake}, and the run asks for {other}; nothing was written$"):
        pipeline_flow.fn(str(other), str(landing))
    with pytest.raises(ServedParameterError, match="started for landing"):
        pipeline_flow.fn(str(lake), str(other))
    with pytest.raises(ServedParameterError, match="started for train output"):
        train_flow.fn("snap", str(model), str(tmp_path / "elsewhere"))
    with pytest.raises(ServedParameterError, match=f"started for train model {model}, and the run asks for m2"):
        train_flow.fn("snap", "m2", str(runs / "abc"))
    assert not other.exists() and not lake.exists()
