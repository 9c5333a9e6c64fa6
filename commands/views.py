"""Materialized views: `/db views`, and the catalog reads the `refresh-views` remedy
(commands/remedies/refresh.py) shares.

Everything is read from the live catalog (`pg_class` with relkind 'm', the view's
indexes, `pg_locks`, `pg_rewrite` dependencies), never from a list of expected names,
because production drifts. Catalog reads take no lock on the views themselves, so the
diagnosis and the plan still arrive while a session holds a view exclusively; that
session is then named as what the refresh would wait for.

PostgreSQL records no refresh time, so the last refresh shown is the one the bot
recorded around its own `apply()`; the bot hands that log in as `ctx.refresh_log`.
"""

from __future__ import annotations

import difflib
import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from commands.base import (
    Context,
    Finding,
    Reader,
    RefreshRecords,
    Report,
    Row,
    Status,
    UsageError,
    human_duration,
    human_size,
    register,
    shown_queries,
)
from commands.health import EXPECTED_VIEWS

CONCURRENTLY = "concurrently"
PLAIN = "plain"

# Table-level lock modes as pg_locks names them, weakest first.
LOCK_MODES = (
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)
# A plain refresh takes ACCESS EXCLUSIVE, which conflicts with every mode. CONCURRENTLY
# takes EXCLUSIVE, which conflicts with every mode except ACCESS SHARE (plain readers).
CONFLICTING_MODES: dict[str, tuple[str, ...]] = {
    PLAIN: LOCK_MODES,
    CONCURRENTLY: LOCK_MODES[1:],
}
# Views bigger than this on disk get the planner's row estimate instead of count(*),
# so a plan or a diagnosis never scans a huge view under the check timeout.
COUNT_LIMIT_BYTES = 256 * 1024 * 1024


# --- the catalog --------------------------------------------------------------------

_VIEWS_SQL = """
SELECT c.oid::bigint AS oid, n.nspname AS schema, c.relname AS view,
       c.relispopulated AS populated, c.reltuples::bigint AS est_rows,
       pg_relation_filenode(c.oid)::bigint AS filenode,
       (SELECT ic.relname
          FROM pg_index i
          JOIN pg_class ic ON ic.oid = i.indexrelid
          JOIN pg_am am ON am.oid = ic.relam
         WHERE i.indrelid = c.oid AND i.indisunique AND i.indimmediate AND i.indisvalid
           AND i.indpred IS NULL AND i.indexprs IS NULL AND i.indnatts > 0
           AND am.amname = 'btree'
         ORDER BY ic.relname
         LIMIT 1) AS unique_index
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'm' AND n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
ORDER BY n.nspname, c.relname
"""
# The conditions PostgreSQL itself puts on the index REFRESH ... CONCURRENTLY uses:
# unique, not deferrable, valid, btree, no WHERE, plain columns only.

_LOCKS_SQL = """
SELECT l.relation::bigint AS oid, l.mode, l.granted, a.pid, a.usename::text AS "user",
       a.application_name AS app, a.state,
       extract(epoch FROM now() - a.xact_start)::float AS xact_s,
       left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120) AS query
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.relation = ANY(%s::oid[]) AND l.pid <> pg_backend_pid()
ORDER BY a.pid, l.mode
"""

_SIZES_SQL = """
SELECT t.oid::bigint AS oid, pg_total_relation_size(t.oid) AS total_bytes,
       pg_relation_size(t.oid) AS heap_bytes
FROM unnest(%s::oid[]) AS t(oid)
"""

# Rewrite-rule dependencies between views and materialized views, so that a view
# built on another (directly or through plain views) refreshes after it.
_DEPENDS_SQL = """
SELECT DISTINCT r.ev_class::bigint AS dependent, d.refobjid::bigint AS base
FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                AND d.refclassid = 'pg_class'::regclass
JOIN pg_class dc ON dc.oid = r.ev_class AND dc.relkind IN ('m', 'v')
JOIN pg_class bc ON bc.oid = d.refobjid AND bc.relkind IN ('m', 'v')
WHERE d.refobjid <> r.ev_class
"""


