"""`/db export leaderboard|submissions|ledger [--since YYYY-MM-DD]`: a table as CSV.

The rows leave the server through `COPY (SELECT …) TO STDOUT (FORMAT csv)` read with
psycopg's copy protocol: PostgreSQL formats the CSV itself (quoting, JSON for jsonb,
ISO timestamps) and sends it row by row, so the bot holds one chunk at a time whatever
the table's size, and the rate is the server's own (bench/export.py compares it with a
plain `COPY` into a file). A named cursor with Python-side CSV formatting was the other
choice; it spends most of its time in the formatter.

The export runs on its own connection, in one `READ ONLY`, `REPEATABLE READ` transaction
(one consistent snapshot) with limits meant for a long read: a statement timeout of
minutes rather than the diagnostics' seconds, a lock timeout that lets it wait behind a
short exclusive lock (a plain `REFRESH MATERIALIZED VIEW`) but not behind a stuck
migration, and an idle-in-transaction timeout in case the reader stalls. It never takes a
pooled connection the diagnostics need.

The ledger and the submissions, tens of millions of rows at a million users, are read
a page at a time (`ExportLimits.page_rows`) by keyset: each page one `COPY` of the rows
after the last one sent, in the export's order, through the index on its time column
(an incremental sort puts the ties in id order). So each statement is short, nothing
sorts the whole table into temporary files first, and the first rows leave at once.
The last row of a page, parsed back from its CSV, is where the next starts; the time
column prints in full precision, so the text compares back exactly. Where the columns
could not keep that promise (a NULL time, ids not unique) the export is one `COPY`.
The file is byte for byte the one statement's, in both cases.

Columns are chosen so that the CSV parses back to the table's values: timestamps in UTC
with their offset (`2026-11-30 10:23:53.123+00`; the naive `timestamp(3)` columns hold
UTC and are labelled so), jsonb as JSON text, NULL as an empty unquoted field. The
leaderboard export carries what the leaderboard shows (handle, name, school, cohort,
points), not e-mails or avatar URLs: an export is a file that gets forwarded. Values are
not altered to defuse spreadsheet formulas (`=…`): the file must compare equal to the
table, and its readers are engineers.
"""

from __future__ import annotations

import csv
import dataclasses
import io
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
    # Read by keyset when set: (output column of the time, of the unique id), the
    # columns `order_by` names (time, then id), both ascending.
    keyset: tuple[str, str] | None = None

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
            keyset=("created_at", "id"),
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
            keyset=("event_time", "id"),
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
        """The rows the export holds, counted without its ORDER BY (a sort of every row
        only to count them) or its columns."""
        return sql.SQL("SELECT count(*) AS n FROM {}{}").format(*self._source())

    @property
    def estimate(self) -> sql.Composed:
        """EXPLAIN of the rows the export holds: the planner's estimate of their number."""
        return sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {}{}").format(*self._source())

    def _source(self) -> tuple[sql.Composable, sql.Composable]:
        return sql.Identifier(self.request.kind.relation), _since(self.request)

    def page(
        self, after: tuple[str, str] | None, rows: int
    ) -> tuple[sql.Composed, tuple[Any, ...]]:
        """The COPY of the `rows` rows after `after` (the time and id of the last row
        sent, as the CSV printed them; None: from the first), header on the first page."""
        kind = self.request.kind
        time_col, id_col = keyset_columns(kind)
        where, params = _since(self.request), self.params
        if after is not None:
            # the printed time back in the column's own type (a naive column holds UTC)
            bound = sql.SQL(
                "(%s::timestamptz AT TIME ZONE 'UTC')" if kind.since_naive else "%s::timestamptz"
            )
            keyset = sql.SQL("{t} >= {b} AND ({t}, {i}) > ({b}, %s)").format(
                t=sql.Identifier(time_col), i=sql.Identifier(id_col), b=bound
            )
            joiner = sql.SQL(" WHERE " if self.request.since is None else " AND ")
            where = sql.SQL("{}{}{}").format(where, joiner, keyset)
            params = (*params, after[0], after[0], after[1])
        select = sql.SQL("SELECT {} FROM {}{} ORDER BY {} LIMIT {}").format(
            _columns(kind), sql.Identifier(kind.relation), where, _order(kind), sql.Literal(rows)
        )
        header = sql.SQL("true" if after is None else "false")
        statement = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER {})").format(
            select, header
        )
        return statement, params


def keyset_columns(kind: Kind) -> tuple[str, str]:
    """The table's (time, id) columns a keyset page compares: those `order_by` names."""
    if kind.keyset is None or len(kind.order_by) != 2:
        raise ValueError(f"{kind.name} is not read by keyset")
    time_col, id_col = (o.split()[0] for o in kind.order_by)
    return time_col, id_col


