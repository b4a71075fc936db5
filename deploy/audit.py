"""The config audit (the seed's "configuration auditor"): every fleetpulse setting written
in the deployment files, checked against the settings schema before anything runs.

    python -m deploy.audit [PATH ...]        (default: deploy/; just audit-config)

A typo in a ConfigMap key is not an error anywhere else until a pod starts and stops on
it (an unknown FLEETPULSE_ variable is refused at start) or, worse, until a default
silently applies (a misspelt ``${FLEETPULSE_KAFKA_PROT:-59092}`` in the compose file).
This reads every YAML file under the paths, every document, and checks what fleetpulse
would read:

- Kubernetes ConfigMaps and Secrets: their ``FLEETPULSE_*`` keys (variables), and the
  hot-reload file (key ``fleetpulse.yaml``: settings by field name);
- workloads' containers: ``env`` entries, and ``envFrom`` references, which must name a
  ConfigMap or Secret in the files read. A container running the fleetpulse image must
  set the addresses its role needs whose defaults are only right on a developer's machine
  (the local stack's, 127.0.0.1 binds): in a pod 127.0.0.1 is the pod itself. Each
  container's whole configuration (its variables, then the hot-reload file mounted at
  FLEETPULSE_CONFIG_DIR) gets the pair checks the processes make (``Rules``);
- kustomizations: patches that set a ConfigMap's ``FLEETPULSE_*`` key or add a container
  variable, and ``configMapGenerator`` literals;
- compose files: each service's ``environment`` (interpolated with the file's defaults)
  and every ``${FLEETPULSE_*:-default}`` reference in a service;
- values files of the Bytewax Helm chart (deploy/k8s/waxctl): its ``env`` map, checked as
  the dataflow role's whole configuration.

Values are checked by the functions the processes use (``load_settings``,
``overlay_settings``), so the audit and a starting pod agree on what is wrong. The report
names the file, the object, the key and the problem; the exit status is 1 if there is a
problem, 0 if not.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

from dataflows.rules import Rules
from deploy.containers import IMAGES
from fleetpulse.alert_rules import RulesError, load_rules
from fleetpulse.errors import ConfigError
from fleetpulse.settings import (
    CONFIG_FILE,
    ENV_PREFIX,
    Settings,
    env_name,
    load_settings,
    overlay_settings,
)

RULES_KEY = "rules.yaml"  # the alert rules in a ConfigMap beside fleetpulse.yaml

__all__ = ["ROLE_NEEDS", "Problem", "Report", "audit", "check_file_key", "check_variable", "main"]

ROOT = Path(__file__).resolve().parents[1]
FIELDS = tuple(Settings.__struct_fields__)
VARIABLES = tuple(env_name(f) for f in FIELDS)
# The repository of the image whose containers read these settings.
FLEETPULSE_IMAGE = next(i.ref.rpartition(":")[0] for i in IMAGES if i.name == "fleetpulse")
POD_KINDS = ("Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")
# ${NAME}, ${NAME:-default}, ${NAME-default} (compose interpolation; $$ is a literal $).
_REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
T = TypeVar("T")

NOT_A_STRING = "{!r} is not a string: Kubernetes takes only strings here (quote it)"
NOT_FOUND = "not found in the files read"
UNSET_IN_POD = "not set: {} needs it, and its default (a 127.0.0.1 address) is the pod itself"


# What each role of the fleetpulse image (its first argument) must be told in a pod: the
# addresses it reaches and binds, whose defaults (the local stack's, 127.0.0.1) are only
# right on a developer's machine; in a pod 127.0.0.1 is the pod itself.
ROLE_NEEDS: dict[str, tuple[str, ...]] = {
    "ingest": ("kafka_bootstrap", "otlp_endpoint", "api_host"),
    "query": ("redis_url", "otlp_endpoint", "api_host"),
    "dataflow": ("kafka_bootstrap", "redis_url", "otlp_endpoint", "metrics_host"),
    "topics": ("kafka_bootstrap",),
}


class Problem(NamedTuple):
    """One thing wrong: where (file, object), which key, and what."""

    file: str
    obj: str
    key: str
    problem: str


@dataclass
class Report:
    """What an audit found, and how much it looked at."""

    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    checked: list[tuple[str, str, str]] = field(default_factory=list)  # (file, object, key)

    def add(self, problem: Problem) -> None:
        if problem not in self.problems:  # one mistake reached twice is reported once
            self.problems.append(problem)


# --- single keys ---------------------------------------------------------------------------


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def check_variable(name: str, value: Any) -> str | None:
    """What is wrong with the variable ``name`` set to ``value`` (None: nothing)."""
    if not name.startswith(ENV_PREFIX):
        return (
            f"variable names are case-sensitive: fleetpulse reads {name.upper()}, not {name}"
            if name.upper().startswith(ENV_PREFIX)
            else None
        )
    if name not in VARIABLES:
        return "unknown setting" + _did_you_mean(name, VARIABLES)
    try:
        load_settings({name: "" if value is None else str(value)})
    except ConfigError as exc:
        return str(exc).removeprefix(f"{name}=")  # the report names the key already
    return None


def check_file_key(key: Any, value: Any) -> str | None:
    """What is wrong with ``key: value`` in the hot-reload file (None: nothing)."""
    name = str(key)
    if name not in FIELDS:
        if name.upper() in VARIABLES:
            return f"the file takes setting names: write {name.upper()[len(ENV_PREFIX) :].lower()}"
        return "unknown setting" + _did_you_mean(name, FIELDS)
    try:
        overlay_settings({}, {name: value}, CONFIG_FILE)
    except ConfigError as exc:
        return str(exc).removeprefix(f"{CONFIG_FILE}: {name}: ")
    return None


def _file_values(text: Any) -> tuple[dict[str, Any], str | None]:
    """The hot-reload file's settings, or why it cannot be read."""
    try:
        values = yaml.safe_load(str(text)) or {}
    except yaml.YAMLError as exc:
        return {}, f"not YAML: {exc}".replace("\n", " ")
    if not isinstance(values, dict):
        return {}, f"{CONFIG_FILE} must be a mapping of settings, not {type(values).__name__}"
    return values, None


