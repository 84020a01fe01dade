"""Recurring curation: serve the pipeline (and, when training is wanted, the training flow) as Prefect
deployments from this process; `prefcurate serve` calls `serve_pipeline`.

Schedules need a real Prefect server: the temporary server a flow call starts on its own has no
scheduler ("Cannot schedule flows on an ephemeral server"), so `check_server` refuses to go on without a
reachable PREFECT_API_URL. Runs execute in subprocesses of this process.
A pipeline run starts no new run while one is still going (deployment concurrency 1, new runs cancelled):
the lake has one writer, and the next run picks up whatever landed meanwhile.

Stopping (SIGTERM or Ctrl-C) leaves nothing behind: the run subprocesses are ended, every run of the served
deployments that is not final is set Cancelled (which also frees its deployment concurrency slot), runs
scheduled for later are deleted and the deployments are paused. Starting does the same first for runs a
serve that was killed (kill -9) left behind, so a restart runs on schedule at once.

Served runs only work on what this serve was started for: the lake, landing folder, model and training
output root travel to the run subprocesses in the environment (prefcurate.flows.stages.SERVED_ENV, which a request
to the API cannot set), and a run whose parameters name anything else fails before it writes anything.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import httpx
from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
)
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled
from prefect.types.entrypoint import EntrypointType
from prefect.settings import PREFECT_API_URL

from prefcurate.flows.pipeline import PIPELINE_FLOW_NAME, pipeline_flow, pipeline_parameters
from prefcurate.flows.stages import SERVED_ENV
from prefcurate.flows.train import TRAIN_DEPLOYMENT, TRAIN_DEPLOYMENT_NAME, train_flow


START_A_SERVER = ("start one with `prefect server start --host 127.0.0.1` and set "
                  "PREFECT_API_URL=http://127.0.0.1:4200/api (the temporary server Prefect starts by itself "
                  "cannot schedule runs)")


class ServerError(RuntimeError):
    """No Prefect server to schedule on."""


def check_server(api_url: str | None = None, timeout_s: float = 5.0) -> str:
    """The configured API URL, after checking that a Prefect server answers its health check there."""
    url = api_url if api_url is not None else PREFECT_API_URL.value()
    if not url:
        raise ServerError(f"schedules need a Prefect server, and PREFECT_API_URL is not set: {START_A_SERVER}")
    try:
        response = httpx.get(url.rstrip("/") + "/health", timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ServerError(f"no Prefect server answers at PREFECT_API_URL={url} ({type(exc).__name__}): "
                          f"{START_A_SERVER}") from None
    return url


def pipeline_deployments(name: str, lake: str, landing: str, *, cron: str | None = None,
                         interval: float | None = None, **pipeline_options) -> list:
    """The scheduled pipeline deployment `prefcurate-pipeline/<name>`, plus the unscheduled training
    deployment when `pipeline_options` has a `train` request. Flows are found by module path, so runs
    work from any working directory."""
    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of cron and interval")
    params = pipeline_parameters(lake, landing, **pipeline_options)
    deployments = [pipeline_flow.to_deployment(
        name=name, cron=cron, interval=interval, parameters=params, entrypoint_type=EntrypointType.MODULE_PATH,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description=f"curate the new files of {params['landing']} into {params['lake']}")]
    if pipeline_options.get("train") is not None:
        deployments.append(train_flow.to_deployment(
            name=TRAIN_DEPLOYMENT_NAME, entrypoint_type=EntrypointType.MODULE_PATH,
            description="fine-tune on a snapshot; started by the pipeline when a new snapshot passes its gate"))
    return deployments


NOT_FINAL = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


def end_runs(deployment_names: list[str], message: str) -> dict[str, int]:
    """Runs of these deployments that are not final: scheduled ones (not started yet) deleted, the others set
    Cancelled with `message`. Returns the counts. The deployments are paused, so the scheduler adds none."""
    counts = {"deleted": 0, "cancelled": 0}
    with get_client(sync_client=True) as client:
        ids = []
        for name in deployment_names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:  # never registered (a first start): nothing of it can be left
                continue
            client.pause_deployment(deployment.id)
            ids.append(deployment.id)
        if not ids:
            return counts
        for _ in range(100):  # pages of at most 200 (the API's limit); each page handled leaves the filter
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=NOT_FINAL))),
                limit=200, offset=0, sort=FlowRunSort.EXPECTED_START_TIME_ASC)
            if not runs:
                break
            for run in runs:
                if run.state_type == StateType.SCHEDULED and run.state_name != "AwaitingRetry":
                    client.delete_flow_run(run.id)
                    counts["deleted"] += 1
                else:
                    client.set_flow_run_state(run.id, Cancelled(message=message), force=True)
                    counts["cancelled"] += 1
    return counts


def _end_children(grace_s: float = 10.0) -> None:
    """End the run subprocesses this process started (and theirs): SIGTERM, then SIGKILL after `grace_s`."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def served_names(name: str, train: bool) -> list[str]:
    return [f"{PIPELINE_FLOW_NAME}/{name}", *([TRAIN_DEPLOYMENT] if train else [])]


def serve_pipeline(name: str, lake: str, landing: str, *, cron: str | None = None, interval: float | None = None,
                   **pipeline_options) -> None:
    """Check the server, clear what an earlier serve left, then serve until SIGTERM or Ctrl-C; on the way out
    end the run processes and every run that is not final (module docstring)."""
    check_server()
    deployments = pipeline_deployments(name, lake, landing, cron=cron, interval=interval, **pipeline_options)
    params, train = deployments[0].parameters, pipeline_options.get("train")
    os.environ[SERVED_ENV] = json.dumps({
        "lake": params["lake"], "landing": params["landing"],
        "train_model": None if train is None else train.model,
        "train_output": None if train is None else train.output_root})
    names = served_names(name, train is not None)
    end_runs(names, "left unfinished by an earlier `prefcurate serve` that did not stop cleanly")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        serve(*deployments)  # Prefect's runner answers SIGTERM with sys.exit(0), Ctrl-C with KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        started = time.monotonic()
        _end_children()
        counts = end_runs(names, "prefcurate serve stopped")
        print(f"prefcurate serve stopped: {counts['cancelled']} unfinished run(s) cancelled, {counts['deleted']} "
              f"scheduled run(s) deleted, deployments paused ({time.monotonic() - started:.1f} s)", flush=True)
        signal.signal(signal.SIGTERM, previous)