def _columns(kind: Kind) -> sql.Composed:
    return sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(sql.SQL(expr), sql.Identifier(name))
        for name, expr in kind.columns
    )


def _order(kind: Kind) -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL(o) for o in kind.order_by)


def _since(request: ExportRequest) -> sql.Composable:
    if request.since is None:
        return sql.SQL("")
    return sql.SQL(" WHERE {} >= %s").format(sql.Identifier(request.kind.since_column))


def build_query(request: ExportRequest) -> ExportQuery:
    kind = request.kind
    params: tuple[Any, ...] = ()
    if request.since is not None:
        start = datetime.combine(request.since, time(), tzinfo=UTC)
        # A naive column compares with a naive UTC value (an aware one would be converted
        # with the session's TimeZone); the transaction sets UTC either way.
        bound: datetime = start.replace(tzinfo=None) if kind.since_naive else start
        params = (bound,)
    select = sql.SQL("SELECT {} FROM {}{} ORDER BY {}").format(
        _columns(kind), sql.Identifier(kind.relation), _since(request), _order(kind)
    )
    return ExportQuery(request, select, params)


@dataclass(frozen=True)
class ExportLimits:
    """A long read's limits (the diagnostics' 5 s would cut every real export)."""

    statement_timeout_ms: int = 15 * 60 * 1000
    lock_timeout_ms: int = 15_000
    idle_in_transaction_timeout_ms: int = 60_000
    chunk_bytes: int = 256 * 1024
    page_rows: int = 100_000  # a keyset page: well under a second of the server's time


@dataclass(frozen=True)
class Chunk:
    data: bytes
    rows: int  # data rows so far, this chunk's included (the header is not a row)
    last: bytes = b""  # the chunk's last message: its last row (or the header)
    page: int = 1  # the statement it came from (the export's first, second, ...)


# Whether a keyset is safe: the time column never NULL (a NULL would compare as nothing
# and drop out of every page) and the id column unique by a valid index of its own.
_KEYSET_SQL = """
SELECT coalesce(bool_and(a.attnotnull), false)
       AND EXISTS (SELECT 1 FROM pg_index AS i
                    JOIN pg_attribute AS k ON k.attrelid = i.indrelid AND k.attnum = i.indkey[0]
                   WHERE i.indrelid = to_regclass(%(rel)s) AND i.indisunique AND i.indisvalid
                     AND i.indnkeyatts = 1 AND i.indexprs IS NULL AND i.indpred IS NULL
                     AND k.attname = %(id)s) AS ok
FROM pg_attribute AS a
WHERE a.attrelid = to_regclass(%(rel)s) AND a.attname IN (%(time)s, %(id)s)
  AND NOT a.attisdropped
"""


async def _by_keyset(conn: psycopg.AsyncConnection[Any], kind: Kind) -> bool:
    if kind.keyset is None:
        return False
    time_col, id_col = keyset_columns(kind)
    cur = await conn.execute(_KEYSET_SQL, {"rel": kind.relation, "time": time_col, "id": id_col})
    row = await cur.fetchone()
    return bool(row and row[0])


async def stream_csv(
    conn: psycopg.AsyncConnection[Any], query: ExportQuery, limits: ExportLimits | None = None
) -> AsyncGenerator[Chunk, None]:
    """The CSV of `query` in chunks of about `limits.chunk_bytes`, header first.

    PostgreSQL sends one CopyData message per row of a `COPY TO`, so counting messages
    counts rows even when a quoted value holds a newline. `conn` must be idle (outside a
    transaction) and not shared; the transaction is this function's own.
    """
    limits = limits or ExportLimits()
    kind = query.request.kind
    await conn.set_read_only(True)
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        await conn.execute(
            "SELECT set_config('statement_timeout', %s, true),"
            " set_config('lock_timeout', %s, true),"
            " set_config('idle_in_transaction_session_timeout', %s, true),"
            " set_config('application_name', %s, true),"
            " set_config('TimeZone', 'UTC', true),"
            " set_config('DateStyle', 'ISO, YMD', true),"
            # a read of minutes keeps to one core: no JIT, no parallel workers taking the
            # cores the incident's diagnostics need
            " set_config('jit', 'off', true),"
            " set_config('max_parallel_workers_per_gather', '0', true)",
            (
                str(limits.statement_timeout_ms),
                str(limits.lock_timeout_ms),
                str(limits.idle_in_transaction_timeout_ms),
                APPLICATION_NAME,
            ),
        )
        if not await _by_keyset(conn, kind):
            async for chunk in _copy(conn, query.copy, query.params, limits, 0, header=True):
                yield chunk
            return
        positions = [kind.column_names.index(c) for c in kind.keyset or ()]
        after: tuple[str, str] | None = None
        rows = page = 0
        while True:
            statement, params = query.page(after, limits.page_rows)
            before, last, page = rows, b"", page + 1
            async for chunk in _copy(conn, statement, params, limits, rows, header=after is None):
                rows, last = chunk.rows, chunk.last or last
                yield dataclasses.replace(chunk, page=page)
            if rows - before < limits.page_rows:
                return
            (fields,) = csv.reader(io.StringIO(last.decode(conn.info.encoding)))
            after = (fields[positions[0]], fields[positions[1]])


