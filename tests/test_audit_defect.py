"""Production's audit trail defect (LEAPS_SCHEMA.md, Audit) seen from the catalog and
fixed: `/db health` warns (and only warns: no incident, no earlier detection), `/db
migrations` lists it with the fix, and `fix-audit-id`, approved by a SUPERADMIN over the
Slack path, gives audit_log.id its default, after which a write made with app.user_id
passes and the live trigger audits it. On the fixture's variant there is nothing to do."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio

from bot.clock import ManualClock
from bot.gateway import TargetGateway
from bot.router import Dispatcher, RunContext, help_answer, help_text
from bot.state import IncidentStore
from commands.audit_trail import audit_trail
from commands.base import Finding, Reader, Report, Status
from commands.fixture.faults import FaultInjector
from commands.migrations import AUDIT_CHECK, PRISMA_AUDIT_MIGRATION
from commands.remedies.audit import FIX_AUDIT_ID_REMEDY
from commands.remedies.base import Execution, Plan, Verification
from tests.conftest import (
    FAST_THRESHOLDS,
    RunningBot,
    bot_settings,
    make_audit_variant,
    running_bot,
)
from tests.fakeslack import FakeSlack
from tests.test_approvals import CHANNEL, message_text, press, request, settle
from tests.test_roles import answer_to
from tests.test_watchdog import OPS, QUOTA_CHECK, dog, mentioning, ops_texts, watched_bot

REQUESTER, ADMIN, SUPER = "U0REQ", "U0ADMIN", "U0SUPER"
ROLE_MAP = {REQUESTER: "REVIEWER", ADMIN: "ADMIN", SUPER: "SUPERADMIN"}
DEFECT = "LEAPS's audit trail refuses every write made with `app.user_id` set"
ID_DEFAULT_SQL: LiteralString = (
    "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a"
    " ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
    " WHERE d.adrelid = 'public.audit_log'::regclass AND a.attname = 'id'"
)


async def fetch(
    dsn: str, query: LiteralString, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def id_default(dsn: str) -> str | None:
    rows = await fetch(dsn, ID_DEFAULT_SQL)
    return str(rows[0][0]) if rows else None


async def user_of(dsn: str, role: str) -> tuple[str, str]:
    """(id, e-mail) of the first LEAPS user of `role`."""
    ((uid, email),) = await fetch(
        dsn, 'SELECT id, email FROM users WHERE role = %s::"Role" ORDER BY id LIMIT 1', (role,)
    )
    return str(uid), str(email)


@pytest_asyncio.fixture(loop_scope="session")
async def dispatcher(leaps_dsn: str) -> AsyncIterator[Dispatcher]:
    gateway = TargetGateway(leaps_dsn)
    try:
        yield Dispatcher(RunContext(gateway, FAST_THRESHOLDS), coalesce_s=0.0)
    finally:
        await gateway.close()


async def finding(dispatcher: Dispatcher, command: str) -> tuple[Report, Finding]:
    report = await dispatcher.run(command)
    assert isinstance(report, Report), report
    (found,) = [f for f in report.findings if f.check == AUDIT_CHECK]
    return report, found


async def promote_as(dsn: str, actor: str, role: str, target: str) -> None:
    """An audited UPDATE made as the application makes it: app.user_id and app.user_role."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.transaction():
            await conn.execute(
                "SELECT set_config('app.user_id', %s, true), set_config('app.user_role', %s, true)",
                (actor, role),
            )
            await conn.execute("UPDATE users SET role = 'REVIEWER' WHERE id = %s", (target,))


# --- detection --------------------------------------------------------------------------


async def test_health_warns_on_production_and_is_ok_on_the_fixture(
    leaps_dsn: str, audit_variant: str, dispatcher: Dispatcher
) -> None:
    await make_audit_variant(leaps_dsn, audit_variant)
    report, found = await finding(dispatcher, "health")
    if audit_variant == "production":
        assert found.status is Status.WARN
        assert DEFECT in found.summary
        assert "audit_trigger_func()" in found.summary and "no default" in found.summary
        assert "text NOT NULL, no default" in found.summary
        assert found.hint is not None and "/db fix-audit-id" in found.hint
        assert {r["table"] for r in found.rows} == {"users", "points_ledger", "submissions"}
        assert all(r["omits_id"] for r in found.rows)
    else:
        assert found.status is Status.OK, found
        assert "accepted" in found.summary and found.hint is None
    assert not [f for f in report.findings if f.status is Status.CRIT]  # the fixture is clean


