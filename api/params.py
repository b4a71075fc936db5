"""Query-parameter forms the query and export routes share: RFC 3339 times with an offset.

Litestar alone parses a ``datetime`` parameter leniently (a number of seconds, a time
without an offset); :func:`check_times` holds every time parameter to the documented
form, from the routes' before-request hook (``api.query.reject_unknown_parameters``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from api.errors import ApiError

__all__ = ["RFC3339", "RFC3339_PATTERN", "TIME_PARAMETERS", "check_times"]

# RFC 3339 date-time with an offset (what `since`/`until` must be; their schema's pattern).
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")
RFC3339_PATTERN = f"^{RFC3339.pattern}$"
_NAIVE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?")

TIME_PARAMETERS = ("since", "until")


def check_times(params: Mapping[str, str]) -> None:
    """422 naming the first time parameter that is not an RFC 3339 time with an offset."""
    for name in TIME_PARAMETERS:
        value = params.get(name)
        if value is None or RFC3339.fullmatch(value):
            continue
        naive = _NAIVE.fullmatch(value) is not None
        why = "it has no UTC offset" if naive else "expected e.g. 2025-06-01T12:00:00Z"
        raise ApiError(
            422,
            "invalid_parameter",
            f"{name}: {value[:40]!r} is not an RFC3339 time: {why}",
            [name],
        )
