"""Hot reload of settings from ``FLEETPULSE_CONFIG_DIR/fleetpulse.yaml``.

The folder is watched the way Kubernetes updates a ConfigMap mounted as a directory:
the visible ``fleetpulse.yaml`` is a symlink to ``..data/fleetpulse.yaml``, ``..data``
a symlink to a timestamped folder, and an update writes a new folder and renames a new
``..data`` over the old one. So the watcher follows the file's *resolved* path and
polls it (about once a second) rather than waiting for inotify events on a name that
never changes. A ``subPath`` mount is a copy made at start and never updates.

What a change does:

* The file holds settings by field name (``low_battery_pct: 15``), put over the
  process's environment and checked by the same schema (``overlay_settings``) plus the
  caller's pair checks (``check``, e.g. ``Rules.from_settings``).
* Only :data:`HOT_KEYS` apply while running. Any other setting the file changes is
  restart-only: it is named in a warning ("takes effect after a restart"), counted in
  the restart-pending gauge, and *none* of those values is applied; the hot ones are.
* A bad file (not YAML, an unknown key, a bad value, a bad pair) changes nothing: the
  last good config stays and an error says why, naming the key.
* The result is one new frozen :class:`ActiveConfig`, swapped in with one assignment,
  so a reader sees the old config or the new one, never a mix.

At start the file is read once and *all* its values apply (nothing is running yet);
a bad file then stops start-up like a bad variable does.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, Literal, Self, TypeVar

import msgspec
import yaml

from fleetpulse.errors import ConfigError
from fleetpulse.settings import CONFIG_FILE, Settings, overlay_settings, shown, to_env

__all__ = [
    "HOT_KEYS",
    "ActiveConfig",
    "ConfigWatcher",
    "FileWatcher",
    "Reload",
    "config_hash",
]

log = logging.getLogger("fleetpulse.config")

T = TypeVar("T")

# Settings that take effect while running. Everything else is read once at start:
# window_s and shards because open windows and the keyed state are laid out by them,
# ports, topics, Redis and Kafka because connections are made with them.
HOT_KEYS = (
    "offline_after_s",
    "low_battery_pct",
    "battery_ok_pct",
    "allowed_lateness_s",
    "stuck_after",
    "retire_after_s",
    "max_robots",
    "max_future_s",
    "max_age_s",
    "log_level",
)

# What a change of the file came to: applied (a hot value changed), invalid (the last
# good config stays), unchanged (the file changed, no hot value did).
Reload = Literal["applied", "invalid", "unchanged"]


def config_hash(settings: Settings) -> str:
    """A short sha256 of the hot values of ``settings``: which config is active."""
    hot = {key: getattr(settings, key) for key in HOT_KEYS}
    return hashlib.sha256(msgspec.json.encode(hot, order="sorted")).hexdigest()[:12]


class ActiveConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The settings a process runs with now: its start-up settings with the file's hot
    values, the hash of those, and the restart-only keys the file changes."""

    settings: Settings
    hash: str
    restart_pending: tuple[str, ...] = ()


def _no_check(_: Settings) -> None:
    return None


