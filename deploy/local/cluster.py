"""A local Kubernetes control plane, run like the local stack: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler as local processes, built from the Go module
proxy once per version, with a CA of their own and a kubeconfig in the stack folder.

    python -m deploy.local.cluster up | down | status | kubeconfig | kubectl-path

Binaries: deploy/local/kubernetes/go.mod pins Kubernetes (its staging modules replaced
by their published versions), deploy/local/kubernetes/etcd/ etcd; they are built
statically (CGO off, paths trimmed, stripped, versions stamped) into
``.stack/bin/<name>-<version>``. Everything else lives under ``.stack/k8s``: the PKI
(openssl), etcd's data, the kubeconfigs (``admin.kubeconfig`` for kubectl). Every port
is a setting (FLEETPULSE_K8S_*); everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

from deploy.local import node
from deploy.local.node import NODE_NAME
from deploy.local.procs import run_with_progress
from deploy.local.services import HERE, Service
from deploy.local.stack import Stack
from deploy.local.volumes import PROVISIONER
from deploy.local.volumes import STORAGE_CLASS as STORAGE_CLASS_NAME
from fleetpulse.errors import FleetpulseError, StackError
from fleetpulse.settings import Settings, env_name, load_settings
from state.acl import RedisUsers, acl_file

if TYPE_CHECKING:
    from deploy.local.main import Tokens

__all__ = ["Cluster", "kubectl", "main"]

BUILD = HERE / "kubernetes"
KUBE_CMDS = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "kube-proxy",
)
SERVICE_CIDR = "10.96.0.0/16"
NODE_USERS = ("kubelet", "kube-proxy", "coredns", "kwok", "volumes")
PAUSE_IMAGE = "localhost/fleetpulse-pause"


def _required(gomod: Path, module: str) -> str:
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", gomod.read_text(), re.M)
    if match is None:
        raise StackError(f"{gomod} does not require {module}")
    return match.group(1)


def kube_version() -> str:
    return _required(BUILD / "go.mod", "k8s.io/kubernetes")


def etcd_version() -> str:
    return _required(BUILD / "etcd" / "go.mod", "go.etcd.io/etcd/server/v3")


@dataclass(frozen=True)
class GoTool:
    """A binary built from a helper module of its own under deploy/local/kubernetes."""

    name: str
    folder: str
    module: str  # whose required version names the binary ("" = the folder's own code)
    package: str = "."
    about: str = "seconds"

    @property
    def dir(self) -> Path:
        return BUILD / self.folder

    def version(self) -> str:
        if self.module:
            return _required(self.dir / "go.mod", self.module)
        code = b"".join(p.read_bytes() for p in sorted(self.dir.glob("*.go")))
        return "src-" + hashlib.sha256(code).hexdigest()[:10]


TOOLS = {
    t.name: t
    for t in (
        GoTool("etcd", "etcd", "go.etcd.io/etcd/server/v3", about="about a minute"),
        GoTool("coredns", "coredns", "github.com/coredns/coredns", about="about a minute"),
        GoTool("crictl", "crictl", "sigs.k8s.io/cri-tools", "sigs.k8s.io/cri-tools/cmd/crictl"),
        GoTool("kwok", "kwok", "sigs.k8s.io/kwok", "sigs.k8s.io/kwok/cmd/kwok", "about a minute"),
        GoTool("pause", "pause", ""),
    )
}


def _bin(root: Path, name: str) -> Path:
    version = TOOLS[name].version() if name in TOOLS else kube_version()
    return root.resolve() / "bin" / f"{name}-{version}"


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise StackError("go not found on PATH; the local Kubernetes is built with Go")
    return go


_GO_ENV = {"CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false -trimpath"}


def build_tool(root: Path, name: str) -> Path:
    """Build one helper-module binary unless it is there (once per version); its path."""
    tool, target = TOOLS[name], _bin(root, name)
    if target.exists():
        return target
    out = target.with_name(f"{name}.partial")
    print(f"provisioning {name} {tool.version()}: go build (first run only, {tool.about})")
    run_with_progress(
        [_go(), "build", "-v", "-ldflags=-s -w", "-o", str(out), tool.package],
        f"go build {name}",
        root.resolve() / "logs" / f"provision-{name}.log",
        tool.dir,
        {**os.environ, **_GO_ENV},
    )
    out.rename(target)
    return target


def build_binaries(root: Path, node: str = "") -> None:
    """Build whatever of etcd and the Kubernetes commands is missing (first run only), and
    the node's tools: ``kubelet`` (crictl, CoreDNS, pause) or ``kwok``."""
    root = root.resolve()
    build_tool(root, "etcd")
    for name in {"kubelet": ("crictl", "coredns", "pause"), "kwok": ("kwok",)}.get(node, ()):
        build_tool(root, name)
    missing = [c for c in KUBE_CMDS if not _bin(root, c).exists()]
    if not missing:
        return
    version = kube_version()
    major, minor = version.lstrip("v").split(".")[:2]
    stamp = " ".join(
        f"-X {pkg}.{key}={value}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for key, value in (
            ("gitVersion", version),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        )
    )
    staging = root / "bin" / f"kube-{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    print(
        f"provisioning Kubernetes {version}: go build of {', '.join(missing)} "
        "(first run only, 6-10 minutes on 2 cores)"
    )
    run_with_progress(
        [
            _go(),
            "build",
            "-v",
            f"-ldflags=-s -w {stamp}",
            "-o",
            str(staging) + "/",
            *(f"k8s.io/kubernetes/cmd/{c}" for c in missing),
        ],
        "go build kubernetes",
        root / "logs" / "provision-kubernetes.log",
        BUILD,
        {**os.environ, **_GO_ENV},
    )
    for name in missing:
        (staging / name).rename(_bin(root, name))
    shutil.rmtree(staging)


