"""Prefect flow for the ingest stage: one task per source file, each wrapping prefcurate.flows.stages.ingest_one."""
from __future__ import annotations

from prefect import flow, get_run_logger, task

from prefcurate.curation.ingest import UnreadableSourceError
from prefcurate.curation.store.lake import LakeError
from prefcurate.flows import stages


def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups (a network filesystem, a busy disk), never a file that is simply unreadable."""
    try:
        state.result()
    except (UnreadableSourceError, LakeError, ValueError):
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, task_run_name="ingest {path}")
def ingest_one(lake_root: str, path: str, fmt: str, source: str, reader_options: dict) -> dict:
    out = stages.ingest_one(lake_root, path, fmt, source, reader_options)
    get_run_logger().info(out["line"])
    return out


@flow(name="prefcurate-ingest", log_prints=True)
def ingest_flow(lake_root: str, paths: list[str], fmt: str, source: str | None = None,
                reader_options: dict | None = None) -> list[dict]:
    """Ingest each file in order (the lake has one writer at a time). A file already ingested
    is a no-op; an unreadable file fails its task with one clear line and writes nothing."""
    results = []
    for path in paths:
        try:
            stages.check_source(path, fmt)  # a missing or non-Parquet file: no task, no retries
        except stages.SourceError as exc:
            results.append({"source_file": path, "error": str(exc)})
            continue
        state = ingest_one(lake_root, path, fmt, source or fmt, reader_options or {}, return_state=True)
        if state.is_completed():
            results.append(state.result())
        else:
            try:
                state.result()
            except Exception as exc:  # report and go on with the other files
                results.append({"source_file": path, "error": str(exc)})
    return results
