"""The local Kubernetes control plane's layout, versions and PKI (no process started)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import msgspec
import yaml

from deploy.local import node
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
    plane = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "volumes"]
    assert names == [*plane, "containerd", "kubelet", "kube-proxy", "coredns"]
    assert not set(names) & {svc.name for svc in stack.services}
    assert cluster._layout_file != stack._layout_file
    ports = [p for svc in cluster.services for p in svc.ports().values()]
    assert len(ports) == len(set(ports)) and all(p < 32768 for p in ports)
    # The fallback node: kwok instead of the runtime, kubelet, proxy and DNS.
    kwok = Cluster(msgspec.structs.replace(s, k8s_node="kwok"))
    assert [svc.name for svc in kwok.services] == [*plane, "kwok"]


def test_node_configs_keep_the_node_inside_what_the_project_owns(tmp_path: Path) -> None:
    home = tmp_path / "node"
    sock = home / "containerd.sock"
    ctd = node.containerd_config(home / "containerd", sock, 21338, "localhost/p:1")
    for key in ("root", "state", "path", "conf_dir"):
        (value,) = re.findall(rf'^\s*{key} = "(.*)"$', ctd, re.M)
        assert value.startswith(str(home)), key
    assert "restrict_oom_score_adj = true" in ctd and "netns_mounts_under_state_dir = true" in ctd
    assert 'address = "127.0.0.1:21338"' in ctd and f'address = "{sock}"' in ctd
    kubelet = yaml.safe_load(
        node.kubelet_config(
            home=home, node_ip="192.0.2.7", port=20250, healthz_port=20248, socket=sock,
            ca=tmp_path / "ca", cert=tmp_path / "c", key=tmp_path / "k",
        )
    )  # fmt: skip
    assert kubelet["cgroupRoot"] == "/fleetpulse" and kubelet["cgroupDriver"] == "cgroupfs"
    assert kubelet["makeIPTablesUtilChains"] is False and kubelet["readOnlyPort"] == 0
    assert kubelet["clusterDNS"] == [node.GATEWAY] and kubelet["address"] == "192.0.2.7"
    assert kubelet["podLogsDir"].startswith(str(home))
    proxy = yaml.safe_load(node.proxy_config(tmp_path / "kc", "192.0.2.7", 20256, 20249))
    assert proxy["mode"] == "nftables" and proxy["nodePortAddresses"] == ["192.0.2.7/32"]
    assert proxy["conntrack"]["maxPerCore"] == 0 and proxy["nftables"]["masqueradeAll"]
    cni = json.loads(node.cni_config(home / "ipam"))
    bridge = cni["plugins"][0]
    assert bridge["ipMasq"] is False and bridge["ipam"]["dataDir"] == str(home / "ipam")
    assert bridge["ipam"]["ranges"] == [[{"subnet": node.POD_CIDR, "gateway": node.GATEWAY}]]


def test_the_machine_state_is_recorded_once_and_put_back(tmp_path: Path) -> None:
    state = node.MachineState(tmp_path)
    state.record()
    first = json.loads(state.file.read_text())
    assert set(first["sysctls"]) <= set(node.SYSCTLS) and "kernel.panic" in first["sysctls"]
    state.file.write_text(json.dumps({**first, "existed": ["kept"]}))
    state.record()  # a node that was never taken down keeps its first record
    assert json.loads(state.file.read_text())["existed"] == ["kept"]


def test_the_pki_signs_what_each_component_presents(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pki.ensure()

    def text(name: str) -> str:
        out = subprocess.run(
            ["openssl", "x509", "-in", str(pki.path(name)), "-noout", "-text"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout

    for name in ("apiserver", "admin", "controller-manager", "scheduler", "kubelet"):
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", str(pki.path("ca.crt")), str(pki.path(f"{name}.crt"))],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stderr
    assert "IP Address:127.0.0.1" in text("apiserver.crt")
    assert "DNS:kubernetes.default.svc" in text("apiserver.crt")
    assert "O=system:masters" in text("admin.crt").replace(" = ", "=")
    assert "CN=system:kube-scheduler" in text("scheduler.crt").replace(" = ", "=")
    kubelet = text("kubelet.crt").replace(" = ", "=")
    assert "CN=system:node:fleetpulse" in kubelet and "O=system:nodes" in kubelet
    serving = pki.kubelet_serving("192.0.2.7")
    assert "IP Address:192.0.2.7" in text(f"{serving}.crt")
    made = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    pki.ensure()  # made once: a second call changes nothing
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == made
