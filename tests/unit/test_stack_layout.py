"""The local stack's two layouts, without starting anything: names, ports, configs and
what the product's processes are told. (tests/integration/test_ha.py runs the HA one.)"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from deploy.local.services import Kafka, Sentinel
from deploy.local.stack import Stack
from fleetpulse.errors import StackError
from fleetpulse.settings import load_settings


def stack_in(tmp_path: Path, ha: bool) -> Stack:
    settings = msgspec.structs.replace(load_settings({}), stack_dir=str(tmp_path / "stack"))
    return Stack(settings, ha=ha)


def test_the_single_layout_is_one_of_each_and_tells_the_product_nothing(tmp_path: Path) -> None:
    stack = stack_in(tmp_path, ha=False)
    assert [(s.name, s.port) for s in stack.services] == [
        ("kafka", 59092),
        ("redis", 56379),
        ("jaeger", 16686),
    ]
    assert stack.client_env() == {}


def test_the_ha_layout_has_its_nodes_on_ports_of_their_own(tmp_path: Path) -> None:
    stack = stack_in(tmp_path, ha=True)
    assert [(s.name, s.ports()) for s in stack.services] == [
        ("kafka-1", {"ha_kafka_port": 29092, "ha_kafka_controller_port": 29093}),
        ("kafka-2", {"ha_kafka_port": 29102, "ha_kafka_controller_port": 29103}),
        ("kafka-3", {"ha_kafka_port": 29112, "ha_kafka_controller_port": 29113}),
        ("redis", {"redis_port": 56379}),
        ("redis-replica", {"redis_port": 56380}),
        ("sentinel-1", {"redis_port": 56390}),
        ("sentinel-2", {"redis_port": 56391}),
        ("sentinel-3", {"redis_port": 56392}),
        ("jaeger", stack.service("jaeger").ports()),
    ]
    assert stack.client_env() == {
        "FLEETPULSE_KAFKA_BOOTSTRAP": "127.0.0.1:29092,127.0.0.1:29102,127.0.0.1:29112",
        "FLEETPULSE_KAFKA_REPLICATION": "3",
        "FLEETPULSE_REDIS_SENTINELS": "127.0.0.1:56390,127.0.0.1:56391,127.0.0.1:56392",
    }
    # The product's settings accept what the stack tells them.
    product = load_settings(stack.client_env())
    assert product.kafka_replication == 3 and product.redis_sentinels


def test_each_kafka_node_gets_its_id_the_shared_quorum_and_three_copies(tmp_path: Path) -> None:
    stack = stack_in(tmp_path, ha=True)
    voters = "controller.quorum.voters=1@127.0.0.1:29093,2@127.0.0.1:29103,3@127.0.0.1:29113"
    for svc in stack.services:
        if not isinstance(svc, Kafka):
            continue
        svc._write_config()
        text = svc.config_path.read_text()
        assert svc.config_path == stack.root / svc.name / "server.properties"
        assert f"node.id={svc.node}\n" in text and voters + "\n" in text
        assert f"listeners=PLAINTEXT://127.0.0.1:{svc.port}," in text
        for line in (
            "default.replication.factor=3",
            "min.insync.replicas=2",
            "transaction.state.log.min.isr=2",
            "unclean.leader.election.enable=false",
        ):
            assert line + "\n" in text  # fmt: skip
        assert svc.heap_mb == 512  # half of the single node's 1024
    single = Kafka(stack.settings, stack.root)
    single._write_config()
    text = single.config_path.read_text()
    assert "controller.quorum.bootstrap.servers=127.0.0.1:59093\n" in text
    assert "listeners=PLAINTEXT://127.0.0.1:59092," in text
    assert "min.insync.replicas=1\n" in text and single.heap_mb == 1024


def test_each_sentinel_watches_the_first_master_with_quorum_2(tmp_path: Path) -> None:
    stack = stack_in(tmp_path, ha=True)
    sentinel = stack.service("sentinel-2")
    assert isinstance(sentinel, Sentinel)
    sentinel.config_path.parent.mkdir(parents=True)
    sentinel.config_path.write_text("kept\n")  # a Sentinel's own rewrites are kept ...
    sentinel.provision()
    assert sentinel.config_path.read_text() == "kept\n"
    sentinel.config_path.unlink()  # ... a fresh start writes the config
    sentinel.provision()
    text = sentinel.config_path.read_text()
    assert "port 56391\n" in text
    assert "sentinel monitor mymaster 127.0.0.1 56379 2\n" in text
    assert "sentinel down-after-milliseconds mymaster 5000\n" in text


def test_one_layout_will_not_start_while_the_other_runs(tmp_path: Path) -> None:
    ha = stack_in(tmp_path, ha=True)
    sentinel = ha.service("sentinel-1")
    # Pretend sentinel-1 runs: this test process stands in for it.
    import os

    ha.pidfile(sentinel).record(os.getpid())
    with pytest.raises(StackError) as info:
        stack_in(tmp_path, ha=False).up()
    assert str(info.value) == (
        "the HA stack is running (sentinel-1); stop it with `just stack-down` before "
        "starting the single-node one"
    )


def test_the_cli_names_a_node_it_does_not_have_and_prints_the_layouts_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy.local.stack import main

    monkeypatch.setenv("FLEETPULSE_STACK_DIR", str(tmp_path / "stack"))
    assert main(["kill", "kafka-9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no service named 'kafka-9'; the stack has kafka, redis, jaeger")
    assert main(["env"]) == 0  # alone: nothing to export
    assert capsys.readouterr().out == ""
    layout = tmp_path / "stack" / "run" / "layout"
    layout.parent.mkdir(parents=True)
    layout.write_text("ha\n")
    assert main(["env"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        'export FLEETPULSE_KAFKA_BOOTSTRAP="${FLEETPULSE_KAFKA_BOOTSTRAP:-'
        '127.0.0.1:29092,127.0.0.1:29102,127.0.0.1:29112}"',
        'export FLEETPULSE_KAFKA_REPLICATION="${FLEETPULSE_KAFKA_REPLICATION:-3}"',
        'export FLEETPULSE_REDIS_SENTINELS="${FLEETPULSE_REDIS_SENTINELS:-'
        '127.0.0.1:56390,127.0.0.1:56391,127.0.0.1:56392}"',
    ]
    assert main(["kill", "sentinel-2"]) == 1
    assert capsys.readouterr().err == "error: sentinel-2 is not running\n"
