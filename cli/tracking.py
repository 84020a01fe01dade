"""Whether a one-shot command runs its stage in this process or as its Prefect flow, and the Prefect settings
the CLI sets before Prefect is imported. Plain Python: reading this module imports no Prefect."""
from __future__ import annotations

import os


def quiet_prefect_defaults() -> None:
    # No network here: Prefect's telemetry would log an error on every server start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def tracked(args) -> bool:
    """Run the stage as a Prefect flow: asked for (--track), or a server is configured in the environment."""
    return bool(args.track or os.environ.get("PREFECT_API_URL"))


def add_track(p) -> None:
    p.add_argument("--track", action="store_true",
                   help="run as a Prefect flow, recorded by the server at PREFECT_API_URL (without one, Prefect "
                        "starts a temporary server: 8-16 s); the default when PREFECT_API_URL is set")
