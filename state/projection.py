"""Is Redis still the whole projection of the dataflow's state? And putting it back.

Redis replication is asynchronous: after a Sentinel failover the promoted replica may
lack the master's last writes, and a Redis restarted without persistence (or flushed)
has lost everything. The dataflow holds every robot's live state (checkpointed), so
it can publish that state again; writes are idempotent and versioned, so publishing
what Redis already holds changes nothing, and what it lost comes back — with the
history entry of each robot's newest report, and the summary counters moving with
the states in the same transactions.

How the flow knows (``dataflows.republish``): ``published`` holds the ``run_id`` of
the server the live state was last completely written to. Any other value — a
failover (another server), a restart (a new run_id), an empty or flushed Redis, or
an operator's ``just rebuild-state`` (which deletes it) — means the projection may be
incomplete. One flow process claims the re-publish (``republish``, set NX with a TTL,
so a crashed claim expires), every shard of the flow writes all its robots' live
state, each sink records the shards it wrote (``republished_shards``), and the one that
completes the set stores the run_id: done.

What is not re-published: closed windows and alerts the failover lost (the flow no
longer holds them; alerts stay on the alerts topic), and history entries older than
each robot's newest report.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

import redis

from state.keys import Keys

__all__ = ["CLAIM_TTL_S", "Projection"]

CLAIM_TTL_S = 30  # a claim not renewed this long was abandoned (its process died)


class Projection:
    """The projection's bookkeeping keys, through one (master) client."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.keys = Keys(prefix)

    def server(self) -> str:
        """The run_id of the Redis server this client writes to now."""
        return str(self.client.info("server")["run_id"])

    def published_to(self) -> str | None:
        """The run_id of the server the live state was last completely published to."""
        return _text(self.client.get(self.keys.published))

    def claim(self, server: str) -> str | None:
        """Claim the re-publish for ``server``; its token, or None if one is under way."""
        token = f"{server[:12]}-{uuid.uuid4().hex[:12]}-{int(time.time())}"
        if self.client.set(self.keys.republish, token, nx=True, ex=CLAIM_TTL_S):
            return token
        return None

    def under_way(self) -> str | None:
        return _text(self.client.get(self.keys.republish))

    def shards_written(self, token: str, shards: Iterable[str], total: int) -> bool:
        """Record that these shards re-published for ``token``; True once all ``total``
        have (then the current server is stored as published, and the claim released)."""
        done_key = self.keys.republished_shards(token)
        pipe = self.client.pipeline(transaction=False)
        pipe.sadd(done_key, *shards)
        pipe.expire(done_key, CLAIM_TTL_S)
        pipe.expire(self.keys.republish, CLAIM_TTL_S)  # progress renews the claim
        pipe.scard(done_key)
        *_, count = pipe.execute()
        if int(count) < total:
            return False
        server = self.server()
        # The claim's token names the server it was made for; if the server changed
        # meanwhile (another failover), leave "published" alone: it is checked again.
        if token.startswith(server[:12]):
            self.client.set(self.keys.published, server)
        self.client.delete(done_key)
        if self.under_way() == token:
            self.client.delete(self.keys.republish)
        return True

    def progress(self, token: str) -> int:
        """How many shards have re-published for ``token``."""
        return int(self.client.scard(self.keys.republished_shards(token)))

    def request(self) -> None:
        """Ask the running dataflow to publish its live state again (rebuild-state)."""
        self.client.delete(self.keys.published)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