# --- the PKI -----------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"openssl {args[0]} failed: {proc.stderr.strip()[-600:]}")


@dataclass(frozen=True)
class Pki:
    """A CA, the API server's serving certificate, client certificates and the service
    account key pair, made with openssl once per stack folder."""

    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    def ensure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.path("ca.crt").exists():
            _openssl("genrsa", "-out", "ca.key", "2048", cwd=self.dir)
            _openssl(
                "req", "-x509", "-new", "-key", "ca.key", "-days", "3650",
                "-subj", "/CN=fleetpulse-local-kubernetes-ca", "-out", "ca.crt",
                cwd=self.dir,
            )  # fmt: skip
        if not self.path("sa.key").exists():
            _openssl("genrsa", "-out", "sa.key", "2048", cwd=self.dir)
            _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=self.dir)
        sans = (
            "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
            "DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1"
        )
        self.cert("apiserver", "kube-apiserver", "", sans, server=True)
        self.cert("admin", "fleetpulse-admin", "system:masters")
        self.cert("controller-manager", "system:kube-controller-manager", "")
        self.cert("scheduler", "system:kube-scheduler", "")
        self.cert("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
        # Serving certificates of the controller manager and the scheduler (their health
        # endpoints), so probes verify them against the same CA.
        local = "DNS:localhost,IP:127.0.0.1"
        self.cert("controller-manager-serving", "kube-controller-manager", "", local, server=True)
        self.cert("scheduler-serving", "kube-scheduler", "", local, server=True)
        # The node: the kubelet's client identity (the Node authorizer's system:node:NAME),
        # kube-proxy (bound to system:node-proxier by default), the DNS (read-only).
        self.cert("kubelet", f"system:node:{NODE_NAME}", "system:nodes")
        self.cert("kube-proxy", "system:kube-proxy", "")
        self.cert("coredns", "fleetpulse-coredns", "")
        self.cert("kwok", "fleetpulse-kwok", "system:masters")
        self.cert("volumes", "fleetpulse-volumes", "system:masters")

    def kubelet_serving(self, node_ip: str) -> str:
        """The kubelet's serving certificate for this node address (made on first use)."""
        name = f"kubelet-serving-{node_ip}"
        self.cert(name, NODE_NAME, "", f"DNS:{NODE_NAME},IP:{node_ip}", server=True)
        return name

    def cert(self, name: str, cn: str, org: str, sans: str = "", server: bool = False) -> None:
        if self.path(f"{name}.crt").exists():
            return
        subject = f"/CN={cn}" + (f"/O={org}" if org else "")
        ext = self.dir / f"{name}.ext"
        usage = "serverAuth" if server else "clientAuth"
        ext.write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage={usage}\n" + (f"subjectAltName={sans}\n" if sans else "")
        )
        _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=self.dir)
        _openssl(
            "req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr",
            cwd=self.dir,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "3650", "-extfile", ext.name, "-out", f"{name}.crt",
            cwd=self.dir,
        )  # fmt: skip
        (self.dir / f"{name}.csr").unlink()
        ext.unlink()


def _kubeconfig(path: Path, server: str, pki: Pki, user: str) -> None:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: fleetpulse-local
  cluster:
    certificate-authority: {pki.path("ca.crt")}
    server: {server}
users:
- name: {user}
  user:
    client-certificate: {pki.path(f"{user}.crt")}
    client-key: {pki.path(f"{user}.key")}
contexts:
- name: fleetpulse-local
  context:
    cluster: fleetpulse-local
    user: {user}
