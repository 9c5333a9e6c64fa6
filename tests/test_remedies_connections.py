"""`/db connections`, `kill-idle`, `cancel` and `terminate` against real sessions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import suppress
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from bot.approvals.executor import Executor
from bot.embedded_pg import EmbeddedPostgres, password_sql
from bot.gateway import TargetGateway
from bot.router import RunContext
from commands.base import APPLICATION_NAME, Status, UsageError
from commands.connections import connections
from commands.fixture.faults import FaultInjector
from commands.remedies.base import REMEDIES
from commands.remedies.sessions import CANCEL, KILL_IDLE, TERMINATE, parse_minutes
from tests.conftest import FAST_THRESHOLDS

APP_ROLE = "dbops_test_app"  # an ordinary login role: the bot spares superusers by default
VICTIM_APP = "idle-victim"

Conn = psycopg.AsyncConnection[Any]


@pytest.fixture(scope="session")
def app_role(pg: EmbeddedPostgres) -> str:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (APP_ROLE,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(APP_ROLE)))
        conn.execute(password_sql(conn, APP_ROLE, pg.dsn()))
    return APP_ROLE


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(leaps_dsn: str) -> AsyncIterator[TargetGateway]:
    gw = TargetGateway(leaps_dsn)
    yield gw
    await gw.close()


@pytest.fixture
def ctx(gateway: TargetGateway) -> RunContext:
    return RunContext(gateway, FAST_THRESHOLDS)


class Sessions:
    """Client sessions a test opens; all closed at the end whatever happened to them."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conns: list[Conn] = []

    async def open(self, *, app: str = VICTIM_APP, user: str | None = None) -> Conn:
        kwargs: dict[str, Any] = {"application_name": app, "autocommit": True}
        if user is not None:
            kwargs["user"] = user
        conn = await psycopg.AsyncConnection.connect(self.dsn, **kwargs)
        await conn.execute("SELECT 1")
        self.conns.append(conn)
        return conn

    async def close(self) -> None:
        for conn in self.conns:
            with suppress(psycopg.Error):
                await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def sessions(leaps_dsn: str) -> AsyncIterator[Sessions]:
    opened = Sessions(leaps_dsn)
    yield opened
    await opened.close()


async def victims(sessions: Sessions, role: str, n: int = 3) -> list[Conn]:
    conns = [await sessions.open(user=role) for _ in range(n)]
    await asyncio.sleep(0.05)  # idle since before the plan's transaction began
    return conns


async def alive(dsn: str, pids: list[int]) -> set[int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s::int[])", (pids,)
        )
        return {int(r[0]) for r in await cur.fetchall()}


def test_remedies_are_registered_with_their_approvers() -> None:
    assert REMEDIES["kill-idle"] is KILL_IDLE
    assert REMEDIES["terminate"] is TERMINATE
    assert REMEDIES["cancel"] is CANCEL
    assert (KILL_IDLE.approver_role, KILL_IDLE.approvers) == ("ADMIN", 1)
    assert (TERMINATE.approver_role, TERMINATE.approvers) == ("ADMIN", 1)
    assert (CANCEL.approver_role, CANCEL.approvers) == ("REVIEWER", 1)
    assert not any(r.destroys_data for r in (KILL_IDLE, TERMINATE, CANCEL))


