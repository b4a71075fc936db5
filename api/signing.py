"""Signed webhooks: an ingest token may be required to sign each post's body.

``FLEETPULSE_WEBHOOK_SECRETS`` names the tokens that must sign and their secrets::

    <key id>=<secret>[|<next secret>],...

The key id is the first 12 hex digits of the token's SHA-256 (``just token`` prints the
hash; the entry's hash in FLEETPULSE_API_TOKENS starts with it), or ``*`` for every
ingest token without an entry of its own. Two secrets may be active at once, so a robot
fleet can move to a new secret before the old one is dropped. A secret is 32-128
characters of ``A-Z a-z 0-9 _ -``.

A signed post carries ``X-Fleetpulse-Signature: t=<unix seconds>,v1=<hex>`` where the
hex is HMAC-SHA256(secret, ``"<t>." + body``) over the exact bytes sent. The server takes
it when ``t`` is within ``FLEETPULSE_WEBHOOK_TOLERANCE_S`` of its clock and the MAC
matches one of the token's secrets (compared in constant time); otherwise 401 with the
reason (missing, malformed, outside the window, no match). A captured post can thus be
replayed only within the window, and a replayed report is a duplicate the dataflow
drops by ``(boot, seq)``. Secrets and signatures are never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Sequence

from fleetpulse.errors import ConfigError

__all__ = ["SIGNATURE_HEADER", "Signatures", "key_id", "sign"]

SIGNATURE_HEADER = "x-fleetpulse-signature"
_KEY_ID = re.compile(r"^([0-9a-f]{12}|\*)$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{32,128}$")
_HEADER = re.compile(r"^t=(\d{1,12}),v1=([0-9a-f]{64})$")


def key_id(token: str) -> str:
    """The key id of a token: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _mac(secret: bytes, ts: int, body: bytes) -> bytes:
    return hmac.new(secret, str(ts).encode() + b"." + body, hashlib.sha256).digest()


def sign(secret: str, body: bytes, ts: int | None = None) -> str:
    """The ``X-Fleetpulse-Signature`` value for ``body`` signed now (or at ``ts``)."""
    when = int(time.time()) if ts is None else ts
    return f"t={when},v1={_mac(secret.encode(), when, body).hex()}"


class Signatures:
    """Which tokens must sign, with which secrets, and the check of a signed post."""

    def __init__(self, secrets: dict[str, Sequence[bytes]], tolerance_s: float) -> None:
        self._secrets = secrets
        self.tolerance_s = tolerance_s

    @classmethod
    def parse(cls, spec: str, tolerance_s: float) -> Signatures:
        """From a FLEETPULSE_WEBHOOK_SECRETS value; ConfigError naming a bad entry (never
        showing a secret)."""
        secrets: dict[str, Sequence[bytes]] = {}
        for raw in filter(None, (part.strip() for part in spec.split(","))):
            kid, sep, values = raw.partition("=")
            kid = kid.strip()
            where = f"FLEETPULSE_WEBHOOK_SECRETS entry for {kid!r}"
            if not sep or not _KEY_ID.match(kid):
                raise ConfigError(
                    f"FLEETPULSE_WEBHOOK_SECRETS entry {kid[:12]!r}...: expected "
                    "`<key id>=<secret>[|<next secret>]`, the key id being the first 12 hex "
                    "digits of the token's SHA-256 (`just token` prints it) or `*`"
                )
            parts = values.split("|")
            if not 1 <= len(parts) <= 2:
                raise ConfigError(f"{where}: one secret, or two while rotating, not {len(parts)}")
            for n, secret in enumerate(parts, 1):
                if not _SECRET.match(secret):
                    raise ConfigError(
                        f"{where}: secret {n} must be 32-128 characters of A-Z a-z 0-9 _ - "
                        f"(it has {len(secret)}; `just token` makes a suitable random string)"
                    )
            if kid in secrets:
                raise ConfigError(f"{where}: given twice")
            secrets[kid] = tuple(s.encode() for s in parts)
        return cls(secrets, tolerance_s)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def secrets_for(self, token: str | None) -> Sequence[bytes] | None:
        """The secrets ``token`` must sign with; None when it need not sign."""
        if not self._secrets or token is None:
            return None
        return self._secrets.get(key_id(token)) or self._secrets.get("*")

    def problem(
        self, token: str | None, header: str | None, body: bytes, now: float | None = None
    ) -> str | None:
        """None when the post may pass (signed well, or its token need not sign), else
        why it may not, for a 401."""
        secrets = self.secrets_for(token)
        if secrets is None:
            return None
        if not header:
            return "this token must sign its posts: X-Fleetpulse-Signature is missing"
        match = _HEADER.match(header.strip())
        if match is None:
            return "X-Fleetpulse-Signature must be `t=<unix seconds>,v1=<64 hex>`"
        ts = int(match.group(1))
        clock = time.time() if now is None else now
        if abs(clock - ts) > self.tolerance_s:
            return (
                f"the signature's timestamp is {clock - ts:+.0f} s from the server's clock, "
                f"outside the replay window of ±{self.tolerance_s:g} s "
                "(FLEETPULSE_WEBHOOK_TOLERANCE_S); sign when sending"
            )
        given = bytes.fromhex(match.group(2))
        # Every secret is tried, whatever matched, so timing tells nothing.
        matched = False
        for secret in secrets:
            matched |= hmac.compare_digest(_mac(secret, ts, body), given)
        if not matched:
            return "the signature does not match the body with this token's secret"
        return None
