"""The listing cursor must be a whole robot id; the check runs before any Redis call."""

from __future__ import annotations

import pytest
import redis

from fleetpulse.errors import InvalidQuery
from fleetpulse.settings import load_settings
from state.reader import RedisStateReader


def _reader() -> RedisStateReader:
    # Nothing connects until a command runs, and the cursor is checked before any.
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    return RedisStateReader(client, load_settings({}))


@pytest.mark.parametrize("cursor", ["amr-1\n", "amr-1\r\n", "\namr-1", "amr 1", ""])
def test_a_cursor_that_is_not_a_whole_robot_id_is_an_invalid_query(cursor: str) -> None:
    with pytest.raises(InvalidQuery) as caught:
        _reader().list_robots(cursor=cursor)
    assert caught.value.parameter == "cursor"
    assert repr(cursor) in caught.value.detail
