"""Prefect flows for the curate and snapshot stages: tasks wrapping flows.stages.run_curate and run_snapshot."""
from __future__ import annotations

from prefect import flow, get_run_logger, task

from prefcurate.curation.labels.curate import CurateConfig
from prefcurate.curation.snapshot import SnapshotPolicy
from prefcurate.flows import stages


@task(retries=1, retry_delay_seconds=2, task_run_name="curate {lake_root}")
def curate_task(lake_root: str, config: CurateConfig) -> dict:
    out = stages.run_curate(lake_root, config)
    get_run_logger().info(out["line"])
    return out


@task(task_run_name="snapshot {name}")
def snapshot_task(lake_root: str, name: str, policy: SnapshotPolicy, out_root: str | None = None) -> dict:
    out = stages.run_snapshot(lake_root, name, policy, out_root)
    get_run_logger().info(out["line"])
    return out


@flow(name="prefcurate-curate")
def curate_flow(lake_root: str, config: CurateConfig | None = None) -> dict:
    """Recompute the curation statistics of the lake (a no-op when nothing changed)."""
    return curate_task(lake_root, config or CurateConfig())


@flow(name="prefcurate-snapshot")
def snapshot_flow(lake_root: str, name: str, policy: SnapshotPolicy | None = None,
                  out_root: str | None = None) -> dict:
    return snapshot_task(lake_root, name, policy or SnapshotPolicy(), out_root)
