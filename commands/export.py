"""`/db export leaderboard|submissions|ledger [--since YYYY-MM-DD]`: a table as CSV.

The rows leave the server through `COPY (SELECT …) TO STDOUT (FORMAT csv)` read with
psycopg's copy protocol: PostgreSQL formats the CSV itself (quoting, JSON for jsonb,
ISO timestamps) and sends it row by row, so the bot holds one chunk at a time whatever
the table's size, and the rate is the server's own (bench/export.py compares it with a
plain `COPY` into a file). A named cursor with Python-side CSV formatting was the other
choice; it spends most of its time in the formatter.

The export runs on its own connection, in one `READ ONLY` transaction (one consistent
snapshot) with limits meant for a long read: a statement timeout of minutes rather than
the diagnostics' seconds, a lock timeout that lets it wait behind a short exclusive
lock (a plain `REFRESH MATERIALIZED VIEW`) but not behind a stuck migration, and an
idle-in-transaction timeout in case the reader stalls. It never takes a pooled
connection the diagnostics need.

Columns are chosen so that the CSV parses back to the table's values: timestamps in UTC
with their offset (`2026-11-30 10:23:53.123+00`; the naive `timestamp(3)` columns hold
UTC and are labelled so), jsonb as JSON text, NULL as an empty unquoted field. The
leaderboard export carries what the leaderboard shows (handle, name, school, cohort,
points), not e-mails or avatar URLs: an export is a file that gets forwarded. Values are
not altered to defuse spreadsheet formulas (`=…`): the file must compare equal to the
table, and its readers are engineers.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

import psycopg
from psycopg import AsyncClientCursor, errors, generators, pq, sql
from psycopg.abc import PQGen
from psycopg.pq.abc import PGconn, PGresult
from psycopg.waiting import Wait

from commands.base import (
    APPLICATION_NAME,
    Context,
    Finding,
    Reader,
    Report,
    Status,
    UsageError,
    register,
)

NAME = "export"
USAGE = "export leaderboard|submissions|ledger [--since YYYY-MM-DD]"
SUMMARY = "a table as a CSV file in the thread (streamed; one export of each kind at a time)"


@dataclass(frozen=True)
class Kind:
    """One exportable table: what is selected, from where, filtered on which time."""

    name: str
    relation: str
    columns: tuple[tuple[str, str], ...]  # (output name, SQL expression over the relation)
    since_column: str  # rows with this at or after the date (UTC) are kept
    order_by: tuple[str, ...]
    describes: str
    since_naive: bool = False  # the since column is a naive `timestamp` holding UTC

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)


def _utc(column: str) -> str:
    """A naive `timestamp` column (Prisma writes UTC there) as timestamptz, so the CSV
    says +00 and a reader need not know which columns are naive."""
    return f"{column} AT TIME ZONE 'UTC'"


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            name="leaderboard",
            relation="leaderboard_totals",
            columns=(
                ("user_id", "user_id"),
                ("handle", "handle"),
                ("name", "name"),
                ("school", "school"),
                ("cohort", "cohort"),
                ("total_points", "total_points"),
                ("public_submissions", "public_submissions"),
                ("last_activity_at", "last_activity_at"),
            ),
            since_column="last_activity_at",
            order_by=("total_points DESC", "user_id"),
            describes="users on the leaderboard (leaderboard_totals), by points; "
            "--since keeps those active since the date",
        ),
        Kind(
            name="submissions",
            relation="submissions",
            columns=(
                ("id", "id"),
                ("user_id", "user_id"),
                ("activity_code", "activity_code"),
                ("status", "status"),
                ("visibility", "visibility"),
                ("payload", "payload"),
                ("reviewer_id", "reviewer_id"),
                ("review_note", "review_note"),
                ("created_at", _utc("created_at")),
                ("updated_at", _utc("updated_at")),
                ("approval_org_timezone", "approval_org_timezone"),
            ),
            since_column="created_at",
            order_by=("created_at", "id"),
            describes="submissions by creation time; --since on created_at",
            since_naive=True,
        ),
        Kind(
            name="ledger",
            relation="points_ledger",
            columns=(
                ("id", "id"),
                ("user_id", "user_id"),
                ("activity_code", "activity_code"),
                ("source", "source"),
                ("delta_points", "delta_points"),
                ("external_source", "external_source"),
                ("external_event_id", "external_event_id"),
                ("created_at", _utc("created_at")),
                ("event_time", "event_time"),
                ("meta", "meta"),
            ),
            since_column="event_time",
            order_by=("event_time", "id"),
            describes="points_ledger rows by event time; --since on event_time",
        ),
    )
}


@dataclass(frozen=True)
class ExportRequest:
    kind: Kind
    since: date | None = None

    def describe(self) -> str:
        return self.kind.name + (f" since {self.since.isoformat()}" if self.since else "")

    def filename(self, at: datetime) -> str:
        since = f"-since-{self.since.isoformat()}" if self.since else ""
        return f"{self.kind.name}{since}-{at.astimezone(UTC):%Y%m%d-%H%M%S}.csv"


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse(args: list[str]) -> ExportRequest:
    """`KIND [--since YYYY-MM-DD]` (also `--since=…`); anything else is a usage error."""
    if not args:
        raise UsageError("say what to export: " + ", ".join(KINDS))
    name, rest = args[0].lower(), list(args[1:])
    kind = KINDS.get(name)
    if kind is None:
        raise UsageError(f"cannot export {args[0]!r}: choose one of " + ", ".join(KINDS))
    since: date | None = None
    while rest:
        word = rest.pop(0)
        flag, equals, value = word.partition("=")
        if flag != "--since":
            raise UsageError(f"unexpected argument {word!r}")
        if not equals:
            if not rest:
                raise UsageError("--since needs a date (YYYY-MM-DD)")
            value = rest.pop(0)
        if since is not None:
            raise UsageError("--since given twice")
        since = _date(value)
    return ExportRequest(kind, since)


def _date(value: str) -> date:
    if not _DATE.match(value):
        raise UsageError(f"--since {value!r} is not a date (YYYY-MM-DD)")
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--since {value!r} is not a date (YYYY-MM-DD)") from None
    if day > datetime.now(UTC).date():
        raise UsageError(f"--since {value} is in the future: nothing to export")
    return day


@dataclass(frozen=True)
class ExportQuery:
    """The SELECT of an export with its bound parameters (psycopg binds them client-side
    for COPY, which takes no server-side parameters)."""

    request: ExportRequest
    select: sql.Composed
    params: tuple[Any, ...]

    @property
    def copy(self) -> sql.Composed:
        return sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true)").format(self.select)

    @property
    def count(self) -> sql.Composed:
        return sql.SQL("SELECT count(*) AS n FROM ({}) AS export").format(self.select)


def build_query(request: ExportRequest) -> ExportQuery:
    kind = request.kind
    columns = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(sql.SQL(expr), sql.Identifier(name))
        for name, expr in kind.columns
    )
    where: sql.Composable = sql.SQL("")
    params: tuple[Any, ...] = ()
    if request.since is not None:
        start = datetime.combine(request.since, time(), tzinfo=UTC)
        # A naive column compares with a naive UTC value (an aware one would be converted
        # with the session's TimeZone); the transaction sets UTC either way.
        bound: datetime = start.replace(tzinfo=None) if kind.since_naive else start
        where = sql.SQL(" WHERE {} >= %s").format(sql.Identifier(kind.since_column))
        params = (bound,)
    select = sql.SQL("SELECT {} FROM {}{} ORDER BY {}").format(
        columns,
        sql.Identifier(kind.relation),
        where,
        sql.SQL(", ").join(sql.SQL(o) for o in kind.order_by),
    )
    return ExportQuery(request, select, params)


@dataclass(frozen=True)
class ExportLimits:
    """A long read's limits (the diagnostics' 5 s would cut every real export)."""

    statement_timeout_ms: int = 15 * 60 * 1000
    lock_timeout_ms: int = 15_000
    idle_in_transaction_timeout_ms: int = 60_000
    chunk_bytes: int = 256 * 1024


@dataclass(frozen=True)
class Chunk:
    data: bytes
    rows: int  # data rows so far, this chunk's included (the header is not a row)


async def stream_csv(
    conn: psycopg.AsyncConnection[Any], query: ExportQuery, limits: ExportLimits | None = None
) -> AsyncGenerator[Chunk, None]:
    """The CSV of `query` in chunks of about `limits.chunk_bytes`, header first.

    PostgreSQL sends one CopyData message per row of a `COPY TO`, so counting messages
    counts rows even when a quoted value holds a newline. `conn` must be idle (outside a
    transaction) and not shared; the transaction is this function's own.
    """
    limits = limits or ExportLimits()
    await conn.set_read_only(True)
    async with conn.transaction():
        await conn.execute(
            "SELECT set_config('statement_timeout', %s, true),"
            " set_config('lock_timeout', %s, true),"
            " set_config('idle_in_transaction_session_timeout', %s, true),"
            " set_config('application_name', %s, true),"
            " set_config('TimeZone', 'UTC', true),"
            " set_config('DateStyle', 'ISO, YMD', true)",
            (
                str(limits.statement_timeout_ms),
                str(limits.lock_timeout_ms),
                str(limits.idle_in_transaction_timeout_ms),
                APPLICATION_NAME,
            ),
        )
        # psycopg's own binding (COPY takes no server-side parameters, as cursor.copy does).
        statement = AsyncClientCursor(conn).mogrify(query.copy, query.params or None)
        pgconn = conn.pgconn
        pgconn.send_query(statement.encode(conn.info.encoding))
        (started,) = await conn.wait(generators.execute(pgconn))
        if started.status != pq.ExecStatus.COPY_OUT:
            raise errors.error_from_result(started, encoding=conn.info.encoding)
        rows = -1  # the header is a message too
        while True:
            data, messages, done = await conn.wait(_read_chunk(pgconn, limits.chunk_bytes))
            rows += messages
            if data or done is not None:
                yield Chunk(bytes(data), max(rows, 0))
            if done is not None:
                if done.status != pq.ExecStatus.COMMAND_OK:
                    raise errors.error_from_result(done, encoding=conn.info.encoding)
                return


def _read_chunk(pgconn: PGconn, limit: int) -> PQGen[tuple[bytearray, int, PGresult | None]]:
    """Rows already received, up to `limit` bytes, in one wait on the connection.

    psycopg's `Copy.read()` goes through the event loop once per row, which costs more
    than PostgreSQL spends producing it (a third of COPY's rate into a file); taking every
    row libpq already holds in one pass keeps the export near COPY's own rate. The
    protocol is psycopg's `copy_from` generator's: would-block waits for the socket, -1
    ends the COPY and its final result (success or the error) follows.
    """
    buf = bytearray()
    messages = 0
    while True:
        nbytes, data = pgconn.get_copy_data(1)
        if nbytes > 0:
            buf += data
            messages += 1
            if len(buf) >= limit:
                return buf, messages, None
        elif nbytes == 0:
            if buf:
                return buf, messages, None
            while not (yield Wait.R):
                continue
            pgconn.consume_input()
        else:
            results = yield from generators.fetch_many(pgconn)
            if not results:
                raise errors.OperationalError("the COPY ended without a result")
            return buf, messages, results[0]


@register(NAME, USAGE, SUMMARY, role="REVIEWER")
async def diagnose(ctx: Context, args: list[str]) -> Report:
    """Outside Slack (`python -m bot run "export …"`) the file has nowhere to go: count
    what would be exported, and say where the CSV itself comes from."""
    request = parse(args)
    query = build_query(request)

    async def count(db: Reader) -> Finding:
        rows = await db.fetch(query.count.as_string(None), query.params)
        n = int(rows[0]["n"]) if rows else 0
        return Finding(
            check=f"export {request.kind.name}",
            status=Status.OK,
            summary=f"{n} rows to export: {request.kind.describes}",
            hint=f"in Slack `/db {NAME} {request.kind.name}` uploads the CSV to the thread; "
            f"from a shell: python -m bot export {request.kind.name} --out FILE",
        )

    finding = await ctx.gateway.run_check(f"export {request.kind.name}", count)
    return Report(
        title=f"Export {request.describe()}", target=ctx.gateway.target, findings=[finding]
    )
