"""`freeze-writes` / `unfreeze-writes` with a real application writer: PostgREST's way in
(`authenticator`, then `SET ROLE authenticated`), frozen and unfrozen through the bot over
Slack, health read by a fresh context, the incident commander reminded by an injected
clock; and the database-wide mode, the refusals and a freeze made by hand on the engine's
executor. Role settings are cluster-wide: every one set here is taken back in `finally`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from bot.approvals.executor import Executor
from bot.clock import ManualClock
from bot.embedded_pg import password_sql, role_dsn
from bot.gateway import TargetGateway
from bot.house import bot_roles
from bot.router import RunContext
from commands.base import DEFAULT_APP_ROLES, Reader, Report, Status, UsageError
from commands.health import FREEZE_CHECK, health
from commands.remedies.base import REMEDIES, Execution
from commands.remedies.freeze import FREEZE, UNFREEZE, freeze_state
from tests.conftest import FAST_THRESHOLDS, RunningBot, bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import ADMIN, REQUESTER, ROLES, plan_message, press, settle

CHANNEL = "C0INCIDENT"
REMIND_S = 600.0
SETTINGS_SQL: LiteralString = """
SELECT r.rolname::text AS role, s.setconfig
FROM pg_roles r
LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid
 AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
WHERE r.rolname = ANY(%s) ORDER BY 1
"""


async def admin_run(dsn: str, query: Any, params: tuple[Any, ...] = ()) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params or None)
        return await cur.fetchall() if cur.description else []


async def settings_now(dsn: str) -> dict[str, Any]:
    rows = await admin_run(dsn, SETTINGS_SQL, (list(DEFAULT_APP_ROLES),))
    return {r[0]: r[1] for r in rows}


async def reset_all(dsn: str) -> None:
    """Every read-only default this file may have set, gone (in this database and all)."""
    db = (await admin_run(dsn, "SELECT current_database()"))[0][0]
    statements = [
        sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(
            sql.Identifier(r), sql.Identifier(db)
        )
        for r in DEFAULT_APP_ROLES
    ] + [
        sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(sql.Identifier(r))
        for r in DEFAULT_APP_ROLES
    ]
    statements.append(
        sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(sql.Identifier(db))
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET default_transaction_read_only = off")
        for statement in statements:
            await conn.execute(statement)


class Writer:
    """The application: logs in as `authenticator`, acts as `authenticated`, and writes in
    plain transactions (as Prisma or a pool does)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = role_dsn(dsn, "authenticator")
        self.conns: list[psycopg.AsyncConnection[Any]] = []

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, application_name="leaps-app"
        )
        await conn.execute("SET ROLE authenticated")
        self.conns.append(conn)
        return conn

    async def write(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("UPDATE users SET name = name WHERE id = (SELECT min(id) FROM users)")
        await conn.execute(
            "INSERT INTO kajabi_events (id, payload) VALUES (%s, '{}')", (uuid.uuid4().hex,)
        )

    async def read(self, conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute("SELECT count(*) FROM users")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def close(self) -> None:
        for conn in self.conns:
            if not conn.closed:
                try:
                    await conn.close()
                except psycopg.Error:
                    pass


async def dead(conn: psycopg.AsyncConnection[Any]) -> bool:
    try:
        await conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False


@pytest_asyncio.fixture(loop_scope="session")
async def app(leaps_dsn: str) -> AsyncIterator[Writer]:
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute(password_sql(conn, "authenticator", leaps_dsn))
    writer = Writer(leaps_dsn)
    try:
        yield writer
    finally:
        await writer.close()
        await reset_all(leaps_dsn)


async def fresh_health(dsn: str) -> Report:
    """`/db health` as a bot started afresh would run it: a new gateway, nothing cached."""
    gateway = TargetGateway(dsn)
    try:
        return await health(RunContext(gateway, FAST_THRESHOLDS), [])
    finally:
        await gateway.close()


def freeze_finding(report: Report) -> Any:
    return next(f for f in report.findings if f.check == FREEZE_CHECK)


async def test_the_application_is_frozen_and_unfrozen_over_slack(
    leaps_dsn: str, fake_slack: FakeSlack, app: Writer
) -> None:
    db = (await admin_run(leaps_dsn, "SELECT current_database()"))[0][0]
    # settings the freeze must give back exactly: one of another kind, one read only already
    await admin_run(
        leaps_dsn,
        sql.SQL("ALTER ROLE anon IN DATABASE {} SET statement_timeout = '5s'").format(
            sql.Identifier(db)
        ),
    )
    await admin_run(
        leaps_dsn,
        sql.SQL(
            "ALTER ROLE service_role IN DATABASE {} SET default_transaction_read_only = on"
        ).format(sql.Identifier(db)),
    )
    before = await settings_now(leaps_dsn)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES, freeze_remind_s=REMIND_S)
    async with running_bot(settings, fake_slack) as bot:
        incidents = bot.service.incidents
        clock = ManualClock()
        incidents.clock = clock
        assert bot.service.ctx.bot_roles == bot_roles(settings) != ()
        await bot.slash("incident start Data loss", channel=CHANNEL, user=REQUESTER)
        await settle(bot)
        idle, busy = await app.connect(), await app.connect()
        await app.write(busy)  # writes work before

        await freeze(bot, f"{FREEZE}", "WRITES FROZEN")
        assert await dead(idle) and await dead(busy)  # idle sessions ended too
        frozen = await app.connect()  # the pool reconnects: read only
        assert await app.read(frozen) > 0
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as refused:
            await app.write(frozen)
        assert refused.value.sqlstate == "25006"
        # the stated limit: a transaction begun READ WRITE explicitly (as PostgREST begins
        # its mutations) is not stopped
        async with frozen.transaction():
            await frozen.execute("SET TRANSACTION READ WRITE")
            await app.write(frozen)

        # health, from the database alone (a restarted bot): critical, since when, by whom
        found = freeze_finding(await fresh_health(leaps_dsn))
        assert found.status is Status.CRIT
        assert f"authenticator (in database {db})" in found.summary
        assert "since " in found.summary and f"by {ADMIN}" in found.summary
        assert "by hand (no record of the bot): service_role" in found.summary

        # the commander is reminded every FREEZE_REMIND_S, only once Slack said ok
        state = await bot.service.gateway.read(lambda d: freeze_state(DEFAULT_APP_ROLES, d))
        assert state.record is not None
        clock.set(state.record.frozen_at + timedelta(seconds=REMIND_S - 1))
        assert await incidents.tick() == 0
        clock.advance(seconds=2)
        assert await incidents.tick() == 1
        assert await incidents.tick() == 0
        clock.advance(seconds=REMIND_S)
        fake_slack.fail_next("chat.postMessage", status=500, times=3)
        assert await incidents.tick() == 0
        assert await incidents.tick() == 1
        reminders = [
            c
            for c in fake_slack.calls_to("chat.postMessage")
            if ":snowflake:" in c.params["text"] and c.status == 200
        ]
        assert len(reminders) == 2 and "unfreeze-writes" in reminders[0].params["text"]
        incident = await incidents.store.active_in(CHANNEL)
        assert incident is not None
        lines = [e.text for e in await incidents.store.timeline(incident.id)]
        assert any(t.startswith(f"`{FREEZE}` done") and "WRITES FROZEN" in t for t in lines)
        assert sum("writes frozen for" in t for t in lines) == 2

        opened_during = await app.connect()
        await freeze(bot, UNFREEZE, "WRITES UNFROZEN")
        assert await dead(opened_during)
        thawed = await app.connect()
        await app.write(thawed)  # writes work again
        assert await settings_now(leaps_dsn) == before  # exactly as they were
        clock.advance(seconds=REMIND_S)
        assert await incidents.tick() == 1  # service_role is still read only (by hand)
        await reset_all(leaps_dsn)
        clock.advance(seconds=REMIND_S)
        assert await incidents.tick() == 0
    found = freeze_finding(await fresh_health(leaps_dsn))
    assert found.status is Status.OK


async def freeze(bot: RunningBot, command: str, done: str) -> None:
    resp = await bot.slash(command, channel=CHANNEL, user=REQUESTER)
    assert resp.status == 200
    await settle(bot)
    await press(bot, plan_message(bot.fake), ADMIN, channel=CHANNEL)
    await settle(bot)
    outcome = [
        str(c.params)
        for c in bot.fake.calls_to("chat.postMessage") + bot.fake.calls_to("chat.update")
    ]
    assert any(done in str(t) for t in outcome), outcome[-3:]


async def fetch_one(query: LiteralString, db: Reader) -> Any:
    return (await db.fetch(query))[0]


async def test_database_wide_refusals_and_a_freeze_made_by_hand(
    leaps_dsn: str, app: Writer
) -> None:
    gateway = TargetGateway(leaps_dsn)
    executor = Executor(leaps_dsn)
    me = (await admin_run(leaps_dsn, "SELECT current_user"))[0][0]
    db = (await admin_run(leaps_dsn, "SELECT current_database()"))[0][0]
    # The application logs in as the bot's own role: frozen database-wide, never by role.
    shared = RunContext(gateway, FAST_THRESHOLDS, bot_roles=("authenticator",))
    plain = RunContext(gateway, FAST_THRESHOLDS)
    freeze_r, unfreeze_r = REMEDIES[FREEZE], REMEDIES[UNFREEZE]
    try:
        with pytest.raises(UsageError, match="superuser"):
            await freeze_r.plan(RunContext(gateway, FAST_THRESHOLDS, app_roles=(me,)), [])
        with pytest.raises(UsageError, match="not frozen"):
            await unfreeze_r.plan(plain, [])
        with pytest.raises(UsageError, match="no arguments"):
            await freeze_r.plan(plain, ["now"])
        await admin_run(
            leaps_dsn,
            sql.SQL(
                "ALTER ROLE authenticator IN DATABASE {} SET default_transaction_read_only = off"
            ).format(sql.Identifier(db)),
        )
        with pytest.raises(UsageError, match="overrides the database's"):
            await freeze_r.plan(shared, [])
        await reset_all(leaps_dsn)

        plan = await freeze_r.plan(shared, [])
        statements = plan.steps[0].sql
        assert f'ALTER DATABASE "{db}" SET' in statements
        assert '"authenticator"' not in statements and 'ALTER ROLE "anon"' in statements
        assert plan.count == 4 and "Kajabi webhooks" in " ".join(plan.warnings)
        assert "REST API" in " ".join(plan.warnings)
        assert "not a hostile client" in " ".join(plan.warnings)
        assert plan.preflight is None and freeze_r.not_tried
        state, outcome = await executor.apply(freeze_r, plan, "apv-shared1")
        assert state == "done", outcome
        run = Execution("apv-shared1", "bot")
        assert (await gateway.read(lambda d: freeze_r.verify(d, plan, run))).landed
        # every new session of the database starts read only, the bot's admin role too ...
        row = await admin_run(leaps_dsn, "SHOW default_transaction_read_only")
        assert row[0][0] == "on"
        with pytest.raises(UsageError, match="already frozen"):
            await freeze_r.plan(shared, [])
        # ... and the bot's own remedy still writes (its backup table, in its transaction)
        lift = await unfreeze_r.plan(shared, [])
        assert f'ALTER DATABASE "{db}" RESET' in lift.steps[0].sql
        state, outcome = await executor.apply(unfreeze_r, lift, "apv-shared2")
        assert state == "done", outcome
        assert (await gateway.read(lambda d: unfreeze_r.verify(d, lift, run))).landed
        assert (await admin_run(leaps_dsn, "SHOW default_transaction_read_only"))[0][0] == "off"
        assert all(v is None for v in (await settings_now(leaps_dsn)).values())
        copied = await admin_run(
            leaps_dsn, 'SELECT count(*) FROM dbops_backup."apv_shared2_unfrozen"'
        )
        assert copied[0][0] == 4

        # A freeze made by hand: in this database, and one in all databases.
        await admin_run(
            leaps_dsn,
            sql.SQL(
                "ALTER ROLE authenticator IN DATABASE {} SET default_transaction_read_only = on"
            ).format(sql.Identifier(db)),
        )
        await admin_run(leaps_dsn, "ALTER ROLE anon SET default_transaction_read_only = on")
        found = freeze_finding(await fresh_health(leaps_dsn))
        assert found.status is Status.CRIT
        assert "made by hand" in found.summary and "since" not in found.summary
        assert "anon (in all databases)" in found.summary
        session = await app.connect()
        lift = await unfreeze_r.plan(plain, [])
        assert "made by hand" in lift.summary and 'ALTER ROLE "anon"' not in lift.steps[0].sql
        assert any("ALL databases" in w for w in lift.warnings)
        state, outcome = await executor.apply(unfreeze_r, lift, "apv-byhand")
        assert state == "done", outcome
        assert await dead(session)  # no record says when it began: every session ended
        await app.write(await app.connect())
    finally:
        await reset_all(leaps_dsn)
        await gateway.close()


def test_the_bots_roles_are_read_from_its_urls() -> None:
    from bot.settings import Settings

    both = Settings(
        database_url="postgresql://app:secret@h:5432/db",
        admin_database_url="host=h user=admin password=x dbname=db",
        state_database_url="postgresql+asyncpg://state:pw@h/s",
        _env_file=None,
    )
    assert bot_roles(both) == ("app", "admin", "state")
    sqlite = Settings(
        database_url="postgres://app@h/db", state_database_url="sqlite:///x", _env_file=None
    )
    assert bot_roles(sqlite) == ("app",)
