"""Bearer tokens with a scope, kept hashed, compared in constant time.

``FLEETPULSE_API_TOKENS`` holds comma-separated ``scope:sha256-hex`` entries; the
tokens themselves are never stored. ``python -m api.auth new --scope ingest`` makes
a token and prints the entry to configure. Scopes: ``ingest`` (post reports), ``read``
(the query API), ``admin`` (operator commands such as reset-order). A scope grants
only itself: an admin token does not post reports.

    401  no token, a malformed header, or a token that matches no entry
    403  a valid token whose scope does not cover the route
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Literal

import msgspec

from fleetpulse.errors import ConfigError

__all__ = [
    "SCOPES",
    "Scope",
    "TokenStore",
    "bearer_token",
    "hash_token",
    "new_token",
    "token_fingerprint",
]

Scope = Literal["ingest", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "admin")
_ENTRY = re.compile(r"^(ingest|read|admin):([0-9a-f]{64})$")


def hash_token(token: str) -> str:
    """The hex SHA-256 that settings keep for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_fingerprint(token: str) -> str:
    """Who a token is, for audit lines and records: the first 12 hex of its SHA-256.

    Safe to log: it names the configured entry (the hash settings keep) and gives
    nothing that authenticates.
    """
    return hash_token(token)[:12]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    kind, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if kind.lower() == "bearer" and token else None


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return "fp_" + secrets.token_urlsafe(32)


class AuthFailure(msgspec.Struct, frozen=True):
    """Why a request was refused: ``status`` 401 or 403 and the message for the client."""

    status: int
    error: str
    detail: str


class TokenStore:
    """The configured token hashes by scope; answers whether a header grants a scope."""

    def __init__(self, entries: Sequence[tuple[Scope, bytes]]) -> None:
        self._entries = list(entries)

    @classmethod
    def parse(cls, spec: str) -> TokenStore:
        """Parse ``scope:sha256-hex,...`` (the FLEETPULSE_API_TOKENS format)."""
        entries: list[tuple[Scope, bytes]] = []
        for raw in filter(None, (part.strip() for part in spec.split(","))):
            match = _ENTRY.match(raw)
            if match is None:
                shown = raw.split(":", 1)[0] + ":..."
                raise ConfigError(
                    f"FLEETPULSE_API_TOKENS entry {shown!r} is not allowed; expected "
                    "`<scope>:<64 hex>` with scope ingest, read or admin (the SHA-256 "
                    "of the token; `just token <scope>` makes one)"
                )
            scope = next(s for s in SCOPES if s == match.group(1))
            entries.append((scope, bytes.fromhex(match.group(2))))
        return cls(entries)

    def _scopes(self, token: str) -> set[Scope]:
        digest = hashlib.sha256(token.encode()).digest()
        scopes: set[Scope] = set()
        # Compare against every entry, whatever matched, so timing tells nothing.
        for entry_scope, entry_digest in self._entries:
            if hmac.compare_digest(digest, entry_digest):
                scopes.add(entry_scope)
        return scopes

    def scopes(self, authorization: str | None) -> set[Scope]:
        """The scopes ``authorization`` grants (none for a missing or unknown token)."""
        token = bearer_token(authorization) if authorization else None
        return self._scopes(token) if token is not None else set()

    def trusts(self, setting: str) -> Callable[[str | None], bool] | None:
        """Whether a request's ``Authorization`` makes its trace context trusted, from a
        FLEETPULSE_TRACE_TRUST value; None when every caller is (``all``)."""
        if setting == "all":
            return None
        trusted = {s for s in setting.split(",") if s}

        def trust(authorization: str | None) -> bool:
            return bool(trusted) and not self.scopes(authorization).isdisjoint(trusted)

        return trust

    def check(self, authorization: str | None, scope: Scope) -> AuthFailure | None:
        """None when ``authorization`` carries a token for ``scope``, else why not."""
        if not authorization:
            return AuthFailure(401, "unauthorized", "missing bearer token (Authorization header)")
        token = bearer_token(authorization)
        if token is None:
            return AuthFailure(401, "unauthorized", "Authorization must be `Bearer <token>`")
        scopes = self._scopes(token)
        if not scopes:
            return AuthFailure(401, "unauthorized", "unknown bearer token")
        if scope not in scopes:
            granted = ", ".join(sorted(scopes))
            return AuthFailure(
                403, "forbidden", f"token has scope {granted}; this route needs {scope}"
            )
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="api.auth", description="make an API token")
    sub = parser.add_subparsers(dest="cmd", required=True)
    new = sub.add_parser("new", help="print a new token and its FLEETPULSE_API_TOKENS entry")
    new.add_argument("--scope", choices=SCOPES, required=True)
    args = parser.parse_args(argv)
    token = new_token()
    print(f"token:   {token}")
    print(f"setting: FLEETPULSE_API_TOKENS={args.scope}:{hash_token(token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
