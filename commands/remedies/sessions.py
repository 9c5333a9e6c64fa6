"""The remedies that end sessions: `kill-idle`, `cancel <pid>`, `terminate <pid>`.

A remedy here names exact backends (pid plus backend start, so a reused pid is never
mistaken for the planned session) and re-checks, in the very statement that signals
them, every condition the plan used. The bot's own sessions, this backend, server
processes (walsenders, autovacuum ...) and, unless the bot's settings allow it,
superuser sessions are never targets.

Signalling a backend is not transactional: once sent, a rollback does not undo it, so
`apply()` checks drift immediately before signalling and reports honestly after.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from commands.base import (
    APPLICATION_NAME,
    Context,
    Reader,
    Row,
    UsageError,
    human_duration,
    shown_queries,
)
from commands.remedies.base import (
    Execution,
    Outcome,
    Plan,
    PlanStep,
    Remedy,
    RemedyAbort,
    RowCountError,
    Verification,
    Writer,
    add_remedy,
    check_count,
    check_drift,
    nothing_planned,
)

DEFAULT_IDLE_MINUTES = 10
MAX_IDLE_MINUTES = 7 * 24 * 60
VERIFY_SECONDS = 2.0
_POLL_SECONDS = 0.05


class KillIdleData(BaseModel):
    pids: list[int]
    minutes: int
    backend_starts: dict[str, str]  # pid -> backend_start (ISO), so a reused pid is spared
    allow_superusers: bool


class SignalData(BaseModel):
    pids: list[int]  # the one pid
    backend_start: str | None
    query_start: str | None
    state: str
    allow_superusers: bool


# --- the guards every remedy here shares --------------------------------------------

# Positional parameters: bot application name, superusers allowed.
_GUARDS = """
  AND a.backend_type = 'client backend'
  AND a.pid <> pg_backend_pid()
  AND coalesce(a.application_name, '') <> %s
  AND (%s::boolean OR r.rolsuper IS FALSE)
"""
_SESSION_COLUMNS = """
a.pid, a.backend_start, a.query_start, a.datname::text AS db, a.usename::text AS "user",
coalesce(a.application_name, '') AS app, coalesce(host(a.client_addr), 'local') AS client_addr,
coalesce(a.state, 'unknown') AS state, a.backend_type, r.rolsuper AS superuser,
extract(epoch FROM now() - a.state_change)::float AS state_s,
extract(epoch FROM now() - a.xact_start)::float AS xact_s,
extract(epoch FROM now() - a.query_start)::float AS query_s,
left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 120) AS query
"""
_FROM = "FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.oid = a.usesysid"


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def _same_start(a: Any, b: str | None) -> bool:
    return isinstance(a, datetime) and b is not None and a == datetime.fromisoformat(b)


async def _clear_snapshot(db: Writer) -> None:
    """pg_stat_activity is a snapshot per transaction; a remedy that watches sessions
    change inside its one transaction must drop it before each look."""
    await db.execute("SELECT pg_stat_clear_snapshot()")


async def _describe_changes(db: Writer, pids: Iterable[int], starts: dict[str, str]) -> str:
    """Why each planned pid no longer qualifies, in words an operator can act on."""
    wanted = sorted(pids)
    if not wanted:
        return ""
    now = {
        int(r["pid"]): r
        for r in await db.fetch(
            f"SELECT {_SESSION_COLUMNS} {_FROM} WHERE a.pid = ANY(%s::int[])", (wanted,)
        )
    }
    said: list[str] = []
    for pid in wanted:
        r = now.get(pid)
        if r is None:
            said.append(f"pid {pid} is gone")
        elif not _same_start(r["backend_start"], starts.get(str(pid))):
            said.append(f"pid {pid} is now a different session (pid reused)")
        else:
            said.append(
                f"pid {pid} is now {r['state']} (for {human_duration(r['state_s'])}, "
                f"{r['app'] or r['user']})"
            )
    return "; ".join(said)


async def wait_gone(db: Writer, pids: list[int]) -> list[int]:
    """Poll until the terminated backends have left; return any still listed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + VERIFY_SECONDS
    while True:
        await _clear_snapshot(db)
        left = [
            int(r["pid"])
            for r in await db.fetch(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s::int[])", (pids,)
            )
        ]
        if not left or loop.time() >= deadline:
            return sorted(left)
        await asyncio.sleep(_POLL_SECONDS)


