"""`/db recover`: the guide's post-recovery verification against a stored baseline, then
the recovery steps, each a remedy under the approval rules.

After a restore the question is not "how many users are there" but "how many of the users
we had": the bot keeps the same counts every hour (`take_baseline`, in its own state store,
never the target) and says "users 100 % of those at the 09:00 baseline".

Growth must not hide a loss: a baseline keeps the target's own `now()` and, per table
(users, submissions, ledger), the count and a per-day histogram of creation times. The
verification compares the rows created at or before that time, now against then, beside
today's totals, and the histograms say when the lost rows had been created. Approved
submissions can legitimately become fewer (REVOKED): that warns, never calls a loss.
Baselines stored before this are "counts only", and the report says so.

No baseline captures the damage (`baseline_refusal`): none while an incident is open,
within BASELINE_QUIET_S after one recovered, or while a check is critical that was not
at the last baseline. One whose counts fell below the last unflagged one is kept but
flagged, and only `--baseline HH:MM` compares with it.

The verification reads each table once, in pieces of bounded statements (issue 16: at a
million users one statement over the ledger outlasts the check timeout; see
commands/keyranges.py), two at a time: submissions by ranges of user ids (count,
approved, orphans against the range's users), the ledger likewise (one pass grouped by
user gives its count, its orphans and the live totals the range's `leaderboard_totals`
rows are compared with), attachments by ranges of submission ids, and the small rest.
The figures are exact: every row is in one piece. The guide's own SQL reads the ledger
twice and every table in turn; bench/recover.py times both.

Steps that depend on another step's result wait for it: `reconcile-points` counts the
awards missing now (it would drift under a `recover-learn` approved meanwhile), and
`refresh-views` comes last. Each `/db recover` requests what can run now; the next one
finds the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from commands.base import (
    Baseline,
    Context,
    Finding,
    Reader,
    Report,
    Row,
    Status,
    TableCensus,
    UsageError,
    human_duration,
)
from commands.base import register as register_command
from commands.keyranges import Piece, block_pieces, key_pieces, no_jit, run_pieces
from commands.remedies.base import REMEDIES, Plan
from commands.remedies.recovery import INCLUDE_DELETED, deleted_on_purpose
from commands.remedies.runbook import runbook_report, status_report

log = logging.getLogger(__name__)

# The counts a baseline keeps and a verification compares, with their labels.
COMPARED: dict[str, str] = {
    "users": "users",
    "submissions": "submissions",
    "ledger_rows": "ledger rows",
    "approved_submissions": "approved submissions",
}
# The recovery steps in the order they are approved, and what each waits for.
STEPS: dict[str, tuple[str, ...]] = {
    "recover-users": (),
    "rematch-kajabi": (),
    "recover-learn": ("recover-users", "rematch-kajabi"),
    "reconcile-points": ("recover-learn",),
    "refresh-views": ("recover-users", "rematch-kajabi", "recover-learn", "reconcile-points"),
}
# With a recovery copy configured (RECOVERY_DATABASE_URL), restoring from it comes first:
# it brings back every lost row the copy holds, and the steps above wait for it.
COPY_STEP = "restore-from-copy"

# Each statement reads one piece of its table (commands/keyranges.py): submissions and
# the ledger by ranges of user ids, users restricted to the same range, so that an
# orphan is a row whose user is missing from the piece's own share of users;
# attachments by ranges of submission ids. `%(cutoff)s` is the baseline's database time
# as naive UTC (creation times are `timestamp(3)` in UTC); NULL when there is none, and
# the `_upto` counts are then dropped.
_SUBMISSIONS_SQL = """
SELECT count(*) AS submissions,
       count(*) FILTER (WHERE s.created_at <= %(cutoff)s) AS submissions_upto,
       count(*) FILTER (WHERE s.status = 'APPROVED') AS approved_submissions,
       count(*) FILTER (WHERE u.id IS NULL) AS orphan_submissions
FROM submissions AS s LEFT JOIN users AS u ON u.id = s.user_id AND {users}
WHERE {rows}
"""
_USERS_SQL = """
SELECT count(*) AS users, count(*) FILTER (WHERE created_at <= %(cutoff)s) AS users_upto
FROM users
"""
_ATTACHMENTS_SQL = """
SELECT count(*) AS orphan_attachments FROM submission_attachments AS a
WHERE {rows}
  AND NOT EXISTS (SELECT 1 FROM submissions AS s WHERE s.id = a.submission_id AND {parents})
"""
_VIEWS_SQL = """
SELECT schemaname::text AS schema, matviewname::text AS view, ispopulated AS populated
FROM pg_matviews WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1, 2
"""
# One pass over a piece of the ledger grouped by user gives its count, its orphans (at
# the level of users instead of rows) and the live totals every view row of those users
# is compared with; a view row of a user who lost every ledger row (or every point)
# differs too.
_LIVE = """
FROM (SELECT l.user_id, count(*) AS n, count(*) FILTER (WHERE l.created_at <= %(cutoff)s) AS upto,
             sum(l.delta_points) AS points
      FROM points_ledger AS l WHERE {rows} GROUP BY l.user_id) AS live
