"""Remedies act on LEAPS as the application does (DESIGN.md approval rule 8), over the
whole Slack path: the approver's LEAPS account (the user whose e-mail is the approver's
Slack profile e-mail) or the configured service identity is set as `app.user_id` /
`app.user_role` for the remedy's transaction, named as reviewer, shown in the outcome,
written to the bot's audit trail and to production's own audit_log by its triggers; the
session and view remedies run the same way with every guard of the fixture present."""

from __future__ import annotations

import asyncio
from typing import Any, LiteralString

import psycopg
import pytest

from bot.approvals.executor import Executor
from bot.gateway import TargetGateway
from bot.router import RunContext
from commands.base import Context, LeapsIdentity, Reader
from commands.fixture.faults import FaultInjector
from commands.remedies.base import Execution, Outcome, Plan, Remedy, Verification, Writer
from commands.remedies.refresh import REFRESH_VIEWS
from commands.remedies.sessions import CANCEL, KILL_IDLE, TERMINATE
from tests.conftest import FAST_THRESHOLDS, bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import CHANNEL, Victims, message_text, press, request, settle

REQUESTER, ADMIN, ADMIN2 = "U0REQ", "U0ADMIN", "U0ADMIN2"
ROLES = {REQUESTER: "REVIEWER", ADMIN: "ADMIN", ADMIN2: "ADMIN"}


