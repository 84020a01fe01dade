"""Orchestration against a real Prefect server started by this module on 127.0.0.1 (a schedule needs one:
the temporary server has no scheduler): the pipeline flow in-process (artifacts, a repeat run redoing
nothing), `prefcurate serve` in a subprocess (its deployment, schedule, scheduled runs, a completed run), a
snapshot-triggered training run on the tiny pipeline, and a gate that refuses to start one."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter, ArtifactFilterFlowRunId, DeploymentFilter, FlowRunFilter, TaskRunFilter,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefcurate.curation.store.lake import Lake
from tests.prefect_util import drain_prefect_workers
from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample
from prefcurate.curation.snapshot import SnapshotPolicy, resolve_snapshot
from prefcurate.curation.store.sql import query
from prefcurate.cli.main import main
from prefcurate.flows.pipeline import ANNOTATORS_KEY, SUMMARY_KEY, TrainGate, TrainRequest, pipeline_flow
from prefcurate.flows.serve import ServerError, check_server
from prefcurate.flows.train import TRAIN_DEPLOYMENT


SERVER_START_S = 300  # measured 11-13 s alone; 120 s was not enough at load 13 on the 2 shared cores
FAST_SCORING = {"workers": 0, "shard_size": 1 << 20}  # 64 px images: worker start-up costs more than it saves


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on a free port with its own PREFECT_HOME; this process's client points at it."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")  # default 60 s: runs appear within 2 s
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield {"url": url, "home": home}
        drain_prefect_workers()  # while the server still answers
    _stop(proc)
    log.close()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return generate_sample(tmp_path_factory.mktemp("sample"), SampleConfig.small())


def _artifacts(client, flow_run_id) -> dict:
    # The sync client sends None for limit/sort unless given, which this server version refuses.
    by_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    found = client.read_artifacts(artifact_filter=by_run, flow_run_filter=FlowRunFilter(),
                                  task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC, limit=20, offset=0)
    return {a.key: a for a in found}


def _runs(client, deployment_name: str) -> list:
    deployment = client.read_deployment_by_name(deployment_name)
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}),
                                 sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200, offset=0)


def test_gate_counts_pairs_and_minority_share():
    gate = TrainGate(min_pairs=100, max_minority_share=0.2)
    assert gate.failures(100, 0.2) == []
    assert gate.failures(99, 0.25) == ["99 pairs < min_pairs 100", "minority share 0.250 > max_minority_share 0.2"]
    assert TrainGate(max_minority_share=None).failures(5000, 1.0) == []


def test_serve_refuses_without_a_real_server(tmp_path, capsys):
    with pytest.raises(ServerError, match="PREFECT_API_URL is not set.*prefect server start --host 127.0.0.1"):
        check_server(api_url="")
    with pytest.raises(ServerError, match=r"no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:\d+/api"):
        check_server(api_url=f"http://127.0.0.1:{_free_port()}/api", timeout_s=1)
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{_free_port()}/api"}):
        assert main(["serve", "--lake", str(tmp_path / "lake"), "--landing", str(tmp_path), "--interval", "60"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefcurate serve: error: no Prefect server answers") and "\n" not in err
    assert main(["serve", "--lake", "l", "--landing", str(tmp_path), "--interval", "60", "--max-steps", "2"]) == 3
    assert "need --train-model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def first_run(server, sample, tmp_path_factory):
    """One pipeline run, in this process, on a fresh lake: (lake, its final state)."""
    lake = str(tmp_path_factory.mktemp("pipeline") / "lake")
    return lake, pipeline_flow(lake, str(sample.pickapic_dir), score_options=FAST_SCORING, return_state=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from prefcurate.training.components import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", resolution=32))


def test_train_command_refuses_bad_snapshot_and_options(capsys, first_run, tiny_model):
    lake, m = first_run[0], tiny_model
    assert main(["train", "--lake", lake, "--snapshot", "nope", "--model", m, "--output", "o"]) == 3
    err = capsys.readouterr().err.strip()
    assert err == f"prefcurate train: error: no snapshot named 'nope' under {lake}/snapshots (names: curated)"
    assert main(["train", "--snapshot", "latest", "--model", m, "--output", "o"]) == 3
    assert "give the lake (--lake LAKE)" in capsys.readouterr().err
    assert main(["train", "--lake", lake, "--snapshot", "latest", "--model", m, "--output", "o",
                 "--max-stepz", "1"]) == 2
    assert "unrecognized arguments: --max-stepz 1" in capsys.readouterr().err


def test_track_runs_a_one_shot_command_as_a_flow_run(first_run, capsys):
    """`--track`: the same stage, recorded by the server (without it, and with no PREFECT_API_URL in the
    environment, the command runs in-process: tests/test_cli_flows.py)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    def curate_runs(client) -> list:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["prefcurate-curate"])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200, offset=0)

    with get_client(sync_client=True) as client:
        before = {r.id for r in curate_runs(client)}
        assert main(["curate", "--lake", first_run[0], "--track"]) == 0
        new = [r for r in curate_runs(client) if r.id not in before]
    assert "curation run " in capsys.readouterr().out  # "nothing new, kept curation run ...": first_run curated
    assert [r.state_name for r in new] == ["Completed"]


