"""Helpers for tests that talk to a Prefect server."""
from __future__ import annotations


def drain_prefect_workers() -> None:
    """Send what Prefect's log and event workers still hold to the server they point at now.
    Done before that server goes away: a worker left holding items for a dead server blocks the next
    drain (the test harness's teardown) for ever."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain():
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())