def _signalled_abort(what: str, planned: int, done: list[int], missed: list[int]) -> RemedyAbort:
    """check_count's verdict, told honestly: a signal already sent cannot be rolled back."""
    return RemedyAbort(
        f"row count: the plan said {planned} {what}, {len(done)} were signalled"
        + (f" (pid {', '.join(map(str, done))})" if done else "")
        + (f"; pid {', '.join(map(str, missed))} no longer qualified" if missed else "")
        + "; a signal already sent cannot be taken back"
    )


# --- kill-idle ----------------------------------------------------------------------

_IDLE_WHERE = (
    """
WHERE a.state = 'idle'
  AND a.datname = current_database()
  AND a.state_change < now() - make_interval(mins => %s::int)
"""
    + _GUARDS
)

_IDLE_PLAN_SQL = f"SELECT {_SESSION_COLUMNS} {_FROM} {_IDLE_WHERE} ORDER BY a.state_change, a.pid"
_IDLE_RECHECK_SQL = f"""
SELECT a.pid, a.backend_start {_FROM} {_IDLE_WHERE}
  AND a.pid = ANY(%s::int[])
"""
# Built from the constant fragments above only; every value is a bound parameter.
KILL_IDLE_SQL = f"""
SELECT a.pid, pg_terminate_backend(a.pid) AS terminated
{_FROM}
{_IDLE_WHERE}
  AND (a.pid, a.backend_start) IN (
      SELECT t.pid, t.started FROM unnest(%s::int[], %s::timestamptz[]) AS t(pid, started))
"""  # noqa: S608


def parse_minutes(args: list[str]) -> int:
    if not args:
        return DEFAULT_IDLE_MINUTES
    if len(args) > 1:
        raise UsageError("`kill-idle` takes one number: the minutes a session has been idle")
    word = args[0].strip()
    if not re.fullmatch(r"\d+", word):
        raise UsageError(
            f"`{word}` is not a whole number of minutes (0 or more; default {DEFAULT_IDLE_MINUTES})"
        )
    minutes = int(word)
    if minutes > MAX_IDLE_MINUTES:
        raise UsageError(f"{minutes} minutes is more than a week ({MAX_IDLE_MINUTES}); too long")
    return minutes


async def plan_kill_idle(ctx: Context, args: list[str]) -> Plan:
    minutes = parse_minutes(args)
    allow = ctx.allow_superuser_kill

    async def survey(db: Reader) -> tuple[list[Row], str]:
        rows = await db.fetch(_IDLE_PLAN_SQL, (minutes, APPLICATION_NAME, allow))
        shown_queries(rows, ctx.thresholds.show_query_literals)
        (dbrow,) = await db.fetch("SELECT current_database() AS db")
        return rows, str(dbrow["db"])

    sessions, database = await ctx.gateway.read(survey)
    pids = [int(s["pid"]) for s in sessions]
    starts = [str(_iso(s["backend_start"])) for s in sessions]
    targets = [
        {
            "pid": s["pid"],
            "user": s["user"],
            "app": s["app"],
            "client_addr": s["client_addr"],
            "state": s["state"],
            "idle_for": human_duration(s["state_s"]),
            "idle_s": s["state_s"],
            "superuser": bool(s["superuser"]),
            "query": s["query"],
        }
        for s in sessions
    ]
    excluded = "the bot's own sessions, non-client backends" + (
        "" if allow else " and superuser sessions"
    )
    warnings = []
    if sessions:
        warnings.append(
            "a terminated session's client sees its connection closed; pools reconnect, "
            "other clients may report an error"
        )
    if allow and any(s["superuser"] for s in sessions):
        warnings.append("superuser sessions are included (the bot's settings allow it)")
    by_app = Counter(str(s["app"] or s["user"]) for s in sessions)
    who = ", ".join(f"{name} ({n})" for name, n in by_app.most_common(5))
    summary = (
        f"terminate {len(pids)} session{'s' if len(pids) != 1 else ''} idle for more than "
        f"{minutes} min in database {database}" + (f": {who}" if who else "")
        if pids
        else f"no session has been idle for more than {minutes} min in database {database}; "
        "nothing to do"
    )
    return Plan(
        remedy="kill-idle",
        args=list(args),
        title=f"Terminate sessions idle over {minutes} min",
        summary=summary + f" (never {excluded})",
        steps=[
            PlanStep(
                sql=KILL_IDLE_SQL.strip(),
                params=[minutes, APPLICATION_NAME, allow, pids, starts],
                note="re-checks every condition, so a session that stopped qualifying "
                "is left alone",
            )
        ],
        targets=targets,
        count=len(pids),
        warnings=warnings,
        needs_approval=bool(pids),
        data=KillIdleData(
            pids=pids,
            minutes=minutes,
            backend_starts=dict(zip(map(str, pids), starts, strict=True)),
            allow_superusers=allow,
        ).model_dump(mode="json"),
    )


