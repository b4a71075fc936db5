"""The local Kubernetes' node: containerd, the kubelet, kube-proxy and the cluster DNS as
local processes beside the control plane (deploy/local/cluster.py), and what they change
on the machine, recorded before the node first starts and restored by `k8s-down`.

Choices (each confined to what the project owns):

- **containerd** is Debian's (apt, first use), with a config, root, state, socket and
  network-namespace folder of its own under ``.stack/k8s/node``. Root here cannot lower
  ``oom_score_adj``, so the CRI restricts it to what it may set. No registry is reachable:
  the pod sandbox ("pause") is a static Go program in an image FROM scratch, and every
  image is moved in with ``podman save --format oci-archive`` → ``ctr images import``.
- **Pod network**: a CNI bridge ``fpbr0`` with host-local addresses from
  :data:`POD_CIDR`, no masquerade (pods reach the machine and each other, nothing else).
- **kube-proxy** in nftables mode: every rule in its own ``kube-proxy`` tables (nothing
  in the machine's iptables chains), service traffic masqueraded (so a pod can reach a
  Service backed by a pod on the same bridge), NodePorts only on the node's address,
  conntrack sysctls left alone.
- **Cluster DNS**: CoreDNS as a local process on the bridge's gateway address (pods'
  ``nameserver``), reading Services and EndpointSlices with a read-only identity.
- **Volumes**: a provisioner of the project's own (deploy/local/volumes.py) makes a
  folder per claim under ``.stack/k8s/volumes`` (default StorageClass ``standard``).
- The kubelet's cgroups go under ``/fleetpulse`` in every hierarchy; its sysctls
  (``vm.overcommit_memory``, ``kernel.panic``, ...) are recorded and put back.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from deploy.local.procs import run_with_progress
from fleetpulse.errors import StackError

__all__ = [
    "BRIDGE",
    "GATEWAY",
    "NODE_NAME",
    "POD_CIDR",
    "MachineState",
    "containerd_config",
    "discover_node_ip",
    "ensure_containerd",
    "kubelet_config",
]

NODE_NAME = "fleetpulse"
POD_CIDR = "10.244.0.0/24"
GATEWAY = "10.244.0.1"
BRIDGE = "fpbr0"
CGROUP_ROOT = "fleetpulse"
CLUSTER_DOMAIN = "cluster.local"

# What the kubelet (protectKernelDefaults off), kube-proxy and the CNI bridge may set.
SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
)
# Folders the runtime creates outside the stack folder (shim sockets, CNI's result cache).
OUTSIDE = (Path("/run/containerd"), Path("/var/lib/cni"))


@functools.cache
def discover_node_ip() -> str:
    """The IPv4 address of the interface with the default route (else the first global
    one): the kubelet refuses a loopback node address."""

    def ip_json(*args: str) -> list[dict[str, object]]:
        out = subprocess.run(["ip", "-j", "-4", *args], capture_output=True, text=True)
        return json.loads(out.stdout or "[]") if out.returncode == 0 else []

    devices = [str(r["dev"]) for r in ip_json("route", "show", "default") if "dev" in r]
    links = ip_json("addr", "show", "scope", "global")
    links.sort(key=lambda link: link.get("ifname") not in devices)
    for link in links:
        infos = link.get("addr_info", [])
        for info in infos if isinstance(infos, list) else []:
            address = str(info.get("local", ""))
            if address and link.get("ifname") != BRIDGE:
                return address
    raise StackError(
        "no IPv4 address on any interface for the local Kubernetes node; set FLEETPULSE_K8S_NODE_IP"
    )


def check_pod_cidr_is_free() -> None:
    """Refuse to start when the machine already routes the pod range (other than ours)."""
    out = subprocess.run(["ip", "-j", "-4", "route", "show"], capture_output=True, text=True)
    pods = ipaddress.ip_network(POD_CIDR)
    for route in json.loads(out.stdout or "[]"):
        dst, dev = str(route.get("dst", "")), route.get("dev")
        if dst in ("", "default") or dev == BRIDGE:
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.ip_network(dst, strict=False).overlaps(pods):
                raise StackError(
                    f"the pod range {POD_CIDR} overlaps the route {dst} on {dev}; "
                    "the local Kubernetes cannot use it on this machine"
                )


def ensure_containerd(logs: Path) -> None:
    """containerd (with ctr and the runc shim) from Debian, on first use."""
    if shutil.which("containerd") and shutil.which("containerd-shim-runc-v2"):
        return
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise StackError(
            "containerd not found on PATH; the local Kubernetes node needs it "
            "(Debian: apt-get install containerd runc containernetworking-plugins)"
        )
    print("provisioning the node: apt-get install containerd (first run only)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = logs / "provision-containerd.log"
    packages = ["containerd", "runc", "containernetworking-plugins", "iproute2", "nftables"]
    run_with_progress([apt, "update"], "apt-get update", log, logs, env)
    run_with_progress([apt, "install", "-y", *packages], "apt-get install", log, logs, env)


def containerd_config(home: Path, socket: Path, metrics_port: int, pause: str) -> str:
    """containerd's config: everything under ``home`` (root, state, opt, CNI config)."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""# Written by deploy/local/node.py: the local Kubernetes node's containerd.
