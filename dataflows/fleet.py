"""The fleet dataflow: Kafka reports -> per-robot live state, windows, alerts -> Redis.

    python -m bytewax.run "dataflows.fleet:build_flow()"                 one process
    python -m bytewax.run "dataflows.fleet:build_flow()" -w 2            two workers
    python -m bytewax.run "dataflows.fleet:build_flow()" -i 0 -a "127.0.0.1:2101;127.0.0.1:2102"
                                                                          process 0 of 2

Recovery is on by default: started through ``bytewax.run`` without recovery flags,
the flow creates its recovery partitions in ``FLEETPULSE_RECOVERY_DIR`` (first run
only) and restarts the same command with them, snapshotting every
``FLEETPULSE_SNAPSHOT_INTERVAL_S``. Without recovery (``FLEETPULSE_RECOVERY_DIR=``),
Bytewax keeps no offsets and re-reads the topic from the beginning on every restart.

Shape (DESIGN.md, "Dataflow semantics"):

    ReportSource (Kafka): key by the robot's shard, keep raw bytes; progress marks ──▶
    stateful_batch (per shard of robots): decode, check, order by (boot, seq), live
        state, alerts, offline and 1-minute event-time windows on the arrival clock;
        bad data -> dead letters ──▶
    FleetSink: one idempotent Redis batch (state/), alerts and dead letters to Kafka

Items cross between workers as raw bytes and are decoded inside the keyed step:
pickling decoded Structs between processes costs more than decoding them.

With ``FLEETPULSE_CONFIG_DIR`` set, a watcher (``fleetpulse.reload``, one per process)
applies the hot thresholds of a changed config file to every shard from its next
batch (``dataflows.rules.LiveRules``) and the log level at once.

What the flow promises under bad data, stalls and crashes is in the README
("Bad data, clocks and crashes"); each piece says why where it is done.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import msgspec
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.recovery import init_db_dir

from dataflows.chaos import Chaos
from dataflows.rules import LiveRules, Rules
from dataflows.shard import ShardLogic
from dataflows.sink import FleetSink, metrics_offset, process_id
from dataflows.source import Binding, ReportSource
from dataflows.spans import flow_spans
from fleetpulse.alert_rules import RuleBook, RulesFile
from fleetpulse.errors import FleetpulseError
from fleetpulse.reload import ActiveConfig, ConfigWatcher, config_hash
from fleetpulse.settings import Settings, load_settings
from observability.logs import set_log_level, setup_logging
from observability.metrics import DataflowMetrics, dataflow_metrics
from state.connect import WRITER, check

__all__ = ["GC_THRESHOLD", "build_flow", "tune_gc"]

log = logging.getLogger("fleetpulse.dataflow")


def build_flow(settings: Settings | None = None, *, tail: bool = True) -> Dataflow:
    """The fleet dataflow. With no settings, they are loaded from the environment.

    ``tail=False`` stops at the end of the topic (tests, replays); the default keeps
    waiting for new reports.
    """
    if settings is None:  # the entry point: python -m bytewax.run "...:build_flow()"
        settings = load_settings()
        setup_logging(settings, "fleetpulse-dataflow")
        _check_redis(settings)
        tune_gc()
    _recovery_on_by_default(settings)
    watcher = _config_watcher(settings)
    if watcher is not None:  # the file's values go over the environment's
        settings = watcher.current.settings
        set_log_level(settings.log_level)
    metrics = dataflow_metrics(
        settings.metrics_host, settings.dataflow_metrics_port, metrics_offset(settings)
    )
    rules = LiveRules(Rules.from_settings(settings))
    _follow_rules(settings, rules, metrics)
    _follow_config(watcher, settings, rules, metrics)
    # What the recovery snapshots belong to; a snapshot of another topic is not resumed.
    binding = Binding.read(settings)
    chaos = Chaos.parse(settings.chaos)
    flow = Dataflow("fleetpulse")
    # Items arrive keyed by shard, values still raw bytes, with progress marks.
    keyed = op.input("reports", flow, ReportSource(settings, metrics, binding, tail=tail))

    # One span recorder for every shard's logic and the sink (sampled reports only).
    spans = flow_spans(settings)

    def builder(resume: bytes | None) -> ShardLogic:
        return ShardLogic(rules, spans, binding.text, resume, chaos.point("snapshot"))

    shards = op.stateful_batch("shards", keyed, builder)
    op.output("sink", shards, FleetSink(settings, chaos))
    return flow


# Collect young objects every 50,000 allocations rather than CPython's 700 (the older
# generations keep their ratios). The robots' state is made of Structs the collector
# does not track (gc=False), but a step allocates lists, tuples and dicts by the
# hundred thousand a second, and each collection of the oldest generation walks every
# tracked object the process holds: with the default, the collector took a fifth of a
# drain with alert rules on (bench/README.md, "What alert rules cost").
GC_THRESHOLD = (50_000, 20, 100)


def tune_gc() -> None:
    """Set the dataflow process's collector thresholds (:data:`GC_THRESHOLD`)."""
    gc.set_threshold(*GC_THRESHOLD)


def _check_redis(settings: Settings) -> None:
    """Stop start-up with one line (no traceback) when Redis refuses the writer's
    credentials or TLS handshake; an unreachable Redis is waited for by the sink."""
    try:
        check(settings, WRITER)
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


_watch_lock = threading.Lock()
_watchers: dict[str, ConfigWatcher] = {}


