"""Prefect flows for the curate and snapshot stages, over curation.curate and curation.snapshot."""
from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger, task

from curation.curate import CurateConfig, curate
from curation.lake import Lake
from curation.snapshot import SnapshotPolicy, write_snapshot


@task(retries=1, retry_delay_seconds=2, task_run_name="curate {lake_root}")
def curate_task(lake_root: str, config: CurateConfig) -> dict:
    result = curate(Lake(lake_root), config)
    get_run_logger().info(result.line())
    return {"run_id": result.run_id, "reused": result.reused, "counts": result.counts, "line": result.line()}


@task(task_run_name="snapshot {name}")
def snapshot_task(lake_root: str, name: str, policy: SnapshotPolicy, out_root: str | None = None) -> dict:
    info = write_snapshot(Lake(lake_root), name, policy, out_root)
    get_run_logger().info(info.line())
    return {**asdict(info), "line": info.line()}


@flow(name="prefcurate-curate")
def curate_flow(lake_root: str, config: CurateConfig | None = None) -> dict:
    """Recompute the curation statistics of the lake (a no-op when nothing changed)."""
    return curate_task(lake_root, config or CurateConfig())


@flow(name="prefcurate-snapshot")
def snapshot_flow(lake_root: str, name: str, policy: SnapshotPolicy | None = None,
                  out_root: str | None = None) -> dict:
    return snapshot_task(lake_root, name, policy or SnapshotPolicy(), out_root)