async def test_migrations_lists_the_defect_with_the_fix(
    leaps_dsn: str, audit_variant: str, dispatcher: Dispatcher
) -> None:
    await make_audit_variant(leaps_dsn, audit_variant)
    _report, found = await finding(dispatcher, "migrations")
    if audit_variant == "production":
        assert found.status is Status.WARN and DEFECT in found.summary
        assert found.hint is not None
        assert "`/db fix-audit-id`" in found.hint
        assert "SET DEFAULT gen_random_uuid()::text" in found.hint
        assert PRISMA_AUDIT_MIGRATION in found.hint and "dbgenerated" in found.hint
    else:
        assert found.status is Status.OK


async def test_the_warning_opens_no_incident_and_does_not_move_detection(
    leaps_dsn: str, faults: FaultInjector, fake_slack: FakeSlack
) -> None:
    """The watchdog with WATCHDOG_OPENS_INCIDENT sees the warning for an hour: nothing is
    posted and no incident opens; a check that then turns critical opens one detected at
    that run, not at the first run that saw the warning."""
    await make_audit_variant(leaps_dsn, "production")
    clock = ManualClock(datetime(2026, 11, 30, 9, 0, tzinfo=UTC))
    async with watched_bot(leaps_dsn, fake_slack, watchdog_opens_incident=True) as bot:
        assert bot.service.incidents is not None
        bot.service.incidents.clock = clock
        dog(bot).clock = clock
        for _ in range(3):
            await dog(bot).tick()
            clock.advance(seconds=1200)
        store: IncidentStore = bot.service.incidents.store
        latest = await store.latest_health()
        assert latest is not None and latest.worst == "warn"  # the watchdog saw it
        assert (await dog(bot).store.checks())[AUDIT_CHECK].status == "warn"
        assert mentioning(ops_texts(fake_slack, "Watchdog"), AUDIT_CHECK) == []
        assert await store.active_in(OPS) is None
        assert await store.first_critical_since(clock.now() - timedelta(hours=24)) is None

        await faults.disable_quota_trigger()
        critical_at = clock.advance(seconds=60)
        await dog(bot).tick()
        assert len(mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK)) == 1
        assert mentioning(ops_texts(fake_slack, "critical"), AUDIT_CHECK) == []
        incident = await store.active_in(OPS)
        assert incident is not None
        assert incident.detected_at == critical_at
        assert AUDIT_CHECK not in incident.title


# --- the remedy -------------------------------------------------------------------------


async def stored_plan(bot: RunningBot) -> tuple[str, Plan]:
    store = bot.service.store
    assert store is not None
    (done,) = [e for e in await store.audit_trail(limit=50) if e.action == "remedy.executed"]
    assert done.approval_id is not None
    approval = await store.get_approval(done.approval_id)
    assert approval is not None
    return approval.id, Plan.model_validate(approval.plan)


async def verify(bot: RunningBot, plan: Plan, approval_id: str) -> Verification:
    run = Execution(approval_id, SUPER)

    async def check(db: Reader) -> Verification:
        return await FIX_AUDIT_ID_REMEDY.verify(db, plan, run)

    return await bot.service.ctx.gateway.read(check)