current-context: fleetpulse-local
"""
    )
    path.chmod(0o600)


# --- the components ------------------------------------------------------------------------


class _Component(Service):
    """A control-plane process: its binary, the cluster folder, an HTTPS health check."""

    @property
    def home(self) -> Path:
        return self.root / "k8s"

    @property
    def pki(self) -> Pki:
        return Pki(self.home / "pki")

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.settings.k8s_apiserver_port}"

    @property
    def node_home(self) -> Path:
        return self.home / "node"

    @property
    def socket(self) -> Path:
        """containerd's socket (under the state folder; a unix socket path is short)."""
        return self.node_home / "containerd.sock"

    def provision(self) -> None:
        build_binaries(self.root, self.settings.k8s_node)
        self.pki.ensure()
        for user in ("admin", "controller-manager", "scheduler", *NODE_USERS):
            _kubeconfig(self.home / f"{user}.kubeconfig", self.server, self.pki, user)

    def _get(self, url: str) -> bool:
        try:
            ca = ssl.create_default_context(cafile=str(self.pki.path("ca.crt")))
            r = httpx.get(url, verify=ca, timeout=1.0)
        except (httpx.HTTPError, OSError):
            return False
        return r.status_code == 200 and r.text.strip() == "ok"


class Etcd(_Component):
    kind = "etcd"
    port_setting = "k8s_etcd_port"
    other_port_settings = ("k8s_etcd_peer_port",)

    def command(self) -> list[str]:
        s = self.settings
        client = f"http://127.0.0.1:{s.k8s_etcd_port}"
        peer = f"http://127.0.0.1:{s.k8s_etcd_peer_port}"
        return [
            str(_bin(self.root, "etcd")),
            "--name=fleetpulse",
            f"--data-dir={self.home / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=fleetpulse={peer}",
            "--listen-metrics-urls=",
            "--log-level=warn",
        ]

    def healthy(self) -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json().get("health") == "true"


