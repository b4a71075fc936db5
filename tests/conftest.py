"""Shared fixtures: settings for tests, and the real local stack for integration tests."""

from __future__ import annotations

import pytest

from fleetpulse.settings import Settings, load_settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    """The settings the environment gives (the local stack's defaults on a dev machine)."""
    return load_settings()