def test_pipeline_publishes_artifacts_and_a_repeat_run_redoes_nothing(tmp_path, first_run, sample):
    (lake, state), landing = first_run, str(sample.pickapic_dir)
    first = state.result()
    assert [r["already_ingested"] for r in first["ingest"]] == [False, False]
    assert all(s["n_scores"] > 0 for s in first["score"]) and len(first["score"]) == 4
    assert not first["curate"]["reused"] and not first["snapshot"]["reused"]
    counts = query(Lake(lake), "SELECT sum(n_read) r, sum(n_accepted) a FROM ingests").to_pylist()[0]
    assert counts["r"] == 900 and first["curate"]["counts"]["pairs"] == counts["a"]
    assert first["snapshot"]["path"] == resolve_snapshot(Lake(lake), "curated")

    with get_client(sync_client=True) as client:
        artifacts = _artifacts(client, state.state_details.flow_run_id)
    summary = artifacts[SUMMARY_KEY].data
    assert first["snapshot"]["snapshot_id"] in summary and "(new)" in summary
    agreement = first["curate"]["counts"]["human_agreement"]
    assert f"**{agreement:.1%}**" in summary and "corrupt_image" in summary and "2 new file(s) of 2" in summary
    table = artifacts[ANNOTATORS_KEY].data
    rows = json.loads(table) if isinstance(table, str) else table
    reliabilities = [r["reliability"] for r in rows]
    assert len(rows) > 5 and reliabilities == sorted(reliabilities)
    truth = {str(r["user_id"]): r["annotator_type"] for r in pq.read_table(sample.annotators).to_pylist()}
    assert all(truth[r["user_id"]] != "reliable" for r in rows[:3])  # the planted unreliable ones come first

    # Training is asked for, but only a snapshot this run wrote may start it: nothing to train here.
    request = TrainRequest(model="unused", output_root=str(tmp_path / "out"), gate=TrainGate(min_pairs=1))
    again = pipeline_flow(lake, landing, score_options=FAST_SCORING, train=request)
    assert [r["already_ingested"] for r in again["ingest"]] == [True, True]
    assert [s["n_scores"] for s in again["score"]] == [0, 0, 0, 0]
    assert [s["n_done_before"] for s in again["score"]] == [s["n_needed"] for s in first["score"]]
    assert again["curate"]["reused"] and again["curate"]["run_id"] == first["curate"]["run_id"]
    assert again["snapshot"]["reused"] and again["snapshot"]["snapshot_id"] == first["snapshot"]["snapshot_id"]
    assert again["training"] == {"started": False, "reasons": ["snapshot unchanged since an earlier run"]}


