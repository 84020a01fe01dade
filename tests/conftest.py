"""Shared test set-up: nothing may reach a hub, and Prefect keeps its state in a temporary home."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefcurate-prefect-"))
# Prefect's console handler keeps the stream it was created with; under pytest's capsys that
# stream is closed after the test, and a later INFO line would fail. Flow tests assert on
# return values and printed summaries, not on Prefect's own log lines.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
