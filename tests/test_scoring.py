"""The scoring stage over a real lake: work planning and dedup (checked against independent DuckDB counts),
prompt-free scorers, resume, new scorer versions, metadata-only pairs, crash safety with a killed subprocess,
equality with direct scorer calls, a tiny open_clip HPS checkpoint through worker processes, the Prefect flow
and the CLI."""
from __future__ import annotations

import glob
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from prefcurate.curation.store.ids import content_id
from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
from prefcurate.curation.store.lake import Lake, LakeError
from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample
from prefcurate.curation.scorers import build_scorer
from prefcurate.curation.scorers.plan import plan_work
from prefcurate.curation.scorers.runner import ScoringConfig, run_scoring
from prefcurate.curation.store.sql import query
from prefcurate.curation.labels.votes import PROMPT_FREE_PROMPT_ID
from prefcurate.cli.main import main
from tests.test_ingest_pickapic import BLUE, BOMB_PNG, GREEN, RED, jpeg, row, write_shard
from tests.test_scorers import TINY_ARCH, TINY_CFG


DISTINCT_IMAGE_PROMPTS = """SELECT count(*) AS n FROM (
    SELECT coalesce(r.image_id, s.ref) AS image_id, s.prompt_id FROM (
        SELECT image_0_id AS ref, prompt_id FROM pairs UNION ALL SELECT image_1_id, prompt_id FROM pairs) s
    LEFT JOIN image_refs r ON r.ref_id = s.ref GROUP BY 1, 2)"""
DUPLICATE_SCORE_KEYS = """SELECT count(*) AS n FROM (
    SELECT image_id, prompt_id, scorer, scorer_version FROM scores GROUP BY ALL HAVING count(*) > 1)"""


def _n(lake: Lake, sql: str) -> int:
    return query(lake, sql).to_pylist()[0]["n"]


def _ingest(lake: Lake, path) -> None:
    ingest_file(lake, str(path), IngestConfig("pickapic", "pickapic"), make_reader("pickapic"))


@pytest.fixture(scope="module")
def sample_lake_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sample")
    paths = generate_sample(root / "sample", SampleConfig.small())
    lake = Lake(str(root / "lake"), create=True)
    for shard in sorted(glob.glob(str(paths.pickapic_dir / "*.parquet"))):
        _ingest(lake, shard)
    return str(root / "lake")


@pytest.fixture
def sample_lake(sample_lake_dir, tmp_path) -> Lake:
    shutil.copytree(sample_lake_dir, tmp_path / "lake")
    return Lake(str(tmp_path / "lake"))


@pytest.fixture
def shared_image_lake(tmp_path) -> Lake:
    """RED appears in four pairs under three prompt_ids (two spellings of the bicycle prompt are one id)."""
    lake = Lake(str(tmp_path / "lake"), create=True)
    rows = [row(0, caption="a red bicycle"), row(1, caption="A  red bicycle ", jpg_1=GREEN),
            row(2, caption="a green lamp", jpg_1=GREEN), row(3, caption="a blue sky", jpg_0=BLUE, jpg_1=RED),
            row(4, caption="a red bicycle", jpg_0=GREEN, jpg_1=BLUE)]
    _ingest(lake, write_shard(tmp_path / "train-0.parquet", rows))
    return lake


def _decoded(lake: Lake) -> dict[str, Image.Image]:
    images = lake.read("images", columns=["image_id", "bytes"]).to_pylist()
    return {r["image_id"]: Image.open(io.BytesIO(r["bytes"])) for r in images}