@dataclass
class MatView:
    oid: int
    schema: str
    name: str
    populated: bool
    unique_index: str | None
    est_rows: int
    rows: int | None = None
    rows_exact: bool = False
    bytes: int | None = None
    locks: list[Row] = field(default_factory=list)
    filenode: int | None = None  # a plain refresh writes a new one
    uncounted: str | None = None  # why `rows` is an estimate or missing

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def mode(self) -> str:
        """CONCURRENTLY needs a usable unique index and a populated view (PostgreSQL
        refuses it on a view that was never filled)."""
        return CONCURRENTLY if self.unique_index and self.populated else PLAIN

    def refresh_sql(self, mode: str | None = None) -> sql.Composed:
        return refresh_statement(self.schema, self.name, mode or self.mode)

    def blockers(self, mode: str | None = None) -> list[Row]:
        """Sessions holding a lock now that the refresh would wait for, one row per pid."""
        modes = CONFLICTING_MODES[mode or self.mode]
        return by_session(lk for lk in self.locks if lk["granted"] and lk["mode"] in modes)

    def queued(self, mode: str | None = None) -> list[Row]:
        """Sessions waiting ahead of us: a new request queues behind them."""
        modes = CONFLICTING_MODES[mode or self.mode]
        return by_session(lk for lk in self.locks if not lk["granted"] and lk["mode"] in modes)

    @property
    def readers_blocked_by(self) -> list[Row]:
        """Sessions that hold or wait for ACCESS EXCLUSIVE: every reader waits on them."""
        return by_session(lk for lk in self.locks if lk["mode"] == "AccessExclusiveLock")

    def rows_text(self) -> str:
        if self.rows is None:
            return "rows unknown" + (f" ({self.uncounted})" if self.uncounted else "")
        text = f"{self.rows:,} rows" if self.rows_exact else f"~{self.rows:,} rows (estimate)"
        return text


def by_session(locks: Iterable[Row]) -> list[Row]:
    """One row per pid (a session often holds several modes on one view), modes joined."""
    merged: dict[int, Row] = {}
    for lk in locks:
        row = merged.setdefault(int(lk["pid"]), {**lk, "modes": []})
        if lk["mode"] not in row["modes"]:
            row["modes"].append(lk["mode"])
    for row in merged.values():
        row["mode"] = "+".join(row.pop("modes"))
    return list(merged.values())


def refresh_statement(schema: str, name: str, mode: str) -> sql.Composed:
    return sql.SQL("REFRESH MATERIALIZED VIEW {}{}").format(
        sql.SQL("CONCURRENTLY ") if mode == CONCURRENTLY else sql.SQL(""),
        sql.Identifier(schema, name),
    )


async def load_views(db: Reader, show_literals: bool = False) -> list[MatView]:
    """Every materialized view with its refresh facts and the locks held on it now."""
    views = [
        MatView(
            oid=int(r["oid"]),
            schema=str(r["schema"]),
            name=str(r["view"]),
            populated=bool(r["populated"]),
            filenode=None if r["filenode"] is None else int(r["filenode"]),
            unique_index=r["unique_index"],
            est_rows=int(r["est_rows"]),
        )
        for r in await db.fetch(_VIEWS_SQL)
    ]
    if views:
        by_oid = {v.oid: v for v in views}
        locks = await db.fetch(_LOCKS_SQL, ([v.oid for v in views],))
        for lock in shown_queries(locks, show_literals):
            by_oid[int(lock.pop("oid"))].locks.append(lock)
    return views


async def measure(db: Reader, views: list[MatView]) -> None:
    """Size and rows of each view, without ever waiting behind an exclusive lock.

    Measuring takes ACCESS SHARE on the view, so a view that someone holds (or waits
    for) in ACCESS EXCLUSIVE is left unmeasured and says why; an unpopulated view
    cannot be read at all; a huge one gets the planner's estimate.
    """
    readable: list[MatView] = []
    for v in views:
        if not v.populated:
            v.uncounted = "not populated"
        elif v.readers_blocked_by:
            pids = ", ".join(str(lk["pid"]) for lk in v.readers_blocked_by)
            v.uncounted = f"not read: pid {pids} holds or awaits ACCESS EXCLUSIVE"
            v.rows = v.est_rows if v.est_rows >= 0 else None
        else:
            readable.append(v)
    if not readable:
        return
    sizes = {int(r["oid"]): r for r in await db.fetch(_SIZES_SQL, ([v.oid for v in readable],))}
    for v in readable:
        size = sizes.get(v.oid)
        if size is None:
            continue
        v.bytes = int(size["total_bytes"])
        if int(size["heap_bytes"]) > COUNT_LIMIT_BYTES:
            v.rows = v.est_rows if v.est_rows >= 0 else None
            v.uncounted = f"larger than {human_size(COUNT_LIMIT_BYTES)}"
            continue
        query = sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(v.schema, v.name))
        (counted,) = await db.fetch(query.as_string())
        v.rows, v.rows_exact = int(counted["n"]), True


