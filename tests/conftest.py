"""Shared test set-up: nothing may reach a hub, and Prefect keeps its state in a temporary home."""
import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefcurate-prefect-"))
# Prefect's console handler keeps the stream it was created with; under pytest's capsys that
# stream is closed after the test, and a later INFO line would fail. Flow tests assert on
# return values and printed summaries, not on Prefect's own log lines.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect server (10-15 s to start) for a module's flow tests. Per module, not per
    session: tests/test_orchestration.py points this process at a real `prefect server start`, and a
    harness still active underneath would take some of its calls."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