def test_each_image_scored_once_per_prompt_and_equal_to_direct_calls(shared_image_lake):
    lake = shared_image_lake
    expected = _n(lake, DISTINCT_IMAGE_PROMPTS)
    assert expected == 7  # bicycle: RED, BLUE, GREEN; lamp: RED, GREEN; sky: BLUE, RED
    result = run_scoring(lake, ["prompt_colour", "sharpness"], workers=0, batch_size=2)
    colour, sharp = result.scorers
    assert (colour.n_scores, colour.n_images) == (expected, 3)  # three images, each decoded once
    assert (sharp.n_scores, sharp.n_images) == (3, 3)  # prompt-free: once per image
    scores = lake.read("scores").to_pylist()
    assert _n(lake, DUPLICATE_SCORE_KEYS) == 0
    assert {r["prompt_id"] for r in scores if r["scorer"] == "sharpness"} == {PROMPT_FREE_PROMPT_ID}
    images = _decoded(lake)
    prompts = {r["prompt_id"]: r["prompt"] for r in lake.read("pairs").to_pylist()}
    for name in ("prompt_colour", "sharpness"):
        scorer = build_scorer(name)
        for r in (r for r in scores if r["scorer"] == name):
            prompt = [prompts[r["prompt_id"]]] if scorer.uses_prompt else None
            assert r["score"] == scorer.score([images[r["image_id"]]], prompt)[0]
            assert r["scorer_version"] == scorer.version
    by_key = {(r["image_id"], r["prompt_id"]): r["score"] for r in scores if r["scorer"] == "prompt_colour"}
    red_bicycle = by_key[(content_id(RED), lake.read("pairs").to_pylist()[0]["prompt_id"])]
    assert red_bicycle > by_key[(content_id(BLUE), lake.read("pairs").to_pylist()[0]["prompt_id"])]


def test_sample_lake_counts_match_duckdb_resume_and_new_shard(sample_lake, tmp_path):
    lake = sample_lake
    expected = _n(lake, DISTINCT_IMAGE_PROMPTS)
    n_images = _n(lake, "SELECT count(DISTINCT image_id) AS n FROM images")
    first = run_scoring(lake, ["prompt_colour", "exposure"], workers=0, batch_size=8, shard_size=40,
                        config=ScoringConfig(batch_size=8, workers=0, shard_size=40, commit_every=2))
    assert [s.n_scores for s in first.scorers] == [expected, n_images]
    assert _n(lake, "SELECT count(*) AS n FROM scores") == expected + n_images
    files = lake.files("scores")
    assert len(files) > 2  # committed in several transactions
    again = run_scoring(lake, ["prompt_colour", "exposure"], workers=0)
    assert [(s.n_scores, s.n_done_before) for s in again.scorers] == [(0, expected), (0, n_images)]
    assert lake.files("scores") == files  # nothing rewritten
    # A new shard with new images: only the new work is scored.
    new = [row(i, caption="a violet tent", jpg_0=jpeg((120, 40, 200)), jpg_1=jpeg((40, 40, 40))) for i in range(2)]
    _ingest(lake, write_shard(tmp_path / "train-new.parquet", new))
    third = run_scoring(lake, ["prompt_colour", "exposure"], workers=0)
    assert [s.n_scores for s in third.scorers] == [2, 2]
    assert _n(lake, "SELECT count(*) AS n FROM scores") == _n(lake, DISTINCT_IMAGE_PROMPTS) + n_images + 2
    assert _n(lake, DUPLICATE_SCORE_KEYS) == 0


def test_metadata_only_pairs_are_skipped_and_counted_then_scored_via_image_refs(tmp_path):
    lake = Lake(str(tmp_path / "lake"), create=True)
    rows = [row(0, uid0="u-red", uid1="u-blue"), row(1, uid0="u-red", uid1="u-green", jpg_1=GREEN)]
    _ingest(lake, write_shard(tmp_path / "meta.parquet", [dict(r, jpg_0=None, jpg_1=None) for r in rows],
                              drop=("jpg_0", "jpg_1")))
    _ingest(lake, write_shard(tmp_path / "other.parquet", [row(5, caption="a grey cat", jpg_0=jpeg((90, 90, 90)))]))
    plan = plan_work(lake, build_scorer("sharpness"))
    assert (plan.n_pairs, plan.n_pairs_skipped, plan.items.num_rows) == (3, 2, 2)
    assert plan.skipped_line() == "2 pairs skipped: images not in the lake yet"
    assert "2 pairs skipped: images not in the lake yet" in run_scoring(lake, ["sharpness"], workers=0).lines()[0]
    _ingest(lake, write_shard(tmp_path / "full.parquet", rows))  # the bytes arrive
    later = run_scoring(lake, ["sharpness"], workers=0).scorers[0]
    assert (later.n_pairs_skipped, later.n_scores) == (0, 2)  # RED and GREEN; BLUE was already scored
    scored = {r["image_id"] for r in lake.read("scores").to_pylist()}
    assert {content_id(RED), content_id(BLUE), content_id(GREEN)} <= scored
    assert not any(":" in i for i in scored)  # keyed by content hash, never by the '<source>:<uid>' ref


