"""Redis state: the key schema, the sink's writer and the API's reader.

The only package that knows Redis keys (see :mod:`state.keys` for the schema). The
dataflow's sink writes through :class:`StateWriter`, the query API reads through
:class:`StateReader` (and awaits :class:`AsyncStateReader`); :class:`RedisStateWriter`,
:class:`RedisStateReader` and :class:`AsyncRedisStateReader` implement them, and
``tests/integration/test_state_contract.py`` holds them to the contract.
"""

from __future__ import annotations

from state.async_reader import AsyncRedisStateReader
from state.connect import close_async, connect, connect_reader, connect_reader_async
from state.keys import Keys
from state.reader import (
    AlertRaised,
    AsyncStateReader,
    ChangeEvent,
    FleetSummary,
    RedisStateReader,
    RobotRetired,
    StateChanged,
    StateReader,
    decode_change,
)
from state.writer import RedisStateWriter, StateWriter, WriteResult

__all__ = [
    "AlertRaised",
    "AsyncRedisStateReader",
    "AsyncStateReader",
    "ChangeEvent",
    "FleetSummary",
    "Keys",
    "RedisStateReader",
    "RedisStateWriter",
    "RobotRetired",
    "StateChanged",
    "StateReader",
    "StateWriter",
    "WriteResult",
    "close_async",
    "connect",
    "connect_reader",
    "connect_reader_async",
    "decode_change",
]