async def test_fix_audit_id_takes_a_superadmin_and_repairs_production_s_trail(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    await make_audit_variant(leaps_dsn, "production")
    _admin, admin_email = await user_of(leaps_dsn, "ADMIN")
    super_id, super_email = await user_of(leaps_dsn, "SUPERADMIN")
    participant, _email = await user_of(leaps_dsn, "PARTICIPANT")
    fake_slack.add_user(ADMIN, email=admin_email)
    fake_slack.add_user(SUPER, email=super_email)
    # before: the application's own audited write is refused
    with pytest.raises(psycopg.errors.NotNullViolation, match="audit_log"):
        await promote_as(leaps_dsn, super_id, "SUPERADMIN", participant)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLE_MAP)
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, "fix-audit-id")
        ts = str(plan.response["ts"])
        plan_text = message_text(fake_slack, CHANNEL, ts)
        assert re.search(r"approver\(s\) with role \W*SUPERADMIN\b", plan_text)
        assert "SET DEFAULT gen_random_uuid()::text" in plan_text
        assert "LOCK TABLE public.audit_log IN ACCESS EXCLUSIVE MODE" in plan_text
        assert "text NOT NULL, no default" in plan_text  # the backup: the old definition
        assert "no backup table" in plan_text
        assert "Prisma will see the default as drift" in plan_text
        assert PRISMA_AUDIT_MIGRATION in plan_text
        assert "audit_trigger_func()" in plan_text  # the defect, named

        await press(bot, plan, ADMIN)
        await settle(bot)
        refusal = json.dumps((await answer_to(fake_slack, ADMIN)).params)
        assert "needs the role SUPERADMIN, yours is ADMIN" in refusal
        assert await id_default(leaps_dsn) is None  # nothing changed

        await press(bot, plan, SUPER)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, ts)
        assert "now defaults to" in final and "before: text NOT NULL, no default" in final
        assert f"acted as LEAPS user {super_id} (SUPERADMIN" in final

        approval_id, stored = await stored_plan(bot)
        assert stored.data["old_default"] is None and stored.data["column_type"] == "text"
        assert stored.locks.relations == ["audit_log"]
        landed = await verify(bot, stored, approval_id)
        assert landed.landed and "gen_random_uuid()" in landed.found

        _report, health = await finding(bot.service.dispatcher, "health")
        assert health.status is Status.OK, health
        trail = await bot.service.ctx.gateway.read(audit_trail)
        assert trail.path == "trigger" and trail.defect() is None

        # A second request finds nothing to do.
        again = await FIX_AUDIT_ID_REMEDY.plan(bot.service.ctx, [])
        assert again.count == 0 and "already has a default" in again.summary

    assert await id_default(leaps_dsn) == "(gen_random_uuid())::text"
    before = await fetch(leaps_dsn, "SELECT count(*) FROM audit_log")
    await promote_as(leaps_dsn, super_id, "SUPERADMIN", participant)  # passes now
    audited = await fetch(
        leaps_dsn,
        "SELECT actor_id, meta ->> 'user_role', id IS NOT NULL FROM audit_log"
        " WHERE action = 'UPDATE_users' AND target_id = %s",
        (participant,),
    )
    assert audited == [(super_id, "SUPERADMIN", True)]
    assert await fetch(leaps_dsn, "SELECT count(*) FROM audit_log") == [(before[0][0] + 1,)]


async def test_verify_says_not_landed_while_the_column_has_no_default(
    leaps_dsn: str, dispatcher: Dispatcher
) -> None:
    await make_audit_variant(leaps_dsn, "production")
    plan = await FIX_AUDIT_ID_REMEDY.plan(dispatcher.ctx, [])
    assert plan.count == 1 and FIX_AUDIT_ID_REMEDY.not_tried
    assert not FIX_AUDIT_ID_REMEDY.preflight
    run = Execution("never-ran", SUPER)

    async def check(db: Reader) -> Verification:
        return await FIX_AUDIT_ID_REMEDY.verify(db, plan, run)

    found = await dispatcher.ctx.gateway.read(check)
    assert not found.landed and "no default" in found.found


async def test_nothing_to_do_on_the_fixture(leaps_dsn: str, fake_slack: FakeSlack) -> None:
    """The fixture's audit function supplies its own ids (its column has no default,
    as production's): the trail accepts writes, so no approval is asked."""
    assert await id_default(leaps_dsn) is None
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLE_MAP)
    async with running_bot(settings, fake_slack) as bot:
        resp = await bot.slash("fix-audit-id", channel=CHANNEL, user=REQUESTER)
        assert resp.status == 200
        told = json.dumps((await answer_to(fake_slack, REQUESTER)).params)
        assert "nothing to do" in told and "supplies its own ids" in told
        await settle(bot)
        assert bot.service.store is not None
        actions = [e.action for e in await bot.service.store.audit_trail(limit=50)]
        assert "remedy.nothing_to_do" in actions and "approval.requested" not in actions
    assert await id_default(leaps_dsn) is None


def test_help_lists_it_with_its_approver_and_guide_sections() -> None:
    one = help_answer(["fix-audit-id"], markup=False)
    assert one.outcome == "help"
    assert "approved by 1 x SUPERADMIN" in one.text
    assert "guide: Migration Problems → Schema Drift Issues" in one.text
    assert "guide: Emergency Recovery → Data Loss Scenarios" in one.text
    assert "`fix-audit-id`" in help_text(markup=False)
