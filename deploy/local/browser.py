"""A browser for the dashboard's tests and screenshots: Debian's ``chromium``.

Playwright (from PyPI) drives it through ``executable_path``; Playwright's own browser
builds are not used (nothing but package registries is reachable here). The package is
installed with apt-get on first use, like redis-server.

    python -m deploy.local.browser      install if needed, print its path and version
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from deploy.local.services import apt_install
from deploy.local.stack import REPO_ROOT
from fleetpulse.errors import FleetpulseError
from fleetpulse.settings import load_settings

__all__ = ["LAUNCH_ARGS", "chromium"]

BINARY = "chromium"
# Root in a sandbox without user namespaces: Chromium's own sandbox cannot start there.
LAUNCH_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--enable-precise-memory-info"]


def chromium() -> str:
    """The path of Debian's chromium, installing it first if it is missing."""
    found = shutil.which(BINARY)
    if found:
        return found
    apt_install(BINARY, BINARY, REPO_ROOT / load_settings().stack_dir)
    found = shutil.which(BINARY)
    assert found is not None  # apt_install raised otherwise
    return found


def main() -> int:
    try:
        path = chromium()
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    print(f"{path}  {version.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