async def fetch(
    dsn: str, query: LiteralString, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def leaps_user(dsn: str, role: str) -> tuple[str, str]:
    """(id, e-mail) of a LEAPS user of `role`."""
    (row,) = await fetch(
        dsn, 'SELECT id, email FROM users WHERE role = %s::"Role" ORDER BY id LIMIT 1', (role,)
    )
    return str(row[0]), str(row[1])


async def inject_duplicate_learn(dsn: str, n: int) -> list[str]:
    async with FaultInjector(dsn) as inj:
        return await inj.duplicate_learn(n)


async def test_dedupe_learn_acts_as_the_approvers_leaps_account(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    await inject_duplicate_learn(leaps_dsn, 3)
    admin_id, admin_email = await leaps_user(leaps_dsn, "ADMIN")
    fake_slack.add_user(ADMIN, email=None)
    fake_slack.add_user(ADMIN2, email=admin_email.upper())  # matching ignores case
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, "dedupe-learn")
        plan_text = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "trg_validate_status_transition" in plan_text  # said before approval
        await press(bot, plan, ADMIN)
        await settle(bot)
        await press(bot, plan, ADMIN2)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert f"acted as LEAPS user {admin_id} (ADMIN" in final
        assert bot.service.store is not None
        (executed,) = [
            e
            for e in await bot.service.store.audit_trail(limit=200)
            if e.action == "remedy.executed"
        ]
        acted = str(executed.detail["summary"])  # names the identity it acted as
        assert admin_id in acted and f"<@{ADMIN2}>" in acted

    rejected = await fetch(
        leaps_dsn,
        "SELECT id, reviewer_id FROM submissions WHERE review_note LIKE 'Duplicate LEARN%%'",
    )
    assert len(rejected) == 3 and {r[1] for r in rejected} == {admin_id}
    audited = await fetch(
        leaps_dsn,
        "SELECT DISTINCT actor_id, meta ->> 'user_role' FROM audit_log"
        " WHERE action = 'UPDATE_submissions'",
    )
    assert audited == [(admin_id, "ADMIN")]


async def test_without_a_leaps_account_the_service_identity_acts(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    await inject_duplicate_learn(leaps_dsn, 2)
    service_id, _email = await leaps_user(leaps_dsn, "REVIEWER")
    _participant, participant_email = await leaps_user(leaps_dsn, "PARTICIPANT")
    fake_slack.add_user(ADMIN, email=participant_email)  # a LEAPS account, but no staff role
    fake_slack.add_user(ADMIN2, email="nobody@elsewhere.example")  # no LEAPS account
    settings = bot_settings(
        leaps_dsn, fake_slack, role_map=ROLES, remedy_service_user_id=service_id
    )
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, "dedupe-learn")
        await press(bot, plan, ADMIN)
        await settle(bot)
        await press(bot, plan, ADMIN2)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert f"acted as LEAPS user {service_id} (ADMIN, service identity" in final
    reviewers = await fetch(
        leaps_dsn,
        "SELECT DISTINCT reviewer_id FROM submissions WHERE review_note LIKE 'Duplicate LEARN%%'",
    )
    assert reviewers == [(service_id,)]


async def test_a_refusal_reaches_slack_naming_the_guard(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    """Neither approver has a staff account and no service identity is set: the approver's
    participant account is used, and production's guard says no."""
    await inject_duplicate_learn(leaps_dsn, 2)
    _participant, participant_email = await leaps_user(leaps_dsn, "PARTICIPANT")
    fake_slack.add_user(ADMIN, email=participant_email)
    fake_slack.add_user(ADMIN2)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    before = await fetch(leaps_dsn, "SELECT * FROM submissions ORDER BY id")
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, "dedupe-learn")
        plan_text = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "refuses this UPDATE" in plan_text
        await press(bot, plan, ADMIN)
        await settle(bot)
        await press(bot, plan, ADMIN2)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "Insufficient permissions to change submission status" in final
        assert "trg_validate_status_transition" in final
    assert await fetch(leaps_dsn, "SELECT * FROM submissions ORDER BY id") == before


async def _probe_plan(ctx: Context, args: list[str]) -> Plan:
    return Plan(remedy="probe", args=args, title="probe", summary="probe", steps=[], count=0)


async def _probe_apply(writer: Writer, plan: Plan) -> Outcome:
    rows = await writer.fetch(
        "SELECT current_setting('app.user_id', true) AS user_id,"
        " current_setting('app.user_role', true) AS role"
    )
    return Outcome(ok=True, summary="probed", rows=rows)


async def _probe_verify(db: Reader, plan: Plan, run: Execution) -> Verification:
    return Verification(landed=True, found="a probe changes nothing")


# A remedy of this test only (never registered): it reports what production's triggers
# would read inside the executor's transaction.
PROBE = Remedy(
    name="probe",
    usage="",
    summary="",
    plan=_probe_plan,
    apply=_probe_apply,
    verify=_probe_verify,
)


async def test_every_session_and_view_remedy_runs_as_the_identity(leaps_dsn: str) -> None:
    admin_id, _email = await leaps_user(leaps_dsn, "ADMIN")
    identity = LeapsIdentity(admin_id, "ADMIN", "the test approver's account")
    executor = Executor(leaps_dsn)
    gateway = TargetGateway(leaps_dsn)
    victims = Victims(leaps_dsn)
    sleeper_task: asyncio.Task[Any] | None = None
    try:
        ctx = RunContext(gateway, FAST_THRESHOLDS)
        state, outcome = await executor.apply(PROBE, await PROBE.plan(ctx, []), "apv-p1", identity)
        assert state == "done" and outcome.rows == [{"user_id": admin_id, "role": "ADMIN"}]
        assert f"acted as LEAPS user {admin_id} (ADMIN" in outcome.summary
        state, outcome = await executor.apply(PROBE, await PROBE.plan(ctx, []), "apv-p2")
        assert outcome.rows == [{"user_id": None, "role": None}]
        assert "acted as no LEAPS user" in outcome.summary

        plan = await REFRESH_VIEWS.plan(ctx, ["leaderboard_totals"])
        state, outcome = await executor.apply(REFRESH_VIEWS, plan, "apv-s1", identity)
        assert state == "done", outcome

        (idle,) = await victims.open(1)
        await asyncio.sleep(0.2)
        plan = await KILL_IDLE.plan(ctx, ["0"])
        assert [int(t["pid"]) for t in plan.targets] == [idle]
        state, outcome = await executor.apply(KILL_IDLE, plan, "apv-s2", identity)
        assert state == "done" and await victims.alive() == set(), outcome

        (busy,) = await victims.open(1)
        sleeper = victims.conns[-1]
        sleeper_task = asyncio.create_task(sleeper.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        plan = await CANCEL.plan(ctx, [str(busy)])
        state, outcome = await executor.apply(CANCEL, plan, "apv-s3", identity)
        assert state == "done", outcome
        with pytest.raises(psycopg.errors.QueryCanceled):
            await sleeper_task
        plan = await TERMINATE.plan(ctx, [str(busy)])
        state, outcome = await executor.apply(TERMINATE, plan, "apv-s4", identity)
        assert state == "done", outcome
        for _ in range(50):
            if busy not in await victims.alive():
                break
            await asyncio.sleep(0.05)
        assert busy not in await victims.alive()
    finally:
        if sleeper_task is not None and not sleeper_task.done():
            sleeper_task.cancel()
        await victims.close()
        await gateway.close()


def test_service_identity_comes_from_settings(fake_slack: FakeSlack) -> None:
    plain = bot_settings("postgresql://x@localhost/db", fake_slack)
    assert plain.service_identity is None
    served = bot_settings(
        "postgresql://x@localhost/db",
        fake_slack,
        remedy_service_user_id="c0ops",
        remedy_service_role="reviewer",
    )
    assert served.service_identity == LeapsIdentity(
        "c0ops", "REVIEWER", "service identity REMEDY_SERVICE_USER_ID"
    )
    with pytest.raises(ValueError, match="unknown role"):
        bot_settings("postgresql://x@localhost/db", fake_slack, remedy_service_role="ROOT")
