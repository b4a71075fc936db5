"""fleetpulse's container images and its compose topology, with podman where no Docker is.

    python -m deploy.containers images              (just images)
    python -m deploy.containers up [--sim]          (just compose-up)
    python -m deploy.containers down [--volumes]    (just compose-down)
    python -m deploy.containers ps                  (just compose-ps)

podman keeps everything under the stack folder (``.stack/containers``): its storage
(images, containers, volumes) through a storage.conf written there, and its engine
settings through deploy/images/containers.conf (the runc runtime, ulimits inside the
sandbox's limits) and deploy/images/registries.conf (no registry is searched), passed as
CONTAINERS_* variables to every podman this runs. The machine's own container config is
never read or changed.

No registry is reachable here, so the images' bases come from Debian itself: a
debootstrap ``minbase`` of bookworm imported as an image (made once, tagged with a hash
of its recipe, remade only when the recipe changes), and a Python one on top of it. The
Dockerfiles take them as their BASE build argument; with Docker they default to the
public images (python:3.11-slim-bookworm, debian:bookworm-slim).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.local.main import Tokens
from deploy.local.procs import run_with_progress
from fleetpulse.errors import FleetpulseError, StackError
from fleetpulse.settings import Settings, env_name, load_settings
from state.acl import RedisUsers, acl_file

__all__ = [
    "COMPOSE_FILE",
    "IMAGES",
    "Compose",
    "Image",
    "Podman",
    "build_images",
    "main",
]

ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = ROOT / "deploy" / "images"
COMPOSE_FILE = ROOT / "deploy" / "docker-compose-local.yml"
PACKAGES = ("podman", "buildah", "runc", "debootstrap")

# The debootstrap base: what it is made of. Any change here (or in base-python.Dockerfile)
# changes the bases' tags, so they are made again.
SUITE = "bookworm"
BASE_RECIPE = {"suite": SUITE, "variant": "minbase", "include": ["ca-certificates"]}
# Slim, as Debian's slim images are: no documentation, manuals or translations, now or in
# packages installed later (dpkg skips these paths; copyright files stay).
DPKG_SLIM = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""

# Extra CA certificates trusted while building (a TLS-inspecting proxy between the build
# and the package index), given to the build as the optional secret `build_ca`.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class Podman:
    """podman with the project's config and storage (nothing global is used)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = Path(settings.stack_dir).resolve() / "containers"
        self.logs = Path(settings.stack_dir).resolve() / "logs"
        self._env: dict[str, str] | None = None

    def ensure_installed(self) -> None:
        """podman, buildah, runc and debootstrap from Debian (first run only)."""
        missing = [p for p in PACKAGES if shutil.which(p) is None]
        if not missing:
            return
        apt = shutil.which("apt-get")
        if apt is None or os.geteuid() != 0:
            raise StackError(
                f"{', '.join(missing)} not found on PATH; install them "
                f"(Debian: apt-get install {' '.join(PACKAGES)})"
            )
        print(f"provisioning containers: apt-get install {' '.join(missing)} (first run only)")
        log = self.logs / "provision-containers.log"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run_with_progress([apt, "update"], "apt-get update", log, ROOT, env)
        run_with_progress([apt, "install", "-y", *missing], "apt-get install", log, ROOT, env)

    def env(self) -> dict[str, str]:
        """The environment of every podman (and podman-compose) this module runs."""
        if self._env is None:
            self._env = self._make_env()
        return self._env

    def _make_env(self) -> dict[str, str]:
        self.root.mkdir(parents=True, exist_ok=True)
        storage = self.root / "storage.conf"
        text = (
            "# Written by deploy/containers.py: podman's storage for this checkout.\n"
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.root / "storage"}"\n'
            f'runroot = "{self.root / "run"}"\n'
        )
        if not storage.exists() or storage.read_text() != text:
            storage.write_text(text)
        return {
            **os.environ,
            "CONTAINERS_CONF": str(IMAGES_DIR / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(storage),
            "CONTAINERS_REGISTRIES_CONF": str(IMAGES_DIR / "registries.conf"),
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """podman ARGS, its output captured; StackError with its stderr when check fails."""
        return _captured(["podman", *args], self.env(), f"podman {' '.join(args[:3])}", check)

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0

    def image_size(self, ref: str) -> int:
        out = self.run("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip()
        return int(out)

    def inventory(self) -> dict[str, set[str]]:
        """Every container and pod (by id) and volume (by name) in the project's storage."""
        return {
            kind: set(self.run(*cmd).stdout.split())
            for kind, cmd in (
                ("containers", ("ps", "-a", "--no-trunc", "--format", "{{.ID}}")),
                ("pods", ("pod", "ps", "--no-trunc", "--format", "{{.ID}}")),
                ("volumes", ("volume", "ls", "--format", "{{.Name}}")),
            )
        }

    def build(self, label: str, args: Sequence[str]) -> None:
        """podman build ARGS from the repository root, one progress line, a log per image."""
        cmd = ["podman", "build", "--network", "host", "--layers", *args, str(ROOT)]
        log = self.logs / f"image-{label}.log"
        run_with_progress(cmd, f"build {label}", log, ROOT, self.env())


def _captured(
    cmd: list[str], env: Mapping[str, str], what: str, check: bool
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with its output captured; StackError with its output's tail when
    ``check`` and it fails."""
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )
    if check and proc.returncode != 0:
        raise StackError(
            f"{what} failed (exit {proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr).strip()[-1500:]}"
        )
    return proc


# --- the bases -------------------------------------------------------------------------


def _apt_sources() -> tuple[str, list[Path]]:
    """The Debian mirror apt uses on this machine, and its source files that name it."""
    files = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    files += [Path("/etc/apt/sources.list")] if Path("/etc/apt/sources.list").exists() else []
    mirror = ""
    for path in files:
        for line in path.read_text().splitlines():
            words = line.split()
            at = {"URIs:": 1, "deb": 1}.get(words[0] if words else "", 0)
            if at and len(words) > at and "security" not in words[at]:
                mirror = mirror or words[at]
    if not mirror:
        raise StackError(
            "no Debian mirror found in /etc/apt/sources.list(.d); debootstrap needs one"
        )
    host = mirror.split("://", 1)[-1].split("/", 1)[0]
    return mirror, [p for p in files if host in p.read_text()]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:12]


def debian_base_ref() -> str:
    digest = _digest(json.dumps(BASE_RECIPE).encode(), DPKG_SLIM.encode())
    return f"localhost/fleetpulse-base/debian:{SUITE}-{digest}"


def python_base_ref() -> str:
    recipe = (IMAGES_DIR / "base-python.Dockerfile").read_bytes()
    digest = _digest(debian_base_ref().encode(), recipe)
    return f"localhost/fleetpulse-base/python:3.11-{SUITE}-{digest}"


def ensure_bases(podman: Podman) -> tuple[str, str]:
    """The Debian and Python bases, made when their recipe's tag is not in storage yet."""
    debian, python = debian_base_ref(), python_base_ref()
    if not podman.image_exists(debian):
        _debootstrap_base(podman, debian)
    if not podman.image_exists(python):
        podman.build(
            "base-python",
            [
                "-f",
                str(IMAGES_DIR / "base-python.Dockerfile"),
                "--build-arg",
                f"BASE={debian}",
                "-t",
                python,
            ],
        )
    return debian, python


_SLIM_DIRS = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/groff",
    "usr/share/lintian",
    "usr/share/locale",
)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _debootstrap_base(podman: Podman, ref: str) -> None:
    mirror, sources = _apt_sources()
    rootfs = podman.root / "rootfs-partial"
    shutil.rmtree(rootfs, ignore_errors=True)
    print(f"making the base image {ref}: debootstrap {SUITE} (once per recipe, ~40 s)")
    run_with_progress(
        [
            "debootstrap",
            f"--variant={BASE_RECIPE['variant']}",
            f"--include={','.join(BASE_RECIPE['include'])}",
            SUITE,
            str(rootfs),
            mirror,
        ],
        "debootstrap",
        podman.logs / "image-base-debian.log",
        ROOT,
    )
    # apt in the images uses this machine's Debian sources (the same mirror, plus the
    # updates and security suites where configured), not only the one debootstrap wrote.
    if any(p.suffix == ".sources" for p in sources):
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    for path in sources:
        target = rootfs / str(path).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (rootfs / "etc/dpkg/dpkg.cfg.d/fleetpulse-slim").write_text(DPKG_SLIM)
    for junk in ("var/lib/apt/lists", "var/cache/apt", "var/log", *_SLIM_DIRS):
        for child in (rootfs / junk).glob("*"):
            if junk == "usr/share/doc" and child.is_dir():
                for path in child.iterdir():  # the copyright files stay
                    if path.name != "copyright":
                        _remove(path)
            elif child.name != "locale.alias":
                _remove(child)
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        imported = subprocess.run(
            ["podman", "import", "--change", 'CMD ["bash"]', "-", ref],
            stdin=tar.stdout,
            env=podman.env(),
            capture_output=True,
            text=True,
            check=False,
        )
    shutil.rmtree(rootfs)
    if imported.returncode != 0 or tar.returncode != 0:
        raise StackError(f"podman import of the base failed: {imported.stderr.strip()[-800:]}")
    print(f"  base image {ref}: {podman.image_size(ref) / 1e6:.0f} MB")


# --- the images ------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """One image of the project: its Dockerfile, tag and what the local build needs."""

    name: str
    tag: str
    dockerfile: str
    base: str  # "python" or "debian": which local base stands in for BASE
    lend: tuple[str, ...] = field(default=())  # "maven" and/or "go": host caches lent

    @property
    def ref(self) -> str:
        return f"localhost/{self.name}:{self.tag}"


def _project_version() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise StackError("pyproject.toml has no version")


def _kafka_version() -> str:
    pom = (ROOT / "deploy/local/kafka/pom.xml").read_text()
    return pom.split("<kafka.version>", 1)[1].split("<", 1)[0]


def _jaeger_version() -> str:
    for line in (ROOT / "deploy/local/jaeger/go.mod").read_text().splitlines():
        words = line.split()
        if words[:1] == ["github.com/jaegertracing/jaeger"] and len(words) > 1:
            return words[1].lstrip("v")
    raise StackError("deploy/local/jaeger/go.mod does not require github.com/jaegertracing/jaeger")


IMAGES = (
    Image("fleetpulse", _project_version(), "fleetpulse.Dockerfile", "python"),
    Image("fleetpulse-kafka", _kafka_version(), "kafka.Dockerfile", "debian", ("maven",)),
    Image("fleetpulse-redis", SUITE, "redis.Dockerfile", "debian"),
    Image("fleetpulse-jaeger", _jaeger_version(), "jaeger.Dockerfile", "debian", ("go",)),
)


def _go_env(name: str) -> str:
    return subprocess.run(
        ["go", "env", name], capture_output=True, text=True, check=True
    ).stdout.strip()


def _maven_repo() -> Path:
    """The local Maven repository mvn uses here: -Dmaven.repo.local in MAVEN_OPTS, else
    ~/.m2/repository of the user's home as Java finds it (the password database, not
    $HOME)."""
    for word in os.environ.get("MAVEN_OPTS", "").split():
        if word.startswith("-Dmaven.repo.local="):
            return Path(word.split("=", 1)[1]).expanduser().resolve()
    return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".m2" / "repository"


def _lent(podman: Podman, what: str) -> list[str]:
    """podman build flags that lend the build stage this machine's tool caches, after
    making sure they hold what the build needs (a download here, once)."""
    if what == "maven":
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError("mvn not found on PATH; the Kafka image's jars come from Maven")
        scratch = podman.root / "kafka-jars"
        run_with_progress(
            [
                mvn,
                "-B",
                "-f",
                str(ROOT / "deploy/local/kafka/pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={scratch}",
                "-DincludeScope=runtime",
            ],
            "mvn (the Kafka jars in the local Maven repository)",
            podman.logs / "image-kafka-mvn.log",
            ROOT / "deploy/local/kafka",
        )
        shutil.rmtree(scratch, ignore_errors=True)
        return ["--build-arg", "OFFLINE=1", "-v", f"{_maven_repo()}:/root/.m2/repository"]
    if what == "go":
        if shutil.which("go") is None:
            raise StackError("go not found on PATH; the Jaeger image is built with Go")
        run_with_progress(
            ["go", "mod", "download"],
            "go mod download (the Jaeger modules in the local module cache)",
            podman.logs / "image-jaeger-go.log",
            ROOT / "deploy/local/jaeger",
        )
        cache = Path(_go_env("GOCACHE"))
        cache.mkdir(parents=True, exist_ok=True)
        return [
            "--build-arg",
            "OFFLINE=1",
            "-v",
            f"{_go_env('GOROOT')}:/usr/local/go:ro",
            "-v",
            f"{_go_env('GOMODCACHE')}:/go/pkg/mod",
            "-v",
            f"{cache}:/root/.cache/go-build",
        ]
    raise ValueError(what)


def build_images(settings: Settings, names: Sequence[str] = ()) -> list[Image]:
    """Build the project's images (all, or those named), cached layer by layer; returns them."""
    chosen = [i for i in IMAGES if not names or i.name in names]
    unknown = set(names) - {i.name for i in IMAGES}
    if unknown:
        raise StackError(
            f"no image {', '.join(sorted(unknown))}; the images: "
            + ", ".join(i.name for i in IMAGES)
        )
    podman = Podman(settings)
    podman.ensure_installed()
    started = time.monotonic()
    debian, python = ensure_bases(podman)
    for n, image in enumerate(chosen, 1):
        print(f"[{n}/{len(chosen)}] {image.ref} from deploy/images/{image.dockerfile}")
        args = [
            "-f",
            str(IMAGES_DIR / image.dockerfile),
            "-t",
            image.ref,
            "--build-arg",
            f"BASE={python if image.base == 'python' else debian}",
        ]
        if "go" in image.lend:
            args += ["--build-arg", f"GO_BASE={debian}"]
        for what in image.lend:
            args += _lent(podman, what)
        if CA_BUNDLE.exists():
            args += ["--secret", f"id=build_ca,src={CA_BUNDLE}"]
        podman.build(image.name, args)
    _prune(podman, keep={debian, python})
    print(f"images built in {time.monotonic() - started:.0f}s:")
    for image in chosen:
        print(f"  {image.ref:<42} {podman.image_size(image.ref) / 1e6:6.0f} MB")
    return chosen


def _prune(podman: Podman, keep: set[str]) -> None:
    """Drop bases of older recipes (only in the project's own storage). Untagged images
    stay: they include the build stages' results, the cache of the next build."""
    bases = "reference=localhost/fleetpulse-base/*"
    out = podman.run("images", "--filter", bases, "--format", "json").stdout
    for image in json.loads(out or "[]"):
        for name in image.get("Names") or []:
            if name not in keep:
                podman.run("rmi", name, check=False)


# --- the compose topology ----------------------------------------------------------------

PROJECT_LABEL = "io.podman.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
# The compose file's port variables, with their settings' defaults, for the port check.
PORT_SETTINGS = (
    "kafka_port",
    "kafka_controller_port",
    "redis_port",
    "jaeger_query_port",
    "jaeger_query_grpc_port",
    "jaeger_otlp_grpc_port",
    "jaeger_otlp_http_port",
    "ingest_port",
    "query_port",
    "dashboard_port",
    "notify_metrics_port",
)
PEER_PORTS = {"FLOW_PEER_PORT_0": 58090, "FLOW_PEER_PORT_1": 58091}


@dataclass
class Compose:
    """One compose project of deploy/docker-compose-local.yml, run with podman-compose.

    ``environ`` holds the variables the file is interpolated with (ports, tokens).
    """

    settings: Settings
    project: str = "fleetpulse"
    environ: dict[str, str] = field(default_factory=dict)
    profiles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.podman = Podman(self.settings)
        spec = yaml.safe_load(COMPOSE_FILE.read_text())
        self.services: dict[str, dict[str, Any]] = spec["services"]

    def env(self) -> dict[str, str]:
        return {**self.podman.env(), **self.environ}

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        profiles = [f"--profile={p}" for p in self.profiles]
        cmd = [sys.executable, "-m", "podman_compose", *profiles, "-f", str(COMPOSE_FILE)]
        return _captured(
            [*cmd, "-p", self.project, *args], self.env(), f"podman-compose {' '.join(args)}", check
        )

    # -- what is running

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        """The project's containers (all states), as podman ps --format json gives them."""
        filters = ["--filter", f"label={PROJECT_LABEL}={self.project}"]
        if service:
            filters += ["--filter", f"label={SERVICE_LABEL}={service}"]
        out = self.podman.run("ps", "-a", *filters, "--format", "json").stdout
        found: list[dict[str, Any]] = json.loads(out or "[]")
        return found

    def container(self, service: str) -> str:
        found = self.containers(service)
        if not found:
            raise StackError(f"no container of service {service} in project {self.project}")
        name: str = found[0]["Names"][0]
        return name

    def volumes(self) -> list[str]:
        out = self.podman.run(
            "volume", "ls", "--filter", f"label={PROJECT_LABEL}={self.project}", "--format", "json"
        ).stdout
        return [v["Name"] for v in json.loads(out or "[]")]

    def pods(self) -> list[str]:
        out = self.podman.run("pod", "ps", "--format", "json").stdout
        return [p["Name"] for p in json.loads(out or "[]") if self.project in p["Name"]]

    def inspect(self, service: str) -> dict[str, Any]:
        return self.inspect_id(self.container(service))

    def inspect_id(self, container: str) -> dict[str, Any]:
        out = self.podman.run("inspect", "--type", "container", container).stdout
        info: dict[str, Any] = json.loads(out)[0]
        return info

    def main_pid(self, service: str) -> int:
        """The host pid of the service's main process (to crash it as a fault would)."""
        pid = int(self.inspect(service)["State"]["Pid"])
        if pid <= 0:
            raise StackError(f"{service} is not running")
        return pid

    def logs(self, service: str, tail: int = 40) -> str:
        proc = self.podman.run("logs", "--tail", str(tail), self.container(service), check=False)
        return (proc.stdout + proc.stderr).strip()

    # -- up and down

    def order(self) -> list[list[str]]:
        """The services in start order: each level depends only on earlier ones."""
        wanted = {
            name: set((spec.get("depends_on") or {}).keys())
            for name, spec in self.services.items()
            if not spec.get("profiles") or set(spec["profiles"]) & set(self.profiles)
        }
        levels: list[list[str]] = []
        placed: set[str] = set()
        while len(placed) < len(wanted):
            level = sorted(n for n, deps in wanted.items() if n not in placed and deps <= placed)
            if not level:
                raise StackError(f"a depends_on cycle among {sorted(set(wanted) - placed)}")
            levels.append(level)
            placed |= set(level)
        return levels

    def check_ports(self) -> None:
        """Host networking: every port the services bind must be free."""
        taken = []
        for name in PORT_SETTINGS:
            var = env_name(name)
            port = int(self.environ.get(var, getattr(self.settings, name)))
            taken += [f"{port} ({var})"] if not _free(port) else []
        var = env_name("dataflow_metrics_port")
        metrics = int(self.environ.get(var, self.settings.dataflow_metrics_port))
        for port, name in ((metrics, var), (metrics + 1, f"{var} + 1")):
            taken += [f"{port} ({name})"] if not _free(port) else []
        for var, default in PEER_PORTS.items():
            port = int(self.environ.get(var, default))
            taken += [f"{port} ({var})"] if not _free(port) else []
        if taken:
            raise StackError(
                "ports in use on this machine: " + ", ".join(taken) + ". The compose services "
                "use the host's network; stop what holds them (the local stack: "
                "`just stack-down`) or move the ports with those variables"
            )

    def up(self, timeout_s: float = 240.0) -> None:
        """Start the services level by level, each level healthy (or done) before the next,
        as `depends_on: condition:` asks (podman < 4.6 does not wait by itself)."""
        self.check_ports()
        for level in self.order():
            print(f"starting {', '.join(level)}")
            self.compose("up", "-d", "--no-deps", *level)
            for service in level:
                self.wait_ready(service, timeout_s)

    def wait_ready(self, service: str, timeout_s: float) -> None:
        """Until the service is healthy (it has a health check), has exited 0 (a one-shot),
        or runs; StackError with its last log lines if it fails or the time runs out."""
        spec = self.services[service]
        one_shot = str(spec.get("restart", "no")) == "no"
        checked = "healthcheck" in spec
        started = time.monotonic()
        name = self.container(service)
        while True:
            state = self.inspect_id(name)["State"]
            if one_shot and state["Status"] == "exited":
                if state["ExitCode"] == 0:
                    break
                raise StackError(
                    f"{service} exited with {state['ExitCode']}:\n{self.logs(service)}"
                )
            if not one_shot and state["Status"] == "running":
                if not checked:
                    break
                # What podman's systemd timers would do: run the check, podman records it.
                if self.podman.run("healthcheck", "run", name, check=False).returncode == 0:
                    break
            if time.monotonic() - started > timeout_s:
                raise StackError(
                    f"{service} not {'done' if one_shot else 'healthy'} after {timeout_s:.0f}s "
                    f"(state {state['Status']}):\n{self.logs(service)}"
                )
            time.sleep(1.0)
        what = "done" if one_shot else ("healthy" if checked else "running")
        print(f"  {service:<11} {what} in {time.monotonic() - started:.0f}s")

    def down(self, volumes: bool = False) -> None:
        """Stop and remove the project's containers (and its volumes with ``volumes``)."""
        args = ["down", "-t", "20"] + (["-v"] if volumes else [])
        # Volumes the containers use that the file does not name (an image's VOLUME):
        # removed with the named ones.
        used = {
            m["Name"]
            for c in self.containers()
            for m in self.inspect_id(c["Id"]).get("Mounts") or []
            if m.get("Type") == "volume"
        }
        self.compose(*args)
        # podman-compose removes what the file names; anything of the project it missed
        # (a container of another profile, a volume of a removed service) goes too.
        for c in self.containers():
            self.podman.run("rm", "-f", "-v", c["Id"], check=False)
        if volumes:
            for v in {*self.volumes(), *used}:
                self.podman.run("volume", "rm", "-f", v, check=False)

    def leftovers(self) -> dict[str, list[str]]:
        """The project's containers, pods and volumes still present (all empty after down)."""
        return {
            "containers": [c["Names"][0] for c in self.containers()],
            "pods": self.pods(),
            "volumes": self.volumes(),
        }


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- the CLI -------------------------------------------------------------------------------


def _tokens_file(settings: Settings, project: str) -> Path:
    return Path(settings.stack_dir).resolve() / "containers" / f"{project}.tokens.json"


def _tokens(settings: Settings, project: str) -> Tokens:
    """The project's dev tokens (the main job's read, ingest and admin): made at its first
    compose-up, kept (mode 0600) so they stay valid across compose-up runs until
    compose-down -v."""
    return Tokens.kept(_tokens_file(settings, project))


def _redis_users(settings: Settings, project: str) -> RedisUsers:
    """The project's Redis users (writer, reader): made at its first compose-up with
    random passwords, kept (mode 0600) beside the tokens; and the ACL file the redis
    container starts with (hashes only, so readable by the container's redis user)."""
    folder = Path(settings.stack_dir).resolve() / "containers"
    users = RedisUsers.kept(folder / f"{project}.redis-users.json")
    acl = _acl_file(settings, project)
    acl.write_text(acl_file(users.settings(settings), default="ping"))
    acl.chmod(0o644)
    return users


def _acl_file(settings: Settings, project: str) -> Path:
    return Path(settings.stack_dir).resolve() / "containers" / f"{project}.users.acl"


def compose_environ(
    settings: Settings,
    tokens: Mapping[str, str],
    users: RedisUsers | None = None,
    project: str = "fleetpulse",
) -> dict[str, str]:
    """The compose file's variables: the port settings in effect, the token hashes, and
    the Redis users' passwords and the ACL file of ``project`` (``users``)."""
    dev = Tokens(**tokens)
    environ = {env_name(n): str(getattr(settings, n)) for n in PORT_SETTINGS}
    environ[env_name("dataflow_metrics_port")] = str(settings.dataflow_metrics_port)
    # The second dataflow process's metrics port, for the dashboard (compose cannot add).
    environ["DATAFLOW_METRICS_PORT_1"] = str(settings.dataflow_metrics_port + 1)
    environ[env_name("trace_trust")] = settings.trace_trust
    environ[env_name("api_tokens")] = dev.setting()
    environ[env_name("sim_token")] = dev.ingest
    for var, default in PEER_PORTS.items():
        environ[var] = os.environ.get(var, str(default))
    if users is not None:
        environ.update(users.writer_env())
        environ.update(users.reader_env())
        environ["REDIS_ACL_FILE"] = str(_acl_file(settings, project))
    return environ


def _where_to_look(settings: Settings, tokens: Tokens) -> str:
    s = settings
    return f"""
fleetpulse is up in containers (project fleetpulse; `just compose-ps`, `just compose-down`)
  dashboard           http://127.0.0.1:{s.dashboard_port}/   (paste the read token below)
  query API           http://127.0.0.1:{s.query_port}/v1/fleet/summary
  ingest (webhook)    http://127.0.0.1:{s.ingest_port}/v1/reports
  Jaeger query API    http://127.0.0.1:{s.jaeger_query_port}/api/services
  dev tokens          read: {tokens.read}
                      ingest: {tokens.ingest}
                      admin: {tokens.admin}
  try                 curl -H "Authorization: Bearer {tokens.read}" \\
                        http://127.0.0.1:{s.query_port}/v1/robots
  logs                podman logs fleetpulse_dataflow-0_1   (after eval "$(just compose-env)")
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.containers", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    images = sub.add_parser("images", help="build the images (cached), print names and sizes")
    images.add_argument("names", nargs="*", help="only these images")
    up = sub.add_parser("up", help="build the images, start the compose topology, wait healthy")
    up.add_argument("--sim", action="store_true", help="also run the simulator (profile sim)")
    down = sub.add_parser("down", help="stop and remove the compose topology's containers")
    down.add_argument("--volumes", "-v", action="store_true", help="and its volumes (data)")
    sub.add_parser("ps", help="the compose topology's containers")
    sub.add_parser("env", help="export lines for podman with the project's storage")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        if args.command == "images":
            build_images(settings, args.names)
            return 0
        podman = Podman(settings)
        if args.command == "env":
            env = podman.env()
            for var in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF"):
                print(f"export {var}={env[var]}")
            return 0
        tokens = _tokens(settings, "fleetpulse")
        users = _redis_users(settings, "fleetpulse")
        compose = Compose(
            settings,
            environ=compose_environ(settings, tokens._asdict(), users),
            profiles=("sim",) if getattr(args, "sim", False) else (),
        )
        if args.command == "up":
            compose.check_ports()  # before minutes of building, not after
            build_images(settings)
            compose.up()
            print(_where_to_look(settings, tokens), flush=True)
        elif args.command == "down":
            compose.down(volumes=args.volumes)
            if args.volumes:
                _tokens_file(settings, "fleetpulse").unlink(missing_ok=True)
                folder = _tokens_file(settings, "fleetpulse").parent
                (folder / "fleetpulse.redis-users.json").unlink(missing_ok=True)
            left = {k: v for k, v in compose.leftovers().items() if v}
            print("compose topology down" + (f"; left: {left}" if left else ""))
        elif args.command == "ps":
            for c in compose.containers():
                print(f"{c['Names'][0]:<32} {c['State']:<10} {c.get('Status', '')}")
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
