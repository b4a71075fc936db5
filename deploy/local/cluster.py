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
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from deploy.local.procs import run_with_progress
from deploy.local.services import HERE, Service
from deploy.local.stack import Stack
from fleetpulse.errors import FleetpulseError, StackError
from fleetpulse.settings import Settings, load_settings

__all__ = ["Cluster", "kubectl", "main"]

BUILD = HERE / "kubernetes"
KUBE_CMDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
SERVICE_CIDR = "10.96.0.0/16"


def _required(gomod: Path, module: str) -> str:
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", gomod.read_text(), re.M)
    if match is None:
        raise StackError(f"{gomod} does not require {module}")
    return match.group(1)


def kube_version() -> str:
    return _required(BUILD / "go.mod", "k8s.io/kubernetes")


def etcd_version() -> str:
    return _required(BUILD / "etcd" / "go.mod", "go.etcd.io/etcd/server/v3")


def _bin(root: Path, name: str) -> Path:
    version = etcd_version() if name == "etcd" else kube_version()
    return root / "bin" / f"{name}-{version}"


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise StackError("go not found on PATH; the local Kubernetes is built with Go")
    return go


def build_binaries(root: Path) -> None:
    """Build whatever of etcd and the Kubernetes commands is missing (first run only)."""
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false -trimpath"}
    logs = root / "logs"
    if not _bin(root, "etcd").exists():
        out = root / "bin" / "etcd.partial"
        print(f"provisioning etcd {etcd_version()}: go build (first run only, about a minute)")
        run_with_progress(
            [_go(), "build", "-v", "-ldflags=-s -w", "-o", str(out), "."],
            "go build etcd",
            logs / "provision-etcd.log",
            BUILD / "etcd",
            env,
        )
        out.rename(_bin(root, "etcd"))
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
        logs / "provision-kubernetes.log",
        BUILD,
        env,
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

    def provision(self) -> None:
        build_binaries(self.root)
        self.pki.ensure()
        for user in ("admin", "controller-manager", "scheduler"):
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


class Cluster(Stack):
    """The control plane as a stack of its own: same start, health, pid files and logs as
    the local stack, its own layout record, and `down` stops only its processes."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, ha=False)

    def layout(self, ha: bool) -> list[Service]:
        s, root = self.settings, self.root
        return [Etcd(s, root), ApiServer(s, root), ControllerManager(s, root), Scheduler(s, root)]

    def up(self, names: Sequence[str] = ()) -> list[str]:
        """Start the components one after the other, each healthy before the next: the
        controller manager and the scheduler exit if they start before the API server
        has made its bootstrap RBAC roles (its /readyz waits for them)."""
        started: list[str] = []
        for svc in [self.service(n) for n in names] if names else self.services:
            started += super().up([svc.name])
        return started

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=("up", "down", "status", "kubeconfig", "kubectl-path"))
    args = parser.parse_args(argv)
    try:
        cluster = Cluster(load_settings())
        if args.command == "up":
            cluster.up()
            print(f"kubectl: export KUBECONFIG={cluster.kubeconfig}  (or `just kubectl ...`)")
        elif args.command == "down":
            cluster.down()
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
