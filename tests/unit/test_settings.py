"""Settings: defaults, derived endpoints, and the messages a bad value gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetpulse.errors import ConfigError
from fleetpulse.settings import (
    Settings,
    load_settings,
    markdown_table,
    overlay_settings,
    to_env,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_design_ports() -> None:
    s = load_settings({})
    assert (s.kafka_port, s.redis_port, s.query_port, s.ingest_port) == (59092, 56379, 58080, 58081)
    assert (s.jaeger_query_port, s.jaeger_otlp_grpc_port, s.jaeger_otlp_http_port) == (
        16686,
        4317,
        4318,
    )
    assert s.kafka_partitions == 12
    assert (s.topic_reports, s.topic_dlq, s.topic_alerts) == (
        "robot.reports",
        "robot.reports.dlq",
        "robot.alerts",
    )


def test_values_are_converted_from_strings() -> None:
    s = load_settings(
        {
            "FLEETPULSE_KAFKA_PARTITIONS": "24",
            "FLEETPULSE_TRACE_SAMPLE_RATIO": "0.25",
            "FLEETPULSE_LOG_LEVEL": "DEBUG",
            "UNRELATED": "ignored",
        }
    )
    assert s.kafka_partitions == 24
    assert s.trace_sample_ratio == 0.25
    assert s.log_level == "DEBUG"


def test_client_endpoints_derive_from_stack_ports_unless_set() -> None:
    s = load_settings({"FLEETPULSE_KAFKA_PORT": "7000", "FLEETPULSE_REDIS_PORT": "7001"})
    assert s.kafka_bootstrap_servers == "127.0.0.1:7000"
    assert s.redis_dsn == "redis://127.0.0.1:7001/0"
    assert s.otlp_grpc_endpoint == "http://127.0.0.1:4317"
    assert s.jaeger_api == "http://127.0.0.1:16686"
    s = load_settings(
        {"FLEETPULSE_KAFKA_BOOTSTRAP": "k1:9092,k2:9092", "FLEETPULSE_REDIS_URL": "redis://r:1/2"}
    )
    assert s.kafka_bootstrap_servers == "k1:9092,k2:9092"
    assert s.redis_dsn == "redis://r:1/2"


def test_settings_are_frozen() -> None:
    s = load_settings({})
    with pytest.raises(AttributeError):
        s.kafka_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FLEETPULSE_KAFKA_PARTITIONS": "0"},
            "FLEETPULSE_KAFKA_PARTITIONS='0' is not allowed (Expected `int` >= 1); "
            "expected an integer >= 1",
        ),
        (
            {"FLEETPULSE_KAFKA_PARTITIONS": "twelve"},
            "FLEETPULSE_KAFKA_PARTITIONS='twelve' is not allowed (Expected `int`, got `str`); "
            "expected an integer >= 1",
        ),
        (
            {"FLEETPULSE_REDIS_PORT": "70000"},
            "FLEETPULSE_REDIS_PORT='70000' is not allowed (Expected `int` <= 65535); "
            "expected an integer >= 1 and <= 65535",
        ),
        (
            {"FLEETPULSE_TRACE_SAMPLE_RATIO": "1.5"},
            "FLEETPULSE_TRACE_SAMPLE_RATIO='1.5' is not allowed (Expected `float` <= 1.0); "
            "expected a number >= 0.0 and <= 1.0",
        ),
        (
            {"FLEETPULSE_LOG_LEVEL": "loud"},
            "FLEETPULSE_LOG_LEVEL='loud' is not allowed (Invalid enum value 'loud'); "
            "expected one of DEBUG, ERROR, INFO, WARNING",
        ),
        (
            {"FLEETPULSE_TOPIC_REPORTS": "robot reports"},
            "FLEETPULSE_TOPIC_REPORTS='robot reports' is not allowed (Expected `str` matching "
            "regex '^[A-Za-z0-9._-]{1,249}$'); expected a string matching ^[A-Za-z0-9._-]{1,249}$",
        ),
        (
            {"FLEETPULSE_STACK_START_TIMEOUT_S": "-3"},
            "FLEETPULSE_STACK_START_TIMEOUT_S='-3' is not allowed (Expected `float` > 0.0); "
            "expected a number > 0",
        ),
    ],
)
def test_bad_values_name_variable_value_and_what_is_allowed(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert str(info.value) == message


def test_unknown_variable_is_rejected_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"FLEETPULSE_KAFKA_PARTITONS": "12"})
    text = str(info.value)
    assert text.startswith("FLEETPULSE_KAFKA_PARTITONS is not a fleetpulse setting.")
    assert "FLEETPULSE_KAFKA_PARTITIONS" in text


def test_a_files_values_go_over_the_environment_through_the_same_schema() -> None:
    env = {"FLEETPULSE_LOW_BATTERY_PCT": "15", "FLEETPULSE_WINDOW_S": "30"}
    s = overlay_settings(env, {"low_battery_pct": 12.5, "log_level": "DEBUG"}, "f.yaml")
    assert (s.low_battery_pct, s.window_s, s.log_level) == (12.5, 30, "DEBUG")
    assert overlay_settings(env, {}, "f.yaml") == load_settings(env)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"low_battery_pct": 120},
            "f.yaml: low_battery_pct: 120 is not allowed (Expected `float` <= 100.0); "
            "expected a number >= 0 and <= 100",
        ),
        (
            {"stuck_after": "many"},
            "f.yaml: stuck_after: 'many' is not allowed (Expected `int`, got `str`); "
            "expected an integer >= 1",
        ),
        (
            {"FLEETPULSE_LOW_BATTERY_PCT": 10},
            "f.yaml: 'FLEETPULSE_LOW_BATTERY_PCT' is not a fleetpulse setting: "
            "write low_battery_pct, not FLEETPULSE_LOW_BATTERY_PCT",
        ),
    ],
)
def test_a_bad_file_value_names_the_file_key_value_and_what_is_allowed(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        overlay_settings({}, values, "f.yaml")
    assert str(info.value) == message


def test_an_unknown_file_key_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        overlay_settings({}, {"low_battery": 10}, "f.yaml")
    text = str(info.value)
    assert text.startswith("f.yaml: 'low_battery' is not a fleetpulse setting: keys are")
    assert "low_battery_pct" in text


def test_every_field_is_documented_and_the_readme_table_is_current() -> None:
    table = markdown_table()
    rows = table.splitlines()[2:]
    assert len(rows) == len(Settings.__struct_fields__)
    assert all(not r.endswith("|  |") for r in rows), "a setting has no description"
    readme = (REPO / "README.md").read_text()
    assert table in readme, "README settings table is stale: run `just settings-table`"


def test_to_env_reproduces_the_settings_in_another_process() -> None:
    s = load_settings(
        {
            "FLEETPULSE_KAFKA_BOOTSTRAP": "k:1",
            "FLEETPULSE_REDIS_READ_FROM_REPLICAS": "true",
            "FLEETPULSE_TRACE_SAMPLE_RATIO": "0.125",
        }
    )
    assert load_settings(to_env(s)) == s
