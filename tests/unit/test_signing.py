"""Signed webhooks: who must sign, what a good signature is, and why a post is refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from api.signing import Signatures, key_id, sign
from fleetpulse.errors import ConfigError
from fleetpulse.reload import ConfigWatcher
from fleetpulse.settings import load_settings, shown

OLD = "o" * 40
NEW = "N3w-secret_" + "n" * 30
ROBOT, OTHER = "fp_robot-token", "fp_other-token"
BODY = b'{"robot_id":"amr-1","seq":1}'
NOW = 1_800_000_000.0


def signatures(spec: str | None = None) -> Signatures:
    return Signatures.parse(spec or f"{key_id(ROBOT)}={OLD}|{NEW}", tolerance_s=300)


def test_a_good_signature_passes_with_either_active_secret() -> None:
    s = signatures()
    for secret in (OLD, NEW):
        assert s.problem(ROBOT, sign(secret, BODY, int(NOW)), BODY, now=NOW) is None
    # Within the window either way.
    assert s.problem(ROBOT, sign(OLD, BODY, int(NOW) - 299), BODY, now=NOW) is None
    assert s.problem(ROBOT, sign(OLD, BODY, int(NOW) + 299), BODY, now=NOW) is None


def test_a_token_without_an_entry_need_not_sign() -> None:
    s = signatures()
    assert s.secrets_for(OTHER) is None
    assert s.problem(OTHER, None, BODY, now=NOW) is None
    assert s.problem(None, None, BODY, now=NOW) is None  # auth answers that one
    assert not Signatures.parse("", 300)


def test_star_makes_every_other_token_sign_and_an_own_entry_wins() -> None:
    s = signatures(f"*={OLD},{key_id(ROBOT)}={NEW}")
    assert s.secrets_for(OTHER) == (OLD.encode(),)
    assert s.secrets_for(ROBOT) == (NEW.encode(),)
    assert s.problem(ROBOT, sign(OLD, BODY, int(NOW)), BODY, now=NOW) is not None


@pytest.mark.parametrize(
    ("header", "body", "reason"),
    [
        (None, BODY, "X-Fleetpulse-Signature is missing"),
        ("", BODY, "X-Fleetpulse-Signature is missing"),
        ("sha256=abc", BODY, "must be `t=<unix seconds>,v1=<64 hex>`"),
        (f"t={int(NOW)},v1=" + "0" * 63, BODY, "must be `t="),
        (sign("w" * 40, BODY, int(NOW)), BODY, "does not match"),  # another secret
        (sign(OLD, BODY, int(NOW)), BODY + b" ", "does not match"),  # body changed
        (sign(OLD, BODY, int(NOW) - 301), BODY, "outside the replay window of ±300 s"),
        (sign(OLD, BODY, int(NOW) + 301), BODY, "outside the replay window"),
    ],
    ids=[
        "absent",
        "empty",
        "other-scheme",
        "short-mac",
        "wrong-secret",
        "tampered",
        "old",
        "future",
    ],
)
def test_a_bad_signature_is_refused_with_its_reason(
    header: str | None, body: bytes, reason: str
) -> None:
    problem = signatures().problem(ROBOT, header, body, now=NOW)
    assert problem is not None and reason in problem
    # The reason never shows a secret or the signature sent.
    assert OLD not in problem and NEW not in problem
    assert not header or header.split("v1=")[-1] not in problem or len(header) < 20


def test_the_signature_covers_timestamp_and_body() -> None:
    header = sign(OLD, BODY, int(NOW))
    moved = header.replace(f"t={int(NOW)}", f"t={int(NOW) + 1}")
    assert "does not match" in (signatures().problem(ROBOT, moved, BODY, now=NOW) or "")


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (f"robot={OLD}", "key id"),
        (f"{key_id(ROBOT)}", "key id"),
        (f"{key_id(ROBOT)}=short", "32-128 characters"),
        (f"{key_id(ROBOT)}={OLD}|{NEW}|{OLD}", "two while rotating"),
        (f"{key_id(ROBOT)}={OLD},{key_id(ROBOT)}={NEW}", "given twice"),
        (f"{key_id(ROBOT)}={'x' * 31}!", "32-128 characters"),
    ],
)
def test_bad_entries_are_refused_without_showing_a_secret(spec: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        Signatures.parse(spec, 300)
    assert says in str(info.value)
    assert OLD not in str(info.value) and NEW not in str(info.value)


def test_secret_settings_never_reach_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert shown("webhook_secrets", f"x={OLD}") == "(set)" and shown("sim_token", "") == "(empty)"
    assert shown("low_battery_pct", 20.0) == "20.0"
    (tmp_path / "fleetpulse.yaml").write_text("low_battery_pct: 20\n")
    base = load_settings({"FLEETPULSE_CONFIG_DIR": str(tmp_path)})
    watcher = ConfigWatcher(base)
    (tmp_path / "fleetpulse.yaml").write_text(
        f"low_battery_pct: 15\nwebhook_secrets: '{key_id(ROBOT)}={NEW}'\n"
    )
    with caplog.at_level(logging.INFO, logger="fleetpulse"):
        watcher.poll()
    text = caplog.text
    assert "webhook_secrets" in text and "(empty) -> (set)" in text
    assert NEW not in text
