"""Sessions: `/db connections`, by state, application and user, worst first.

The remedies that end sessions (`kill-idle`, `cancel`, `terminate`) are in
commands/remedies/sessions.py; the hints here name them.
"""

from __future__ import annotations

from collections import Counter

from commands.base import (
    Context,
    Finding,
    Reader,
    Report,
    Row,
    Status,
    Thresholds,
    UsageError,
    human_duration,
    register,
    shown_queries,
)

# --- /db connections ----------------------------------------------------------------

_SESSIONS_SQL = """
SELECT a.pid, a.pid = pg_backend_pid() AS me, a.datname::text AS db,
       a.usename::text AS "user", coalesce(a.application_name, '') AS app,
       coalesce(host(a.client_addr), 'local') AS client_addr,
       coalesce(a.state, 'unknown') AS state,
       extract(epoch FROM now() - a.backend_start)::float AS backend_s,
       extract(epoch FROM now() - a.state_change)::float AS state_s,
       extract(epoch FROM now() - a.xact_start)::float AS xact_s,
       extract(epoch FROM now() - a.query_start)::float AS query_s,
       coalesce(a.wait_event_type || ':' || a.wait_event, '') AS wait,
       CASE WHEN a.wait_event_type = 'Lock' THEN pg_blocking_pids(a.pid)
            ELSE '{}'::int[] END AS blocked_by,
       left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), %(chars)s) AS query
FROM pg_stat_activity a
WHERE a.backend_type = 'client backend'
"""
_LIMITS_SQL = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS reserved
"""


def session_status(s: Row, th: Thresholds) -> tuple[Status, str]:
    """How worrying one session is, and why, by the same limits `/db health` uses."""
    state = str(s["state"])
    state_s = float(s["state_s"] or 0)
    if s["blocked_by"]:
        waiting = float(s["query_s"] or state_s)
        status = Status.OK
        if waiting >= th.blocked_crit_s:
            status = Status.CRIT
        elif waiting > th.blocked_warn_s:
            status = Status.WARN
        holders = ", ".join(str(p) for p in s["blocked_by"])
        return status, f"waiting {human_duration(waiting)} on a lock held by pid {holders}"
    if state.startswith("idle in transaction"):
        if state_s >= th.idle_in_tx_crit_s:
            return Status.CRIT, f"{state} for {human_duration(state_s)}"
        if state_s >= th.idle_in_tx_warn_s:
            return Status.WARN, f"{state} for {human_duration(state_s)}"
        return Status.OK, state
    if state == "active":
        query_s = float(s["query_s"] or 0)
        if query_s >= th.long_query_crit_s:
            return Status.CRIT, f"query running {human_duration(query_s)}"
        if query_s >= th.long_query_warn_s:
            return Status.WARN, f"query running {human_duration(query_s)}"
        return Status.OK, state
    if state == "idle" and state_s >= th.idle_session_warn_s:
        return Status.WARN, f"idle for {human_duration(state_s)}"
    return Status.OK, state


def _session_row(s: Row, status: Status, why: str) -> Row:
    return {
        "status": status.value,
        "pid": s["pid"],
        "db": s["db"],
        "user": s["user"],
        "app": s["app"],
        "client_addr": s["client_addr"],
        "state": s["state"],
        "backend_age": human_duration(s["backend_s"]),
        "state_age": human_duration(s["state_s"]),
        "xact_age": human_duration(s["xact_s"]) if s["xact_s"] is not None else "",
        "wait": s["wait"],
        "why": why,
        "query": s["query"],
    }


def _group(sessions: list[Row], key: str) -> list[Row]:
    """Sessions per value of `key`, with the states and the oldest ages in each group."""
    groups: dict[str, list[Row]] = {}
    for s in sessions:
        groups.setdefault(str(s[key] or "(none)"), []).append(s)
    rows: list[Row] = []
    for name, members in groups.items():
        states = Counter(str(m["state"]) for m in members)
        oldest_state = max((float(m["state_s"] or 0) for m in members), default=0.0)
        xacts = [float(m["xact_s"]) for m in members if m["xact_s"] is not None]
        rows.append(
            {
                key: name,
                "sessions": len(members),
                "states": ", ".join(f"{n} {st}" for st, n in states.most_common()),
                "oldest_state_change": human_duration(oldest_state),
                "oldest_xact": human_duration(max(xacts)) if xacts else "",
            }
        )
    return sorted(rows, key=lambda r: (-int(r["sessions"]), str(r[key])))


def connection_findings(sessions: list[Row], limits: Row, th: Thresholds) -> list[Finding]:
    used = len(sessions)
    usable = max(1, int(limits["max_connections"]) - int(limits["reserved"]))
    pct = 100.0 * used / usable
    count_status = Status.OK
    if pct >= th.connections_crit_pct:
        count_status = Status.CRIT
    elif pct >= th.connections_warn_pct:
        count_status = Status.WARN
    others = [s for s in sessions if not s["me"]]
    by_state = _group(sessions, "state")
    findings = [
        Finding(
            check="connections",
            status=count_status,
            summary=f"{used}/{usable} client connections ({pct:.0f}%): "
            + ", ".join(f"{r['sessions']} {r['state']}" for r in by_state),
            rows=by_state,
            hint="idle ones can go with `/db kill-idle [minutes]` (needs approval)"
            if count_status is not Status.OK
            else None,
        )
    ]
    for key, check in (("app", "by application"), ("user", "by user")):
        grouped = _group(others, key)
        findings.append(
            Finding(
                check=check,
                status=Status.OK,
                summary=", ".join(f"{r[key]} ({r['sessions']})" for r in grouped[:5])
                or "no other session",
                rows=grouped,
            )
        )
    rated = [(s, *session_status(s, th)) for s in others]
    rated.sort(
        key=lambda t: (
            t[1].severity,
            -max(float(t[0]["xact_s"] or 0), float(t[0]["state_s"] or 0)),
        )
    )
    worst = rated[0][1] if rated else Status.OK
    shown = rated[: th.max_rows]
    summary = f"{len(rated)} other client session{'s' if len(rated) != 1 else ''}"
    bad = [(s, st, why) for s, st, why in rated if st is not Status.OK]
    if bad:
        summary += "; " + "; ".join(f"pid {s['pid']} {why}" for s, _st, why in bad[:3])
    if len(rated) > len(shown):
        summary += f" (worst {len(shown)} listed, {len(rated) - len(shown)} more not shown)"
    hint = None
    if bad:
        states = {str(s["state"]) for s, _st, _why in bad}
        if any(st.startswith("idle in transaction") for st in states) or any(
            s["blocked_by"] for s, _st, _why in bad
        ):
            hint = "end a holder with `/db terminate <pid>` (needs approval)"
        elif "active" in states:
            hint = "stop a long query with `/db cancel <pid>`"
        else:
            hint = "`/db kill-idle [minutes]` ends idle sessions (needs approval)"
    findings.append(
        Finding(
            check="sessions",
            status=worst,
            summary=summary,
            rows=[_session_row(s, st, why) for s, st, why in shown],
            hint=hint,
        )
    )
    return findings


@register(
    "connections",
    usage="/db connections",
    summary="sessions by state, application and user, with their ages, worst first",
    role="REVIEWER",
)
async def connections(ctx: Context, args: list[str]) -> Report:
    if args:
        raise UsageError("`connections` takes no arguments")
    gw = ctx.gateway
    th = ctx.thresholds
    built: list[Finding] = []

    async def survey(db: Reader) -> Finding:
        sessions = await db.fetch(_SESSIONS_SQL, {"chars": th.query_chars})
        shown_queries(sessions, th.show_query_literals)
        (limits,) = await db.fetch(_LIMITS_SQL)
        built.extend(connection_findings(sessions, limits, th))
        return Finding(check="connections", status=Status.OK, summary="")

    head = await gw.run_check("connections", survey)
    findings = built if head.status is Status.OK else [head]
    return Report(title="Connections", target=gw.target, findings=findings).sorted()