async def dependency_order(db: Reader, views: list[MatView]) -> list[MatView]:
    """Base views before the views built on them; otherwise alphabetical."""
    if len(views) < 2:
        return list(views)
    edges: dict[int, set[int]] = {}
    for r in await db.fetch(_DEPENDS_SQL):
        edges.setdefault(int(r["dependent"]), set()).add(int(r["base"]))
    chosen = {v.oid: v for v in views}

    def bases_of(oid: int) -> set[int]:
        """The chosen views `oid` reads from, through any chain of views."""
        seen: set[int] = set()
        stack = list(edges.get(oid, ()))
        while stack:
            nxt = stack.pop()
            if nxt in seen:
                continue
            seen.add(nxt)
            stack.extend(edges.get(nxt, ()))
        return {b for b in seen if b in chosen and b != oid}

    waiting_on = {oid: bases_of(oid) for oid in chosen}
    ready = [((v.schema, v.name), v.oid) for v in views if not waiting_on[v.oid]]
    heapq.heapify(ready)
    ordered: list[MatView] = []
    while ready:
        _key, oid = heapq.heappop(ready)
        ordered.append(chosen[oid])
        for other, bases in waiting_on.items():
            if oid in bases:
                bases.discard(oid)
                if not bases:
                    v = chosen[other]
                    heapq.heappush(ready, ((v.schema, v.name), other))
    if len(ordered) != len(views):  # a cycle cannot exist in PostgreSQL; stay total anyway
        done = {v.oid for v in ordered}
        ordered += sorted((v for v in views if v.oid not in done), key=lambda v: v.qualified)
    return ordered


def select_views(views: list[MatView], args: list[str]) -> list[MatView]:
    """The views the arguments name: none or `all` for every view; names may be bare
    or `schema.view`, and match case-insensitively when that is unambiguous."""
    if not views:
        raise UsageError("this database has no materialized views; there is nothing to refresh")
    words = [a for a in args if a.strip()]
    if not words or [w.lower() for w in words] == ["all"]:
        return list(views)
    if any(w.lower() == "all" for w in words):
        raise UsageError("`all` refreshes every view; give it alone or name the views")
    chosen: dict[int, MatView] = {}
    for word in words:
        for v in _resolve(views, word):
            chosen[v.oid] = v
    return list(chosen.values())


def _resolve(views: list[MatView], word: str) -> list[MatView]:
    for matches in (
        [v for v in views if v.qualified == word],
        [v for v in views if v.name == word],
        [v for v in views if v.qualified.lower() == word.lower()],
        [v for v in views if v.name.lower() == word.lower()],
    ):
        if len(matches) == 1:
            return matches
        if len(matches) > 1:
            raise UsageError(
                f"`{word}` names several materialized views: "
                + ", ".join(f"`{v.qualified}`" for v in matches)
                + "; give the schema as well"
            )
    names = sorted({v.name for v in views} | {v.qualified for v in views})
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.5) or difflib.get_close_matches(
        word.lower(), [n.lower() for n in names], n=1, cutoff=0.5
    )
    suggestion = f" (did you mean `{close[0]}`?)" if close else ""
    listing = ", ".join(v.qualified for v in views)
    raise UsageError(f"no materialized view `{word}`{suggestion}; the views are: {listing}")


def describe_lock(lock: Row) -> str:
    return f"pid {lock['pid']} ({lock.get('app') or lock.get('user') or '?'}, {lock['mode']})"


# --- /db views ----------------------------------------------------------------------


def _as_utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


async def refresh_records(ctx: Context) -> tuple[RefreshRecords | None, str]:
    """The bot's own refresh log and what to say when a view has no entry in it; a log
    that cannot be read is said, never fatal, since the views' own facts still count
    (shared with `/db analytics`)."""
    log_fn = ctx.refresh_log
    if log_fn is None:
        return None, "no refresh recorded by the bot"
    try:
        records = await log_fn()
    except Exception as exc:  # the log lives elsewhere; the view facts still count
        return None, f"the bot's refresh log could not be read ({type(exc).__name__})"
    return records, "no refresh recorded by the bot"