LEFT JOIN users AS u ON u.id = live.user_id AND {users}"""
_LEDGER_SQL = (
    "SELECT coalesce(sum(live.n), 0)::bigint AS ledger_rows,"
    " coalesce(sum(live.upto), 0)::bigint AS ledger_rows_upto,"
    " coalesce(sum(live.n) FILTER (WHERE u.id IS NULL), 0)::bigint AS orphan_ledger_rows" + _LIVE
)
_LEDGER_AND_VIEW_SQL = (
    "SELECT coalesce(sum(live.n), 0)::bigint AS ledger_rows,"  # noqa: S608 (constants)
    " coalesce(sum(live.upto), 0)::bigint AS ledger_rows_upto,"
    " coalesce(sum(live.n) FILTER (WHERE u.id IS NULL), 0)::bigint AS orphan_ledger_rows,"
    " count(v.user_id) AS view_rows,"
    " count(v.user_id) FILTER (WHERE live.points IS DISTINCT FROM v.total_points) AS stale_rows,"
    " max(v.total_points)::bigint AS top_points,"
    " max(coalesce(live.points, 0)) FILTER (WHERE v.user_id IS NOT NULL)::bigint"
    " AS top_live_points"
    + _LIVE
    + " FULL JOIN (SELECT v.user_id, v.total_points FROM leaderboard_totals AS v"
    " WHERE {view}) AS v ON v.user_id = live.user_id"
)
LEADERBOARD = "leaderboard_totals"
# Figures of the pieces that are the greatest, not the sum, of theirs.
_MAXIMA = frozenset({"top_points", "top_live_points"})
# The tables a baseline takes the census of (metric key: table): count and per-day
# histogram of `created_at`.
TABLES: dict[str, str] = {
    "users": "users",
    "submissions": "submissions",
    "ledger_rows": "points_ledger",
}
# Counts that can legitimately fall (an approval revoked): a fall warns, never a loss.
ADVISORY = frozenset({"approved_submissions"})
# Per block range of the table (commands/keyranges.py), summed by day.
_DAYS_SQL = {
    key: f"SELECT created_at::date AS day, count(*) AS n FROM {table}"  # noqa: S608 (constants)
    " WHERE created_at <= %(cutoff)s AND {rows} GROUP BY 1"
    for key, table in TABLES.items()
}
DAYS_SHOWN = 5  # creation days of lost rows named in a finding


@dataclass
class Measured:
    """What the verification read; a part that failed is None, its reason in `errors`."""

    counts: dict[str, int | None] = field(default_factory=dict)
    views: list[Row] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> int | None:
        return self.counts.get(key)


Cutoff = datetime | None  # naive UTC: compared with `timestamp(3)` creation times


def _naive_utc(at: datetime | None) -> Cutoff:
    return None if at is None else at.astimezone(UTC).replace(tzinfo=None)


def combine(rows: list[Row]) -> dict[str, int | None]:
    """The pieces' one-row figures as one: counts added, maxima the greatest (None
    when no piece had one)."""
    out: dict[str, int | None] = {}
    for row in rows:
        for key, value in row.items():
            have = out.get(key)
            if key in _MAXIMA:
                if value is not None and (have is None or int(value) > have):
                    out[key] = int(value)
                else:
                    out.setdefault(key, have)
            else:
                out[key] = (have or 0) + int(value or 0)
    return out


async def _pieces(ctx: Context, table: str, column: str) -> list[Piece]:
    async def read(db: Reader) -> list[Piece]:
        return await key_pieces(db, table, column)

    return await ctx.gateway.read(read)


async def _by_users(ctx: Context, table: str, sql: str, cutoff: Cutoff) -> dict[str, int | None]:
    """A per-user-range statement over `table`'s pieces, their figures combined."""

    async def read(db: Reader, piece: Piece) -> Row:
        query = sql.format(
            rows=piece.where("l.user_id" if table == "points_ledger" else "s.user_id"),
            users=piece.where("u.id"),
            view=piece.where("v.user_id"),
        )
        return (await db.fetch(query, {"cutoff": cutoff, **piece.params()}))[0]

    pieces = await _pieces(ctx, table, "user_id")
    return combine(await run_pieces(ctx.gateway, pieces, read))


async def _submissions(ctx: Context, cutoff: Cutoff) -> dict[str, int | None]:
    return await _by_users(ctx, "submissions", _SUBMISSIONS_SQL, cutoff)