def _config_watcher(settings: Settings) -> ConfigWatcher | None:
    """This process's watcher of ``FLEETPULSE_CONFIG_DIR`` (one per folder, started once);
    None when the setting is empty. Raises ConfigError for a missing or bad file."""
    if not settings.config_dir:
        return None
    with _watch_lock:
        watcher = _watchers.get(settings.config_dir)
        if watcher is None:
            watcher = ConfigWatcher(settings, check=Rules.from_settings)
            _watchers[settings.config_dir] = watcher.start()
        return watcher


def _follow_config(
    watcher: ConfigWatcher | None, settings: Settings, rules: LiveRules, metrics: DataflowMetrics
) -> None:
    """Show the active config in the metrics and, with a watcher, apply its hot reloads:
    new rules for every shard (from their next batch) and the log level."""
    if watcher is None:
        metrics.config.observe(None, ActiveConfig(settings=settings, hash=config_hash(settings)))
        return
    watcher.observe = metrics.config.observe
    metrics.config.observe(None, watcher.current)

    def apply(active: ActiveConfig) -> None:
        # Checked by the watcher; the alert rules come from their own file.
        new = Rules.from_settings(active.settings)
        rules.current = msgspec.structs.replace(new, book=rules.current.book)
        set_log_level(active.settings.log_level)

    watcher.subscribe(apply)
    if watcher.current.settings != settings:  # reloaded between the start and subscribe
        apply(watcher.current)


_rules_files: dict[str, RulesFile] = {}


def _follow_rules(settings: Settings, rules: LiveRules, metrics: DataflowMetrics) -> None:
    """Load ``FLEETPULSE_RULES_FILE`` into ``rules`` and follow its changes (one watcher
    per file and process; raises ConfigError naming the problem for a bad file)."""
    if not settings.rules_file:
        metrics.rules.set(0)
        return

    def apply(book: RuleBook) -> None:
        rules.current = msgspec.structs.replace(rules.current, book=book)
        metrics.rules.set(len(book.rules))

    with _watch_lock:
        watched = _rules_files.get(settings.rules_file)
        if watched is None:
            watched = RulesFile(
                settings.rules_file,
                on_result=lambda result: metrics.rules_reloads.labels(result).inc(),
            )
            _rules_files[settings.rules_file] = watched.start()
        watched.subscribe(apply)
    apply(watched.current)


def _recovery_on_by_default(settings: Settings) -> None:
    """Under ``python -m bytewax.run`` without recovery flags, restart with recovery on."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_spec is None or main_spec.name != "bytewax.run":
        return  # built by tests or another runner, which choose their own recovery
    directory = os.environ.get("BYTEWAX_RECOVERY_DIRECTORY") or _flag(
        ("-r", "--recovery-directory")
    )
    if directory:
        _init_partitions(Path(directory), settings.recovery_partitions, _share(settings))
        return
    if not settings.recovery_dir:
        log.warning(
            "recovery is off (FLEETPULSE_RECOVERY_DIR is empty): every restart re-reads "
            "%s from the beginning",
            settings.topic_reports,
        )
        return
    recovery = Path(settings.recovery_dir).resolve()
    _init_partitions(recovery, settings.recovery_partitions, _share(settings))
    env = {
        **os.environ,
        "BYTEWAX_RECOVERY_DIRECTORY": str(recovery),
        "BYTEWAX_SNAPSHOT_INTERVAL": str(settings.snapshot_interval_s),
        "BYTEWAX_RECOVERY_BACKUP_INTERVAL": str(settings.backup_interval_s),
    }
    print(f"fleetpulse: recovery on, partitions in {recovery}", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "bytewax.run", *sys.argv[1:]], env)


def _flag(names: tuple[str, ...]) -> str | None:
    argv = sys.argv
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            return argv[i + 1]
        for name in names:
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _share(settings: Settings) -> tuple[int, int]:
    """(this process, processes) whose recovery partitions this process creates: all of
    them (0, 1) unless ``recovery_per_process`` and this process is one of a cluster."""
    addresses = _flag(("-a", "--addresses")) or os.environ.get("BYTEWAX_ADDRESSES")
    hostfile = os.environ.get("BYTEWAX_HOSTFILE_PATH")
    if not addresses and hostfile:  # the Bytewax chart's peers, one per line
        addresses = ";".join(Path(hostfile).read_text().split())
    processes = len([a for a in addresses.split(";") if a]) if addresses else 1
    if not settings.recovery_per_process or processes < 2:
        return 0, 1
    return process_id(), processes


def _init_partitions(directory: Path, count: int, share: tuple[int, int] = (0, 1)) -> None:
    """Create the recovery partitions once; concurrent processes of a cluster wait their turn.

    ``share`` (index, processes): create only partitions p with p % processes == index,
    the process's own folder then holds its share and the cluster as a whole all of them
    (Bytewax resumes when the processes together see every partition)."""
    index, processes = share
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if any(directory.glob("part-*")):
            return
        if processes == 1:
            init_db_dir(directory, count)  # type: ignore[no-untyped-call]
            print(
                f"fleetpulse: created {count} recovery partitions in {directory}", file=sys.stderr
            )
            return
        staging = directory / f".init-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        init_db_dir(staging, count)  # type: ignore[no-untyped-call]
        mine = [p for p in range(count) if p % processes == index]
        for part in mine:
            for path in staging.glob(f"part-{part}.*"):
                path.rename(directory / path.name)
        shutil.rmtree(staging)
        print(
            f"fleetpulse: created recovery partitions {mine} of {count} in {directory} "
            f"(process {index} of {processes})",
            file=sys.stderr,
        )