def _iso(value: datetime) -> str:
    """UTC ISO 8601: the console shows it as is, Slack as each reader's local time."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def last_refresh(
    record: Mapping[str, Any] | None, now: datetime, missing: str
) -> tuple[str, Status]:
    """One sentence on the bot's last refresh of a view, the same in `/db views` and
    `/db analytics`; only a failed refresh is a warning."""
    if record is None:
        return missing, Status.OK
    started = _as_utc(record.get("started_at"))
    finished = _as_utc(record.get("finished_at"))
    error = record.get("error")
    mode = record.get("mode") or "?"
    if error:
        when = human_duration((now - (finished or started)).total_seconds()) if started else "?"
        at = f" at {_iso(finished or started)}" if started else ""
        return f"last refresh by the bot failed {when} ago{at} ({mode}): {error}", Status.WARN
    if finished is None:
        since = human_duration((now - started).total_seconds()) if started else "?"
        at = f" at {_iso(started)}" if started else ""
        return (
            f"a refresh by the bot ({mode}) started {since} ago{at} and has not finished",
            Status.OK,
        )
    took = f", took {human_duration((finished - started).total_seconds())}" if started else ""
    rows = record.get("rows")
    rows_text = f", {rows:,} rows" if isinstance(rows, int) else ""
    ago = human_duration((now - finished).total_seconds())
    return (
        f"last refreshed by the bot {ago} ago ({mode}{rows_text}{took}), at {_iso(finished)}",
        Status.OK,
    )


def view_finding(v: MatView, record: Mapping[str, Any] | None, missing: str) -> Finding:
    now = datetime.now(UTC)
    parts: list[str] = []
    status = Status.OK
    hint: str | None = None
    if v.populated:
        parts.append(f"populated, {v.rows_text()}, {human_size(v.bytes)}")
    else:
        parts.append("NOT populated: every read of it fails")
        status = Status.CRIT
        hint = f"`/db refresh-views {v.name}` fills it (a plain refresh, needs approval)"
    if v.unique_index:
        parts.append(f"concurrently refreshable (unique index {v.unique_index})")
    else:
        parts.append("no usable unique index: a refresh blocks every reader")
        if status is Status.OK:
            status = Status.WARN
            hint = (
                "create a unique index without WHERE or expressions on the view's key "
                "columns so refreshes can run CONCURRENTLY"
            )
    if v.readers_blocked_by:
        parts.append(
            "readers wait now: " + ", ".join(describe_lock(lk) for lk in v.readers_blocked_by[:3])
        )
        if status is Status.OK:
            status = Status.WARN
            hint = "the holder can be ended with `/db terminate <pid>` (needs approval)"
    refresh_text, refresh_status = last_refresh(record, now, missing)
    parts.append(refresh_text)
    if refresh_status is Status.WARN and status is Status.OK:
        status = Status.WARN
        hint = f"`/db refresh-views {v.name}` tries again"
    row: Row = {
        "view": v.qualified,
        "populated": v.populated,
        "rows": v.rows,
        "rows_exact": v.rows_exact,
        "size": human_size(v.bytes),
        "unique_index": v.unique_index,
        "refresh_mode": v.mode,
        "last_refresh": refresh_text,
    }
    return Finding(
        check=f"view {v.qualified}",
        status=status,
        summary=f"{v.qualified}: " + "; ".join(parts),
        rows=[row],
        hint=hint,
    )


@register(
    "views",
    usage="/db views",
    summary="materialized views: populated, size, rows, refresh mode, last refresh",
    role="REVIEWER",
)
async def views(ctx: Context, args: list[str]) -> Report:
    if args:
        raise UsageError("`views` takes no arguments")
    gw = ctx.gateway
    found: list[MatView] = []

    async def survey(db: Reader) -> Finding:
        loaded = await load_views(db, ctx.thresholds.show_query_literals)
        await measure(db, loaded)
        found.extend(loaded)
        return Finding(check="materialized views", status=Status.OK, summary=f"{len(loaded)} views")

    head = await gw.run_check("materialized views", survey)
    if head.status is not Status.OK:
        return Report(title="Materialized views", target=gw.target, findings=[head])
    records, missing = await refresh_records(ctx)
    findings: list[Finding] = []
    for v in found:
        record = None
        if records is not None:
            record = records.get(v.qualified) or records.get(v.name)
        findings.append(view_finding(v, record, missing))
    names = {v.name for v in found}
    absent = [name for name in EXPECTED_VIEWS if name not in names]
    if not found:
        findings.append(
            Finding(
                check="materialized views",
                status=Status.WARN,
                summary="this database has no materialized views",
            )
        )
    elif absent:
        findings.append(
            Finding(
                check="expected views",
                status=Status.WARN,
                summary="LEAPS views not found: " + ", ".join(absent),
                hint="recreate them from the migration that defines them",
            )
        )
    return Report(title="Materialized views", target=gw.target, findings=findings).sorted()
