"""``GET /v1/export/{kind}``: history, window stats or alerts as CSV or NDJSON, streamed.

    GET /v1/export/history?site=plant-1&since=2025-06-01T00:00:00Z&format=csv

Rows come in the order of :mod:`state.export` (robots by id, each robot's rows oldest
first) as Redis gives them, a page at a time, so the server holds a bounded number of
rows whatever the export's size; a slow client holds the stream back (the server
waits on its socket), it does not fill the server's memory.

Formats (``format=``, else the ``Accept`` header, else NDJSON):

- **NDJSON** (``application/x-ndjson``): one line per row, the item's JSON as stored,
  with a ``cursor`` field first (and ``robot_id`` where the item has none).
- **CSV** (``text/csv``, RFC 4180: CRLF, fields quoted when they hold a comma, a quote
  or a line break): a header row, then one flat row per item: nested objects flattened
  (``pose.x``, ``pose.y``...), lists joined by ``;`` (an error text holding ``;`` is
  ambiguous there; NDJSON is exact), null empty, times as stored (RFC 3339), and the
  ``cursor`` column last.

**Resuming.** Each row's cursor resumes after it: a client whose connection dropped
passes the cursor of the last whole row it got (``cursor=``) and gets the rows after
it, none twice, none missed (what a change meanwhile does: :mod:`state.export`). A
stream that ends without the terminating chunk was cut; one that ends cleanly is the
whole export, or ``limit`` rows of it (then resume from the last row's cursor: an
answer with no row is the end). An error after the first byte (Redis gone) cuts the
connection, so it is never mistaken for the end. ``python -m api.export`` is a client
that does all this and writes a file (:mod:`api.export_cli`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import get
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example, OpenAPIMediaType, OpenAPIResponse, Operation, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import PathParameter, QueryParameter
from litestar.response import Stream
from litestar.types import ControllerRouterHandler

from api.errors import AnyRequest, ApiError
from api.params import RFC3339_PATTERN
from fleetpulse.schema import ROBOT_ID_PATTERN
from state.export import KINDS, Row, Runner, export_rows, parse_cursor, time_range
from state.keys import Keys

__all__ = ["CSV", "NDJSON", "csv_columns", "csv_rows", "export_routes", "ndjson_rows"]

CSV = "text/csv"  # Litestar adds "; charset=utf-8"
NDJSON = "application/x-ndjson"
Format = Literal["csv", "ndjson"]
_CURSOR_KEY = b'{"cursor":'
# The cursors' common form (state.export); what each kind's last two parts are is checked
# by state.export.parse_cursor.
_ROBOT_ID_PART = ROBOT_ID_PATTERN[1:].split("$")[0]  # the pattern without its anchors
_CURSOR_PATTERN = "^(" + "|".join(KINDS) + ")/" + _ROBOT_ID_PART + r"/\d{1,20}/[^\n]{1,300}$(?!\n)"


# --- formats ----------------------------------------------------------------------------------
def _unwrap(t: Any) -> Any:
    while isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    return t


def csv_columns(item: type[msgspec.Struct]) -> list[tuple[str, ...]]:
    """The CSV columns of ``item`` as key paths (a nested Struct's fields flattened)."""
    out: list[tuple[str, ...]] = []

    def walk(info: msgspec.inspect.StructType, path: tuple[str, ...]) -> None:
        for f in info.fields:
            t = _unwrap(f.type)
            if isinstance(t, msgspec.inspect.StructType):
                walk(t, (*path, f.encode_name))
            else:
                out.append((*path, f.encode_name))

    info = _unwrap(msgspec.inspect.type_info(item))
    assert isinstance(info, msgspec.inspect.StructType)
    walk(info, ())
    return out


def _cell(value: Any) -> str:
    """A JSON value the csv module would not write as wanted, as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(_text(v) for v in value)
    return msgspec.json.encode(value).decode()  # an object: its JSON


def _text(value: Any) -> str:
    if type(value) in _PLAIN:
        return "" if value is None else str(value)
    return str(_cell(value))


# Types the csv module writes as wanted: text as is, numbers as Python's shortest repr
# (the same digits as the stored JSON), None as an empty field.
_PLAIN = frozenset({str, int, float, type(None)})


def _getter(path: tuple[str, ...]) -> Callable[[dict[str, Any]], Any]:
    key = path[0]
    if len(path) == 1:
        return lambda item: item.get(key)
    rest = _getter(path[1:])
    return lambda item: rest(v) if isinstance(v := item.get(key), dict) else None


def csv_rows(columns: Sequence[tuple[str, ...]]) -> Callable[[Sequence[Row] | None], bytes]:
    """A function from rows to CSV text (bytes); None gives the header row."""
    header = [".".join(path) for path in columns] + ["cursor"]
    has_robot_id = ("robot_id",) in columns
    if not has_robot_id:
        header.insert(0, "robot_id")
    getters = [_getter(path) for path in columns]
    decode = msgspec.json.decode  # the values as stored, times included

    def encode(rows: Sequence[Row] | None) -> bytes:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\r\n")
        if rows is None:
            writer.writerow(header)
            return buf.getvalue().encode()
        table = []
        for row in rows:
            item = decode(row.raw)
            cells = [get(item) for get in getters]
            cells = [v if type(v) in _PLAIN else _cell(v) for v in cells]
            if not has_robot_id:
                cells.insert(0, row.robot_id)
            cells.append(row.cursor)
            table.append(cells)
        writer.writerows(table)
        return buf.getvalue().encode()

    return encode


def ndjson_rows(has_robot_id: bool) -> Callable[[Sequence[Row] | None], bytes]:
    """A function from rows to NDJSON lines: each stored item with ``cursor`` first."""

    def encode(rows: Sequence[Row] | None) -> bytes:
        if rows is None:
            return b""
        parts: list[bytes] = []
        for row in rows:
            head = _CURSOR_KEY + msgspec.json.encode(row.cursor) + b","
            if not has_robot_id:
                head += b'"robot_id":' + msgspec.json.encode(row.robot_id) + b","
            parts += (head, row.raw[1:], b"\n")
        return b"".join(parts)

    return encode


def _format_of(fmt: Format | None, accept: str | None) -> Format:
    if fmt is not None:
        return fmt
    accept = (accept or "").lower()
    if "text/csv" in accept and "ndjson" not in accept:
        return "csv"
    return "ndjson"


# --- the route --------------------------------------------------------------------------------
@dataclass
class ExportOperation(Operation):
    """The export's OpenAPI operation: its 200 is CSV or NDJSON (one media type per
    response is all a route handler can say)."""

    def __post_init__(self) -> None:
        if self.responses is None:
            return
        text = Schema(type=OpenAPIType.STRING)
        self.responses["200"] = OpenAPIResponse(
            description="The rows, streamed: NDJSON (each item's JSON with `cursor`) or "
            "CSV (a header row, one flat row per item, `cursor` last). Cut without the "
            "terminating chunk when the server fails mid-way: resume from the last "
            "whole row's cursor.",
            content={NDJSON: OpenAPIMediaType(schema=text), CSV: OpenAPIMediaType(schema=text)},
        )


def export_routes(
    run: Callable[[], Runner],
    keys: Keys,
    exists: Callable[[str], Awaitable[bool]],
    errors: dict[int, ResponseSpec],
) -> list[ControllerRouterHandler]:
    """The export route. ``run()``: the plan runner of the app's reader (made in its
    lifespan); ``keys``: the store's key names; ``exists(robot_id)``: whether the robot
    has a live state; ``errors``: the documented error answers."""
    kinds_doc = "; ".join(f"`{name}`: {k.order}" for name, k in KINDS.items())

    @get(
        "/v1/export/{kind:str}",
        summary="Export history, window stats or alerts as CSV or NDJSON",
        description="Every row of `kind` for one robot (`robot_id`), a site (`site`) or the "
        "fleet (neither), in event time `[since, until)`, streamed: robots in id order, each "
        f"robot's rows oldest first ({kinds_doc}). Every row carries the `cursor` that "
        "resumes after it; pass it back as `cursor` after a dropped connection to get the "
        "rest with no row missed or repeated.",
        responses=errors,
        operation_class=ExportOperation,
    )
    async def export(
        request: AnyRequest,
        kind: Annotated[
            str,
            PathParameter(
                schema_extra={"enum": list(KINDS)},
                description="What to export: " + ", ".join(KINDS),
                examples=[Example(value="history")],
            ),
        ],
        format: Annotated[  # the parameter's public name
            Format | None,
            QueryParameter(
                description="`csv` or `ndjson`; default: from `Accept` (text/csv or "
                "application/x-ndjson), else ndjson."
            ),
        ] = None,
        robot_id: Annotated[
            str | None,
            QueryParameter(
                pattern=ROBOT_ID_PATTERN, description="Only this robot (404 if it never reported)."
            ),
        ] = None,
        site: Annotated[
            str | None,
            QueryParameter(pattern=ROBOT_ID_PATTERN, description="Only robots of this site."),
        ] = None,
        since: Annotated[
            datetime | None,
            QueryParameter(
                description="Rows at or after this RFC 3339 time with an offset.",
                schema_extra={"pattern": RFC3339_PATTERN},
            ),
        ] = None,
        until: Annotated[
            datetime | None,
            QueryParameter(
                description="Rows before this RFC 3339 time with an offset; after `since`.",
                schema_extra={"pattern": RFC3339_PATTERN},
            ),
        ] = None,
        cursor: Annotated[
            str | None,
            QueryParameter(
                pattern=_CURSOR_PATTERN,
                description="A row's `cursor` from an earlier answer of the same kind "
                "(`<kind>/<robot id>/<a>/<b>`): the rows after it.",
            ),
        ] = None,
        limit: Annotated[
            int | None, QueryParameter(ge=1, description="At most this many rows.")
        ] = None,
    ) -> Stream:
        """The rows, streamed (see the description)."""
        spec = KINDS.get(kind)
        if spec is None:
            raise ApiError(
                422, "invalid_parameter", f"kind: {kind[:40]!r} is not one of "
                + ", ".join(KINDS), ["kind"],
            )  # fmt: skip
        if robot_id is not None and site is not None:
            raise ApiError(
                422,
                "invalid_parameter",
                "site: give robot_id or site, not both (neither: the whole fleet)",
                ["site"],
            )
        window = time_range(since, until)
        after = None if cursor is None else parse_cursor(kind, cursor)
        if robot_id is not None and not await exists(robot_id):
            raise ApiError(404, "not_found", f"no robot {robot_id!r} has reported; check the id")
        chosen = _format_of(format, request.headers.get("accept"))
        if chosen == "csv":
            encode = csv_rows(csv_columns(spec.item))
        else:
            has_id = any(f.encode_name == "robot_id" for f in msgspec.structs.fields(spec.item))
            encode = ndjson_rows(has_id)
        rows = export_rows(
            run(), keys, kind, robot_id=robot_id, site=site, window=window, cursor=after,
            limit=limit,
        )  # fmt: skip

        async def body() -> AsyncIterator[bytes]:
            head = encode(None)
            if head:
                yield head
            async for page in rows:
                yield encode(page)

        scope = robot_id if robot_id is not None else f"site-{site}" if site else "fleet"
        ext = "csv" if chosen == "csv" else "ndjson"
        return Stream(
            body(),
            media_type=CSV if chosen == "csv" else NDJSON,
            headers={
                "Content-Disposition": f'attachment; filename="fleetpulse-{kind}-{scope}.{ext}"',
                "Cache-Control": "no-store",
            },
        )

    return [export]


if __name__ == "__main__":  # python -m api.export: the client (api.export_cli)
    import sys

    from api.export_cli import main

    sys.exit(main())