@pytest.mark.parametrize("bad", [["-1"], ["1.5"], ["abc"], ["10081"], ["1", "2"], ["+5"]])
def test_kill_idle_minutes_must_be_a_sane_whole_number(bad: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_minutes(bad)


def test_kill_idle_minutes_default_and_bounds() -> None:
    assert parse_minutes([]) == 10
    assert parse_minutes(["0"]) == 0
    assert parse_minutes(["10080"]) == 10080


async def test_kill_idle_terminates_exactly_the_idle_sessions(
    ctx: RunContext, sessions: Sessions, app_role: str, leaps_dsn: str
) -> None:
    conns = await victims(sessions, app_role)
    pids = sorted(c.info.backend_pid for c in conns)
    bystander = await sessions.open(app="superuser-idle")  # superuser: spared by default
    await asyncio.sleep(0.05)

    plan = await KILL_IDLE.plan(ctx, ["0"])
    planned = {int(t["pid"]) for t in plan.targets}
    assert {int(t["pid"]) for t in plan.targets if t["app"] == VICTIM_APP} == set(pids)
    assert planned == set(pids)
    assert bystander.info.backend_pid not in planned
    assert all(t["app"] != APPLICATION_NAME for t in plan.targets)
    assert plan.count == 3 and plan.data["pids"] == pids and plan.data["minutes"] == 0
    assert plan.needs_approval
    assert "pg_terminate_backend" in plan.steps[0].sql
    assert plan.steps[0].params[3] == pids

    state, outcome = await Executor(leaps_dsn).apply(KILL_IDLE, plan, "apv-test1")
    assert state == "done", outcome
    assert outcome.affected == 3
    assert sorted(int(r["pid"]) for r in outcome.rows) == pids
    assert all(r["gone"] for r in outcome.rows)
    assert await alive(leaps_dsn, pids) == set()
    assert await alive(leaps_dsn, [bystander.info.backend_pid]) == {bystander.info.backend_pid}
    with pytest.raises(psycopg.OperationalError):
        await conns[0].execute("SELECT 1")


async def test_kill_idle_spares_young_sessions_and_the_bot(
    gateway: TargetGateway, sessions: Sessions, app_role: str
) -> None:
    await victims(sessions, app_role, n=1)
    bot_like = await sessions.open(app=APPLICATION_NAME)  # another replica of the bot
    superuser = await sessions.open(app="superuser-idle")
    await asyncio.sleep(0.05)

    plan = await KILL_IDLE.plan(RunContext(gateway, FAST_THRESHOLDS), [])
    assert plan.count == 0 and not plan.needs_approval  # nobody idle for 10 minutes
    assert "nothing to do" in plan.summary

    allowed = RunContext(gateway, FAST_THRESHOLDS, allow_superuser_kill=True)
    plan = await KILL_IDLE.plan(allowed, ["0"])
    planned = {int(t["pid"]) for t in plan.targets}
    assert superuser.info.backend_pid in planned
    assert bot_like.info.backend_pid not in planned
    assert all(t["app"] != APPLICATION_NAME for t in plan.targets)
    assert any("superuser" in w for w in plan.warnings)


async def test_kill_idle_aborts_on_drift_and_kills_nobody(
    ctx: RunContext, sessions: Sessions, app_role: str, leaps_dsn: str
) -> None:
    conns = await victims(sessions, app_role)
    pids = [c.info.backend_pid for c in conns]
    plan = await KILL_IDLE.plan(ctx, ["0"])
    assert plan.count == 3

    await conns[0].close()
    for _ in range(100):  # the backend exits just after its client leaves
        if not await alive(leaps_dsn, [pids[0]]):
            break
        await asyncio.sleep(0.02)

    state, outcome = await Executor(leaps_dsn).apply(KILL_IDLE, plan, "apv-test1")
    assert state == "aborted"
    assert "drift" in outcome.summary
    assert f"pid {pids[0]} is gone" in outcome.summary
    assert await alive(leaps_dsn, pids[1:]) == set(pids[1:])
    for conn in conns[1:]:
        await conn.execute("SELECT 1")  # still connected


async def test_a_session_that_became_busy_is_drift(
    ctx: RunContext, sessions: Sessions, app_role: str, leaps_dsn: str
) -> None:
    conns = await victims(sessions, app_role, n=2)
    plan = await KILL_IDLE.plan(ctx, ["0"])
    busy = conns[0]
    await busy.set_autocommit(False)
    await busy.execute("SELECT 1")  # now idle in transaction: no longer plain idle

    state, outcome = await Executor(leaps_dsn).apply(KILL_IDLE, plan, "apv-test1")
    assert state == "aborted"
    assert f"pid {busy.info.backend_pid} is now idle in transaction" in outcome.summary
    await busy.rollback()
    pids = [c.info.backend_pid for c in conns]
    assert await alive(leaps_dsn, pids) == set(pids)


async def test_terminate_one_session(
    ctx: RunContext, sessions: Sessions, app_role: str, leaps_dsn: str
) -> None:
    (victim,) = await victims(sessions, app_role, n=1)
    pid = victim.info.backend_pid
    await victim.set_autocommit(False)
    await victim.execute("SELECT now()")  # an open transaction to roll back

    plan = await TERMINATE.plan(ctx, [str(pid)])
    assert plan.count == 1 and plan.data["pids"] == [pid]
    assert plan.targets[0]["app"] == VICTIM_APP
    assert any("rolls back its open transaction" in w for w in plan.warnings)

    state, outcome = await Executor(leaps_dsn).apply(TERMINATE, plan, "apv-test1")
    assert state == "done", outcome
    assert outcome.affected == 1 and outcome.rows == [
        {"pid": pid, "terminated": True, "gone": True}
    ]
    assert await alive(leaps_dsn, [pid]) == set()


async def test_terminate_refuses_what_it_must_not_touch(
    ctx: RunContext, gateway: TargetGateway, sessions: Sessions, leaps_dsn: str
) -> None:
    bot_like = await sessions.open(app=APPLICATION_NAME)
    superuser = await sessions.open(app="superuser-idle")
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
        )
        row = await cur.fetchone()
        assert row is not None
        checkpointer = int(row[0])

    cases = {
        "abc": "not a process id",
        "-3": "not a process id",
        "0": "not a process id",
        "99999999": "no session with pid 99999999",
        str(bot_like.info.backend_pid): "bot's own sessions",
        str(superuser.info.backend_pid): "superuser",
        str(checkpointer): "not a client session",
    }
    for arg, expected in cases.items():
        with pytest.raises(UsageError, match=expected):
            await TERMINATE.plan(ctx, [arg])
    with pytest.raises(UsageError, match="one process id"):
        await CANCEL.plan(ctx, [])

    allowed = RunContext(gateway, FAST_THRESHOLDS, allow_superuser_kill=True)
    plan = await TERMINATE.plan(allowed, [str(superuser.info.backend_pid)])
    assert any("superuser session" in w for w in plan.warnings)