class ApiServer(_Component):
    kind = "kube-apiserver"
    port_setting = "k8s_apiserver_port"

    def command(self) -> list[str]:
        s, pki = self.settings, self.pki
        return [
            str(_bin(self.root, "kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{s.k8s_etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # A loopback advertise address is refused by the endpoint reconciler.
            "--endpoint-reconciler-type=none",
            f"--secure-port={s.k8s_apiserver_port}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            f"--client-ca-file={pki.path('ca.crt')}",
            f"--tls-cert-file={pki.path('apiserver.crt')}",
            f"--tls-private-key-file={pki.path('apiserver.key')}",
            f"--kubelet-client-certificate={pki.path('apiserver-kubelet-client.crt')}",
            f"--kubelet-client-key={pki.path('apiserver-kubelet-client.key')}",
            f"--kubelet-certificate-authority={pki.path('ca.crt')}",
            f"--service-account-key-file={pki.path('sa.pub')}",
            f"--service-account-signing-key-file={pki.path('sa.key')}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--kubelet-preferred-address-types=InternalIP",
            "--profiling=false",
            "--v=0",
        ]

    def healthy(self) -> bool:
        return self._get(f"https://127.0.0.1:{self.port}/readyz")


class _Controller(_Component):
    """A component that talks to the API server with a kubeconfig of its own (``user``)
    and serves its health on a secure port with a certificate of our CA."""

    user = ""

    def command(self) -> list[str]:
        kubeconfig, pki = self.home / f"{self.user}.kubeconfig", self.pki
        return [
            str(_bin(self.root, self.kind)),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--tls-cert-file={pki.path(f'{self.user}-serving.crt')}",
            f"--tls-private-key-file={pki.path(f'{self.user}-serving.key')}",
            "--profiling=false",
            *self.flags(),
        ]

    def flags(self) -> list[str]:
        return []

    def healthy(self) -> bool:
        return self._get(f"https://127.0.0.1:{self.port}/healthz")


class ControllerManager(_Controller):
    kind = "kube-controller-manager"
    port_setting = "k8s_controller_manager_port"
    user = "controller-manager"

    def flags(self) -> list[str]:
        pki = self.pki
        return [
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.path('sa.key')}",
            f"--root-ca-file={pki.path('ca.crt')}",
            f"--cluster-signing-cert-file={pki.path('ca.crt')}",
            f"--cluster-signing-key-file={pki.path('ca.key')}",
        ]


class Scheduler(_Controller):
    kind = "kube-scheduler"
    port_setting = "k8s_scheduler_port"
    user = "scheduler"


# --- the node ----------------------------------------------------------------------------


class Containerd(_Component):
    """Debian's containerd with a config, root, state and socket of the project's own; the
    pause image is made and imported once it answers."""

    kind = "containerd"
    port_setting = "k8s_containerd_metrics_port"

    @property
    def config_path(self) -> Path:
        return self.node_home / "containerd.toml"

    @property
    def pause_ref(self) -> str:
        return f"{PAUSE_IMAGE}:{TOOLS['pause'].version()}"

    def provision(self) -> None:
        super().provision()
        node.ensure_containerd(self.root.resolve() / "logs")
        node.check_pod_cidr_is_free()
        state = node.MachineState(self.node_home)
        state.record()
        state.prepare()
        home = self.node_home / "containerd"
        (home / "cni").mkdir(parents=True, exist_ok=True)
        (home / "cni" / "10-fleetpulse.conflist").write_text(
            node.cni_config(self.node_home / "ipam") + "\n"
        )
        self.config_path.write_text(
            node.containerd_config(home, self.socket, self.port, self.pause_ref)
        )

    def command(self) -> list[str]:
        return ["containerd", f"--config={self.config_path}", "--log-level=warn"]

    def healthy(self) -> bool:
        return self.socket.exists() and node.http_ok(f"http://127.0.0.1:{self.port}/v1/metrics")

    def after_start(self) -> None:
        if not self.has_image(self.pause_ref):
            self.import_images([self._build_pause()])

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["ctr", f"--address={self.socket}", "--namespace=k8s.io", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise StackError(f"ctr {' '.join(args[:2])} failed: {proc.stderr.strip()[-800:]}")
        return proc

    def has_image(self, ref: str) -> bool:
        return ref in self.ctr("images", "list", "--quiet").stdout.split()

    def import_images(self, refs: Sequence[str]) -> None:
        """Move podman images into the node's containerd (an OCI archive each)."""
        from deploy.containers import Podman

        podman = Podman(self.settings)
        scratch = self.node_home / "import"
        scratch.mkdir(parents=True, exist_ok=True)
        for ref in refs:
            started = time.monotonic()
            archive = scratch / "image.tar"
            archive.unlink(missing_ok=True)
            podman.run("save", "--format", "oci-archive", "-o", str(archive), ref)
            self.ctr("images", "import", "--base-name", ref.split(":")[0], str(archive))
            archive.unlink()
            if not self.has_image(ref):
                raise StackError(f"{ref} is not in the node's containerd after its import")
            print(f"  {ref} imported into the node in {time.monotonic() - started:.1f}s")

    def _build_pause(self) -> str:
        """The pod sandbox image: the static pause program FROM scratch (podman)."""
        from deploy.containers import Podman

        podman = Podman(self.settings)
        podman.ensure_installed()
        if not podman.image_exists(self.pause_ref):
            folder = self.node_home / "pause-image"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_bin(self.root, "pause"), folder / "pause")
            (folder / "Containerfile").write_text(
                'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n'
            )
            podman.run("build", "-t", self.pause_ref, str(folder))
        return self.pause_ref


class Kubelet(_Component):
    kind = "kubelet"
    port_setting = "k8s_kubelet_healthz_port"
    other_port_settings = ("k8s_kubelet_port",)

    @property
    def node_ip(self) -> str:
        return self.settings.k8s_node_ip or node.discover_node_ip()

    def provision(self) -> None:
        super().provision()
        ip, pki = self.node_ip, self.pki
        serving = pki.kubelet_serving(ip)
        for sub in ("kubelet", "pod-logs", "volume-plugins"):
            (self.node_home / sub).mkdir(parents=True, exist_ok=True)
        (self.node_home / "kubelet.yaml").write_text(
            node.kubelet_config(
                home=self.node_home,
                node_ip=ip,
                port=self.settings.k8s_kubelet_port,
                healthz_port=self.port,
                socket=self.socket,
                ca=pki.path("ca.crt"),
                cert=pki.path(f"{serving}.crt"),
                key=pki.path(f"{serving}.key"),
            )
        )

    def command(self) -> list[str]:
        return [
            str(_bin(self.root, "kubelet")),
            f"--config={self.node_home / 'kubelet.yaml'}",
            f"--kubeconfig={self.home / 'kubelet.kubeconfig'}",
            f"--root-dir={self.node_home / 'kubelet'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={self.node_ip}",
            "--v=1",
        ]

    def healthy(self) -> bool:
        return node.http_ok(f"http://127.0.0.1:{self.port}/healthz")

    def after_start(self) -> None:
        """Wait for the node to be Ready."""
        deadline = time.monotonic() + self.settings.stack_start_timeout_s
        while not _node_ready(self.settings):
            if time.monotonic() > deadline:
                raise StackError(
                    f"the node {NODE_NAME} is not Ready after "
                    f"{self.settings.stack_start_timeout_s:.0f}s; see {self.log_path}"
                )
            time.sleep(0.5)


class Volumes(_Component):
    """The volume provisioner (deploy/local/volumes.py): a folder under .stack/k8s/volumes
    per claim of the default StorageClass ``standard``."""

    kind = "volumes"
    port_setting = "k8s_volumes_port"

    def command(self) -> list[str]:
        return [
            sys.executable,
            str(HERE / "volumes.py"),
            f"--kubeconfig={self.home / 'volumes.kubeconfig'}",
            f"--dir={self.home / 'volumes'}",
            f"--port={self.port}",
        ]

    def healthy(self) -> bool:
        return node.http_ok(f"http://127.0.0.1:{self.port}/healthz")

    def after_start(self) -> None:
        """The default StorageClass; one of the same name made otherwise is replaced (a
        StorageClass's provisioner cannot be changed in place)."""
        found = kubectl(self.settings, "get", "storageclass", "-o", "json")
        for sc in json.loads(found)["items"]:
            if sc["metadata"]["name"] == STORAGE_CLASS_NAME and sc["provisioner"] != PROVISIONER:
                kubectl(self.settings, "delete", "storageclass", STORAGE_CLASS_NAME)
        kubectl(self.settings, "apply", "--server-side", "-f", "-", input=STORAGE_CLASS)


STORAGE_CLASS = f"""apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {STORAGE_CLASS_NAME}
  annotations: {{storageclass.kubernetes.io/is-default-class: "true"}}
provisioner: {PROVISIONER}
reclaimPolicy: Delete
volumeBindingMode: Immediate
"""

DNS_RBAC = """apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "fleetpulse:coredns"}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "fleetpulse:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "fleetpulse:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: fleetpulse-coredns}
"""


def _node_ready(settings: Settings) -> bool:
    try:
        out = kubectl(settings, "get", "node", NODE_NAME, "-o", "json")
    except StackError:
        return False
    conditions = json.loads(out)["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


class KubeProxy(_Component):
    kind = "kube-proxy"
    port_setting = "k8s_proxy_healthz_port"
    other_port_settings = ("k8s_proxy_metrics_port",)

    def provision(self) -> None:
        super().provision()
        s = self.settings
        (self.node_home / "kube-proxy.yaml").write_text(
            node.proxy_config(
                self.home / "kube-proxy.kubeconfig",
                s.k8s_node_ip or node.discover_node_ip(),
                self.port,
                s.k8s_proxy_metrics_port,
            )
        )

    def command(self) -> list[str]:
        config = self.node_home / "kube-proxy.yaml"
        return [str(_bin(self.root, "kube-proxy")), f"--config={config}"]

    def healthy(self) -> bool:
        return node.http_ok(f"http://127.0.0.1:{self.port}/healthz")


class ClusterDns(_Component):
    """CoreDNS on the pod bridge's gateway address (the bridge is made here if the CNI
    has not made it yet)."""

    kind = "coredns"
    port_setting = "k8s_dns_ready_port"
    other_port_settings = ("k8s_dns_health_port",)

    def provision(self) -> None:
        super().provision()
        kubectl(self.settings, "apply", "--server-side", "-f", "-", input=DNS_RBAC)
        bridge = Path(f"/sys/class/net/{node.BRIDGE}")
        if not bridge.exists():
            for args in (
                ("link", "add", node.BRIDGE, "type", "bridge"),
                ("addr", "add", f"{node.GATEWAY}/24", "dev", node.BRIDGE),
                ("link", "set", node.BRIDGE, "up"),
            ):
                subprocess.run(["ip", *args], check=True, capture_output=True)
        (self.node_home / "Corefile").write_text(
            node.corefile(
                self.home / "coredns.kubeconfig",
                self.settings.k8s_dns_health_port,
                self.port,
            )
        )

    def command(self) -> list[str]:
        return [str(_bin(self.root, "coredns")), "-conf", str(self.node_home / "Corefile")]

    def healthy(self) -> bool:
        return node.http_ok(f"http://127.0.0.1:{self.port}/ready")


class Kwok(_Component):
    """The fallback node (FLEETPULSE_K8S_NODE=kwok): a Node object kwok keeps Ready and
    whose pods it reports Running without running anything."""

    kind = "kwok"
    port_setting = "k8s_kubelet_healthz_port"

    @property
    def stages(self) -> Path:
        return self.home / f"kwok-stages-{TOOLS['kwok'].version()}.yaml"

    def provision(self) -> None:
        """kwok's own "fast" stages (node Ready, pods Running), rendered from its module."""
        super().provision()
        if self.stages.exists():
            return
        tool = TOOLS["kwok"]
        found = subprocess.run(
            [_go(), "list", "-m", "-f", "{{.Dir}}", tool.module],
            cwd=tool.dir, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if found.returncode != 0:
            raise StackError(f"kwok's module is not in the module cache: {found.stderr.strip()}")
        fast = Path(found.stdout.strip()) / "kustomize" / "stage" / "fast"
        self.stages.write_text(kubectl(self.settings, "kustomize", str(fast)))

    def command(self) -> list[str]:
        return [
            str(_bin(self.root, "kwok")),
            f"--config={self.stages}",
            f"--kubeconfig={self.home / 'kwok.kubeconfig'}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--cidr={node.POD_CIDR}",
            f"--server-address=127.0.0.1:{self.port}",
        ]

    def healthy(self) -> bool:
        return node.http_ok(f"http://127.0.0.1:{self.port}/healthz")

    def after_start(self) -> None:
        kubectl(self.settings, "apply", "--server-side", "-f", "-", input=KWOK_NODE)


KWOK_NODE = f"""apiVersion: v1
kind: Node
metadata:
  name: {NODE_NAME}
  annotations: {{kwok.x-k8s.io/node: fake}}
  labels: {{kubernetes.io/hostname: {NODE_NAME}, type: kwok}}
"""


class Cluster(Stack):
    """The control plane and a node as a stack of its own: same start, health, pid files
    and logs as the local stack, its own layout record; `down` stops only its processes
    and restores what the node changed on the machine."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, ha=False)

    def layout(self, ha: bool) -> list[Service]:
        return self._layout(self.settings.k8s_node)

    def _layout(self, kind: str) -> list[Service]:
        s, root = self.settings, self.root
        plane: list[Service] = [
            Etcd(s, root),
            ApiServer(s, root),
            ControllerManager(s, root),
            Scheduler(s, root),
        ]
        if kind == "kwok":
            return [*plane, Volumes(s, root), Kwok(s, root)]
        node_ = [Containerd(s, root), Kubelet(s, root), KubeProxy(s, root), ClusterDns(s, root)]
        return [*plane, Volumes(s, root), *node_]

    def up(self, names: Sequence[str] = ()) -> list[str]:
        """Start the components one after the other, each healthy before the next: the
        controller manager and the scheduler exit if they start before the API server
        has made its bootstrap RBAC roles (its /readyz waits for them)."""
        started: list[str] = []
        for svc in [self.service(n) for n in names] if names else self.services:
            started += super().up([svc.name])
        return started

    @property
    def containerd(self) -> Containerd:
        return Containerd(self.settings, self.root)

    def down(self) -> None:
        """Stop the node first (the kubelet, then every pod through the CRI so the runtime
        releases their namespaces and addresses, then the rest), then the control plane,
        then put back what the node changed on the machine."""
        every: dict[str, Service] = {}
        for svc in [*self._layout("kubelet"), *self._layout("kwok")]:
            every.setdefault(svc.name, svc)
        order = ["kubelet", "kube-proxy", "coredns", "kwok", "containerd", "volumes"]
        order += ["kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]
        for name in order:
            svc = every[name]
            if name == "containerd" and self.pidfile(svc).running_pid():
                self._remove_pods()
            pid = self.pidfile(svc).stop()
            if pid:
                print(f"{svc.name:24} stopped (pid {pid})")
        proxy = _bin(self.root, "kube-proxy")
        home = self.root / "k8s" / "node"
        for line in node.MachineState(home).restore(proxy if proxy.exists() else None):
            print(f"  {line}")

    def _remove_pods(self) -> None:
        crictl = _bin(self.root, "crictl")
        if not crictl.exists():
            return
        endpoint = f"unix://{self.containerd.socket}"
        cmd = [str(crictl), f"--runtime-endpoint={endpoint}", f"--image-endpoint={endpoint}"]
        pods = subprocess.run([*cmd, "pods", "-q"], capture_output=True, text=True).stdout.split()
        if pods:
            print(f"removing {len(pods)} pod sandboxes through the CRI")
            subprocess.run([*cmd, "rmp", "--force", "--all"], capture_output=True, timeout=180)

    @property
    def _layout_file(self) -> Path:
        return self.root / "run" / "k8s-layout"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "k8s" / "admin.kubeconfig"


def kubectl(settings: Settings, *args: str, input: str | None = None) -> str:
    """kubectl ARGS against the local cluster as its admin; StackError with stderr if it fails."""
    cluster = Cluster(settings)
    proc = subprocess.run(
        [str(_bin(cluster.root, "kubectl")), f"--kubeconfig={cluster.kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise StackError(f"kubectl {' '.join(args[:2])} failed: {proc.stderr.strip()[-1200:]}")
    return proc.stdout


K8S = HERE.parent / "k8s"


def sync_images(settings: Settings) -> dict[str, str]:
    """Build the product's images (cached) and import into the node those whose podman
    image id changed since their last import; returns each image's id by reference."""
    from deploy.containers import IMAGES, Podman, build_images

    build_images(settings)
    containerd = Containerd(settings, Path(settings.stack_dir))
    record = containerd.node_home / "imported.json"
    imported = json.loads(record.read_text()) if record.exists() else {}
    podman = Podman(settings)
    for image in IMAGES:
        image_id = podman.run("image", "inspect", "--format", "{{.Id}}", image.ref).stdout.strip()
        if imported.get(image.ref) != image_id or not containerd.has_image(image.ref):
            containerd.import_images([image.ref])
            imported[image.ref] = image_id
            record.write_text(json.dumps(imported, indent=2) + "\n")
    return {ref: imported[ref] for ref in (image.ref for image in IMAGES)}


def apply_crds(settings: Settings) -> None:
    """The upstream CRDs (deploy/k8s/crds), applied server-side and established."""
    crds = sorted((K8S / "crds").glob("*.yaml"))
    for crd in crds:
        kubectl(settings, "apply", "--server-side", "--force-conflicts", "-f", str(crd))
    kubectl(settings, "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")


def deploy(settings: Settings, overlay: str, timeout_s: float = 600.0) -> None:
    """Apply an overlay of deploy/k8s to the local cluster and wait until every workload
    has rolled out (images built and imported first)."""
    path = K8S / "overlays" / overlay
    if not path.is_dir():
        known = ", ".join(sorted(p.name for p in (K8S / "overlays").iterdir()))
        raise StackError(f"no overlay {overlay!r} in deploy/k8s/overlays; there are: {known}")
    images = sync_images(settings) if settings.k8s_node == "kubelet" else {}
    apply_crds(settings)
    print(f"applying deploy/k8s/overlays/{overlay}")
    docs = [d for d in yaml.safe_load_all(kubectl(settings, "kustomize", str(path))) if d]
    tokens = dev_tokens(settings)
    redis_secrets = fill_redis_secrets(settings, docs)
    stamp = hashlib.sha256((tokens.setting() + redis_secrets).encode()).hexdigest()[:12]
    for doc in docs:
        data = doc.get("stringData", {})
        if doc["kind"] == "Secret" and data.get(env_name("api_tokens")) == "":
            data[env_name("api_tokens")] = tokens.setting()  # no token: the dev tokens
        if doc["kind"] in ("Deployment", "StatefulSet"):  # a token change rolls the pods
            meta = doc["spec"]["template"]["metadata"]
            meta.setdefault("annotations", {})["fleetpulse.local/tokens"] = stamp
            # So does a rebuilt image: its tag stays, its id changes (imagePullPolicy Never).
            spec = doc["spec"]["template"]["spec"]
            used = sorted(
                {c["image"] for c in [*spec.get("initContainers", []), *spec["containers"]]}
            )
            ids = [images[ref].removeprefix("sha256:")[:12] for ref in used if ref in images]
            if ids:
                meta["annotations"]["fleetpulse.local/images"] = ",".join(ids)
    _fit_cpu_requests(settings, docs)
    # A Job's pod template cannot change once made: a one-shot of an earlier deploy (the
    # topics, idempotent) is removed and runs again with this deploy's template.
    for doc in docs:
        if doc["kind"] == "Job":
            ns = doc["metadata"].get("namespace", NAMESPACE)
            kubectl(settings, "delete", "job", doc["metadata"]["name"], "-n", ns,
                    "--ignore-not-found", "--wait=true")  # fmt: skip
    listed = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    kubectl(settings, "apply", "--server-side", "--force-conflicts", "-f", "-", input=listed)
    wait_rollout(settings, NAMESPACE, timeout_s)
    print(where_to_look(settings, tokens))


NAMESPACE = "fleetpulse"


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _fit_cpu_requests(settings: Settings, docs: list[dict[str, Any]]) -> None:
    """Scale the workloads' CPU requests down to fit the node when they would not (the ha
    overlay asks for more than this machine's 2 cores); limits stay as they are, and the
    scheduler still places every pod. Printed, so nobody mistakes it for the overlay."""
    out = kubectl(settings, "get", "node", NODE_NAME, "-o", "json")
    allocatable = _cpu(json.loads(out)["status"]["allocatable"]["cpu"]) * 0.9
    pods = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            spec = doc["spec"]["template"]["spec"]
            pods += [spec] * int(doc["spec"].get("replicas", 1))
    containers = [c for spec in pods for c in spec["containers"]]
    asked = sum(_cpu(c.get("resources", {}).get("requests", {}).get("cpu", 0)) for c in containers)
    if asked <= allocatable:
        return
    factor = allocatable / asked
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            requests = c.get("resources", {}).get("requests", {})
            if "cpu" in requests:
                requests["cpu"] = f"{max(1, int(_cpu(requests['cpu']) * factor * 1000))}m"
    print(
        f"  the overlay asks for {asked:.2f} CPUs, this node has {allocatable / 0.9:.0f}: "
        f"CPU requests scaled by {factor:.2f} to fit (limits unchanged)"
    )


def fill_redis_secrets(settings: Settings, docs: list[dict[str, Any]]) -> str:
    """Fill the rendered Redis Secrets that are left empty (deploy/k8s/base/config.yaml):
    the writer's and reader's users with passwords made at the first deploy and kept
    (mode 0600) in the cluster's folder, the ACL file for the product's key prefix, and
    the admin (default user) password. Returns what changed pods must roll for."""

    folder = Path(settings.stack_dir).resolve() / "k8s"
    users = RedisUsers.kept(folder / "redis-users.json")
    admin_file = folder / "redis-admin-password"
    if not admin_file.exists():
        admin_file.touch(mode=0o600)
        admin_file.write_text(secrets.token_urlsafe(24))
    admin = admin_file.read_text().strip()
    env: dict[str, str] = next(
        (d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
         and d["metadata"]["name"] == "fleetpulse-env"),
        {},
    )  # fmt: skip
    product = load_settings({k: v for k, v in env.items() if k.startswith("FLEETPULSE_")})
    fills: dict[str, dict[str, str]] = {
        "fleetpulse-redis-writer": users.writer_env(),
        "fleetpulse-redis-reader": users.reader_env(),
        "redis-acl": {
            "users.acl": acl_file(users.settings(product), admin_password=admin),
            "admin-password": admin,
        },
    }
    for doc in docs:
        wanted = fills.get(doc["metadata"]["name"]) if doc["kind"] == "Secret" else None
        data = doc.get("stringData", {})
        if wanted and all(v == "" for v in data.values()):
            doc["stringData"] = dict(wanted)
    return json.dumps(fills, sort_keys=True)


def dev_tokens(settings: Settings) -> Tokens:
    """The local cluster's dev tokens (read, ingest, admin): made at the first deploy and
    kept (mode 0600) in the cluster's folder, so they stay valid across deploys."""
    from deploy.local.main import Tokens

    return Tokens.kept(Path(settings.stack_dir).resolve() / "k8s" / "dev-tokens.json")


def service_url(settings: Settings, name: str, namespace: str = NAMESPACE) -> str:
    """http://CLUSTER-IP:PORT of a Service (reachable from this machine through kube-proxy)."""
    svc = json.loads(kubectl(settings, "get", "service", name, "-n", namespace, "-o", "json"))
    return f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"


def where_to_look(settings: Settings, tokens: Tokens) -> str:
    ingest, query = service_url(settings, "ingest"), service_url(settings, "query")
    jaeger, board = service_url(settings, "jaeger"), service_url(settings, "dashboard")
    auth = f'-H "Authorization: Bearer {tokens.read}"'
    return f"""
fleetpulse runs on the local Kubernetes — where to look (Service addresses, routed here
by kube-proxy):
  dashboard           {board}/   (paste the read token below)
  fleet summary       curl {auth} {query}/v1/fleet/summary
  API docs            {query}/schema  ·  ingest {ingest}/schema
  traces (Jaeger API) {jaeger}/api/services
  pods                just kubectl -n {NAMESPACE} get pods -o wide
  dev tokens          read: {tokens.read}
                      ingest: {tokens.ingest}
                      admin: {tokens.admin}
"""


def wait_rollout(settings: Settings, namespace: str, timeout_s: float) -> None:
    """Wait until every Deployment and StatefulSet of ``namespace`` has all its replicas
    updated and ready, printing progress; StackError naming what is not."""
    started = time.monotonic()
    last = ""
    while True:
        out = kubectl(settings, "get", "deployments,statefulsets", "-n", namespace, "-o", "json")
        waiting = []
        for w in json.loads(out)["items"]:
            want, status = w["spec"].get("replicas", 1), w.get("status", {})
            ready, updated = status.get("readyReplicas", 0), status.get("updatedReplicas", 0)
            stale = status.get("observedGeneration", 0) < w["metadata"]["generation"]
            if ready < want or updated < want or stale:
                waiting.append(f"{w['metadata']['name']} {ready}/{want}")
        if not waiting:
            print(f"rolled out in {time.monotonic() - started:.0f}s")
            return
        line = "waiting for " + ", ".join(waiting)
        if line != last:
            print(f"  {time.monotonic() - started:5.0f}s {line}")
            last = line
        if time.monotonic() - started > timeout_s:
            pods = kubectl(settings, "get", "pods", "-n", namespace, "-o", "wide")
            raise StackError(f"not rolled out after {timeout_s:.0f}s: {line}\n{pods}")
        time.sleep(2.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "command", choices=("up", "down", "status", "deploy", "kubeconfig", "kubectl-path")
    )
    parser.add_argument("overlay", nargs="?", default="minikube", help="for deploy")
    args = parser.parse_args(argv)
    try:
        cluster = Cluster(load_settings())
        if args.command == "up":
            cluster.up()
            print(f"kubectl: export KUBECONFIG={cluster.kubeconfig}  (or `just kubectl ...`)")
        elif args.command == "down":
            cluster.down()
        elif args.command == "deploy":
            deploy(cluster.settings, args.overlay)
        elif args.command == "kubeconfig":
            print(cluster.kubeconfig)
        elif args.command == "kubectl-path":
            print(_bin(cluster.root, "kubectl"))
        else:
            ok = True
            for row in cluster.status():
                state = "healthy" if row.healthy else ("UNHEALTHY" if row.pid else "down")
                ok = ok and row.healthy
                print(f"{row.name:24} pid {row.pid or '-':>7}  port {row.port:<6} {state}")
            return 0 if ok else 1
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