async def _ledger(ctx: Context, cutoff: Cutoff) -> tuple[dict[str, int | None], list[Row]]:
    async def views(db: Reader) -> list[Row]:
        await no_jit(db)
        return await db.fetch(_VIEWS_SQL)

    found = await ctx.gateway.read(views)
    populated = any(v["view"] == LEADERBOARD and v["populated"] for v in found)
    sql = _LEDGER_AND_VIEW_SQL if populated else _LEDGER_SQL
    return await _by_users(ctx, "points_ledger", sql, cutoff), found


async def _rest(ctx: Context, cutoff: Cutoff) -> dict[str, int | None]:
    """Users, and attachments without a submission by ranges of submission ids: a merge
    of the two indexes per range (hashing every submission id for the attachments cost
    twice as much at 100,000 users)."""

    async def users(db: Reader) -> tuple[Row, list[Piece]]:
        await no_jit(db)
        row = (await db.fetch(_USERS_SQL, {"cutoff": cutoff}))[0]
        return row, await key_pieces(db, "submission_attachments", "submission_id", "submissions")

    async def attachments(db: Reader, piece: Piece) -> Row:
        query = _ATTACHMENTS_SQL.format(
            rows=piece.where("a.submission_id"), parents=piece.where("s.id")
        )
        return (await db.fetch(query, piece.params()))[0]

    row, pieces = await ctx.gateway.read(users)
    found = await run_pieces(ctx.gateway, pieces, attachments, {"enable_hashjoin": "off"})
    return combine([row, *found])


async def measure(ctx: Context, since: datetime | None = None) -> Measured:
    """The verification's figures, each table in pieces of bounded statements (two at a
    time, one table after the other: the pool's connections are shared with whatever
    else runs). With `since` (a baseline's database time) also `<key>_upto`: the rows
    of users, submissions and the ledger created at or before it."""
    cutoff = _naive_utc(since)
    out = Measured()
    for name in ("submissions", "ledger", "users"):
        try:
            if name == "submissions":
                counts = await _submissions(ctx, cutoff)
            elif name == "ledger":
                counts, out.views = await _ledger(ctx, cutoff)
            else:
                counts = await _rest(ctx, cutoff)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            out.errors[name] = f"{type(exc).__name__}: {text[0] if text else ''}"
            continue
        out.counts.update(
            {k: v for k, v in counts.items() if cutoff is not None or not k.endswith("_upto")}
        )
    return out


async def created_by_day(ctx: Context, key: str, since: datetime) -> dict[str, int]:
    """The rows of one table (a `TABLES` key) created at or before `since`, by UTC day
    of creation: per block range of the table, summed."""
    cutoff = _naive_utc(since)

    async def pieces(db: Reader) -> list[Piece]:
        return await block_pieces(db, TABLES[key])

    async def read(db: Reader, piece: Piece) -> list[Row]:
        sql = _DAYS_SQL[key].format(rows=piece.where("ctid"))
        return await db.fetch(sql, {"cutoff": cutoff, **piece.params()})

    days: dict[str, int] = {}
    for rows in await run_pieces(ctx.gateway, await ctx.gateway.read(pieces), read):
        for r in rows:
            day = str(r["day"])
            days[day] = days.get(day, 0) + int(r["n"])
    return days


# The baseline's one pass per table, per block range (summed): every row, those created by
# the previous baseline's time (`%(prev)s`, NULL: none) and, per day, by this one's
# (`%(now)s`); approved submissions too. The hourly baseline needs no orphan nor view
# check: counting is all it does, a tenth of the verification's work.
_CENSUS_SQL = {
    key: "SELECT created_at::date AS day, count(*) AS n,"  # noqa: S608 (constants)
    " count(*) FILTER (WHERE created_at <= %(prev)s) AS upto,"
    " count(*) FILTER (WHERE created_at <= %(now)s) AS by_now"
    + (", count(*) FILTER (WHERE status = 'APPROVED') AS approved" if key == "submissions" else "")
    + f" FROM {table} WHERE {{rows}} GROUP BY 1"
    for key, table in TABLES.items()
}
_TOP_POINTS_SQL = f"SELECT max(total_points)::bigint AS top FROM {LEADERBOARD}"  # noqa: S608