version = 2
root = "{home / "root"}"
state = "{home / "state"}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[metrics]
  address = "127.0.0.1:{metrics_port}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{home / "opt"}"

[{cri}]
  sandbox_image = "{pause}"
  # root here cannot lower oom_score_adj; without this runc fails to start any container
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{home / "cni"}"
"""


def cni_config(ipam_dir: Path) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "fleetpulse",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(ipam_dir),
                        "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=2,
    )


def kubelet_config(
    *,
    home: Path,
    node_ip: str,
    port: int,
    healthz_port: int,
    socket: Path,
    ca: Path,
    cert: Path,
    key: Path,
) -> str:
    return f"""# Written by deploy/local/node.py: the local Kubernetes node's kubelet.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {node_ip}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
tlsCertFile: {cert}
tlsPrivateKeyFile: {key}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
containerRuntimeEndpoint: unix://{socket}
cgroupDriver: cgroupfs
cgroupRoot: /{CGROUP_ROOT}
failSwapOn: false
failCgroupV1: false
makeIPTablesUtilChains: false
protectKernelDefaults: false
clusterDNS: [{GATEWAY}]
clusterDomain: {CLUSTER_DOMAIN}
resolvConf: /etc/resolv.conf
podLogsDir: {home / "pod-logs"}
volumePluginDir: {home / "volume-plugins"}
# Images come in by import, never from a registry: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 200Mi
  nodefs.available: 2%
  nodefs.inodesFree: 2%
  imagefs.available: 2%
serializeImagePulls: false
shutdownGracePeriod: 0s
"""


def proxy_config(kubeconfig: Path, node_ip: str, healthz: int, metrics: int) -> str:
    return f"""# Written by deploy/local/node.py: the local Kubernetes node's kube-proxy.
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE_NAME}
mode: nftables
clusterCIDR: {POD_CIDR}
healthzBindAddress: 127.0.0.1:{healthz}
metricsBindAddress: 127.0.0.1:{metrics}
nodePortAddresses: ["{node_ip}/32"]
nftables:
  masqueradeAll: true
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
"""


def corefile(kubeconfig: Path, health: int, ready: int) -> str:
    return f"""# Written by deploy/local/node.py: the local Kubernetes' cluster DNS.
.:53 {{
    bind {GATEWAY}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    forward . /etc/resolv.conf
    cache 5
    loadbalance
}}
"""


# --- what the node changes on the machine ----------------------------------------------


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _mounts_under(folder: Path) -> list[str]:
    """Mount points at or below ``folder`` (deepest first)."""
    prefix = str(folder.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def _cgroup_dirs() -> list[Path]:
    return sorted(Path("/sys/fs/cgroup").glob(f"*/{CGROUP_ROOT}"))


class MachineState:
    """What the node changes outside the stack folder: recorded once before it starts
    (``record``), put back by ``restore`` (after every node process has stopped)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.file = home / "machine-before.json"

    def record(self) -> None:
        if self.file.exists():  # a node that ran before and was not taken down: keep
            return
        sysctls = {}
        for name in SYSCTLS:
            with contextlib.suppress(OSError):
                sysctls[name] = _sysctl_path(name).read_text().strip()
        state = {
            "sysctls": sysctls,
            "existed": [str(p) for p in OUTSIDE if p.exists()],
        }
        self.home.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(state, indent=2) + "\n")

    def prepare(self) -> None:
        """The kubelet's cgroup parent in every hierarchy."""
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if hierarchy.is_dir() and (hierarchy / "cgroup.procs").exists():
                with contextlib.suppress(OSError):
                    (hierarchy / CGROUP_ROOT).mkdir(exist_ok=True)

    def restore(self, kube_proxy: Path | None) -> list[str]:
        """Put the machine back; returns what it did (for the user)."""
        done: list[str] = []
        for point in _mounts_under(self.home):
            if subprocess.run(["umount", "-l", point], capture_output=True).returncode == 0:
                done.append(f"unmounted {point}")
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
            done.append(f"deleted the bridge {BRIDGE}")
        if kube_proxy is not None and _has_proxy_tables():
            subprocess.run([str(kube_proxy), "--cleanup"], capture_output=True)
            done.append("removed kube-proxy's nftables tables")
        for folder in _cgroup_dirs():
            removed = _remove_cgroup(folder)
            if removed:
                done.append(f"removed {removed} cgroups under {folder}")
        if not self.file.exists():
            return done
        state = json.loads(self.file.read_text())
        for name, value in state["sysctls"].items():
            path = _sysctl_path(name)
            with contextlib.suppress(OSError):
                if path.read_text().strip() != value:
                    path.write_text(value + "\n")
                    done.append(f"restored {name} = {value}")
        existed = set(state["existed"])
        for path in OUTSIDE:
            if str(path) not in existed and path.exists():
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path}")
        self.file.unlink()
        return done


def _has_proxy_tables() -> bool:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    return "kube-proxy" in out.stdout


def _remove_cgroup(folder: Path) -> int:
    """rmdir a cgroup and its children, deepest first (empty ones only); how many."""
    removed = 0
    for _ in range(20):  # a cgroup still emptying refuses rmdir for a moment
        dirs = sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, folder]:
            with contextlib.suppress(OSError):
                d.rmdir()
                removed += 1
        if not folder.exists():
            break
        time.sleep(0.25)
    return removed


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False