def _png_with_broken_pixel_data() -> bytes:
    """A PNG whose zlib stream is broken but whose chunk CRCs were recomputed to match: the ingest's
    structure check passes it (only a full decode would not), so the damage first shows at scoring."""
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 10, 10)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT")
    length = int.from_bytes(data[start - 4:start], "big")
    data[start + 4:start + 12] = b"\x00" * 8
    data[start + 4 + length:start + 8 + length] = zlib.crc32(data[start:start + 4 + length]).to_bytes(4, "big")
    return bytes(data)


def test_image_that_does_not_decode_gets_nan_and_is_not_retried(tmp_path, tiny_hps):
    lake = Lake(str(tmp_path / "lake"), create=True)
    broken = _png_with_broken_pixel_data()
    _ingest(lake, write_shard(tmp_path / "train-0.parquet", [row(0, jpg_0=broken), row(1, jpg_1=GREEN)]))
    for name, options in (("sharpness", None), ("hpsv2", {"hpsv2": {"arch": TINY_ARCH}})):
        summary = run_scoring(lake, [name], tiny_hps, workers=0, batch_size=2, scorer_options=options).scorers[0]
        assert (summary.n_images, summary.n_undecodable, summary.failures) == (4, 1, {"undecodable_image": 1})
        assert "failures stored as NaN: 1 undecodable_image" in summary.line()
        scores = {r["image_id"]: r["score"] for r in lake.read("scores").to_pylist() if r["scorer"] == name}
        assert np.isnan(scores[content_id(broken)]) and np.isfinite(scores[content_id(BLUE)])
        assert run_scoring(lake, [name], tiny_hps, workers=0, scorer_options=options).scorers[0].n_scores == 0
    # The pair holding the broken image never reaches training: the snapshot leaves it out and counts it.
    from prefcurate.curation.snapshot import SnapshotPolicy, write_snapshot
    info = write_snapshot(lake, "after-scoring", SnapshotPolicy(kind="plain"), str(tmp_path / "snaps"))
    assert (info.counts["pairs"], info.counts["unscorable_images"]) == (1, 1)
    assert "1 with an undecodable image" in info.line()


def test_a_decompression_bomb_already_in_a_lake_is_refused_before_decoding(tmp_path):
    """A lake ingested with the pixel limit lifted still holds a 12000 x 12000 PNG header: scoring refuses
    it from the header (a decode would allocate 432 MB) and counts it."""
    lake = Lake(str(tmp_path / "lake"), create=True)
    shard = write_shard(tmp_path / "train-0.parquet", [row(0, jpg_0=BOMB_PNG), row(1, jpg_1=GREEN)])
    ingest_file(lake, shard, IngestConfig("pickapic", "pickapic", max_image_pixels=10**12), make_reader("pickapic"))
    summary = run_scoring(lake, ["sharpness"], workers=0).scorers[0]
    assert (summary.n_images, summary.failures) == (4, {"image_too_large": 1})
    scores = {r["image_id"]: r["score"] for r in lake.read("scores").to_pylist()}
    assert np.isnan(scores[content_id(BOMB_PNG)]) and sum(np.isnan(v) for v in scores.values()) == 1


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from prefcurate.curation.store.lake import Lake, LakeError
    from prefcurate.curation.scorers.runner import ScoringConfig, run_scoring
    lake = Lake(sys.argv[1])
    moved = []
    real_mv = lake.fs.mv
    def mv(src, dst, *a, **k):  # SIGKILL after the third transaction's COMMIT.json, before its file moves
        if "_staging" in src and "/scores/" in dst:
            moved.append(dst)
            if len(moved) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        real_mv(src, dst, *a, **k)
    lake.fs.mv = mv
    if __name__ == "__main__":
        run_scoring(lake, ["prompt_colour"], config=ScoringConfig(batch_size=4, workers=0, commit_every=1))