async def census(
    ctx: Context, now: datetime, prev: datetime | None
) -> tuple[Measured, dict[str, dict[str, int]]]:
    """What a baseline keeps, in one pass over each table's blocks in pieces: the counts
    it compares (`<key>_upto`: created by `prev`, the previous baseline's database time,
    when there is one) and each table's rows by day of creation up to `now`."""
    now_cut, prev_cut = _naive_utc(now), _naive_utc(prev)
    out = Measured()
    days: dict[str, dict[str, int]] = {}
    for key, table in TABLES.items():

        async def pieces(db: Reader, table: str = table) -> list[Piece]:
            return await block_pieces(db, table)

        async def read(db: Reader, piece: Piece, key: str = key) -> list[Row]:
            sql = _CENSUS_SQL[key].format(rows=piece.where("ctid"))
            return await db.fetch(sql, {"now": now_cut, "prev": prev_cut, **piece.params()})

        by_day: dict[str, int] = {}
        total = upto = approved = 0
        for rows in await run_pieces(ctx.gateway, await ctx.gateway.read(pieces), read):
            for r in rows:
                total += int(r["n"])
                upto += int(r["upto"])
                approved += int(r.get("approved") or 0)
                if r["day"] is not None and int(r["by_now"]):
                    day = str(r["day"])
                    by_day[day] = by_day.get(day, 0) + int(r["by_now"])
        out.counts[key] = total
        if prev_cut is not None:
            out.counts[f"{key}_upto"] = upto
        if key == "submissions":
            out.counts["approved_submissions"] = approved
        days[key] = by_day

    async def top(db: Reader) -> int | None:
        await no_jit(db)
        views = await db.fetch(_VIEWS_SQL)
        if not any(v["view"] == LEADERBOARD and v["populated"] for v in views):
            return None
        found = (await db.fetch(_TOP_POINTS_SQL))[0]["top"]
        return None if found is None else int(found)

    out.counts["top_points"] = await ctx.gateway.read(top)
    return out, days


async def census_days(ctx: Context, since: datetime) -> dict[str, dict[str, int]]:
    """Every table's histogram at `since`, one table after the other."""
    return {k: await created_by_day(ctx, k, since) for k in TABLES}


async def database_now(ctx: Context) -> datetime:
    """The target's own `now()`: what "created at or before the baseline" is measured by
    (the bot's clock may differ from the database's)."""

    async def read(db: Reader) -> list[Row]:
        return await db.fetch("SELECT now() AS now")

    found = (await ctx.gateway.read(read))[0]["now"]
    assert isinstance(found, datetime)
    return found.astimezone(UTC)


def baseline_counts(m: Measured) -> dict[str, int | None]:
    return {k: m.get(k) for k in (*COMPARED, "top_points")}


@dataclass(frozen=True)
class BaselineConditions:
    """What the bot knows when a baseline falls due (`baseline_refusal` decides)."""

    now: datetime
    open_incidents: tuple[int, ...] = ()  # not yet fully recovered
    recovered_at: datetime | None = None  # the latest full recovery of an incident
    quiet_s: float = 3600.0  # BASELINE_QUIET_S
    # The checks critical in the latest health run, each with the start of its current
    # critical spell.
    critical: Mapping[str, datetime] = field(default_factory=dict)


def baseline_refusal(c: BaselineConditions, last: Baseline | None) -> str | None:
    """Why no baseline may be taken now (None: take it). A baseline of a damaged target
    would become what its recovery is measured by, and call the loss 100 %.

    - never while an incident is open (or resolved but not yet recovered);
    - never within `quiet_s` after one recovered;
    - never while a check is critical that was not critical at the last baseline, or
      whose current critical spell began after it. A check critical throughout does not
      stop baselines. With no baseline yet (or only counts-only ones, whose critical
      checks are unknown) the first is taken whatever is critical."""
    if c.open_incidents:
        ids = ", ".join(f"#{i}" for i in c.open_incidents)
        return f"incident {ids} is open: the last baseline before it stays"
    if c.recovered_at is not None:
        quiet_until = c.recovered_at + timedelta(seconds=c.quiet_s)
        if c.now < quiet_until:
            return (
                f"an incident recovered at {_hhmm(c.recovered_at)} UTC: quiet until "
                f"{_hhmm(quiet_until)} UTC (BASELINE_QUIET_S)"
            )
    if last is None or last.critical is None:
        return None
    new = sorted(
        check
        for check, since in c.critical.items()
        if check not in last.critical or since > last.taken_at
    )
    if new:
        return f"critical since {last.name}: " + ", ".join(new)
    return None


def fell_below(prev: Baseline | None, m: Measured, tolerance: float) -> str | None:
    """Why a new baseline is flagged: a table's rows fell below the last unflagged
    baseline's by more than the tolerance (the rows created by its time, where it has
    a census, so growth cannot hide it). None: not flagged."""
    if prev is None:
        return None
    drops: list[str] = []
    for key in TABLES:
        label = COMPARED[key]
        now: int | None
        census = prev.tables.get(key)
        now_upto = m.get(f"{key}_upto")
        was: int | None
        if census is not None and now_upto is not None:
            was, now, what = census.upto, now_upto, f"{label} created by then"
        else:
            was, now, what = prev.counts.get(key), m.get(key), label
        if was and now is not None and 100.0 * now / was < 100.0 - tolerance:
            drops.append(f"{what} {now:,} of {was:,}")
    if not drops:
        return None
    return f"fewer rows than {prev.name}: " + ", ".join(drops)


