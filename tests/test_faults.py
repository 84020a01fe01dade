"""The fault suite (`make faults`, marker `faults`): kill -9 at every step of every writer, then rerun and
compare with an uninterrupted run; bad inputs, each with its expected count, message and exit code.

Kills use the lake's documented hook (PREFCURATE_FAULT=<point>[:<n>], curation/store/lake.py): the process sends
itself SIGKILL at that point of a real run in a subprocess. One case kills a scoring run from outside at an
arbitrary moment instead. After every kill a reader that runs no recovery checks that what it sees
reconciles (every visible ingest has n_read = n_accepted + n_duplicates + n_quarantined, and the visible
tables hold exactly those rows); then the stage is rerun and the rest of the pipeline run, and the
lake's content must equal the uninterrupted run's.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefcurate.curation.store.lake import Lake
from prefcurate.data_schemas import TABLES, UNIQUE_KEYS
from prefcurate.cli.main import main

pytestmark = pytest.mark.faults

STAGE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from prefcurate.curation.store.lake import Lake
    stage, root, shard = sys.argv[1], sys.argv[2], sys.argv[3]
    lake = Lake(root, create=True)
    if stage == "ingest":
        from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
        ingest_file(lake, shard, IngestConfig("pickapic", "pickapic"), make_reader("pickapic", batch_rows=40))
    elif stage == "score":
        from prefcurate.curation.scorers.runner import ScoringConfig, run_scoring
        run_scoring(lake, ["sharpness", "exposure"], config=ScoringConfig(batch_size=8, workers=0, commit_every=1))
    elif stage == "curate":
        from prefcurate.curation.labels.curate import curate
        curate(lake)
    elif stage == "snapshot":
        from prefcurate.curation.snapshot import SnapshotPolicy, write_snapshot
        if os.environ.get("KILL_BEFORE_SNAPSHOT_RENAME"):
            real_mv = lake.fs.mv
            def mv(src, dst, *a, **k):
                if "_staging-" in src:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_mv(src, dst, *a, **k)
            lake.fs.mv = mv
        write_snapshot(lake, "plain", SnapshotPolicy(kind="plain"))
""")
STAGES = ("ingest0", "ingest1", "score", "curate", "snapshot")


def _run_stage(stage: str, root: str, shards: list[str], fault: str | None = None, extra_env: dict | None = None,
               wait: bool = True):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), **(extra_env or {}))
    env.pop("PREFCURATE_FAULT", None)
    if fault:
        env.update(PREFCURATE_FAULT=fault, PREFCURATE_FAULT_ACTION="kill")
    shard = shards[int(stage[-1])] if stage.startswith("ingest") else ""
    args = [sys.executable, "-c", STAGE_SCRIPT, stage.rstrip("01"), root, shard]
    if not wait:
        return subprocess.Popen(args, env=env)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def content(lake: Lake) -> dict[str, str]:
    """sha256 of each table's rows (sorted, ingest times dropped), of the curation run and of the snapshots."""
    digests = {}
    for table in TABLES:
        rows = lake.read(table)
        rows = rows.drop_columns([c for c in ("started_at", "finished_at") if c in rows.column_names])
        rows = rows.sort_by([(c, "ascending") for c in rows.column_names if not pa.types.is_binary(
            rows.schema.field(c).type)])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as writer:
            writer.write_table(rows)
        digests[table] = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
    from prefcurate.curation.labels.curate import current_run

    # The run id names the score files, whose txids are random: compare its tables, every one of them
    # (curation is deterministic: tests/test_curate_reproducible.py).
    run = current_run(lake)
    for name in ("votes", "consensus", "pair_metrics", "annotators", "scorer_reliability"):
        path = lake.join("curation", run["run_id"], f"{name}.parquet") if run else None
        if path and os.path.exists(path):
            rows = pq.read_table(path)
            digests[name] = hashlib.sha256(str(rows.sort_by([(c, "ascending") for c in rows.column_names
                                                             if not pa.types.is_binary(rows.schema.field(c).type)])
                                               .to_pylist()).encode()).hexdigest()
    snapshots = sorted(os.path.basename(p) for p in glob.glob(lake.join("snapshots", "*"))
                       if os.path.exists(os.path.join(p, "manifest.json")))
    digests["snapshots"] = ",".join(snapshots)
    return digests


