"""Redis state: the key schema, the sink's writer and the API's reader.

The only package that knows Redis keys (see :mod:`state.keys` for the schema). The
dataflow's sink writes through :class:`StateWriter`, the query API reads through
:class:`StateReader`; :class:`RedisStateWriter` / :class:`RedisStateReader` implement
them, and ``tests/integration/test_state_contract.py`` holds them to the contract.
"""

from __future__ import annotations

from state.connect import connect, connect_reader
from state.keys import Keys
from state.reader import (
    AlertRaised,
    ChangeEvent,
    FleetSummary,
    RedisStateReader,
    StateChanged,
    StateReader,
    decode_change,
)
from state.writer import RedisStateWriter, StateWriter, WriteResult

__all__ = [
    "AlertRaised",
    "ChangeEvent",
    "FleetSummary",
    "Keys",
    "RedisStateReader",
    "RedisStateWriter",
    "StateChanged",
    "StateReader",
    "StateWriter",
    "WriteResult",
    "connect",
    "connect_reader",
    "decode_change",
]