""")


def test_killed_mid_run_then_rerun_gives_complete_scores_without_duplicates(sample_lake):
    lake = sample_lake
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    crashed = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, lake.root], env=env)
    assert crashed.returncode == -signal.SIGKILL
    visible = lake.read("scores").num_rows
    assert visible == 8  # two complete commits of one 4-image batch each; the third is still staged
    assert os.listdir(os.path.join(lake.path, "_staging"))
    rerun = run_scoring(lake, ["prompt_colour"], workers=0).scorers[0]
    expected = _n(lake, DISTINCT_IMAGE_PROMPTS)
    assert rerun.n_done_before == 12  # recovery rolled the third transaction forward before planning
    assert rerun.n_scores == expected - 12
    assert lake.read("scores").num_rows == expected and _n(lake, DUPLICATE_SCORE_KEYS) == 0


TWIN_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from prefcurate.curation.store.lake import Lake, LakeError
    from prefcurate.curation.scorers import build_scorer
    from prefcurate.curation.scorers.plan import plan_work
    from prefcurate.curation.scorers.runner import ScoringConfig, score_shard
    root, me, other = sys.argv[1], sys.argv[2], sys.argv[3]
    lake, scorer = Lake(root), build_scorer("prompt_colour")
    plan = plan_work(lake, scorer)
    open(me, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(other) and time.monotonic() < deadline:  # both have planned: same work
        time.sleep(0.02)
    result = score_shard(lake, scorer, plan.items, ScoringConfig(batch_size=4, workers=0, commit_every=1))
    print(plan.items.num_rows, result.n_scores, result.n_dropped)
""")


def test_two_score_runs_planned_at_once_store_each_key_once(sample_lake, tmp_path):
    """Both runs plan before either commits, so both score everything; the commits, re-checked under the
    lock, still store every (image, prompt, scorer, version) once, and the two runs' rows add up."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    flags = [str(tmp_path / "a.planned"), str(tmp_path / "b.planned")]
    runs = [subprocess.Popen([sys.executable, "-c", TWIN_SCRIPT, sample_lake.root, flags[i], flags[1 - i]], env=env,
                             stdout=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [run.communicate(timeout=240)[0].splitlines()[-1].split() for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    expected = _n(sample_lake, DISTINCT_IMAGE_PROMPTS)
    planned, written, dropped = zip(*[map(int, out) for out in outs])
    assert planned == (expected, expected) and sum(written) == expected and sum(dropped) == expected
    assert sample_lake.read("scores").num_rows == expected and _n(sample_lake, DUPLICATE_SCORE_KEYS) == 0


HOLDER_SCRIPT = textwrap.dedent("""
    import sys, time
    from prefcurate.curation.store.lake import Lake, LakeError
    with Lake(sys.argv[1]).writing():
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_score_waits_for_another_writer_then_fails_after_its_timeout(sample_lake):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, sample_lake.root, "30"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LakeError, match="waited 1 s for the writer lock .* held by pid"):
            run_scoring(sample_lake, ["sharpness"], config=ScoringConfig(workers=0, lock_timeout_s=1.0))
    finally:
        holder.kill()
        holder.wait()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, sample_lake.root, "2"], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    summary = run_scoring(sample_lake, ["sharpness"], workers=0).scorers[0]  # waits (600 s default), then runs
    assert holder.wait(timeout=30) == 0 and time.monotonic() - started > 1.0
    assert summary.n_scores == _n(sample_lake, "SELECT count(*) AS n FROM images") > 0


POOL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from prefcurate.curation.scorers.worker import make_pool, worker_pids, _ready
    if __name__ == "__main__":
        pool = make_pool(2)
        [f.result() for f in [pool.submit(_ready) for _ in range(2)]]
        from multiprocessing import forkserver
        print(" ".join(map(str, worker_pids(pool) + [forkserver._forkserver._forkserver_pid])), flush=True)
        time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended (only unreaped)
    except FileNotFoundError:
        return False