def reconciles(root: str) -> tuple[int, int]:
    """What a reader sees (no recovery), checked: returns (visible ingests, visible score rows)."""
    lake = Lake(root)
    ingests = lake.read("ingests").to_pylist()
    for row in ingests:
        assert row["n_read"] == row["n_accepted"] + row["n_duplicates"] + row["n_quarantined"], row
    assert lake.read("pairs").num_rows == sum(r["n_accepted"] for r in ingests)
    assert lake.read("quarantine").num_rows == sum(r["n_quarantined"] for r in ingests)
    from prefcurate.curation.store.sql import query

    assert query(lake, "SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": lake.read("pairs").num_rows}]
    for table, key in UNIQUE_KEYS.items():
        rows = lake.read(table, columns=list(key))
        assert len(set(zip(*(rows.column(c).to_pylist() for c in key)))) == rows.num_rows, table
    return len(ingests), lake.read("scores").num_rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two small Pick-a-Pic-shaped shards, and the lake after each stage of an uninterrupted run."""
    from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample

    root = tmp_path_factory.mktemp("faults")
    paths = generate_sample(str(root / "sample"), SampleConfig(seed=1, n_prompts=16, n_rows=240, n_annotators=20,
                                                                image_size=32))
    shards = sorted(glob.glob(os.path.join(str(paths.pickapic_dir), "*.parquet")))[:2]
    before = {}
    lake_root = str(root / "reference")
    for stage in STAGES:
        before[stage] = str(root / f"before-{stage}")
        if os.path.exists(lake_root):
            shutil.copytree(lake_root, before[stage])
        done = _run_stage(stage, lake_root, shards)
        assert done.returncode == 0, done.stderr
    return {"root": root, "shards": shards, "before": before, "reference": content(Lake(lake_root))}


def _finish_from(stage: str, root: str, shards: list[str]) -> None:
    """Rerun `stage` and run the later ones, in this process (as the uninterrupted run did in subprocesses)."""
    from prefcurate.curation.labels.curate import curate
    from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
    from prefcurate.curation.scorers.runner import ScoringConfig, run_scoring
    from prefcurate.curation.snapshot import SnapshotPolicy, write_snapshot

    lake = Lake(root, create=True)
    for later in STAGES[STAGES.index(stage):]:
        if later.startswith("ingest"):
            ingest_file(lake, shards[int(later[-1])], IngestConfig("pickapic", "pickapic"),
                        make_reader("pickapic", batch_rows=40))
        elif later == "score":
            run_scoring(lake, ["sharpness", "exposure"], config=ScoringConfig(batch_size=8, workers=0, commit_every=1))
        elif later == "curate":
            curate(lake)
        else:
            write_snapshot(lake, "plain", SnapshotPolicy(kind="plain"))


KILL_POINTS = [
    ("ingest0", "before_flush:1"), ("ingest0", "after_flush:2"), ("ingest0", "before_commit_record"),
    ("ingest0", "after_commit_record"), ("ingest0", "after_move:1"), ("ingest0", "after_move:3"),
    ("ingest0", "before_log"), ("ingest0", "after_log"), ("ingest0", "after_cleanup"),
    ("ingest1", "after_move:2"), ("ingest1", "before_log"),
    ("score", "before_commit_record:2"), ("score", "after_move:3"), ("score", "after_log:4"),
    ("curate", "after_derived_file:2"), ("snapshot", "KILL_BEFORE_SNAPSHOT_RENAME"),
]
FIGURES: dict[str, int] = {"kill points": 0, "recovered identically": 0}


@pytest.fixture(scope="module", autouse=True)
def _print_figures(request):
    """The suite's figures, printed once at the end of the module for the report."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and FIGURES["kill points"]:
        reporter.write_line(f"fault suite: {FIGURES['kill points']} kill points tried, "
                            f"{FIGURES['recovered identically']} recovered identically")


@pytest.mark.parametrize("stage, point", KILL_POINTS, ids=[f"{s}-{p}" for s, p in KILL_POINTS])
def test_kill_9_at_a_step_then_rerun_gives_the_uninterrupted_content(world, tmp_path, stage, point):
    root = str(tmp_path / "lake")
    if os.path.exists(world["before"][stage]):
        shutil.copytree(world["before"][stage], root)
    kw = ({"extra_env": {point: "1"}} if point.isupper() else {"fault": point})
    crashed = _run_stage(stage, root, world["shards"], **kw)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    FIGURES["kill points"] += 1
    if os.path.exists(os.path.join(root, "_lake.json")):
        seen_ingests, _ = reconciles(root)
        n_before = int(stage == "ingest1") + (2 if stage in ("score", "curate", "snapshot") else 0)
        assert seen_ingests in (n_before, n_before + 1) if stage.startswith("ingest") else seen_ingests == n_before
        if point in ("before_flush:1", "after_flush:2", "before_commit_record", "after_commit_record",
                     "after_move:1", "after_move:3", "before_log") and stage.startswith("ingest"):
            assert seen_ingests == n_before  # decided or not, the transaction is invisible until its log entry
    _finish_from(stage, root, world["shards"])
    assert content(Lake(root)) == world["reference"]
    assert Lake(root).verify()["problems"] == []
    FIGURES["recovered identically"] += 1


