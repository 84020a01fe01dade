"""Recurring curation: serve the pipeline (and, when training is wanted, the training flow) as Prefect
deployments from this process; `prefcurate serve` calls `serve_pipeline`.

Schedules need a real Prefect server: the temporary server a flow call starts on its own has no
scheduler ("Cannot schedule flows on an ephemeral server"), so `check_server` refuses to go on without a
reachable PREFECT_API_URL. Runs execute in subprocesses of this process; stopping it pauses the schedule.
A pipeline run starts no new run while one is still going (deployment concurrency 1, new runs cancelled):
the lake has one writer, and the next run picks up whatever landed meanwhile.
"""
from __future__ import annotations

import httpx
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.types.entrypoint import EntrypointType
from prefect.settings import PREFECT_API_URL

from flows.pipeline import pipeline_flow, pipeline_parameters
from flows.train import TRAIN_DEPLOYMENT_NAME, train_flow


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


def serve_pipeline(name: str, lake: str, landing: str, *, cron: str | None = None, interval: float | None = None,
                   **pipeline_options) -> None:
    """Check the server, then serve until interrupted (Ctrl-C or SIGTERM pauses the schedule)."""
    check_server()
    serve(*pipeline_deployments(name, lake, landing, cron=cron, interval=interval, **pipeline_options))
