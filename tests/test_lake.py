"""The lake's commit log, checksums, writer lock, recovery, migration and repair (curation/store/lake.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
from prefcurate.curation.store.lake import InjectedFault, Lake, LakeCorruptError, LakeError, reset_faults
from prefcurate.cli.main import main
from tests.test_ingest_pickapic import GREEN, row, write_shard


def _scores(n: int, scorer: str = "sharpness", start: int = 0) -> pa.Table:
    return pa.table({"image_id": [f"img{i}" for i in range(start, start + n)], "prompt_id": ["p"] * n,
                     "scorer": [scorer] * n, "scorer_version": ["1"] * n,
                     "score": [float(i) for i in range(start, start + n)]})


def _commit_scores(lake: Lake, rows: pa.Table, txid: str, skip_existing: bool = False) -> int:
    with lake.transaction(txid) as tx:
        dropped = tx.write("scores", rows, partition="sharpness", skip_existing=skip_existing)
    return dropped


@pytest.fixture
def lake(tmp_path):
    return Lake(str(tmp_path / "lake"), create=True)


@pytest.fixture
def inject(monkeypatch):
    def arm(point: str, action: str = "raise"):
        monkeypatch.setenv("PREFCURATE_FAULT", point)
        monkeypatch.setenv("PREFCURATE_FAULT_ACTION", action)
        reset_faults()
    yield arm
    reset_faults()


def test_every_file_is_in_the_log_with_rows_bytes_and_sha256(lake):
    _commit_scores(lake, _scores(5), "t1")
    [entry] = lake.log_entries()
    [info] = entry["files"]
    assert (entry["seq"], entry["txid"], info["table"], info["rows"]) == (0, "t1", "scores", 5)
    data = open(lake.join(info["path"]), "rb").read()
    import hashlib

    assert info["bytes"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
    assert lake.files("scores") == [lake.join(info["path"])]
    assert not os.path.exists(lake.join("_staging", "t1"))


def test_exists_answers_for_a_local_path_and_a_file_url(tmp_path):
    root = tmp_path / "lake"
    assert not Lake.exists(str(root)) and not Lake.exists(f"file://{root}")
    Lake(str(root), create=True)
    assert Lake.exists(str(root)) and Lake.exists(f"file://{root}") and Lake.exists(f"file://{root}/")
    assert Lake.exists(Lake(f"file://{root}").root)
    (tmp_path / "not-a-lake").mkdir()
    assert not Lake.exists(f"file://{tmp_path / 'not-a-lake'}")


def test_a_transaction_commits_when_its_block_ends_and_leaves_nothing_when_it_raises(lake):
    with lake.transaction("t1") as tx:
        tx.write("scores", _scores(3), partition="sharpness")
        assert lake.read("scores").num_rows == 0  # invisible until the block ends
    assert lake.read("scores").num_rows == 3 and [e["txid"] for e in lake.log_entries()] == ["t1"]
    with pytest.raises(ValueError, match="stop"):
        with lake.transaction("t2") as tx:
            tx.write("scores", _scores(2, start=3), partition="sharpness")
            raise ValueError("stop")
    assert lake.read("scores").num_rows == 3 and not os.path.exists(lake.join("_staging", "t2"))


def test_a_file_no_log_entry_names_is_never_read(lake):
    _commit_scores(lake, _scores(2), "t1")
    stray = lake.join("scores", "sharpness", "part-stray-00001.parquet")
    pq.write_table(_scores(3, start=10), stray)  # e.g. moved into place by a transaction that then crashed
    assert lake.read("scores").num_rows == 2
    from prefcurate.curation.store.sql import query

    assert query(lake, "SELECT count(*) AS n FROM scores").to_pylist() == [{"n": 2}]


@pytest.mark.parametrize("point", ["before_flush", "after_flush", "before_commit_record"])
def test_an_error_before_the_commit_record_leaves_nothing(lake, inject, point):
    inject(point)
    with pytest.raises(InjectedFault):
        _commit_scores(lake, _scores(4), "t1")
    assert lake.read("scores").num_rows == 0 and lake.log_entries() == []
    assert not os.path.exists(lake.join("_staging", "t1"))


@pytest.mark.parametrize("point", ["after_commit_record", "after_move", "before_log"])
@pytest.mark.parametrize("action", ["raise", "interrupt"])
def test_an_error_after_the_commit_record_rolls_forward_never_half_applies(lake, inject, point, action):
    inject(point, action)
    with pytest.raises((InjectedFault, KeyboardInterrupt)):
        _commit_scores(lake, _scores(4), "t1")
    # abort() rolled the decided transaction forward (the fault fires once): all of it is visible
    assert lake.read("scores").num_rows == 4 and [e["txid"] for e in lake.log_entries()] == ["t1"]
    assert lake.recover() == [] and lake.read("scores").num_rows == 4


def test_writers_never_store_a_key_twice_and_repair_removes_repeats(lake, capsys):
    assert _commit_scores(lake, _scores(4), "t1", skip_existing=True) == 0
    # a second scorer that planned the same work before the first committed
    assert _commit_scores(lake, _scores(6), "t2", skip_existing=True) == 4
    assert lake.read("scores").num_rows == 6
    _commit_scores(lake, _scores(3), "t3")  # a writer that did not ask: repeats land
    assert lake.read("scores").num_rows == 9
    assert lake.repair() == ["scores: removed 3 duplicate row(s) from 1 file(s)"]
    table = lake.read("scores")
    assert table.num_rows == 6 and len(set(table.column("image_id").to_pylist())) == 6
    assert lake.repair() == []
    assert lake.verify()["problems"] == []
    _commit_scores(lake, _scores(1), "t4")
    assert main(["repair", "--lake", lake.root]) == 0
    assert capsys.readouterr().out == "scores: removed 1 duplicate row(s) from 1 file(s)\n"


def test_lock_waits_for_another_process_then_names_it(lake, tmp_path):
    holder = textwrap.dedent("""
        import sys, time
        from prefcurate.curation.store.lake import Lake
        with Lake(sys.argv[1]).writing():
            print("held", flush=True)
            time.sleep(float(sys.argv[2]))
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    process = subprocess.Popen([sys.executable, "-c", holder, lake.root, "3"], stdout=subprocess.PIPE, env=env,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(LakeError, match=rf"waited 0 s for the writer lock of .*held by pid {process.pid} on "):
            with lake.writing(wait_s=0.2):
                pass
        started = time.monotonic()
        with lake.writing(wait_s=30):  # waits, as documented, instead of failing
            waited = time.monotonic() - started
        assert 1.5 < waited < 30  # the holder kept it ~3 s after "held"; 0.2 s of that went on the first try
    finally:
        process.kill()
        process.wait()


def test_lock_is_reentrant_in_a_thread_and_threads_queue(lake):
    order = []
    with lake.writing():
        with Lake(lake.root).writing(wait_s=1):  # same lake, same thread: no self-deadlock
            order.append("nested")
        other = threading.Thread(target=lambda: (Lake(lake.root).writing(wait_s=10).__enter__(), order.append("t")))
        other.start()
        time.sleep(0.3)
        order.append("main done")
    other.join(10)
    assert order == ["nested", "main done", "t"]


def test_remote_lock_is_an_exclusive_object_with_an_expiry():
    root = f"memory://prefcurate-lock-{os.getpid()}/lake"
    fs = fsspec.filesystem("memory")
    try:
        first, second = Lake(root, create=True), Lake(root)
        assert not first.is_local
        held, release = threading.Event(), threading.Event()

        def hold():
            with first.writing():
                held.set()
                release.wait(10)
        thread = threading.Thread(target=hold)
        thread.start()
        held.wait(10)
        lock = json.loads(fs.cat_file(f"/prefcurate-lock-{os.getpid()}/lake/_lock.json"))
        assert lock["pid"] == os.getpid() and lock["expires_at"] > time.time()
        # another process's view: the in-process registry would queue it, so take the object lock directly
        with pytest.raises(LakeError, match="held by pid"):
            second._remote_lock(wait_s=0.2)
        release.set()
        thread.join(10)
        assert not fs.exists(f"/prefcurate-lock-{os.getpid()}/lake/_lock.json")
        # a holder that died leaves a lock whose expiry passes: the next writer breaks it
        fs.pipe_file(f"/prefcurate-lock-{os.getpid()}/lake/_lock.json",
                     json.dumps({"pid": 1, "host": "gone", "command": "x", "since": "then", "token": "t",
                                 "expires_at": time.time() - 1}).encode())
        _commit_scores(second, _scores(2), "t1")
        assert second.read("scores").num_rows == 2
    finally:
        fs.rm(f"/prefcurate-lock-{os.getpid()}", recursive=True)


def _v1_lake(tmp_path) -> Lake:
    """A lake as prefcurate wrote it before the commit log: files in folders, a version-1 marker."""
    lake = Lake(str(tmp_path / "old"), create=True)
    shard = write_shard(tmp_path / "train-0.parquet", [row(0), row(1, jpg_1=GREEN), row(2, caption="")])
    ingest_file(lake, shard, IngestConfig("pickapic", "pickapic"), make_reader("pickapic"))
    import shutil

    shutil.rmtree(lake.join("_log"))
    (tmp_path / "old" / "_lake.json").write_text(json.dumps({"format": "prefcurate-lake", "schema_version": 1}))
    return Lake(lake.root)


def test_a_version_1_lake_is_read_as_before_and_migrated_on_first_write(tmp_path):
    lake = _v1_lake(tmp_path)
    assert lake.version_on_disk == 1 and lake.read("pairs").num_rows == 2
    with pytest.raises(LakeError, match="format version 1"):
        lake.verify()
    actions = lake.recover()
    assert any(a.startswith("migrated lake format version 1 to 2 (") for a in actions)
    assert json.loads((tmp_path / "old" / "_lake.json").read_text())["schema_version"] == 2
    assert [e["txid"] for e in lake.log_entries()] == ["migrate-v1"]
    assert lake.read("pairs").num_rows == 2 and lake.read("quarantine").num_rows == 1
    assert lake.verify()["problems"] == [] and lake.verify()["files"] == 5


def test_verify_names_a_flipped_byte_and_readers_notice_a_changed_size(lake, tmp_path, capsys):
    _commit_scores(lake, _scores(50), "t1")
    assert main(["verify", "--lake", lake.root]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 lake files")
    [path] = lake.files("scores")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    rel = lake.relative(path)
    assert main(["verify", "--lake", lake.root]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and rel in err and "sha256" in err
    with open(path, "ab") as f:
        f.write(b"more")
    with pytest.raises(LakeCorruptError, match=f"lake file {rel} has {len(data) + 4} bytes"):
        lake.read("scores")
    assert main(["sql", "--lake", lake.root, "SELECT count(*) FROM scores"]) == 3
    assert rel in capsys.readouterr().err


def test_leftovers_of_interrupted_writes_are_removed(lake):
    stale = lake.join("ingests", "part-x.parquet.tmp-0123")
    os.makedirs(os.path.dirname(stale))
    open(stale, "wb").write(b"half")
    os.makedirs(lake.join("_staging", "undecided"))
    assert sorted(lake.recover()) == ["discarded unfinished transaction undecided",
                                      "removed 1 temporary file(s) of interrupted writes"]
    assert not os.path.exists(stale) and not os.path.exists(lake.join("_staging", "undecided"))


def test_a_newer_lake_version_is_refused_in_one_line(lake, capsys):
    with open(lake.join("_lake.json"), "w") as f:
        json.dump({"format": "prefcurate-lake", "schema_version": 3}, f)
    assert main(["sql", "--lake", lake.root, "SELECT 1"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "schema version 3" in err and "upgrade prefcurate" in err


def test_checkpoints_let_a_new_reader_skip_the_old_log_entries(lake, monkeypatch, inject):
    import prefcurate.curation.store.lake as lake_module

    monkeypatch.setattr(lake_module, "CHECKPOINT_EVERY", 3)
    for i in range(7):
        _commit_scores(lake, _scores(1, start=i), f"t{i}")
    names = sorted(os.listdir(lake.join("_log")))
    assert [n for n in names if "checkpoint" in n] == [f"{2:020d}.checkpoint.json", f"{5:020d}.checkpoint.json"]
    fresh = Lake(lake.root)
    assert [e["seq"] for e in fresh.log_entries()] == [6]  # the checkpoint of seq 5 stands for 0-5
    assert fresh.files("scores") == lake.files("scores") and fresh.read("scores").num_rows == 7
    assert fresh.version() == 6
    _commit_scores(lake, _scores(2, start=6), "dup")  # seq 7: one repeated key (img6), one new
    inject("after_log")  # the repair's commit dies after its log entry (seq 8, a checkpoint) is written
    with pytest.raises(InjectedFault):
        Lake(lake.root).repair()
    monkeypatch.delenv("PREFCURATE_FAULT")
    again = Lake(lake.root)
    assert again.recover() == []  # abort() finished the roll-forward; nothing is logged twice
    assert again.version() == 8 and again.read("scores").num_rows == 8
    assert again.verify()["problems"] == []