def test_kill_9_from_outside_during_scoring(world, tmp_path):
    """Not at a chosen point: SIGKILL from the parent once the run has committed twice."""
    root = str(tmp_path / "lake")
    shutil.copytree(world["before"]["score"], root)
    n_log = len(os.listdir(os.path.join(root, "_log")))
    process = _run_stage("score", root, world["shards"], wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(os.listdir(os.path.join(root, "_log"))) < n_log + 2:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    reconciles(root)
    _finish_from("score", root, world["shards"])
    assert content(Lake(root)) == world["reference"]


# -- bad inputs: count, message, exit code -------------------------------------------------------------------

def _ingest_cli(root, path, capsys) -> tuple[int, str]:
    code = main(["ingest", "--lake", root, "--format", "pickapic", str(path)])
    captured = capsys.readouterr()
    return code, captured.err


def test_truncated_parquet_is_refused_and_writes_nothing(world, tmp_path, capsys):
    data = open(world["shards"][0], "rb").read()
    bad = tmp_path / "train-truncated.parquet"
    bad.write_bytes(data[: len(data) // 2])
    root = str(tmp_path / "lake")
    code, err = _ingest_cli(root, bad, capsys)
    assert code == 3 and err.count("\n") == 1 and str(bad) in err
    if os.path.exists(os.path.join(root, "_lake.json")):
        assert all(Lake(root).files(t) == [] for t in TABLES)


def test_wrong_typed_parquet_rows_are_quarantined_with_a_reason(tmp_path, capsys):
    bad = tmp_path / "train-typed.parquet"
    pq.write_table(pa.table({"caption": [1, 2], "jpg_0": ["a", "b"], "jpg_1": ["c", "d"], "label_0": ["x", "y"],
                             "label_1": ["y", "x"]}), bad)
    root = str(tmp_path / "lake")
    code, err = _ingest_cli(root, bad, capsys)
    assert code == 0, err
    assert Lake(root).read("quarantine").column("reason").to_pylist() == ["wrong_type", "wrong_type"]
    assert Lake(root).read("pairs").num_rows == 0


def test_zero_row_shard_is_an_ingest_of_nothing(world, tmp_path, capsys):
    empty = tmp_path / "train-empty.parquet"
    pq.write_table(pq.read_table(world["shards"][0]).slice(0, 0), empty)
    root = str(tmp_path / "lake")
    code, err = _ingest_cli(root, empty, capsys)
    assert code == 0, err
    [row] = Lake(root).read("ingests").to_pylist()
    assert (row["n_read"], row["n_accepted"], row["n_quarantined"]) == (0, 0, 0)
    assert Lake(root).read("pairs").num_rows == 0


def test_newer_lake_version_is_refused_by_readers_and_writers(world, tmp_path, capsys):
    root = tmp_path / "lake"
    shutil.copytree(world["before"]["score"], root)
    (root / "_lake.json").write_text('{"format": "prefcurate-lake", "schema_version": 3}')
    code, err = _ingest_cli(str(root), world["shards"][0], capsys)
    assert code == 3 and err.count("\n") == 1 and "upgrade prefcurate" in err
    assert main(["sql", "--lake", str(root), "SELECT count(*) FROM pairs"]) == 3
    assert "upgrade prefcurate" in capsys.readouterr().err


def test_flipped_bytes_in_a_lake_part_file_are_named(world, tmp_path, capsys):
    root = tmp_path / "lake"
    shutil.copytree(world["before"]["score"], root)
    lake = Lake(str(root))
    [victim] = [f for f in lake.files("pairs")][:1]
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(victim, "wb").write(bytes(data))
    assert main(["verify", "--lake", str(root)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of " in err and lake.relative(victim) in err
    with pytest.raises(Exception, match=lake.relative(victim)):
        lake.read("pairs")  # Parquet page checksums, verified by every Lake.read


def test_a_snapshot_file_changed_after_writing_is_named(world, tmp_path, capsys):
    root = tmp_path / "lake"
    shutil.copytree(os.path.join(world["root"], "reference"), root)
    [shard] = glob.glob(str(root / "snapshots" / "*" / "shards" / "*.parquet"))
    with open(shard, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert main(["verify", "--lake", str(root)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match its manifest hash" in err
    from prefcurate.curation.snapshot import SnapshotError, verify_snapshot

    with pytest.raises(SnapshotError, match="shards/shard-00000.parquet does not match its manifest hash"):
        verify_snapshot(os.path.dirname(os.path.dirname(shard)))  # what training checks before it reads


# -- bad inputs of the contained-input rules: prompt and pixel limits, paths, special files ------------------

def _cli(args: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    """The real `prefcurate` command in a subprocess with a timeout: a regression that blocks on a FIFO or a
    device fails the test instead of hanging CI."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-c", "from prefcurate.cli.main import entry; entry()", *args], env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def _reasons(root: str) -> dict[str, int]:
    from prefcurate.curation.ingest import quarantine_reasons

    return quarantine_reasons(Lake(root))


def test_a_1_mb_prompt_is_quarantined_as_prompt_too_long(tmp_path):
    from tests.test_ingest_pickapic import GREEN, row, write_shard

    shard = write_shard(tmp_path / "train-0.parquet", [row(0), row(1, caption="x" * (1 << 20), jpg_1=GREEN)])
    root = str(tmp_path / "lake")
    done = _cli(["ingest", "--lake", root, "--format", "pickapic", shard])
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "read 2 = accepted 1 + duplicates 0 + quarantined 1" in done.stdout
    assert _reasons(root) == {"prompt_too_long": 1}
    [q] = Lake(root).read("quarantine").to_pylist()
    assert "1048576 UTF-8 bytes, more than the limit of 8192" in q["detail"] and len(q["raw"]) < 1000


def test_a_decompression_bomb_png_header_is_quarantined_before_any_decode(tmp_path):
    from tests.test_ingest_pickapic import BOMB_PNG, GREEN, row, write_shard

    shard = write_shard(tmp_path / "train-0.parquet", [row(0), row(1, jpg_0=BOMB_PNG, jpg_1=GREEN)])
    root = str(tmp_path / "lake")
    done = _cli(["ingest", "--lake", root, "--format", "pickapic", shard])
    assert done.returncode == 0 and "read 2 = accepted 1 + duplicates 0 + quarantined 1" in done.stdout
    assert _reasons(root) == {"image_too_large": 1}
    assert len(BOMB_PNG) < 128 and Lake(root).read("images").num_rows == 2  # the bomb is not stored
    [q] = Lake(root).read("quarantine").to_pylist()
    assert "12000x12000 = 144000000 pixels, more than the limit of 89478485" in q["detail"]


def _contained_case(tmp_path) -> tuple[str, str]:
    import json

    from PIL import Image

    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    for folder, name, colour in ((root, "a.png", (1, 2, 3)), (root, "b.png", (4, 5, 6)),
                                 (outside, "x.png", (7, 8, 9))):
        Image.new("RGB", (8, 8), colour).save(folder / name)
    (root / "link.png").symlink_to(outside / "x.png")
    os.mkfifo(root / "pipe.png")
    lines = [("a.png", "b.png"), (str(outside / "x.png"), "b.png"), ("../elsewhere/x.png", "b.png"),
             ("link.png", "a.png"), ("/dev/zero", "a.png"), ("pipe.png", "a.png")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "image_0": a, "image_1": b, "label": 1}) + "\n"
                            for i, (a, b) in enumerate(lines)))
    return str(root), str(path)


def test_image_paths_outside_the_root_and_through_symlinks_are_quarantined(tmp_path):
    image_root, source = _contained_case(tmp_path)
    root = str(tmp_path / "lake")
    done = _cli(["ingest", "--lake", root, "--format", "jsonl", "--image-root", image_root, source])
    assert done.returncode == 0, done.stderr
    assert "read 6 = accepted 1 + duplicates 0 + quarantined 5" in done.stdout
    assert _reasons(root) == {"image_outside_root": 4, "not_a_regular_file": 1}  # /dev/zero is outside too


def test_dev_zero_and_a_fifo_are_refused_without_being_read_even_when_outside_paths_are_allowed(tmp_path):
    image_root, source = _contained_case(tmp_path)
    root = str(tmp_path / "lake")
    done = _cli(["ingest", "--lake", root, "--format", "jsonl", "--image-root", image_root, "--allow-outside-root",
                 source])
    assert done.returncode == 0, done.stderr
    assert "read 6 = accepted 4 + duplicates 0 + quarantined 2" in done.stdout
    assert _reasons(root) == {"not_a_regular_file": 2}
    details = sorted(q["detail"] for q in Lake(root).read("quarantine").to_pylist())
    assert details == ["image path /dev/zero is not a regular file",
                       f"image path {image_root}/pipe.png is not a regular file"]