async def apply_kill_idle(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(KillIdleData)
    minutes, allow, planned, starts = (
        data.minutes,
        data.allow_superusers,
        data.pids,
        data.backend_starts,
    )
    await _clear_snapshot(writer)
    rows = await writer.fetch(_IDLE_RECHECK_SQL, (minutes, APPLICATION_NAME, allow, planned))
    still = sorted(
        int(r["pid"]) for r in rows if _same_start(r["backend_start"], starts.get(str(r["pid"])))
    )
    changed = set(planned) - set(still)
    if changed:
        detail = await _describe_changes(writer, changed, starts)
        raise RemedyAbort(
            f"drift: the plan named {len(planned)} idle sessions, {len(still)} of them still "
            f"qualify ({detail}); nothing was changed, request it again"
        )
    # `still` is a subset of the planned pids, so equal sets mean equal counts.
    check_drift(plan, len(still), "idle sessions")
    if not still:
        return Outcome(ok=True, summary="no session to terminate; nothing was changed")
    params = (minutes, APPLICATION_NAME, allow, still, [starts[str(p)] for p in still])
    signalled = await writer.fetch(KILL_IDLE_SQL, params)
    done = sorted(int(r["pid"]) for r in signalled if r["terminated"])
    try:
        check_count(plan, len(done), "sessions")
    except RowCountError as exc:
        raise _signalled_abort(
            "sessions", plan.count, done, sorted(set(still) - set(done))
        ) from exc
    left = await wait_gone(writer, done)
    by_pid = {int(t["pid"]): t for t in plan.targets}
    out_rows: list[Row] = [
        {
            "pid": pid,
            "user": by_pid.get(pid, {}).get("user"),
            "app": by_pid.get(pid, {}).get("app"),
            "idle_for": by_pid.get(pid, {}).get("idle_for"),
            "terminated": True,
            "gone": pid not in left,
        }
        for pid in done
    ]
    summary = f"terminated {len(done)} idle session{'s' if len(done) != 1 else ''}"
    summary += (
        f"; pid {', '.join(map(str, left))} still listed after {VERIFY_SECONDS:.0f}s "
        "(it exits at its next interrupt check)"
        if left
        else "; all gone from pg_stat_activity"
    )
    return Outcome(ok=True, summary=summary, affected=len(done), rows=out_rows)


# --- cancel <pid> / terminate <pid> -------------------------------------------------

_ONE_SESSION_SQL = f"""
SELECT {_SESSION_COLUMNS}, a.pid = pg_backend_pid() AS me, current_database() AS current_db
{_FROM} WHERE a.pid = %s
"""
_SIGNAL_FN = {"cancel": "pg_cancel_backend", "terminate": "pg_terminate_backend"}


def _signal_sql(action: str) -> str:
    return f"""
SELECT a.pid, {_SIGNAL_FN[action]}(a.pid) AS signalled
{_FROM}
WHERE a.pid = %s AND a.backend_start = %s::timestamptz
{_GUARDS}
""".strip()


def parse_pid(action: str, args: list[str]) -> int:
    if len(args) != 1:
        raise UsageError(f"`{action}` takes one process id: `{action} <pid>`")
    word = args[0].strip()
    if not re.fullmatch(r"\d{1,10}", word) or not 0 < int(word) < 2**31:
        raise UsageError(f"`{word}` is not a process id (a positive whole number)")
    return int(word)


def _refuse(action: str, pid: int, s: Row | None, allow: bool) -> str | None:
    """Why `pid` may not be signalled, or None when it may."""
    if s is None:
        return f"there is no session with pid {pid}; `/db connections` lists them"
    if s["me"]:
        return f"pid {pid} is the bot's own connection for this check"
    if s["app"] == APPLICATION_NAME:
        return f"pid {pid} is one of the bot's own sessions (application_name {s['app']})"
    if s["backend_type"] != "client backend":
        return (
            f"pid {pid} is a {s['backend_type']} process, not a client session; "
            f"the bot does not {action} server processes"
        )
    if s["superuser"] is None and not allow:
        return f"pid {pid} has no known role, so it may be a superuser's; the bot leaves it"
    if s["superuser"] and not allow:
        return (
            f"pid {pid} belongs to superuser `{s['user']}`; the bot's settings do not allow "
            "ending superuser sessions"
        )
    return None


def _session_target(s: Row) -> Row:
    return {
        "pid": s["pid"],
        "db": s["db"],
        "user": s["user"],
        "app": s["app"],
        "client_addr": s["client_addr"],
        "state": s["state"],
        "state_age": human_duration(s["state_s"]),
        "xact_age": human_duration(s["xact_s"]) if s["xact_s"] is not None else "",
        "query_age": human_duration(s["query_s"]) if s["query_s"] is not None else "",
        "query": s["query"],
    }


def _signal_planner(action: str) -> Callable[[Context, list[str]], Awaitable[Plan]]:
    async def plan(ctx: Context, args: list[str]) -> Plan:
        pid = parse_pid(action, args)
        allow = ctx.allow_superuser_kill

        async def survey(db: Reader) -> Row | None:
            rows = await db.fetch(_ONE_SESSION_SQL, (pid,))
            shown_queries(rows, ctx.thresholds.show_query_literals)
            return rows[0] if rows else None

        s = await ctx.gateway.read(survey)
        refusal = _refuse(action, pid, s, allow)
        if refusal is not None:
            raise UsageError(refusal)
        assert s is not None
        state = str(s["state"])
        warnings: list[str] = []
        if action == "terminate":
            effect = "closes its connection"
            if s["xact_s"] is not None:
                effect += (
                    f" and rolls back its open transaction (open {human_duration(s['xact_s'])})"
                )
            warnings.append(f"terminating pid {pid} {effect}; its client must reconnect")
        elif state != "active":
            warnings.append(
                f"pid {pid} is {state}: there is no running statement to cancel, so a cancel "
                "does nothing"
                + ("; `terminate` ends its transaction" if state.startswith("idle in") else "")
            )
        else:
            warnings.append(
                f"cancelling pid {pid} stops its statement (running "
                f"{human_duration(s['query_s'])}); an open transaction around it is aborted"
            )
        if s["db"] != s["current_db"]:
            warnings.append(f"pid {pid} is connected to database {s['db']}, not {s['current_db']}")
        if s["superuser"]:
            warnings.append(f"pid {pid} is a superuser session (the bot's settings allow it)")
        start = _iso(s["backend_start"])
        who = s["app"] or s["user"]
        return Plan(
            remedy=action,
            args=list(args),
            title=f"{action.capitalize()} pid {pid}",
            summary=f"{action} pid {pid} ({who}, {state} for {human_duration(s['state_s'])})",
            steps=[
                PlanStep(
                    sql=_signal_sql(action),
                    params=[pid, start, APPLICATION_NAME, allow],
                    note="matches the backend start too, so a reused pid is left alone",
                )
            ],
            targets=[_session_target(s)],
            count=1,
            warnings=warnings,
            data=SignalData(
                pids=[pid],
                backend_start=start,
                query_start=_iso(s["query_start"]),
                state=state,
                allow_superusers=allow,
            ).model_dump(mode="json"),
        )

    return plan


def _signal_applier(action: str) -> Callable[[Writer, Plan], Awaitable[Outcome]]:
    async def apply(writer: Writer, plan: Plan) -> Outcome:
        data = plan.private(SignalData)
        (pid,) = data.pids
        start = str(data.backend_start)
        allow = data.allow_superusers
        await _clear_snapshot(writer)
        rows = await writer.fetch(_ONE_SESSION_SQL, (pid,))
        same = bool(rows) and _same_start(rows[0]["backend_start"], start)
        try:
            check_drift(plan, 1 if same else 0, "sessions")
        except RemedyAbort as exc:
            detail = await _describe_changes(writer, [pid], {str(pid): start})
            raise RemedyAbort(f"drift: {detail}; nothing was changed, request it again") from exc
        signalled = await writer.fetch(_signal_sql(action), (pid, start, APPLICATION_NAME, allow))
        done = [int(r["pid"]) for r in signalled if r["signalled"]]
        try:
            check_count(plan, len(done), "sessions")
        except RowCountError as exc:
            raise _signalled_abort("sessions", plan.count, done, [pid]) from exc
        if action == "terminate":
            left = await wait_gone(writer, done)
            gone = not left
            summary = f"terminated pid {pid}; " + (
                "it is gone from pg_stat_activity"
                if gone
                else f"still listed after {VERIFY_SECONDS:.0f}s (it exits at its next "
                "interrupt check)"
            )
            return Outcome(
                ok=True,
                summary=summary,
                affected=1,
                rows=[{"pid": pid, "terminated": True, "gone": gone}],
            )
        seen = await _watch_cancel(writer, pid, start, data.query_start, data.state == "active")
        return Outcome(
            ok=True, summary=f"cancel sent to pid {pid}; {seen['result']}", affected=1, rows=[seen]
        )

    return apply


async def _watch_cancel(
    writer: Writer, pid: int, start: str, query_start: str | None, was_running: bool
) -> Row:
    """Best effort: look for up to a second whether the statement stopped."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + VERIFY_SECONDS / 2
    while True:
        await _clear_snapshot(writer)
        rows = await writer.fetch(_ONE_SESSION_SQL, (pid,))
        s = rows[0] if rows else None
        if s is None or not _same_start(s["backend_start"], start):
            return {"pid": pid, "state": None, "result": "the session has ended"}
        if not was_running:
            return {
                "pid": pid,
                "state": s["state"],
                "result": f"it was running no statement; the session is {s['state']}",
            }
        same_query = s["state"] == "active" and _iso(s["query_start"]) == query_start
        if not same_query:
            return {
                "pid": pid,
                "state": s["state"],
                "result": f"the statement stopped; the session is now {s['state']}",
            }
        if loop.time() >= deadline:
            return {
                "pid": pid,
                "state": s["state"],
                "result": "still running the same statement; it stops at its next interrupt "
                "check, or use `terminate`",
            }
        await asyncio.sleep(_POLL_SECONDS)


async def _still_there(db: Reader, starts: dict[str, str]) -> list[Row]:
    """The planned sessions (pid and backend start) still connected."""
    if not starts:
        return []
    rows = await db.fetch(
        "SELECT pid, backend_start, query_start, state FROM pg_stat_activity"
        " WHERE pid = ANY(%s::int[])",
        ([int(p) for p in starts],),
    )
    return [r for r in rows if _same_start(r["backend_start"], starts.get(str(r["pid"])))]


async def verify_kill_idle(db: Reader, plan: Plan, run: Execution) -> Verification:
    """Signals are not transactional: the sessions are gone exactly when they were sent."""
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    left = await _still_there(db, plan.private(KillIdleData).backend_starts)
    if left:
        pids = ", ".join(str(r["pid"]) for r in left)
        return Verification(landed=False, found=f"planned sessions still connected: pid {pids}")
    return Verification(landed=True, found=f"the {plan.count} planned sessions are gone")


async def verify_terminate(db: Reader, plan: Plan, run: Execution) -> Verification:
    data = plan.private(SignalData)
    (pid,) = data.pids
    left = await _still_there(db, {str(pid): str(data.backend_start)})
    if left:
        return Verification(landed=False, found=f"pid {pid} is still connected")
    return Verification(landed=True, found=f"pid {pid} is gone")


async def verify_cancel(db: Reader, plan: Plan, run: Execution) -> Verification:
    data = plan.private(SignalData)
    (pid,) = data.pids
    left = await _still_there(db, {str(pid): str(data.backend_start)})
    running = [
        r for r in left if r["state"] == "active" and _iso(r["query_start"]) == data.query_start
    ]
    if running and data.state == "active":
        return Verification(landed=False, found=f"pid {pid} still runs the planned statement")
    return Verification(landed=True, found=f"pid {pid} no longer runs the planned statement")


# Rule 10: never tried before approval, since a signal sent cannot be rolled back.
_SIGNAL_NOT_TRIED = (
    "a signal to a backend is not transactional: ROLLBACK cannot bring back a session or "
    "statement it ended. The plan checked instead the exact sessions (pid and backend "
    "start, state and times, role; never the bot's own, server processes or, unless "
    "allowed, superusers), and apply re-checks each condition in the statement that "
    "signals"
)

KILL_IDLE = add_remedy(
    Remedy(
        name="kill-idle",
        usage="/db kill-idle [minutes]",
        summary=f"terminate sessions idle for more than N minutes (default {DEFAULT_IDLE_MINUTES})",
        plan=plan_kill_idle,
        apply=apply_kill_idle,
        verify=verify_kill_idle,
        role="REVIEWER",
        approver_role="ADMIN",
        approvers=1,
        not_tried=_SIGNAL_NOT_TRIED,
    )
)
TERMINATE = add_remedy(
    Remedy(
        name="terminate",
        usage="/db terminate <pid>",
        summary="end one session: its transaction rolls back and its connection closes",
        plan=_signal_planner("terminate"),
        apply=_signal_applier("terminate"),
        verify=verify_terminate,
        role="REVIEWER",
        approver_role="ADMIN",
        approvers=1,
        not_tried=_SIGNAL_NOT_TRIED,
    )
)
CANCEL = add_remedy(
    Remedy(
        name="cancel",
        usage="/db cancel <pid>",
        summary="cancel the statement one session is running; the session stays",
        plan=_signal_planner("cancel"),
        apply=_signal_applier("cancel"),
        verify=verify_cancel,
        role="REVIEWER",
        approver_role="REVIEWER",
        approvers=1,
        not_tried=_SIGNAL_NOT_TRIED,
    )
)
