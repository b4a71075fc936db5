"""Serve the API with granian (a production ASGI server), workers from settings.

    python -m api.serve ingest   the webhook server: POST routes, port FLEETPULSE_INGEST_PORT
    python -m api.serve query    the API server: GET routes, port FLEETPULSE_QUERY_PORT
    python -m api.serve dashboard  the dashboard: page, feed and GET routes, port
                                 FLEETPULSE_DASHBOARD_PORT
    python -m api.serve all      every route on FLEETPULSE_QUERY_PORT

Each worker process builds its app through one of the factories below, which load
the settings once for that process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from litestar import Litestar

from api.app import create_app
from api.auth import TokenStore
from api.signing import Signatures
from fleetpulse.errors import FleetpulseError
from fleetpulse.reload import ConfigWatcher
from fleetpulse.settings import Settings, load_settings
from observability.logs import setup_logging
from state.connect import READER, check

__all__ = ["all_app", "dashboard_app", "ingest_app", "main", "query_app"]


def _settings(service: str) -> Settings:
    settings = load_settings()
    setup_logging(settings, service)
    return settings


def ingest_app() -> Litestar:
    """Factory for the ingest server's workers."""
    return create_app(_settings("fleetpulse-ingest"), query=False)


def query_app() -> Litestar:
    """Factory for the query server's workers."""
    return create_app(_settings("fleetpulse-api"), ingest=False)


def dashboard_app() -> Litestar:
    """Factory for the dashboard server's workers."""
    return create_app(_settings("fleetpulse-api"), ingest=False, dashboard=True)


def all_app() -> Litestar:
    """Factory for a server with every route."""
    return create_app(_settings("fleetpulse-api"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="api.serve", description="serve the fleetpulse API")
    parser.add_argument("role", choices=("ingest", "query", "dashboard", "all"))
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        if settings.config_dir:  # the file's ports, workers, tokens... go over the environment's
            settings = ConfigWatcher(settings).current.settings
        # Check here so bad settings stop start-up with one clear message, not one per worker.
        TokenStore.parse(settings.api_tokens)
        Signatures.parse(settings.webhook_secrets, settings.webhook_tolerance_s)
        if args.role != "ingest":  # wrong Redis credentials or CA: one message, not a 503
            check(settings, READER)
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from granian.constants import Interfaces
    from granian.server import Server

    port = {"ingest": settings.ingest_port, "dashboard": settings.dashboard_port}.get(
        args.role, settings.query_port
    )
    if settings.api_workers > 1:
        # Workers are processes: their metrics add up through files in this folder.
        metrics_dir = Path(tempfile.mkdtemp(prefix=f"fleetpulse-{args.role}-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    server = Server(
        f"api.serve:{args.role}_app",
        address=settings.api_host,
        port=port,
        interface=Interfaces.ASGI,
        workers=settings.api_workers,
        factory=True,
        log_access=False,
        # Open SSE streams would hold a stop forever; clients resume with Last-Event-ID.
        workers_kill_timeout=10,
    )
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
