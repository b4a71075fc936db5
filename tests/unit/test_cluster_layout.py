"""The local Kubernetes control plane's layout, versions and PKI (no process started)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec

from deploy.local.cluster import Cluster, Pki, etcd_version, kube_version
from deploy.local.stack import Stack
from fleetpulse.settings import Settings


def test_versions_come_from_the_helper_modules() -> None:
    assert kube_version() == "v1.37.2"
    assert etcd_version().startswith("v3.6.")


def test_the_cluster_is_a_stack_of_its_own(tmp_path: Path) -> None:
    s = msgspec.structs.replace(Settings(), stack_dir=str(tmp_path))
    cluster, stack = Cluster(s), Stack(s)
    names = [svc.name for svc in cluster.services]
    assert names == ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]
    assert not set(names) & {svc.name for svc in stack.services}
    assert cluster._layout_file != stack._layout_file
    ports = [p for svc in cluster.services for p in svc.ports().values()]
    assert len(ports) == len(set(ports)) and all(p < 32768 for p in ports)


def test_the_pki_signs_what_each_component_presents(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pki.ensure()

    def text(name: str) -> str:
        out = subprocess.run(
            ["openssl", "x509", "-in", str(pki.path(name)), "-noout", "-text"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout

    for name in ("apiserver", "admin", "controller-manager", "scheduler"):
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", str(pki.path("ca.crt")), str(pki.path(f"{name}.crt"))],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stderr
    assert "IP Address:127.0.0.1" in text("apiserver.crt")
    assert "DNS:kubernetes.default.svc" in text("apiserver.crt")
    assert "O=system:masters" in text("admin.crt").replace(" = ", "=")
    assert "CN=system:kube-scheduler" in text("scheduler.crt").replace(" = ", "=")
    made = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    pki.ensure()  # made once: a second call changes nothing
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == made