def test_decode_workers_die_with_a_killed_scoring_process():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    parent = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT], env=env, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)  # two workers and their forkserver
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)], "decode workers (or their forkserver) outlived their parent"


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    cfg_dir = tmp_path_factory.mktemp("open_clip_cfg")
    (cfg_dir / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    weights = tmp_path_factory.mktemp("weights")
    for name, seed in (("HPS_v2_compressed.pt", 11), ("HPS_v2.1_compressed.pt", 12)):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_ARCH, pretrained=None)
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights / name)
    return weights


def test_neural_scorer_through_worker_processes_matches_direct_scores(sample_lake, tiny_hps):
    lake, options = sample_lake, {"hpsv2": {"arch": TINY_ARCH}}
    result = run_scoring(lake, ["hpsv2"], tiny_hps, "cpu", batch_size=8, workers=2, shard_size=50,
                         scorer_options=options).scorers[0]
    expected = _n(lake, DISTINCT_IMAGE_PROMPTS)
    assert result.n_scores == expected and result.images_per_s > 0
    scorer = build_scorer("hpsv2", tiny_hps, arch=TINY_ARCH)
    rows = lake.read("scores").to_pylist()
    images = _decoded(lake)
    prompts = {r["prompt_id"]: r["prompt"] for r in lake.read("pairs").to_pylist()}
    direct = scorer.score([images[r["image_id"]] for r in rows], [prompts[r["prompt_id"]] for r in rows])
    np.testing.assert_allclose([r["score"] for r in rows], direct, rtol=1e-5, atol=1e-6)
    assert np.std(direct) > 0  # a real signal, not a constant
    # A new checkpoint is a new scorer_version: everything is scored again, the old rows stay.
    os.replace(tiny_hps / "HPS_v2_compressed.pt", tiny_hps / "old.pt")
    shutil.copy(tiny_hps / "HPS_v2.1_compressed.pt", tiny_hps / "HPS_v2_compressed.pt")
    again = run_scoring(lake, ["hpsv2"], tiny_hps, workers=0, scorer_options=options).scorers[0]
    assert (again.n_done_before, again.n_scores) == (0, expected) and again.version != result.version
    assert _n(lake, "SELECT count(DISTINCT scorer_version) AS n FROM scores") == 2


def test_flow_scores_shards_as_tasks_and_cli_reports_throughput(sample_lake, prefect_server, capsys):
    from prefcurate.flows.score import run_score_flow

    summaries = run_score_flow(sample_lake.root, ["sharpness", "prompt_colour"], workers=0, shard_size=30,
                               batch_size=8)
    expected = _n(sample_lake, DISTINCT_IMAGE_PROMPTS)
    assert [s["n_scores"] for s in summaries] == [_n(sample_lake, "SELECT count(*) AS n FROM images"), expected]
    assert _n(sample_lake, DUPLICATE_SCORE_KEYS) == 0
    capsys.readouterr()
    assert main(["score", "--lake", sample_lake.root, "--scorers", "sharpness,exposure", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "sharpness: 0 scores" in out and f"exposure: {summaries[0]['n_scores']} scores" in out
    assert "throughput (images/s): sharpness" in out


@pytest.mark.skipif(importlib.util.find_spec("prefect_ray") is None,
                    reason="needs the [ray] extra: pip install prefect-ray")
def test_flow_on_a_local_ray_cluster(sample_lake, prefect_server):
    from prefcurate.flows.score import run_score_flow

    summaries = run_score_flow(sample_lake.root, ["colourfulness"], task_runner="ray", workers=0, shard_size=40)
    assert summaries[0]["n_scores"] == _n(sample_lake, "SELECT count(*) AS n FROM images")
    assert _n(sample_lake, DUPLICATE_SCORE_KEYS) == 0


def test_cli_errors_are_one_line_with_exit_code_3(sample_lake, tmp_path, capsys):
    assert main(["score", "--lake", sample_lake.root, "--scorers", "sharpness,nope"]) == 3
    assert capsys.readouterr().err.strip().startswith("prefcurate score: error: unknown scorer(s) 'nope'; scorers: ")
    assert main(["score", "--lake", sample_lake.root, "--scorers", "hpsv2", "--weights", str(tmp_path)]) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "HPS_v2_compressed.pt" in err and "xswu/HPSv2" in err
    assert sample_lake.files("scores") == []