async def take_baseline(
    ctx: Context, conditions: BaselineConditions | None = None
) -> Baseline | None:
    """The hourly snapshot: the verification's counts, the target's own time and each
    table's census (`census`), kept in the bot's state store. None when there is no store, the
    conditions refuse one (logged), or the target could not be read (nothing is stored).
    Flagged when its rows fell below the last unflagged baseline's."""
    if ctx.baselines is None:
        return None
    target = ctx.gateway.target
    if conditions is not None:
        last = await ctx.baselines.latest(target, include_flagged=True)
        refusal = baseline_refusal(conditions, last)
        if refusal is not None:
            log.info("baseline not taken: %s", refusal)
            return None
    prev = await ctx.baselines.latest(target)
    try:
        db_now = await database_now(ctx)
        m, days = await census(
            ctx, db_now, None if prev is None or prev.counts_only else prev.db_now
        )
    except Exception as exc:
        log.warning("baseline not taken: %s: %s", type(exc).__name__, exc)
        return None
    tables = {k: TableCensus(count=int(m.get(k) or 0), days=d) for k, d in days.items()}
    flagged = fell_below(prev, m, ctx.thresholds.recover_tolerance_pct)
    if flagged:
        log.warning("baseline flagged: %s", flagged)
    return await ctx.baselines.save(
        target,
        baseline_counts(m),
        now=None if conditions is None else conditions.now,
        db_now=db_now,
        tables=tables,
        critical=None if conditions is None else conditions.critical,
        flagged=flagged,
    )


# --- the report ---------------------------------------------------------------------


def pct_text(pct: float) -> str:
    """100 %, 97.8 %: a whole number needs no decimals."""
    return f"{pct:.1f}".removesuffix(".0") + " %"


