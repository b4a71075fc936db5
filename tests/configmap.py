"""A folder updated the way the kubelet updates a ConfigMap mounted as a directory.

    fleetpulse.yaml -> ..data/fleetpulse.yaml
    ..data -> ..2026_11_30_10_00_00.<n>
    ..2026_11_30_10_00_00.<n>/fleetpulse.yaml

An update writes a new timestamped folder, points a temporary symlink at it, renames
that over ``..data`` (one atomic rename) and removes the old folder, as the kubelet's
AtomicWriter does.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fleetpulse.settings import CONFIG_FILE


class ConfigMap:
    """A ConfigMap volume with one key, :data:`CONFIG_FILE`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.updates = 0
        root.mkdir(parents=True, exist_ok=True)

    def write(self, text: str) -> Path:
        """Publish ``text`` as the new content; returns the new timestamped folder."""
        self.updates += 1
        data = self.root / "..data"
        old = data.resolve() if data.is_symlink() else None
        fresh = self.root / f"..2026_11_30_10_00_{self.updates:02d}.{os.getpid()}"
        fresh.mkdir()
        (fresh / CONFIG_FILE).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(fresh.name)
        tmp.replace(data)  # os.replace: rename(2), atomic over the old symlink
        visible = self.root / CONFIG_FILE
        if not visible.is_symlink():
            visible.symlink_to(f"..data/{CONFIG_FILE}")
        if old is not None:
            shutil.rmtree(old)
        return fresh
