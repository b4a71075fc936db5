"""``python -m api.export KIND --out FILE``: an export from the query server, into a file.

    python -m api.export history --site plant-1 --since 2025-06-01T00:00:00Z \\
        --format csv --out plant-1.csv --token-file read.token

It reads ``GET /v1/export/{kind}`` as it streams and writes each *whole* row to the
file (a row cut by a dropped connection is never written), showing rows, bytes and
rate on stderr. When the connection drops, the server restarts or answers 502/503/504,
it asks again with the cursor of the last row written, so the file holds every row
once (:mod:`api.export` says what a cursor promises). It gives up after ``--retries``
failures in a row without a new row, and on any other error answer (its detail shown).

The server's URL defaults to the local query server (``FLEETPULSE_API_HOST``,
``FLEETPULSE_QUERY_PORT``); the read-scope token comes from ``--token-file`` (or
``--token``, which other users of the machine may see in the process list).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

import httpx
import msgspec

from fleetpulse.errors import FleetpulseError
from fleetpulse.settings import load_settings

__all__ = ["ExportFailed", "Records", "export_to_file", "main"]

RETRYABLE = frozenset({502, 503, 504})


class ExportFailed(FleetpulseError):  # noqa: N818 - reads as a condition, like httpx's errors
    """The server refused the export, or it could not be finished within the retries."""


class _Cursor(msgspec.Struct):
    cursor: str


_cursor_dec = msgspec.json.Decoder(_Cursor)


class Records:
    """Splits an export's bytes into whole rows (NDJSON lines or CSV records) and reads
    each one's cursor. ``"`` and line feeds are ASCII, so the split works on bytes
    whatever UTF-8 text the rows hold; a CSV record ends at a line feed outside quotes."""

    def __init__(self, fmt: str) -> None:
        self.csv = fmt == "csv"
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already looked at for a record's end
        self._quotes = 0  # quote characters in _buf[:_scanned]
        self.header: bytes | None = None  # the CSV header row of the latest answer
        self._headed = False  # whether this answer's header row was seen

    def feed(self, chunk: bytes) -> list[tuple[bytes, str]]:
        """The whole rows completed by ``chunk``, each with its cursor (the CSV header
        row is kept in :attr:`header`, not returned)."""
        self._buf += chunk
        out: list[tuple[bytes, str]] = []
        start = 0
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end < 0:
                self._quotes += self._buf.count(b'"', self._scanned)
                self._scanned = len(self._buf)
                break
            self._quotes += self._buf.count(b'"', self._scanned, end)
            self._scanned = end + 1
            if self.csv and self._quotes % 2:
                continue  # a line break inside a quoted field
            record = bytes(self._buf[start : end + 1])
            start, self._quotes = end + 1, 0
            if self.csv and not self._headed:
                self.header, self._headed = record, True
                continue
            out.append((record, self._cursor_of(record)))
        if start:
            del self._buf[:start]
            self._scanned -= start
        return out

    def restart(self) -> None:
        """Forget a partial row (its connection dropped); the next answer starts afresh
        (a CSV answer with the header row again, which is checked and skipped)."""
        self._buf.clear()
        self._scanned = self._quotes = 0
        self._headed = False

    @property
    def pending(self) -> int:
        """Bytes of a row not yet whole."""
        return len(self._buf)

    def _cursor_of(self, record: bytes) -> str:
        if not self.csv:
            return _cursor_dec.decode(record).cursor
        fields = next(csv.reader([record.decode()]))
        return fields[-1]


class _Progress:
    def __init__(self, err: TextIO, quiet: bool) -> None:
        self.err, self.quiet = err, quiet
        self.tty = err.isatty()
        self.start = self.last = time.monotonic()
        self.rows = self.bytes = 0

    def add(self, rows: int, size: int) -> None:
        self.rows += rows
        self.bytes += size
        now = time.monotonic()
        if not self.quiet and now - self.last >= (0.5 if self.tty else 5.0):
            self.last = now
            self._show(now, "\r" if self.tty else "", "" if self.tty else "\n")

    def _show(self, now: float, head: str, tail: str) -> None:
        took = max(now - self.start, 1e-9)
        self.err.write(
            f"{head}{self.rows:,} rows  {self.bytes / 1e6:,.1f} MB  "
            f"{self.rows / took:,.0f} rows/s{tail}"
        )
        self.err.flush()

    def note(self, text: str) -> None:
        if not self.quiet:
            self.err.write(("\n" if self.tty else "") + text + "\n")
            self.err.flush()

    def done(self, out: str, resumes: int) -> None:
        if self.quiet:
            return
        took = time.monotonic() - self.start
        self.err.write(
            f"{chr(13) if self.tty else ''}wrote {self.rows:,} rows ({self.bytes / 1e6:,.1f} MB)"
            f" to {out} in {took:.1f}s ({self.rows / max(took, 1e-9):,.0f} rows/s)"
            f"{f', resumed {resumes} times' if resumes else ''}\n"
        )
        self.err.flush()


def export_to_file(
    client: httpx.Client,
    kind: str,
    params: dict[str, str],
    out: BinaryIO,
    *,
    fmt: str,
    cursor: str | None = None,
    retries: int = 20,
    progress: _Progress | None = None,
) -> tuple[int, int]:
    """Stream ``GET /v1/export/{kind}`` into ``out``, resuming after drops; returns
    (rows written, times resumed). Raises ExportFailed when it cannot finish."""
    records = Records(fmt)
    rows = resumes = failures = 0
    header: bytes | None = None
    last = cursor
    while True:
        query = {**params, "format": fmt, **({"cursor": last} if last else {})}
        try:
            with client.stream("GET", f"/v1/export/{kind}", params=query) as answer:
                if answer.status_code in RETRYABLE:
                    raise httpx.TransportError(f"the server answered {answer.status_code}")
                if answer.status_code != 200:
                    answer.read()
                    raise ExportFailed(_refusal(answer))
                for chunk in answer.iter_bytes():
                    got = records.feed(chunk)
                    if header is None and records.header is not None:
                        header = records.header
                        out.write(header)
                    elif records.header is not None and records.header != header:
                        raise ExportFailed("the CSV columns changed between two answers")
                    if got:
                        out.write(b"".join(record for record, _ in got))
                        rows += len(got)
                        last = got[-1][1]
                        failures = 0
                        if progress is not None:
                            progress.add(len(got), sum(len(r) for r, _ in got))
            if records.pending:
                raise ExportFailed("the answer ended inside a row")
            out.flush()
            return rows, resumes
        except httpx.TransportError as exc:
            failures += 1
            if failures > retries:
                raise ExportFailed(
                    f"gave up after {retries} failures in a row ({exc}); {rows:,} rows "
                    f"written, resume with --cursor {last}"
                ) from exc
            records.restart()
            resumes += 1
            wait = min(0.2 * 2 ** (failures - 1), 5.0)
            if progress is not None:
                where = f"after {last}" if last else "from the start"
                progress.note(f"connection lost ({exc}); resuming {where} in {wait:.1f}s")
            time.sleep(wait)


def _refusal(answer: httpx.Response) -> str:
    try:
        body = answer.json()
        return f"{answer.status_code} {body.get('error')}: {body.get('detail')}"
    except ValueError:
        return f"{answer.status_code}: {answer.text[:200]}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m api.export",
        description="Export history, window stats or alerts from the query server to a file "
        "(streamed; resumes by cursor when the connection drops).",
    )
    p.add_argument("kind", help="history, stats or alerts")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--robot", help="one robot's rows")
    who.add_argument("--site", help="the rows of a site's robots (neither: the fleet)")
    p.add_argument("--since", help="rows at or after this RFC 3339 time (with an offset)")
    p.add_argument("--until", help="rows before this RFC 3339 time")
    p.add_argument("--format", choices=("csv", "ndjson"), default="csv")
    p.add_argument("--out", required=True, help="the file to write (replaced)")
    p.add_argument("--cursor", help="start after this row's cursor")
    p.add_argument("--url", help="the query server (default: the local one, from settings)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token-file", type=Path, help="a file holding a read-scope token")
    token.add_argument("--token", help="a read-scope token (`just token read`)")
    p.add_argument("--retries", type=int, default=20, help="failures in a row before giving up")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except FleetpulseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
    url = args.url or f"http://{host}:{settings.query_port}"
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    elif args.token:
        token = args.token
    else:
        print("error: give --token-file (or --token): a read-scope token", file=sys.stderr)
        return 2
    params = {
        k: v
        for k, v in (
            ("robot_id", args.robot),
            ("site", args.site),
            ("since", args.since),
            ("until", args.until),
        )
        if v is not None
    }
    progress = _Progress(sys.stderr, args.quiet)
    headers = {"Authorization": f"Bearer {token}"}
    # A read waits long: the server sends between pages, a stopped one counts as a drop.
    timeout = httpx.Timeout(10.0, read=60.0)
    try:
        with (
            httpx.Client(base_url=url, headers=headers, timeout=timeout) as client,
            Path(args.out).open("wb") as out,
        ):
            _, resumes = export_to_file(
                client, args.kind, params, out, fmt=args.format, cursor=args.cursor,
                retries=args.retries, progress=progress,
            )  # fmt: skip
    except ExportFailed as exc:
        progress.note(f"error: {exc}")
        return 1
    progress.done(args.out, resumes)
    return 0
