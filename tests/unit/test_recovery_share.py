"""A recovery volume per process: each process of a cluster creates only its partitions."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import pytest

from dataflows.fleet import _init_partitions, _share
from dataflows.sink import metrics_offset
from fleetpulse.settings import Settings


def _parts(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("part-*"))


def test_all_partitions_in_one_shared_folder(tmp_path: Path) -> None:
    _init_partitions(tmp_path, 3)
    assert _parts(tmp_path) == ["part-0.sqlite3", "part-1.sqlite3", "part-2.sqlite3"]


def test_each_process_makes_its_share_and_together_they_make_all(tmp_path: Path) -> None:
    folders = [tmp_path / "p0", tmp_path / "p1"]
    for index, folder in enumerate(folders):
        _init_partitions(folder, 5, (index, 2))
    assert _parts(folders[0]) == ["part-0.sqlite3", "part-2.sqlite3", "part-4.sqlite3"]
    assert _parts(folders[1]) == ["part-1.sqlite3", "part-3.sqlite3"]
    assert not [p for f in folders for p in f.iterdir() if p.name.startswith(".init-")]
    # A restart finds its partitions and makes none again.
    before = (folders[1] / "part-1.sqlite3").stat().st_mtime_ns
    _init_partitions(folders[1], 5, (1, 2))
    assert (folders[1] / "part-1.sqlite3").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("per_process", "argv", "share"),
    [
        (False, ["-i", "1", "-a", "h:1;h:2"], (0, 1)),
        (True, ["-i", "1", "-a", "h:1;h:2"], (1, 2)),
        (True, ["-w", "2"], (0, 1)),  # one process alone keeps them all
    ],
)
def test_the_share_comes_from_the_setting_and_the_cluster_flags(
    monkeypatch: pytest.MonkeyPatch, per_process: bool, argv: list[str], share: tuple[int, int]
) -> None:
    monkeypatch.setattr(sys, "argv", ["bytewax.run", "flow", *argv])
    monkeypatch.delenv("BYTEWAX_PROCESS_ID", raising=False)
    s = msgspec.structs.replace(Settings(), recovery_per_process=per_process)
    assert _share(s) == share


def test_a_statefulset_pod_finds_its_share_as_the_bytewax_chart_sets_it_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No -i/-a: the pod's ordinal and a hostfile of peers, as bytewax.run reads them.
    hostfile = tmp_path / "hostfile.txt"
    peers = [f"dataflow-{i}.dataflow.fleetpulse.svc.cluster.local:9999" for i in range(3)]
    hostfile.write_text("\n".join(peers) + "\n")
    monkeypatch.setattr(sys, "argv", ["bytewax.run", "dataflows.fleet:build_flow()"])
    monkeypatch.delenv("BYTEWAX_PROCESS_ID", raising=False)
    monkeypatch.delenv("BYTEWAX_ADDRESSES", raising=False)
    monkeypatch.setenv("BYTEWAX_POD_NAME", "dataflow-2")
    monkeypatch.setenv("BYTEWAX_STATEFULSET_NAME", "dataflow")
    monkeypatch.setenv("BYTEWAX_HOSTFILE_PATH", str(hostfile))
    s = msgspec.structs.replace(Settings(), recovery_per_process=True)
    assert _share(s) == (2, 3)


@pytest.mark.parametrize(("per_process", "offset"), [(True, 1), (False, 0)])
def test_the_metrics_port_moves_with_the_process_only_where_processes_share_a_host(
    monkeypatch: pytest.MonkeyPatch, per_process: bool, offset: int
) -> None:
    monkeypatch.setattr(sys, "argv", ["bytewax.run", "flow", "-i", "1", "-a", "h:1;h:2"])
    monkeypatch.delenv("BYTEWAX_PROCESS_ID", raising=False)
    s = msgspec.structs.replace(Settings(), metrics_port_per_process=per_process)
    assert metrics_offset(s) == offset