async def _copy(
    conn: psycopg.AsyncConnection[Any],
    statement: sql.Composed,
    params: tuple[Any, ...],
    limits: ExportLimits,
    rows: int,
    *,
    header: bool,
) -> AsyncGenerator[Chunk, None]:
    """One `COPY ... TO STDOUT` in chunks, `rows` the data rows sent before it."""
    # psycopg's own binding (COPY takes no server-side parameters, as cursor.copy does).
    text = AsyncClientCursor(conn).mogrify(statement, params or None)
    pgconn = conn.pgconn
    pgconn.send_query(text.encode(conn.info.encoding))
    (started,) = await conn.wait(generators.execute(pgconn))
    if started.status != pq.ExecStatus.COPY_OUT:
        raise errors.error_from_result(started, encoding=conn.info.encoding)
    rows -= header  # the header is a message too
    while True:
        data, messages, last, done = await conn.wait(_read_chunk(pgconn, limits.chunk_bytes))
        rows += messages
        if data or done is not None:
            yield Chunk(bytes(data), max(rows, 0), last)
        if done is not None:
            if done.status != pq.ExecStatus.COMMAND_OK:
                raise errors.error_from_result(done, encoding=conn.info.encoding)
            return


def _read_chunk(pgconn: PGconn, limit: int) -> PQGen[tuple[bytearray, int, bytes, PGresult | None]]:
    """Rows already received, up to `limit` bytes, in one wait on the connection, with
    the last of them on its own.

    psycopg's `Copy.read()` goes through the event loop once per row, which costs more
    than PostgreSQL spends producing it (a third of COPY's rate into a file); taking every
    row libpq already holds in one pass keeps the export near COPY's own rate. The
    protocol is psycopg's `copy_from` generator's: would-block waits for the socket, -1
    ends the COPY and its final result (success or the error) follows.
    """
    buf = bytearray()
    messages = 0
    last: bytes | memoryview = b""
    while True:
        nbytes, data = pgconn.get_copy_data(1)
        if nbytes > 0:
            buf += data
            last = data
            messages += 1
            if len(buf) >= limit:
                return buf, messages, bytes(last), None
        elif nbytes == 0:
            if buf:
                return buf, messages, bytes(last), None
            while not (yield Wait.R):
                continue
            pgconn.consume_input()
        else:
            results = yield from generators.fetch_many(pgconn)
            if not results:
                raise errors.OperationalError("the COPY ended without a result")
            return buf, messages, bytes(last), results[0]


# Above this many rows (the planner's estimate) the console's answer is the estimate,
# said to be one: counting 20 million ledger rows reads 2.5 GB, near the check timeout.
EXACT_COUNT_MAX = 2_000_000


@register(NAME, USAGE, SUMMARY, role="REVIEWER")
async def diagnose(ctx: Context, args: list[str]) -> Report:
    """Outside Slack (`python -m bot run "export …"`) the file has nowhere to go: count
    what would be exported (the planner's estimate, labelled so, for a big table), and
    say where the CSV itself comes from."""
    request = parse(args)
    query = build_query(request)

    async def count(db: Reader) -> Finding:
        await db.fetch("SELECT set_config('jit', 'off', true)")  # a scan, not worth compiling
        (plan,) = await db.fetch(query.estimate.as_string(None), query.params)
        estimate = int(plan["QUERY PLAN"][0]["Plan"]["Plan Rows"])
        if estimate > EXACT_COUNT_MAX:
            rows = f"about {estimate:,} rows (the planner's estimate, not counted)"
        else:
            (row,) = await db.fetch(query.count.as_string(None), query.params)
            rows = f"{int(row['n'])} rows"
        return Finding(
            check=f"export {request.kind.name}",
            status=Status.OK,
            summary=f"{rows} to export: {request.kind.describes}",
            hint=f"in Slack `/db {NAME} {request.kind.name}` uploads the CSV to the thread; "
            f"from a shell: python -m bot export {request.kind.name} --out FILE",
        )

    finding = await ctx.gateway.run_check(f"export {request.kind.name}", count)
    return Report(
        title=f"Export {request.describe()}", target=ctx.gateway.target, findings=[finding]
    )