# --- walking the files ---------------------------------------------------------------------


@dataclass
class _Doc:
    file: Path
    body: Any

    @property
    def where(self) -> str:
        try:
            return str(self.file.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(self.file)


def _yaml_files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))
        else:
            yield path


def _name(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name', '?')}"


class _Auditor:
    def __init__(self, report: Report) -> None:
        self.report = report
        # By "Kind/name": the variables of each ConfigMap and Secret, the hot-reload files.
        self.sources: dict[str, list[tuple[_Doc, dict[str, str]]]] = {}
        self.files: dict[str, list[tuple[_Doc, dict[str, Any]]]] = {}

    def problem(self, doc: _Doc, obj: str, key: str, text: str | None) -> None:
        self.report.checked.append((doc.where, obj, key))
        if text is not None:
            self.report.add(Problem(doc.where, obj, key, text))

    def variable(self, doc: _Doc, obj: str, key: str, value: Any) -> None:
        """Check ``key=value`` if ``key`` is (or looks like) a fleetpulse variable."""
        if key.upper().startswith(ENV_PREFIX):
            self.problem(doc, obj, key, check_variable(key, value))

    # Kubernetes ------------------------------------------------------------------------

    def k8s_variable(self, doc: _Doc, obj: str, key: str, value: Any) -> None:
        """A variable in a Kubernetes object, where values must be strings."""
        if key.startswith(ENV_PREFIX) and not isinstance(value, str):
            self.problem(doc, obj, key, NOT_A_STRING.format(value))
        else:
            self.variable(doc, obj, key, value)

    def env_source(self, doc: _Doc, obj: Mapping[str, Any]) -> None:
        """A ConfigMap's or Secret's variables, checked and kept for envFrom."""
        name = _name(obj)
        data = dict(obj.get("data") or {})
        if obj["kind"] == "Secret":
            data = {k: base64.b64decode(str(v)).decode("utf-8", "replace") for k, v in data.items()}
            data.update(obj.get("stringData") or {})
        values: dict[str, str] = {}
        for key, value in data.items():
            if key == CONFIG_FILE:
                self.hot_file(doc, name, value)
            elif key == RULES_KEY:
                self.rules_file(doc, name, value)
            else:
                self.k8s_variable(doc, name, key, value)
                values[key] = str(value)
        self.sources.setdefault(name, []).append((doc, values))

    def rules_file(self, doc: _Doc, obj: str, text: Any) -> None:
        """The alert rules a ConfigMap carries (``rules.yaml``), checked as the flow would."""
        try:
            load_rules(str(text), RULES_KEY)
        except RulesError as exc:
            self.problem(doc, obj, RULES_KEY, str(exc).removeprefix(f"{RULES_KEY}: "))

    def hot_file(self, doc: _Doc, obj: str, text: Any) -> None:
        values, why = _file_values(text)
        if why is not None:
            self.problem(doc, obj, CONFIG_FILE, why)
            return
        for key, value in values.items():
            self.problem(doc, obj, f"{CONFIG_FILE}: {key}", check_file_key(key, value))
        self.files.setdefault(obj, []).append((doc, values))

    def workload(self, doc: _Doc, obj: Mapping[str, Any]) -> None:
        pod = _pod(obj)
        for c in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
            where = f"{_name(obj)} container {c.get('name', '?')}"
            for entry in c.get("env") or []:
                self.k8s_variable(doc, where, str(entry.get("name", "")), entry.get("value", ""))

    def containers(self, doc: _Doc, obj: Mapping[str, Any]) -> None:
        """Second pass, once every ConfigMap is known: each container's whole settings."""
        pod = _pod(obj)
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for c in pod.get("containers") or []:
            where = f"{_name(obj)} container {c.get('name', '?')}"
            env: dict[str, str] = {}
            complete = True
            for source in c.get("envFrom") or []:
                for kind, ref_key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    ref = source.get(ref_key)
                    if ref is None:
                        continue
                    found = _nearest(self.sources.get(f"{kind}/{ref.get('name')}", []), doc)
                    if found is not None:
                        env.update(found)
                        continue
                    complete = False
                    if not ref.get("optional"):
                        self.problem(doc, where, f"envFrom {kind}/{ref.get('name')}", NOT_FOUND)
            env.update({e["name"]: str(e["value"]) for e in c.get("env") or [] if "value" in e})
            ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
            runs_fleetpulse = str(c.get("image", "")).startswith(FLEETPULSE_IMAGE + ":")
            if not runs_fleetpulse or "command" in c or not complete:
                continue  # not our entrypoint, or settings we cannot see
            role = str((c.get("args") or ["?"])[0])
            for name in map(env_name, ROLE_NEEDS.get(role, ())):
                self.problem(doc, where, name, None if name in ours else UNSET_IN_POD.format(role))
            self._whole(doc, where, ours, c, volumes)

    def _whole(
        self,
        doc: _Doc,
        where: str,
        ours: dict[str, str],
        container: Mapping[str, Any],
        volumes: Mapping[str, Any],
    ) -> None:
        """The pair checks of the processes on the variables and the hot-reload file."""
        try:
            alone = load_settings(ours)
        except ConfigError:
            return  # already reported key by key
        values: dict[str, Any] = {}
        for mount in container.get("volumeMounts") or []:
            if alone.config_dir and mount.get("mountPath") == alone.config_dir:
                ref = (volumes.get(mount.get("name")) or {}).get("configMap") or {}
                found = _nearest(self.files.get(f"ConfigMap/{ref.get('name')}", []), doc) or {}
                # The file's good keys (its bad ones are reported already), as a pod would
                # not start with them at all.
                values = {k: v for k, v in found.items() if check_file_key(k, v) is None}
        try:
            Rules.from_settings(overlay_settings(ours, values, CONFIG_FILE))
        except ConfigError as exc:
            self.problem(doc, where, "(settings together)", str(exc))
        else:
            self.problem(doc, where, "(settings together)", None)

    # kustomize ---------------------------------------------------------------------------

    def kustomization(self, doc: _Doc, obj: Mapping[str, Any]) -> None:
        for i, patch in enumerate(obj.get("patches") or []):
            where = f"{obj['kind']} patch {i + 1}"
            target = patch.get("target") or {}
            if target.get("kind"):
                where += f" ({target['kind']}/{target.get('name', '*')})"
            if "patch" not in patch:
                continue  # a patch file: read as a file of its own
            try:
                body = yaml.load(patch["patch"], Loader=_LOADER)
            except yaml.YAMLError as exc:
                self.problem(doc, where, "patch", f"not YAML: {exc}".replace("\n", " "))
                continue
            self.patch_body(_Doc(doc.file, body), where)
        for gen in obj.get("configMapGenerator") or []:
            where = f"configMapGenerator {gen.get('name', '?')}"
            for literal in gen.get("literals") or []:
                key, _, value = str(literal).partition("=")
                self.variable(doc, where, key, value)
            for env_file in gen.get("envs") or []:
                path = doc.file.parent / env_file
                for line in path.read_text().splitlines() if path.exists() else []:
                    key, sep, value = line.partition("=")
                    if sep and not line.lstrip().startswith("#"):
                        self.variable(doc, f"{where} ({env_file})", key.strip(), value.strip())

    def patch_body(self, doc: _Doc, where: str) -> None:
        """A JSON 6902 patch (a list of operations) or a strategic merge patch."""
        if isinstance(doc.body, dict):
            self.document(doc)
            return
        for op in doc.body if isinstance(doc.body, list) else []:
            if not isinstance(op, dict) or op.get("op") not in ("add", "replace"):
                continue
            path, value = str(op.get("path", "")), op.get("value")
            last = path.rsplit("/", 1)[-1].replace("~1", "/").replace("~0", "~")
            if path.startswith("/data/") and last == CONFIG_FILE:
                self.hot_file(doc, where, value)
            elif path.startswith("/data/"):
                self.variable(doc, where, last, value)
            elif "/env/" in path and isinstance(value, dict) and "name" in value:
                self.variable(doc, where, str(value["name"]), value.get("value", ""))

    # compose -----------------------------------------------------------------------------

    def compose(self, doc: _Doc, body: Mapping[str, Any]) -> None:
        for service, spec in (body.get("services") or {}).items():
            where = f"service {service}"
            environment = (spec or {}).get("environment") or {}
            if isinstance(environment, list):
                environment = dict(str(e).partition("=")[::2] for e in environment)
            for key, value in environment.items():
                self.variable(doc, where, str(key), _interpolate(value))
            for text in _strings(spec):
                for name, default in _REFERENCE.findall(text):
                    self.variable(doc, where, name, default)

    # the Bytewax Helm chart's values (waxctl) ----------------------------------------------

    def chart_values(self, doc: _Doc, body: Mapping[str, Any]) -> None:
        """The chart runs the image's dataflow with ``env`` (a map) as its variables."""
        where = "Bytewax chart values env"
        ours: dict[str, str] = {}
        for key, value in (body.get("env") or {}).items():
            self.variable(doc, where, str(key), str(value))
            if str(key).startswith(ENV_PREFIX):
                ours[str(key)] = str(value)
        for name in map(env_name, ROLE_NEEDS["dataflow"]):
            self.problem(
                doc, where, name, None if name in ours else UNSET_IN_POD.format("dataflow")
            )
        self._whole(doc, where, ours, {}, {})

    # one document ------------------------------------------------------------------------

    def document(self, doc: _Doc) -> None:
        body = doc.body
        if not isinstance(body, dict):
            return
        kind = body.get("kind")
        if kind in ("Kustomization", "Component"):
            self.kustomization(doc, body)
        elif kind in ("ConfigMap", "Secret"):
            self.env_source(doc, body)
        elif kind in POD_KINDS:
            self.workload(doc, body)
        elif kind is None and isinstance(body.get("services"), dict):
            self.compose(doc, body)
        elif kind is None and isinstance(body.get("configuration"), dict) and "env" in body:
            self.chart_values(doc, body)


def _shared(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _nearest(found: Sequence[tuple[_Doc, T]], doc: _Doc) -> T | None:
    """Of the objects of one name, the one defined closest (by folder) to ``doc``."""
    if not found:
        return None
    parts = doc.file.resolve().parts
    return max(found, key=lambda f: _shared(f[0].file.resolve().parts, parts))[1]


def _pod(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The pod spec of a workload (a Pod's own spec, a CronJob's job's template's)."""
    spec: Mapping[str, Any] = obj.get("spec") or {}
    if obj.get("kind") == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    if obj.get("kind") != "Pod":
        spec = (spec.get("template") or {}).get("spec") or {}
    return spec


def _interpolate(value: Any) -> str:
    """A compose value with every ${VAR...} replaced by its default (nothing set)."""
    text = "" if value is None else str(value)
    text = _REFERENCE.sub(lambda m: m.group(2) or "", text)
    return text.replace("$$", "$")


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def audit(paths: Sequence[Path]) -> Report:
    """Check every YAML file under ``paths`` (files or folders)."""
    report = Report()
    auditor = _Auditor(report)
    docs: list[_Doc] = []
    for path in _yaml_files(paths):
        report.files += 1
        try:
            loaded = list(yaml.load_all(path.read_text(), Loader=_LOADER))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            why = f"not YAML: {exc}".replace("\n", " ")
            report.add(Problem(_Doc(path, None).where, "-", "-", why))
            continue
        docs += [_Doc(path, body) for body in loaded if body is not None]
    for doc in docs:
        if isinstance(doc.body, list):  # a patch file of JSON 6902 operations
            auditor.patch_body(doc, "patch")
        elif isinstance(doc.body, dict) and doc.body.get("kind") != "CustomResourceDefinition":
            auditor.document(doc)
    for doc in docs:  # every ConfigMap and Secret is known now
        if isinstance(doc.body, dict) and doc.body.get("kind") in POD_KINDS:
            auditor.containers(doc, doc.body)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.audit", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "paths", nargs="*", type=Path, help="files or folders to read (default: deploy/)"
    )
    args = parser.parse_args(argv)
    paths: list[Path] = args.paths or [ROOT / "deploy"]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    report = audit(paths)
    for p in sorted(report.problems, key=lambda p: p.file):  # stable: in order within a file
        print(f"{p.file}: {p.obj}: {p.key}: {p.problem}")
    where = f"{report.files} files, {len(report.checked)} settings checked"
    if report.problems:
        files = len({p.file for p in report.problems})
        print(f"config audit: {len(report.problems)} problem(s) in {files} file(s) ({where})")
        return 1
    print(f"config audit: no problems ({where})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