def _hhmm(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%H:%M")


def percentages(report: Report) -> dict[str, float]:
    """The recovery percentages of a verification, per count (for templates and
    summaries): what `count:` findings hold in their rows."""
    out: dict[str, float] = {}
    for f in report.findings:
        for row in f.rows:
            if f.check.startswith("count: ") and row.get("pct") is not None:
                out[str(row["metric"])] = float(row["pct"])
    return out


def lost_days(then: Mapping[str, int], now: Mapping[str, int]) -> dict[str, int]:
    """Per UTC day of creation, the rows there were at the baseline and are not now."""
    return {d: n - now.get(d, 0) for d, n in sorted(then.items()) if n > now.get(d, 0)}


def days_text(lost: Mapping[str, int]) -> str:
    """`created 2026-12-01 (12), 2026-12-02 (8)`; past `DAYS_SHOWN` days, how many more."""
    days = sorted(lost)
    shown = ", ".join(f"{d} ({lost[d]:,})" for d in days[:DAYS_SHOWN])
    more = len(days) - DAYS_SHOWN
    return "created " + shown + (f" and {more} more days up to {days[-1]}" if more > 0 else "")


def count_findings(
    m: Measured,
    base: Baseline | None,
    tolerance: float,
    lost_by_day: Mapping[str, Mapping[str, int]] | None = None,
) -> list[Finding]:
    """One finding per count. Against a baseline with a census, users, submissions and
    ledger rows compare the rows created at or before its database time, now against
    then, beside today's totals; approved submissions compare totals and only warn."""
    findings: list[Finding] = []
    for key, label in COMPARED.items():
        check = f"count: {label}"
        now = m.get(key)
        if now is None:
            findings.append(
                Finding(check=check, status=Status.SKIPPED, summary=f"{label}: not read")
            )
            continue
        was = base.counts.get(key) if base else None
        if base is None or was is None:
            findings.append(
                Finding(
                    check=check,
                    status=Status.OK,
                    summary=f"{label}: {now:,} (no baseline to compare)",
                    rows=[{"metric": key, "baseline": None, "now": now, "pct": None}],
                )
            )
            continue
        at = _hhmm(base.taken_at)
        census = base.tables.get(key)
        now_upto = m.get(f"{key}_upto")
        if key in ADVISORY:
            pct = 100.0 * now / was if was else 100.0
            low = now < was
            note = (
                f": {was - now:,} fewer, which a revocation (REVOKED) also makes: not called a loss"
                if low
                else ""
            )
            findings.append(
                Finding(
                    check=check,
                    status=Status.WARN if low else Status.OK,
                    summary=f"{label} {pct_text(pct)} of the {at} count ({now:,} of {was:,})"
                    + note,
                    rows=[
                        {"metric": key, "baseline": was, "now": now, "pct": round(pct, 2)}
                        | {"advisory": True}
                    ],
                )
            )
            continue
        if census is None or now_upto is None:
            pct = 100.0 * now / was if was else 100.0
            low = pct < 100.0 - tolerance
            findings.append(
                Finding(
                    check=check,
                    status=Status.CRIT if low else Status.OK,
                    summary=f"{label} {pct_text(pct)} of the {at} count "
                    f"({now:,} of {was:,}; counts only: growth can hide a loss)",
                    rows=[
                        {"metric": key, "baseline": was, "now": now, "pct": round(pct, 2)}
                        | {"counts_only": True}
                    ],
                    hint="the recovery steps below" if low else None,
                )
            )
            continue
        then = census.upto
        pct = 100.0 * now_upto / then if then else 100.0
        low = pct < 100.0 - tolerance
        lost = max(0, then - now_upto)
        days = dict((lost_by_day or {}).get(key, {}))
        summary = (
            f"{label} {pct_text(pct)} of those at the {at} baseline "
            f"({now_upto:,} of the {then:,} created by then)"
        )
        if lost:
            summary += f": {lost:,} lost" + (f", {days_text(days)}" if days else "")
        summary += f"; {now:,} in all now, {was:,} then"
        findings.append(
            Finding(
                check=check,
                status=Status.CRIT if low else Status.OK,
                summary=summary,
                rows=[
                    {
                        "metric": key,
                        "baseline": then,
                        "now": now_upto,
                        "pct": round(pct, 2),
                        "total": now,
                        "baseline_total": was,
                        "lost": lost,
                        "lost_by_day": days,
                    }
                ],
                hint="the recovery steps below" if low else None,
            )
        )
    return findings


def integrity_findings(m: Measured, base: Baseline | None) -> list[Finding]:
    out: list[Finding] = []
    top, live_top = m.get("top_points"), m.get("top_live_points")
    if top is None:
        out.append(
            Finding(
                check="top points",
                status=Status.SKIPPED,
                summary=f"{LEADERBOARD} is not populated or not readable",
                hint="/db refresh-views",
            )
        )
    else:
        was = base.counts.get("top_points") if base else None
        against = f"; {pct_text(100.0 * top / was)} of the baseline's {was:,}" if was else ""
        out.append(
            Finding(
                check="top points",
                status=Status.OK if top == live_top else Status.WARN,
                summary=f"top points {top:,} in {LEADERBOARD}, {live_top:,} in the live ledger"
                + against,
                rows=[{"view": top, "live": live_top, "baseline": was}],
            )
        )
    orphans = {
        "submissions": m.get("orphan_submissions"),
        "ledger rows": m.get("orphan_ledger_rows"),
        "attachments": m.get("orphan_attachments"),
    }
    known = {k: v for k, v in orphans.items() if v is not None}
    out.append(
        Finding(
            check="orphans",
            status=Status.CRIT if any(known.values()) else Status.OK,
            summary="orphans: " + ", ".join(f"{v:,} {k}" for k, v in known.items()),
            rows=[{"kind": k, "rows": v} for k, v in orphans.items()],
            hint="/db cleanup-orphans" if any(known.values()) else None,
        )
    )
    if m.views:
        empty = [f"{v['schema']}.{v['view']}" for v in m.views if not v["populated"]]
        out.append(
            Finding(
                check="views populated",
                status=Status.CRIT if empty else Status.OK,
                summary=(
                    f"{len(empty)} of {len(m.views)} materialized views unpopulated: "
                    + ", ".join(empty)
                    if empty
                    else f"all {len(m.views)} materialized views populated"
                ),
                hint="/db refresh-views" if empty else None,
            )
        )
    stale, rows = m.get("stale_rows"), m.get("view_rows")
    if stale is not None and rows is not None:
        out.append(
            Finding(
                check=f"{LEADERBOARD} vs live ledger",
                status=Status.WARN if stale else Status.OK,
                summary=(
                    f"{stale:,} of {rows:,} {LEADERBOARD} rows differ from the live ledger"
                    if stale
                    else f"all {rows:,} {LEADERBOARD} rows match the live ledger"
                ),
                hint="/db refresh-views" if stale else None,
            )
        )
    for part, reason in m.errors.items():
        out.append(
            Finding(check=f"read {part}", status=Status.SKIPPED, summary=f"not read: {reason}")
        )
    return out


def baseline_finding(
    base: Baseline | None,
    before: datetime,
    asked: str | None,
    passed_over: Baseline | None = None,
) -> Finding:
    """Which baseline the verification used, by name. Warns when it is counts only or
    flagged; says which newer flagged one it passed over (`passed_over`)."""
    if base is None:
        when = f"before {asked} UTC" if asked else "yet"
        summary = f"no baseline stored {when}: the counts are not compared"
        if passed_over is not None:
            summary += f" ({_passed_over_text(passed_over)})"
        return Finding(
            check="baseline",
            status=Status.WARN,
            summary=summary,
            hint="the bot stores one every BASELINE_INTERVAL_S (default hourly)",
        )
    age = (before - base.taken_at).total_seconds()
    summary = (
        f"compared with {base.name}, {human_duration(age)} before {'then' if asked else 'now'}"
    )
    status, hint = Status.OK, None
    if base.counts_only:
        status = Status.WARN
        summary += (
            "; it was stored before creation-time histograms: counts only, so growth can "
            "hide a loss"
        )
        hint = "a baseline with histograms is stored every BASELINE_INTERVAL_S"
    else:
        summary += f" (database time {base.db_now:%H:%M:%S} UTC)" if base.db_now else ""
    if base.flagged:
        status = Status.WARN
        summary += f"; it is flagged, {base.flagged}"
    if passed_over is not None:
        summary += f"; {_passed_over_text(passed_over)}"
    return Finding(
        check="baseline",
        status=status,
        summary=summary,
        rows=[
            {
                "taken_at": base.taken_at.isoformat(),
                "db_now": base.db_now.isoformat() if base.db_now else None,
                "counts_only": base.counts_only,
                "flagged": base.flagged,
                **dict(base.counts),
            }
        ],
        hint=hint,
    )


def _passed_over_text(flagged: Baseline) -> str:
    at = _hhmm(flagged.taken_at)
    return (
        f"{flagged.name} is flagged ({flagged.flagged}) and not used by default: "
        f"`--baseline {at}` compares with it"
    )


@dataclass
class StepPlan:
    name: str
    plan: Plan | None = None
    problem: str | None = None

    @property
    def pending(self) -> bool:
        return self.plan is not None and self.plan.count > 0


async def plan_steps(ctx: Context) -> list[StepPlan]:
    """Every step planned read-only (the plans an approval would bind, counted now)."""

    async def one(name: str) -> StepPlan:
        remedy = REMEDIES.get(name)
        if remedy is None:
            return StepPlan(name, problem="not available in this bot")
        try:
            return StepPlan(name, plan=await remedy.plan(ctx, []))
        except UsageError as exc:
            return StepPlan(name, problem=str(exc))
        except Exception as exc:  # a step that cannot be planned must not sink the report
            return StepPlan(name, problem=f"{type(exc).__name__}: {exc}")

    # One after the other: the verification already took the pool's connections side by
    # side, and a plan waiting for a connection would be lost to the pool's timeout.
    names = [COPY_STEP] if ctx.recovery_copy is not None else []
    return [await one(n) for n in [*names, *STEPS]]


def step_findings(
    steps: list[StepPlan], m: Measured, dry_run: bool
) -> tuple[list[Finding], list[str]]:
    """One finding per step and the steps to request now."""
    by_name = {s.name: s for s in steps}
    views_stale = bool(m.get("stale_rows")) or any(not v["populated"] for v in m.views)
    findings: list[Finding] = []
    requested: list[str] = []
    for step in steps:
        check = f"step: {step.name}"
        if step.plan is None:
            findings.append(
                Finding(check=check, status=Status.SKIPPED, summary=f"cannot plan: {step.problem}")
            )
            continue
        plan = step.plan
        after = () if step.name == COPY_STEP else (COPY_STEP, *STEPS[step.name])
        waits = [d for d in after if d in by_name and by_name[d].pending]
        todo = step.pending
        if step.name == "refresh-views":
            todo = views_stale or bool(waits)
        if not todo:
            findings.append(
                Finding(check=check, status=Status.OK, summary="nothing to do: " + plan.summary)
            )
            continue
        if waits:
            findings.append(
                Finding(
                    check=check,
                    status=Status.WARN,
                    summary=f"after {', '.join(waits)}: run `/db recover` again then; "
                    f"now: {plan.summary}",
                )
            )
            continue
        verb = "would request" if dry_run else "requested (its own approval thread)"
        findings.append(
            Finding(
                check=check,
                status=Status.WARN,
                summary=f"{verb}: {plan.summary}",
                rows=[{"note": w} for w in plan.warnings],
                hint=f"/db {step.name}",
            )
        )
        requested.append(step.name)
    return findings, requested


def parse_args(args: list[str]) -> tuple[bool, str | None]:
    dry_run, asked = False, None
    words = list(args)
    while words:
        word = words.pop(0)
        if word == "--dry-run":
            dry_run = True
        elif word == "--baseline" and words:
            asked = words.pop(0)
        elif word.startswith("--baseline="):
            asked = word.split("=", 1)[1]
        else:
            raise UsageError(f"unknown argument {word!r}")
    if asked is not None:
        try:
            datetime.strptime(asked, "%H:%M")
        except ValueError:
            raise UsageError(f"--baseline wants HH:MM (UTC), not {asked!r}") from None
    return dry_run, asked


def baseline_moment(asked: str | None, now: datetime) -> datetime:
    """The end of the latest minute HH:MM (UTC) not after now, so that `--baseline 11:00`
    names the baseline taken at 11:00:07; now when none was asked."""
    if asked is None:
        return now
    hour, minute = (int(p) for p in asked.split(":"))
    moment = now.astimezone(UTC).replace(hour=hour, minute=minute, second=0, microsecond=0)
    if moment > now:
        moment -= timedelta(days=1)
    return min(now, moment + timedelta(minutes=1) - timedelta(microseconds=1))


def recovery_verified(report: Report) -> bool:
    """A clean recovery verification: compared with a baseline (unflagged, not counts
    only), no row lost, no orphan, views populated and current. Fewer approved
    submissions (a revocation) do not stand in its way. False for any other report."""
    verification = [f for f in report.findings if not f.check.startswith("step: ")]
    has_baseline = any(f.check == "baseline" and f.status is Status.OK for f in verification)
    return has_baseline and all(
        f.status is Status.OK or (f.status is Status.WARN and _advisory(f)) for f in verification
    )


def _advisory(f: Finding) -> bool:
    return f.check.startswith("count: ") and bool(f.rows) and bool(f.rows[0].get("advisory"))


def recovery_evidence(report: Report) -> dict[str, Any]:
    """What an incident keeps of the clean verification that closed its recovery clock."""
    baseline = next((f.summary for f in report.findings if f.check == "baseline"), None)
    return {"baseline": baseline, "percentages": percentages(report)}


RUNBOOK_FLAG = "--runbook"
STATUS_FLAG = "--status"


def runbook_mode(args: list[str]) -> tuple[str, list[str]] | None:
    """`--runbook [--freeze] [--from-step N]` or `--status`: (mode, the rest); None for
    the verification's own arguments."""
    if STATUS_FLAG in args:
        if len(args) != 1:
            raise UsageError(f"{STATUS_FLAG} takes no other argument")
        return "status", []
    if RUNBOOK_FLAG in args:
        return "runbook", [a for a in args if a != RUNBOOK_FLAG]
    return None


@register_command(
    "recover",
    usage="/db recover [--dry-run] [--baseline HH:MM] | --runbook [--freeze] [--from-step N]"
    " | --status",
    summary="post-recovery verification against the hourly baseline, then the recovery "
    "steps; --runbook: all of them as one approved plan; --status: the runbook's progress",
)
async def recover(ctx: Context, args: list[str]) -> Report:
    mode = runbook_mode(args)
    if mode is not None:
        name, rest = mode
        return await status_report(ctx) if name == "status" else await runbook_report(ctx, rest)
    dry_run, asked = parse_args(args)
    now = datetime.now(UTC)
    before = baseline_moment(asked, now)
    target = ctx.gateway.target
    base: Baseline | None = None
    passed_over: Baseline | None = None
    if ctx.baselines is not None:
        if asked is not None:  # named: flagged or not
            base = await ctx.baselines.latest_before(target, before)
        else:  # by default the latest unflagged one
            base = await ctx.baselines.latest(target)
            newest = await ctx.baselines.latest(target, include_flagged=True)
            if newest is not None and newest.flagged and (base is None or newest.id != base.id):
                passed_over = newest
    since = None if base is None or base.counts_only else base.db_now
    measured = await measure(ctx, since)
    by_day: dict[str, dict[str, int]] = {}
    if base is not None and since is not None:
        for key, census in base.tables.items():
            now_upto = measured.get(f"{key}_upto")
            if key in TABLES and now_upto is not None and now_upto < census.upto:
                try:
                    by_day[key] = lost_days(census.days, await created_by_day(ctx, key, since))
                except Exception as exc:  # the loss is still called, only not dated
                    log.warning("creation days of lost %s not read: %s", key, exc)
    steps = await plan_steps(ctx)
    tolerance = ctx.thresholds.recover_tolerance_pct
    findings = [
        baseline_finding(base, before, asked, passed_over),
        *count_findings(measured, base, tolerance, by_day),
        *integrity_findings(measured, base),
    ]
    step_list, requested = step_findings(steps, measured, dry_run)
    try:  # users deleted on purpose after the baseline: never requested, only named
        deleted = await deleted_on_purpose(ctx)
    except Exception:
        log.exception("could not count the users deleted on purpose")
        deleted = 0
    if deleted:
        step_list.append(
            Finding(
                check=f"step: recover-users {INCLUDE_DELETED}",
                status=Status.WARN,
                summary=f"{deleted} missing users were deleted on purpose (their latest audit "
                "row is a DELETE) after the latest baseline; not restored unless asked",
                hint=f"/db recover-users {INCLUDE_DELETED}",
            )
        )
    report = Report(
        title="Recovery verification" + (" (dry run: nothing requested)" if dry_run else ""),
        target=target,
        findings=[*findings, *step_list],
        follow_ups=[] if dry_run else requested,
    )
    if ctx.baselines is not None and not measured.errors:
        await _keep(ctx, baseline_counts(measured))
    if recovery_verified(report) and ctx.on_recovery_verified is not None:
        try:
            await ctx.on_recovery_verified(report)
        except Exception:
            log.exception("the recovery-verified hook failed")
    return report


async def _keep(ctx: Context, counts: Mapping[str, int | None]) -> None:
    """The latest verification is kept as well (kind "verification"), for the incident
    summary's data impact; a failure to keep it does not change the report."""
    assert ctx.baselines is not None
    try:
        await ctx.baselines.save(ctx.gateway.target, counts, kind="verification")
    except Exception:
        log.exception("could not keep the verification's counts")
