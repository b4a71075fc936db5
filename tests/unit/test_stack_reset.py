"""`just stack-reset` deletes the dataflow's recovery store with the stack's data.

Every Stack here lives in temporary folders with no service running: reset() stops
only processes recorded in its own (empty) pid folder, so the real stack is untouched.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import msgspec
import pytest

from deploy.local.stack import REPO_ROOT, Stack
from fleetpulse.settings import load_settings


def stack_in(tmp_path: Path, recovery_dir: str) -> Stack:
    settings = msgspec.structs.replace(
        load_settings({}), stack_dir=str(tmp_path / "stack"), recovery_dir=recovery_dir
    )
    stack = Stack(settings)
    for sub in ("kafka/data/meta.properties", "redis/appendonly.aof", "bin/jaeger-v1"):
        (stack.root / sub).parent.mkdir(parents=True, exist_ok=True)
        (stack.root / sub).write_text("x")
    return stack


def recovery_store(path: Path) -> Path:
    path.mkdir(parents=True)
    for i in range(2):
        (path / f"part-{i}.sqlite3").write_bytes(b"SQLite format 3\x00")
    return path


def test_reset_deletes_the_recovery_store_with_the_stack_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = recovery_store(tmp_path / "recovery")
    stack = stack_in(tmp_path, str(store))
    stack.reset()
    assert not store.exists()
    assert not (stack.root / "kafka" / "data").exists()
    assert not (stack.root / "redis").exists()
    assert (stack.root / "bin" / "jaeger-v1").exists()  # provisioned binaries stay
    assert f"dataflow recovery store {store} deleted" in capsys.readouterr().out


def test_a_relative_recovery_dir_is_under_the_repository(tmp_path: Path) -> None:
    relative = f".test-recovery-{uuid.uuid4().hex[:10]}"
    store = recovery_store(REPO_ROOT / relative)
    try:
        stack = stack_in(tmp_path, relative)
        assert stack.recovery_dir == store
        stack.reset()
        assert not store.exists()
    finally:
        if store.exists():
            for part in store.iterdir():
                part.unlink()
            store.rmdir()


def test_reset_with_recovery_off_or_no_store_yet_is_fine(tmp_path: Path) -> None:
    stack_in(tmp_path, "").reset()  # recovery off: nothing to delete
    stack_in(tmp_path, str(tmp_path / "never-made")).reset()
    assert Stack(msgspec.structs.replace(load_settings({}), recovery_dir="")).recovery_dir is None


def test_a_recovery_dir_holding_the_stack_is_never_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mistyped FLEETPULSE_RECOVERY_DIR (the stack folder, or a folder above it) stays.
    for wrong in (tmp_path / "stack", tmp_path):
        stack = stack_in(tmp_path, str(wrong))
        stack.reset()
        assert (stack.root / "bin" / "jaeger-v1").exists()
        assert "warning: recovery store not deleted" in capsys.readouterr().out
