"""Hot reload from a ConfigMap-style folder: what applies, what waits for a restart, what
a bad file does, and what the metrics say."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from dataflows.rules import Rules
from fleetpulse.errors import ConfigError
from fleetpulse.reload import ActiveConfig, ConfigWatcher, Reload, config_hash
from fleetpulse.settings import CONFIG_FILE, Settings, load_settings
from observability.metrics import ConfigMetrics
from tests.configmap import ConfigMap

GOOD = "low_battery_pct: 20\nbattery_ok_pct: 25\n"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


@pytest.fixture
def logs() -> Iterator[_Records]:
    # A handler on our own logger: setup_logging elsewhere may stop propagation to root.
    handler = _Records()
    logger = logging.getLogger("fleetpulse.config")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def configmap(tmp_path: Path) -> ConfigMap:
    cm = ConfigMap(tmp_path / "config")
    cm.write(GOOD)
    return cm


def _watch(cm: ConfigMap, **env: str) -> ConfigWatcher:
    settings = load_settings({"FLEETPULSE_CONFIG_DIR": str(cm.root), **env})
    return ConfigWatcher(settings, check=Rules.from_settings)


def test_the_folder_is_laid_out_as_the_kubelet_does_it(configmap: ConfigMap) -> None:
    root = configmap.root
    assert (root / CONFIG_FILE).readlink() == Path("..data") / CONFIG_FILE
    first = (root / "..data").readlink()
    configmap.write("low_battery_pct: 10\n")
    second = (root / "..data").readlink()
    assert first != second and second.name.startswith("..2026_11_30_")
    assert not (root / first).exists()  # the old folder is gone, as after a kubelet update
    assert (root / CONFIG_FILE).read_text() == "low_battery_pct: 10\n"


def test_a_swapped_data_symlink_applies_the_new_values_once(configmap: ConfigMap) -> None:
    watcher = _watch(configmap, FLEETPULSE_LOW_BATTERY_PCT="5", FLEETPULSE_BATTERY_OK_PCT="8")
    applied: list[ActiveConfig] = []
    watcher.subscribe(applied.append)
    start = watcher.current
    # The file goes over the environment at start.
    assert (start.settings.low_battery_pct, start.settings.battery_ok_pct) == (20.0, 25.0)
    assert watcher.poll() is None  # nothing changed yet

    configmap.write("low_battery_pct: 50\nbattery_ok_pct: 55\noffline_after_s: 7.5\n")
    assert watcher.poll() == "applied"
    now = watcher.current.settings
    assert (now.low_battery_pct, now.battery_ok_pct, now.offline_after_s) == (50.0, 55.0, 7.5)
    assert watcher.current.hash == config_hash(now) != start.hash
    assert applied == [watcher.current]
    assert watcher.poll() is None  # one change, one reload


def test_a_key_dropped_from_the_file_falls_back_to_the_environment(configmap: ConfigMap) -> None:
    watcher = _watch(configmap, FLEETPULSE_LOW_BATTERY_PCT="5", FLEETPULSE_BATTERY_OK_PCT="8")
    configmap.write("battery_ok_pct: 25\n")
    assert watcher.poll() == "applied"
    assert watcher.current.settings.low_battery_pct == 5.0


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("low_battery_pct: [20\n", "is not valid YAML"),
        ("offline_after_s: 99\nlow_battery: 30\n", "'low_battery' is not a fleetpulse setting"),
        (
            "FLEETPULSE_LOW_BATTERY_PCT: 30\n",
            "write low_battery_pct, not FLEETPULSE_LOW_BATTERY_PCT",
        ),
        ("low_battery_pct: 150\n", "low_battery_pct: 150 is not allowed"),
        ("offline_after_s: soon\n", "offline_after_s: 'soon' is not allowed"),
        (
            "low_battery_pct: 30\nbattery_ok_pct: 25\n",
            "battery_ok_pct (25) must be above low_battery_pct (30)",
        ),
        ("[low_battery_pct]\n", "must map setting names to values"),
    ],
)
def test_a_bad_file_keeps_the_last_good_config_and_says_why(
    configmap: ConfigMap, logs: _Records, text: str, why: str
) -> None:
    watcher = _watch(configmap)
    configmap.write("low_battery_pct: 10\nbattery_ok_pct: 15\n")
    assert watcher.poll() == "applied"
    good = watcher.current

    configmap.write(text)
    assert watcher.poll() == "invalid"
    assert watcher.current is good  # nothing of the bad file applied, not even its good keys
    errors = [msg for level, msg in logs.lines if level == "ERROR"]
    assert len(errors) == 1
    assert why in errors[0]
    assert f"config {good.hash} stays" in errors[0]
    assert watcher.poll() is None  # said once, not every second

    configmap.write("low_battery_pct: 10\nbattery_ok_pct: 15\n")  # fixed: the same values
    assert watcher.poll() == "unchanged"
    assert watcher.current.settings == good.settings


def test_restart_only_keys_are_named_and_not_applied_while_hot_ones_are(
    configmap: ConfigMap, logs: _Records
) -> None:
    watcher = _watch(configmap)
    started = watcher.current.settings
    configmap.write(
        GOOD + "low_battery_pct: 30\nbattery_ok_pct: 35\nwindow_s: 30\nkafka_partitions: 24\n"
    )
    assert watcher.poll() == "applied"
    now = watcher.current
    assert (now.settings.low_battery_pct, now.settings.battery_ok_pct) == (30.0, 35.0)
    assert (now.settings.window_s, now.settings.kafka_partitions) == (60, 12)
    assert now.settings == msgspec.structs.replace(
        started, low_battery_pct=30.0, battery_ok_pct=35.0
    )
    assert now.restart_pending == ("kafka_partitions", "window_s")
    warnings = [msg for level, msg in logs.lines if level == "WARNING"]
    assert len(warnings) == 1
    assert "kafka_partitions (12 -> 24), window_s (60 -> 30)" in warnings[0]
    assert "takes effect after a restart" in warnings[0]

    # Only a restart-only change: nothing hot moved, the restart stays pending.
    configmap.write("low_battery_pct: 30\nbattery_ok_pct: 35\nwindow_s: 45\n")
    assert watcher.poll() == "unchanged"
    assert watcher.current.restart_pending == ("window_s",)
    assert watcher.current.settings.window_s == 60
    # Back to the started values: nothing pending any more.
    configmap.write("low_battery_pct: 30\nbattery_ok_pct: 35\n")
    assert watcher.poll() == "unchanged"
    assert watcher.current.restart_pending == ()


def test_restart_only_values_in_the_file_at_start_apply(configmap: ConfigMap) -> None:
    configmap.write(GOOD + "window_s: 30\n")
    watcher = _watch(configmap)
    assert watcher.current.settings.window_s == 30
    assert watcher.current.restart_pending == ()


def test_the_same_bytes_again_are_no_reload_and_a_comment_is_unchanged(
    configmap: ConfigMap,
) -> None:
    watcher = _watch(configmap)
    before = watcher.current
    configmap.write(GOOD)  # a new ..data with the same content
    assert watcher.poll() is None
    configmap.write("# thresholds for plant 1\n" + GOOD)
    assert watcher.poll() == "unchanged"
    assert watcher.current.hash == before.hash
    assert watcher.current.settings == before.settings


def test_the_hash_follows_the_hot_values_only() -> None:
    base = load_settings({})
    assert config_hash(base) == config_hash(load_settings({}))
    assert len(config_hash(base)) == 12
    assert config_hash(msgspec.structs.replace(base, low_battery_pct=21.0)) != config_hash(base)
    assert config_hash(msgspec.structs.replace(base, log_level="DEBUG")) != config_hash(base)
    assert config_hash(msgspec.structs.replace(base, window_s=30)) == config_hash(base)


def test_a_missing_file_is_invalid_while_running_and_fatal_at_start(
    configmap: ConfigMap, tmp_path: Path
) -> None:
    watcher = _watch(configmap)
    good = watcher.current
    (configmap.root / CONFIG_FILE).unlink()
    assert watcher.poll() == "invalid"
    assert watcher.current is good
    assert watcher.poll() is None
    with pytest.raises(ConfigError, match=r"cannot read .*fleetpulse\.yaml"):
        ConfigWatcher(load_settings({"FLEETPULSE_CONFIG_DIR": str(tmp_path / "none")}))


def test_a_bad_file_at_start_stops_start_up_naming_the_key(configmap: ConfigMap) -> None:
    configmap.write("low_battery_pct: 40\n")  # above the default battery_ok_pct (25)
    with pytest.raises(ConfigError, match=r"battery_ok_pct \(25\) must be above"):
        _watch(configmap)


def test_the_metrics_show_the_active_hash_and_count_results(configmap: ConfigMap) -> None:
    registry = CollectorRegistry()
    metrics = ConfigMetrics(registry)
    settings = load_settings({"FLEETPULSE_CONFIG_DIR": str(configmap.root)})
    watcher = ConfigWatcher(settings, check=Rules.from_settings, observe=metrics.observe)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    first = watcher.current.hash
    assert value("fleetpulse_config_info", hash=first) == 1.0
    assert value("fleetpulse_config_reloads_total", result="applied") == 0.0
    configmap.write("low_battery_pct: 50\nbattery_ok_pct: 55\nwindow_s: 30\n")
    watcher.poll()
    configmap.write("low_battery_pct: 500\n")
    watcher.poll()
    second = watcher.current.hash
    assert second != first
    assert value("fleetpulse_config_info", hash=first) is None
    assert value("fleetpulse_config_info", hash=second) == 1.0
    counts = {
        r: value("fleetpulse_config_reloads_total", result=r)
        for r in ("applied", "invalid", "unchanged")
    }
    assert counts == {"applied": 1.0, "invalid": 1.0, "unchanged": 0.0}
    assert value("fleetpulse_config_restart_pending") == 1.0


def test_the_thread_picks_up_an_update_within_a_few_polls(configmap: ConfigMap) -> None:
    seen: list[Reload | None] = []
    settings = load_settings({"FLEETPULSE_CONFIG_DIR": str(configmap.root)})
    watcher = ConfigWatcher(
        settings, observe=lambda result, _: seen.append(result), interval_s=0.05
    ).start()
    try:
        configmap.write("stuck_after: 3\n")
        deadline = time.monotonic() + 5
        while watcher.current.settings.stuck_after != 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.current.settings.stuck_after == 3
        assert seen == [None, "applied"]
    finally:
        watcher.stop()


def test_settings_without_a_config_dir_have_nothing_to_watch() -> None:
    with pytest.raises(ConfigError, match="FLEETPULSE_CONFIG_DIR is empty"):
        ConfigWatcher(Settings())