def test_train_command_and_inline_training(tmp_path, capsys, first_run, sample, tiny_model):
    """`prefcurate train --snapshot latest`, and a pipeline with no training deployment training in its own run."""
    import torch

    model = tiny_model
    fast = ["--max-steps", "1", "--resolution", "32", "--no-latent-cache"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only thrash the 2 shared cores
    try:
        lake = first_run[0]
        assert main(["train", "--lake", lake, "--snapshot", "latest", "--model", model, "--loss", "ipo",
                     "--output", str(tmp_path / "cli"), *fast]) == 0
        latest = resolve_snapshot(Lake(lake), "latest")
        assert capsys.readouterr().out.splitlines()[-1].startswith(f"trained 1 steps on {latest}; final loss ")
        assert json.loads((tmp_path / "cli" / "train_config.json").read_text())["loss"] == "ipo"
        request = TrainRequest(model=model, output_root=str(tmp_path / "runs"), options=tuple(fast), deployment=None,
                               gate=TrainGate(min_pairs=10))
        result = pipeline_flow(lake, str(sample.pickapic_dir), scorers=[], snapshot_name="filtered",
                               policy=SnapshotPolicy(kind="filter"), train=request)
    finally:
        torch.set_num_threads(threads)
    snapshot, training = result["snapshot"], result["training"]
    assert not snapshot["reused"] and training["started"] and training["minority_share"] == 0.0  # filter: u <= 0.5
    assert training["output"] == str(tmp_path / "runs" / snapshot["snapshot_id"]) and training["final_loss"] > 0
    assert (tmp_path / "runs" / snapshot["snapshot_id"] / "pytorch_lora_weights.safetensors").is_file()


@pytest.fixture(scope="module")
def served(server, sample, tmp_path_factory):
    """`prefcurate serve` every 60 s with training on the tiny pipeline; waits until the first pipeline run and
    the training run it started completed. (60 s: a second pipeline run would only compete for the 2 cores.)"""
    from prefcurate.training.components import build_tiny_pipeline

    root = tmp_path_factory.mktemp("served")
    model = build_tiny_pipeline(root / "model", resolution=32)
    env = {**os.environ, "PREFECT_API_URL": server["url"], "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_LOGGING_LEVEL": "INFO"}
    lake, out = root / "lake", root / "training"
    argv = [sys.executable, "-m", "prefcurate.cli", "serve", "--lake", str(lake), "--landing",
            str(sample.pickapic_dir),
            "--interval", "60", "--name", "test", "--workers", "0", "--train-model", str(model),
            "--train-output", str(out), "--train-min-pairs", "100", "--train-max-minority-share", "0.5",
            "--max-steps", "2", "--resolution", "32", "--no-latent-cache", "--learning-rate", "1e-3"]
    log = open(root / "serve.log", "wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    started = time.monotonic()
    state = {"proc": proc, "argv": argv, "env": env, "root": root}
    try:
        with get_client(sync_client=True) as client:
            while True:
                time.sleep(1)
                if proc.poll() is not None or time.monotonic() - started > 240:
                    pytest.fail(f"serve exited or timed out: {(root / 'serve.log').read_text()[-3000:]}")
                try:
                    train_runs = _runs(client, TRAIN_DEPLOYMENT)
                    pipeline_runs = _runs(client, "prefcurate-pipeline/test")
                except Exception:  # deployments not registered yet
                    continue
                done = [r for r in pipeline_runs if r.state_name == "Completed"]
                trained = [r for r in train_runs if r.state_name == "Completed"]
                if trained and done:
                    break
        yield {"lake": str(lake), "out": out, "seconds": time.monotonic() - started, **state}
    finally:
        _stop(state["proc"])
        log.close()


@pytest.mark.slow
def test_served_deployment_has_its_schedule_and_runs_complete(server, served):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("prefcurate-pipeline/test")
        runs = _runs(client, "prefcurate-pipeline/test")
        completed = [r for r in runs if r.state_name == "Completed"]
        artifacts = _artifacts(client, completed[0].id)
    assert [s.schedule.interval for s in deployment.schedules] == [timedelta(seconds=60)]
    assert deployment.parameters["lake"] == served["lake"]
    assert deployment.parameters["train"]["gate"]["min_pairs"] == 100
    assert deployment.global_concurrency_limit.limit == 1  # overlapping runs are cancelled, not queued
    assert sum(r.auto_scheduled for r in runs) >= 3  # the server's scheduler created them
    # Under load a scheduled run can come due while the previous one still runs: the deployment's concurrency
    # policy cancels it (as designed). No run may fail or crash, and runs that ran never overlap.
    assert completed and not [r.state_name for r in runs if r.state_type in (StateType.FAILED, StateType.CRASHED)]
    assert all("concurrency limit reached" in (r.state.message or "") for r in runs if r.state_name == "Cancelled")
    spans = sorted((r.start_time, r.end_time, r.state_name) for r in runs if r.state_name == "Completed")
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(spans, spans[1:])), spans
    assert "Started run" in artifacts[SUMMARY_KEY].data and ANNOTATORS_KEY in artifacts
    assert query(Lake(served["lake"]), "SELECT count(*) AS n FROM ingests").to_pylist() == [{"n": 2}]


@pytest.mark.slow
def test_new_snapshot_starts_one_training_run_on_it(server, served):
    snapshot = resolve_snapshot(Lake(served["lake"]), "curated")
    with get_client(sync_client=True) as client:
        runs = _runs(client, TRAIN_DEPLOYMENT)
    assert len(runs) == 1
    run = runs[0]
    assert run.state_name == "Completed" and run.parameters["snapshot"] == snapshot
    output = served["out"] / Path(snapshot).name
    assert run.parameters["output"] == str(output)
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
    assert (output / "pytorch_lora_weights.safetensors").stat().st_size > 0


@pytest.mark.slow
def test_a_snapshot_failing_the_gate_starts_no_training_run(tmp_path, server, served, sample, first_run):
    """A new snapshot (another policy, on the lake of `first_run`) whose minority share exceeds the gate."""
    request = TrainRequest(model="unused", output_root=str(tmp_path / "out"),
                           gate=TrainGate(min_pairs=100, max_minority_share=0.01))
    result = pipeline_flow(first_run[0], str(sample.pickapic_dir), score_options=FAST_SCORING,
                           snapshot_name="gated", policy=SnapshotPolicy(kind="plain"), train=request)
    assert not result["snapshot"]["reused"]
    training = result["training"]
    assert not training["started"] and 0.01 < training["minority_share"] < 0.5
    assert training["reasons"] == [f"minority share {training['minority_share']:.3f} > max_minority_share 0.01"]
    with get_client(sync_client=True) as client:
        assert len(_runs(client, TRAIN_DEPLOYMENT)) == 1  # still only the served fixture's run
    assert not (tmp_path / "out").exists()


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    """Poll until `predicate()` returns something truthy; fail loudly, saying what, when the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _final(run) -> bool:
    return run.state_type in (StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED)


@pytest.mark.slow
def test_served_runs_are_held_to_the_lake_and_serve_stops_cleanly(server, served, tmp_path):
    """A POSTed run naming another lake fails with one clear message and writes nothing. SIGTERM ends every run
    (nothing Scheduled, Pending or Running stays, the deployment is paused); a restarted serve runs its schedule
    at once (no stale concurrency slot); SIGTERM during a run ends that run Cancelled."""
    pipeline = "prefcurate-pipeline/test"
    other = tmp_path / "other-lake"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(pipeline)
        def idle():
            return not [r for r in _runs(client, pipeline) if r.state_type in (StateType.RUNNING, StateType.PENDING)]

        for _ in range(5):  # a scheduled run coming due at the same moment may take the one slot: try again
            _wait_for(idle, 240, "the served pipeline to be idle")
            posted = client.create_flow_run_from_deployment(deployment.id, parameters={"lake": str(other)})
            def ended(run_id=posted.id):
                found = client.read_flow_run(run_id)
                return found if _final(found) else None

            run = _wait_for(ended, 180, "the POSTed run to end")
            if run.state_name != "Cancelled":
                break
        assert run.state_name == "Failed", (run.state_name, run.state.message)
        assert f"refused: this `prefcurate serve` was started for lake {served['lake']}" in run.state.message
        assert f"the run asks for {other}; nothing was written" in run.state.message
    assert not other.exists()

    def stop_and_check(proc) -> list:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        with get_client(sync_client=True) as client:
            runs = _runs(client, pipeline) + _runs(client, TRAIN_DEPLOYMENT)
            assert [r.state_name for r in runs if not _final(r)] == []
            assert client.read_deployment_by_name(pipeline).paused
        return runs

    before = {r.id for r in stop_and_check(served["proc"])}
    log = open(served["root"] / "serve-restart.log", "wb")
    restarted = subprocess.Popen(served["argv"], env=served["env"], stdout=log, stderr=subprocess.STDOUT)
    served["proc"] = restarted  # the fixture stops it, whatever happens here
    try:
        with get_client(sync_client=True) as client:
            def running_new_run():
                try:
                    runs = _runs(client, pipeline)
                except Exception:  # re-registering
                    return None
                return next((r for r in runs if r.id not in before and r.state_type == StateType.RUNNING), None)

            run = _wait_for(running_new_run, 150, "a pipeline run of the restarted serve to start")
            assert not client.read_deployment_by_name(pipeline).paused
        runs = stop_and_check(restarted)
        assert {r.id: r.state_name for r in runs}[run.id] in ("Cancelled", "Completed")
        assert b"prefcurate serve stopped: " in (served["root"] / "serve-restart.log").read_bytes()
    finally:
        log.close()
