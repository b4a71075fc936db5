"""The HA figures page: docs/ha.md (and docs/ha.png) from the fault tests' last run.

    python -m deploy.local.figures [--from DIR]     (what `just ha-figures` runs last)

The fault tests (tests/integration/test_ha.py) each write one JSON file of figures to
``HA_FIGURES_DIR``; this renders them as one table per fault, with the command
that made them and the machine, and a chart of the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.local.stack import REPO_ROOT

__all__ = ["main", "render"]

DOCS = REPO_ROOT / "docs"
COMMAND = "just ha-figures"
ORDER = ("broker-kill", "broker-pause", "controller-kill", "redis-failover")
TITLES = {
    "broker-kill": "A broker leading most partitions killed (kill -9), then back",
    "broker-pause": "A slow broker: SIGSTOP for 6 s, then SIGCONT",
    "controller-kill": "The active KRaft controller killed (kill -9), then back",
    "redis-failover": "The Redis master killed (Sentinel failover), then Redis emptied",
}
MEANING = {
    "fault": "what was done",
    "rate_per_s": "HTTP reports/s offered (single posts, all robots together)",
    "robots": "robots reporting",
    "leaders_moved_s": "kill -> every partition led by another broker (s)",
    "new_controller": "node elected active controller",
    "controller_elected_s": "kill -> a new active controller (s)",
    "fault_seconds": "length of the event window measured (s)",
    "accepted_during": "reports answered 202 during the event",
    "answered_per_s": "reports/s the load reached during the event (202 + 503)",
    "refused_503": "reports answered 503 during the event (the robot retries)",
    "seconds_with_503": "whole seconds in which ingest answered any 503",
    "freshness_p99_s": "p99 of Kafka append -> state in Redis during the event (bucket bound, s)",
    "lost": "202-acknowledged reports missing from Redis (live state or history)",
    "dataflow_restarts": "dataflow restarts during the event",
    "failover_to_republished_s": "master kill -> live state re-published on the new master (s)",
    "flushall_to_converged_s": "FLUSHALL -> every robot's live state back (s)",
    "rebuild_state_exit": "exit status of `just rebuild-state` afterwards",
    "lost_live_states": "robots whose live state differs from the flow's after converging",
}


def render(figures: dict[str, dict[str, Any]]) -> str:
    first = next(iter(figures.values()))
    out = [
        "# High availability: figures of the last fault-test run",
        "",
        f"Made by `{COMMAND}` (the fault tests of `tests/integration/test_ha.py`, which",
        "start an HA stack of their own: 3 KRaft brokers, Redis master + replica + 3",
        "Sentinels with down-after 1000 ms; the product on it through HTTP, the dataflow as",
        "the main job's 2 processes), then `python -m deploy.local.figures`.",
        f"Machine: {first.get('machine', '?')}; run {first.get('when', '?')}. The same",
        "tests run in `./dev check`; what they assert does not depend on these numbers.",
        "",
        "![headline figures](ha.png)",
        "",
        "What the first runs found: with one broker of three killed, the dataflow's",
        "partition-end requests (a librdkafka admin client's ListOffsets) spun 70-95% of a",
        "core per flow process; on 2 cores that starved the Kafka controllers until their",
        "leadership flapped, and the dead broker's partitions moved only after ~31 s (503s",
        "in 15-21 seconds, freshness p99 30 s, still 0 reports lost). Since the ends are",
        "asked through a consumer of their own with a back-off per partition",
        "(`dataflows/source.py`, `_Ends`), the same fault moves them after ~9 s, the",
        "controller's broker session timeout.",
        "",
    ]
    rank = {n: i for i, n in enumerate(ORDER)}
    for name in sorted(figures, key=lambda n: (rank.get(n.partition(" (")[0], 99), n)):
        fig = figures[name]
        out += [
            f"## {TITLES.get(name, name)}",
            "",
            "| figure | value | meaning |",
            "| --- | --- | --- |",
        ]
        for key, value in fig.items():
            if key in ("test", "when", "machine"):
                continue
            out.append(f"| `{key}` | {value} | {MEANING.get(key, '')} |")
        out.append("")
    return "\n".join(out)


def chart(figures: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ORDER if n in figures and n != "redis-failover"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, key, label in (
        (left, "seconds_with_503", "seconds with 503s"),
        (right, "freshness_p99_s", "freshness p99 (s)"),
    ):
        values = [float(figures[n].get(key, 0)) for n in names]
        bars = ax.barh(names, values, color="#4a7bb7")
        for bar, v in zip(bars, values, strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:g}", va="center")
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.set_xlim(0, max(values, default=1) * 1.3 or 1)
    lost = sum(int(figures[n].get("lost", 0)) for n in names)
    fig.suptitle(f"Kafka faults under steady HTTP load: acknowledged reports lost = {lost}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="figures", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--from", dest="source", type=Path, default=REPO_ROOT / ".stack" / "figures"
    )
    args = parser.parse_args(argv)
    files = sorted(args.source.glob("*.json"))
    if not files:
        print(f"error: no figures in {args.source}; run `{COMMAND}`", file=sys.stderr)
        return 1
    figures = {}
    for f in files:
        data = json.loads(f.read_text())
        figures[data["test"]] = data
    DOCS.mkdir(exist_ok=True)
    (DOCS / "ha.md").write_text(render(figures))
    chart(figures, DOCS / "ha.png")
    print(f"wrote {DOCS / 'ha.md'} and {DOCS / 'ha.png'} from {len(files)} fault tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
