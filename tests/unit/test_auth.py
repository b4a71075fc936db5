"""Token scopes: ingest, read and admin, each granting only itself."""

from __future__ import annotations

import pytest

from api.auth import TokenStore, bearer_token, hash_token, main, new_token, token_fingerprint
from fleetpulse.errors import ConfigError


def test_an_admin_entry_grants_admin_and_nothing_else() -> None:
    admin, ingest = new_token(), new_token()
    store = TokenStore.parse(f"admin:{hash_token(admin)}, ingest:{hash_token(ingest)}")
    assert store.check(f"Bearer {admin}", "admin") is None
    refused = store.check(f"Bearer {admin}", "ingest")
    assert refused is not None
    assert (refused.status, refused.detail) == (
        403,
        "token has scope admin; this route needs ingest",
    )
    refused = store.check(f"Bearer {ingest}", "admin")
    assert refused is not None and refused.status == 403


def test_a_bad_entry_names_the_scopes_allowed() -> None:
    with pytest.raises(ConfigError, match="scope ingest, read or admin") as caught:
        TokenStore.parse("root:" + "0" * 64)
    assert "'root:...'" in str(caught.value)


def test_just_token_admin_prints_an_admin_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new", "--scope", "admin"]) == 0
    token_line, setting_line = capsys.readouterr().out.splitlines()
    token = token_line.removeprefix("token:").strip()
    assert setting_line == f"setting: FLEETPULSE_API_TOKENS=admin:{hash_token(token)}"


def test_the_fingerprint_is_the_start_of_the_configured_hash() -> None:
    token = new_token()
    assert token_fingerprint(token) == hash_token(token)[:12]
    assert bearer_token(f"bearer  {token} ") == token
    assert bearer_token(f"Basic {token}") is None
    assert bearer_token(None) is None