class FileWatcher(Generic[T]):
    """A file looked at every ``interval_s`` in a daemon thread (:meth:`start`); what a
    good change applies goes to every :meth:`subscribe` callback. Subclasses read the
    file at start and implement :meth:`poll`."""

    def __init__(self, path: Path, interval_s: float, thread_name: str) -> None:
        self.path = path
        self.interval_s = interval_s
        self._thread_name = thread_name
        self._listeners: list[Callable[[T], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def subscribe(self, listener: Callable[[T], None]) -> None:
        """Call ``listener(value)`` from the watcher's thread whenever a change applies."""
        self._listeners.append(listener)

    def start(self) -> Self:
        """Poll in a daemon thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def poll(self) -> Reload | None:
        """Look at the file once; what its change came to (None: it did not change)."""
        raise NotImplementedError

    def _done(self, result: Reload, why: str) -> Reload:
        """Say what a change came to (``why``: the problem of an invalid one)."""
        raise NotImplementedError

    def _read_first(self, cannot: Callable[[str], Exception]) -> bytes:
        """The file's bytes at start; raises ``cannot(reason)`` when it cannot be read."""
        self._stamp = _file_stamp(self.path)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise cannot(exc.strerror or str(exc)) from None
        self._digest = hashlib.sha256(data).digest()
        return data

    def _read_changed(self) -> bytes | Reload | None:
        """The file's bytes when they changed since the last look; None when they did not
        (the same stamp, or the same bytes again: re-mounted, touched); "invalid" when the
        file cannot be read (said through :meth:`_done`)."""
        stamp = _file_stamp(self.path)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self._digest = b""
            return self._done("invalid", f"cannot read {self.path}: {exc.strerror}")
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return None
        self._digest = digest
        return data

    def _applied(self, value: T) -> None:
        for listener in self._listeners:
            listener(value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # the watcher must outlive any surprise; say it and go on
                log.exception("watching %s failed; trying again", self.path)


class ConfigWatcher(FileWatcher[ActiveConfig]):
    """Watches ``settings.config_dir`` and keeps :attr:`current` up to date.

    ``settings`` are the process's settings from the environment alone; the file goes
    over them here (raises :class:`ConfigError` if it is missing or bad at start).
    ``check`` raises ConfigError for settings that are not usable together;
    ``observe(result, active)`` hears of every change of the file (result None once, for
    the start-up config), and :meth:`subscribe`'s callbacks of every applied config.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        check: Callable[[Settings], object] = _no_check,
        observe: Callable[[Reload | None, ActiveConfig], None] | None = None,
        interval_s: float = 1.0,
    ) -> None:
        if not settings.config_dir:
            raise ConfigError("FLEETPULSE_CONFIG_DIR is empty: there is no config file to watch")
        super().__init__(Path(settings.config_dir) / CONFIG_FILE, interval_s, "fleetpulse-config")
        self.check = check
        self.observe = observe
        self._env = to_env(settings)
        data = self._read_first(
            lambda why: ConfigError(
                f"FLEETPULSE_CONFIG_DIR={settings.config_dir!r}: cannot read {self.path}: "
                f"{why}; mount the ConfigMap as a directory holding {CONFIG_FILE}"
            )
        )
        started = self._settings(data)
        self.check(started)
        self.started = started
        self.current = ActiveConfig(settings=started, hash=config_hash(started))
        if observe is not None:
            observe(None, self.current)

    def poll(self) -> Reload | None:
        """Look at the file once; what its change came to (None: it did not change)."""
        data = self._read_changed()
        if not isinstance(data, bytes):
            return data
        try:
            wanted = self._settings(data)
            self.check(wanted)
            # Only the hot values move; the restart-only ones stay as the process started.
            hot = {key: getattr(wanted, key) for key in HOT_KEYS}
            effective = msgspec.structs.replace(self.started, **hot)
            self.check(effective)
        except ConfigError as exc:
            return self._done("invalid", str(exc))
        before = self.current
        pending = tuple(
            key
            for key in Settings.__struct_fields__
            if key not in HOT_KEYS and getattr(wanted, key) != getattr(self.started, key)
        )
        if pending:
            log.warning(
                "%s changes %s: restart-only, takes effect after a restart; none of these "
                "is applied now",
                self.path,
                ", ".join(
                    f"{key} ({shown(key, getattr(self.started, key))} -> "
                    f"{shown(key, getattr(wanted, key))})"
                    for key in pending
                ),
            )
        self.current = ActiveConfig(
            settings=effective, hash=config_hash(effective), restart_pending=pending
        )
        if effective == before.settings:
            return self._done("unchanged", "")
        changed = [key for key in HOT_KEYS if hot[key] != getattr(before.settings, key)]
        log.info(
            "config %s applied from %s: %s",
            self.current.hash,
            self.path,
            ", ".join(
                f"{k} {shown(k, getattr(before.settings, k))} -> {shown(k, hot[k])}"
                for k in changed
            ),
        )
        self._applied(self.current)
        return self._done("applied", "")

    def _done(self, result: Reload, why: str) -> Reload:
        if result == "invalid":
            log.error("%s is not applied, config %s stays: %s", self.path, self.current.hash, why)
        if self.observe is not None:
            self.observe(result, self.current)
        return result

    def _settings(self, data: bytes) -> Settings:
        """The environment's settings with the file ``data`` over them (raises ConfigError)."""
        try:
            values: Any = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.path} is not valid YAML: {exc}") from None
        if values is None:
            values = {}  # an empty file: the environment alone
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{self.path} must map setting names to values (e.g. low_battery_pct: 15), "
                f"not be a {type(values).__name__}"
            )
        return overlay_settings(self._env, values, str(self.path))


def _file_stamp(path: Path) -> tuple[str, int, int, int] | None:
    """Where the file resolves to and its inode, mtime and size; None if it is missing.

    A ConfigMap update swaps ``..data``, which changes the resolved path even when the
    new file happens to have the same inode number, mtime and size."""
    try:
        real = path.resolve(strict=True)
        st = real.stat()
    except OSError:
        return None
    return str(real), st.st_ino, st.st_mtime_ns, st.st_size
