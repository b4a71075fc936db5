"""The OpenAPI documents as a contract: schemathesis, black-box over HTTP, against running
API servers (issue 17).

    python -m deploy.local.fuzz --read fp_... --ingest fp_... --admin fp_...
        [--ingest-url http://127.0.0.1:58081] [--query-url http://127.0.0.1:58080]
        [--examples 100] [--seed 17] [--report-dir DIR]

Each server's own ``/schema/openapi.json`` is fuzzed with every check schemathesis has
(``--checks all``: no 5xx, every status and header documented, response bodies and media
types as documented, schema-violating requests refused, schema-valid ones accepted, a
missing required header refused, auth not ignored, ...) in both modes (``--mode all``),
a fixed number of cases per operation and a fixed seed, so a run is the same every time:

    ingest  the ingest server's routes with an ingest token (the report posts: real Kafka
            writes, so aim it at a topic you can spare)
    admin   its admin routes with an admin token (reset-order, retire, ack: control
            records; the rules file's GET/PUT)
    query   the query server's routes with a read token

Settings that differ from schemathesis' defaults are in ``schemathesis.toml`` beside this
file, with why; ``fuzz_hooks.py`` holds the one hook (a positive report's ``ts`` is now).
Each run gets its token in its environment, never on a command line. The report of a run
shows each failure with a curl line that repeats it (the token filtered out).
Exit status 0 when every run found nothing. ``just fuzz-api`` runs it against the main
job's servers (``./dev main`` prints their tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from fleetpulse.settings import load_settings

__all__ = ["CONFIG", "Answer", "Run", "Target", "main", "run", "targets"]

CONFIG = Path(__file__).with_name("schemathesis.toml")
ROOT = Path(__file__).resolve().parents[2]  # the hooks module is imported from here
# The bearer token reaches schemathesis in its environment (the config file's
# Authorization header reads it), not on a command line any user can list.
TOKEN_ENV = "FUZZ_BEARER_TOKEN"
# The admin routes (an admin token): commands written to Kafka, and the rules file.
ADMIN_PATHS = (
    r"/v1/robots/\{robot_id\}/(reset-order|retire)|/v1/incidents/\{incident_id\}/ack|/v1/rules"
)


class Target(NamedTuple):
    """One schemathesis run: a server, the token it is fuzzed with, which of its routes."""

    name: str
    base_url: str
    token: str
    paths: str  # a regex of the document's paths to fuzz


class Answer(NamedTuple):
    """One request of a run and its answer."""

    method: str
    path: str  # the URL's path, without the query
    status: int
    body: str


class Run(NamedTuple):
    """What one run found: its exit status, its report, and each request's answer."""

    target: Target
    returncode: int
    output: str
    answers: list[Answer]


def targets(ingest_url: str, query_url: str, read: str, ingest: str, admin: str) -> list[Target]:
    """The three runs that cover both servers' every route, each with the token it needs."""
    return [
        Target("ingest", ingest_url, ingest, f"^(?!({ADMIN_PATHS})$)"),
        Target("admin", ingest_url, admin, f"^({ADMIN_PATHS})$"),
        Target("query", query_url, read, ".*"),
    ]


def command(target: Target, har: Path, examples: int, seed: int) -> list[str]:
    """The schemathesis command line of ``target``."""
    cli = Path(sys.executable).with_name("schemathesis")
    return [
        str(cli),
        "--config-file",
        str(CONFIG),
        "run",
        f"{target.base_url}/schema/openapi.json",
        "--checks",
        "all",
        "--mode",
        "all",
        "--include-path-regex",
        target.paths,
        "--max-examples",
        str(examples),
        "--seed",
        str(seed),
        "--workers",
        "1",
        "--no-color",
        "--report",
        "har",
        "--report-har-path",
        str(har),
    ]


def run(target: Target, report_dir: Path, examples: int = 100, seed: int = 17) -> Run:
    """Fuzz ``target``; the report (stdout) keeps every failure's curl line."""
    report_dir.mkdir(parents=True, exist_ok=True)
    har = report_dir / f"{target.name}.har"
    done = subprocess.run(
        command(target, har, examples, seed),
        cwd=ROOT,
        env={**os.environ, TOKEN_ENV: target.token},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return Run(target, done.returncode, done.stdout + done.stderr, _answers(har))


def _answers(har: Path) -> list[Answer]:
    if not har.exists():
        return []
    out: list[Answer] = []
    for entry in json.loads(har.read_text())["log"]["entries"]:
        request, response = entry["request"], entry["response"]
        path = "/" + request["url"].split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        body = response.get("content", {}).get("text", "")
        out.append(Answer(request["method"], path, response["status"], body))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings()
    parser = argparse.ArgumentParser(
        prog="deploy.local.fuzz", description="schemathesis over HTTP against the API servers"
    )
    parser.add_argument("--read", required=True, help="a read token of the query server")
    parser.add_argument("--ingest", required=True, help="an ingest token of the ingest server")
    parser.add_argument("--admin", required=True, help="an admin token of the ingest server")
    parser.add_argument("--ingest-url", default=f"http://127.0.0.1:{settings.ingest_port}")
    parser.add_argument("--query-url", default=f"http://127.0.0.1:{settings.query_port}")
    parser.add_argument("--examples", type=int, default=100, help="cases per operation")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--report-dir", type=Path, default=Path(".stack/fuzz"))
    args = parser.parse_args(argv)
    failed = []
    for target in targets(args.ingest_url, args.query_url, args.read, args.ingest, args.admin):
        result = run(target, args.report_dir, args.examples, args.seed)
        print(f"== {target.name}: {target.base_url} ({len(result.answers)} requests)")
        print(result.output)
        if result.returncode != 0:
            failed.append(target.name)
    print(f"failed: {', '.join(failed)}" if failed else "no findings")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