async def test_a_reused_pid_is_drift(
    ctx: RunContext, sessions: Sessions, app_role: str, leaps_dsn: str
) -> None:
    (victim,) = await victims(sessions, app_role, n=1)
    pid = victim.info.backend_pid
    plan = await TERMINATE.plan(ctx, [str(pid)])
    started = datetime.fromisoformat(plan.data["backend_start"])
    plan.data["backend_start"] = (started - timedelta(hours=1)).isoformat()  # a former holder

    state, outcome = await Executor(leaps_dsn).apply(TERMINATE, plan, "apv-test1")
    assert state == "aborted"
    assert f"pid {pid} is now a different session (pid reused)" in outcome.summary
    await victim.execute("SELECT 1")  # untouched


async def test_cancel_stops_a_running_statement(
    ctx: RunContext, sessions: Sessions, app_role: str, leaps_dsn: str
) -> None:
    (victim,) = await victims(sessions, app_role, n=1)
    pid = victim.info.backend_pid
    idle_plan = await CANCEL.plan(ctx, [str(pid)])
    assert any("no running statement" in w for w in idle_plan.warnings)

    running = asyncio.create_task(victim.execute("SELECT pg_sleep(30)"))
    try:
        for _ in range(200):
            async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as c:
                cur = await c.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
                row = await cur.fetchone()
            if row is not None and row[0] == "active":
                break
            await asyncio.sleep(0.02)
        plan = await CANCEL.plan(ctx, [str(pid)])
        assert plan.data["state"] == "active" and plan.data["query_start"]
        state, outcome = await Executor(leaps_dsn).apply(CANCEL, plan, "apv-test1")
        assert state == "done", outcome
        assert "the statement stopped" in outcome.summary
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(running, timeout=5)
    finally:
        if not running.done():
            running.cancel()
    await victim.execute("SELECT 1")  # the session stays


async def test_connections_report_worst_first(
    ctx: RunContext, faults: FaultInjector, sessions: Sessions, app_role: str
) -> None:
    conns = await victims(sessions, app_role, n=2)
    stuck = await faults.idle_in_transaction()
    await asyncio.sleep(FAST_THRESHOLDS.idle_in_tx_crit_s + 0.1)

    report = await connections(ctx, [])
    by_check = {f.check: f for f in report.findings}
    assert set(by_check) == {"connections", "by application", "by user", "sessions"}
    listed = by_check["sessions"]
    assert listed.status is Status.CRIT
    assert listed.rows[0]["pid"] == stuck and listed.rows[0]["status"] == "crit"
    assert listed.rows[0]["state"] == "idle in transaction"
    assert {c.info.backend_pid for c in conns} <= {int(r["pid"]) for r in listed.rows}
    assert set(listed.rows[0]) >= {
        "pid",
        "user",
        "app",
        "client_addr",
        "state",
        "backend_age",
        "state_age",
        "xact_age",
        "wait",
        "query",
    }
    assert listed.hint is not None and "terminate" in listed.hint
    apps = {r["app"]: r for r in by_check["by application"].rows}
    assert apps[VICTIM_APP]["sessions"] == 2
    users = {r["user"]: r for r in by_check["by user"].rows}
    assert users[app_role]["sessions"] == 2
    assert report.findings[0].status is Status.CRIT

    with pytest.raises(UsageError):
        await connections(ctx, ["x"])
