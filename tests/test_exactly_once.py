"""Exactly once, to the end: an approval whose process dies (kill -9) or is stopped
(SIGTERM) mid-remedy still ends `done` or `failed`, decided by the remedy's own
verification; a plan Slack would not show is cancelled; the console approves only what
the console requested."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql

from bot.approvals.executor import Executor
from bot.console.console import decide_from_console, request_from_console
from bot.gateway import TargetGateway
from bot.router import RunContext
from bot.state import open_store
from bot.state.store import Approval
from commands.fixture.faults import FaultInjector
from commands.remedies.base import Execution, Plan, Remedy
from commands.remedies.ledger import DEDUPE_EVENTS, RECONCILE_POINTS
from commands.remedies.refresh import REFRESH_VIEWS
from tests.conftest import FAST_THRESHOLDS, bot_settings, running_bot
from tests.fakeslack import Call, FakeSlack
from tests.test_approvals import ADMIN, CHANNEL, REQUESTER, ROLES, press, request, settle
from tests.test_multiprocess import ADMINS, bot_process, click, post, request_plan, wait_until

VIEW = "school_metrics"
Conn = psycopg.AsyncConnection[Any]


@asynccontextmanager
async def view_reader(dsn: str) -> AsyncIterator[Conn]:
    """A session reading the view in an open transaction: a plain refresh waits for it."""
    reader = await psycopg.AsyncConnection.connect(dsn, application_name="slow-reader")
    try:
        await reader.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(VIEW)))
        yield reader
    finally:
        await reader.rollback()
        await reader.close()


async def refresh_waits(dsn: str) -> bool:
    """The remedy's REFRESH is queued behind the reader."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query ILIKE 'REFRESH MATERIALIZED VIEW%%'"
        )
        row = await cur.fetchone()
        return bool(row and row[0])


def approval_id_of(plan: Call) -> str:
    text = json.dumps(plan.params.get("blocks", [])) + str(plan.params.get("text", ""))
    start = text.index("apv-")
    return text[start : start + 16]


def thread_text(fake: FakeSlack, plan: Call) -> str:
    ts = str(plan.response["ts"]) if plan.response else ""
    msg = fake.message(CHANNEL, ts)
    assert msg is not None
    return json.dumps(msg.get("blocks", [])) + str(msg.get("text", ""))


async def test_kill_9_mid_remedy_ends_failed_by_verification_in_a_new_process(
    leaps_dsn: str,
    pg_dsn_factory: Callable[[str], str],
    fake_slack: FakeSlack,
    faults: FaultInjector,
) -> None:
    await faults.drop_view_unique_index(VIEW)  # a plain refresh: it needs approval
    state_url = pg_dsn_factory("state_kill9")
    slow = {
        "REMEDY_STATEMENT_TIMEOUT_MS": "3000",
        "REMEDY_LOCK_TIMEOUT_MS": "600000",
        "SWEEP_INTERVAL_S": "0.5",
        "SWEEP_MARGIN_S": "0.5",
    }
    store = await open_store(state_url)
    try:
        async with view_reader(leaps_dsn):
            async with bot_process(leaps_dsn, state_url, fake_slack, **slow) as first:
                plan = await request_plan(first, fake_slack, f"refresh-views {VIEW}")
                approval_id = approval_id_of(plan)
                assert await post(first.url, click(plan, ADMINS[0], fake_slack)) == 200
                await wait_until(lambda: refresh_waits(leaps_dsn))
                current = await store.get_approval(approval_id)
                assert current is not None and current.state == "executing"
                first.proc.send_signal(signal.SIGKILL)
                await first.proc.wait()
            assert (await store.get_approval(approval_id)).state == "executing"  # type: ignore[union-attr]
            fake_slack.reset()
            async with bot_process(leaps_dsn, state_url, fake_slack, **slow):

                async def decided() -> Approval | None:
                    a = await store.get_approval(approval_id)
                    return a if a is not None and a.is_terminal else None

                await wait_until(decided, limit_s=30)
                final = await decided()
                assert final is not None and final.state == "failed"
                assert final.outcome is not None
                summary = str(final.outcome["summary"])
                assert summary.startswith("process died during execution; verification found")
                assert "did not commit" in summary
                (update,) = await fake_slack.wait_for(
                    "chat.update",  # the plan's; the parent message is updated as well
                    timeout=10,
                    predicate=lambda c: c.params.get("ts") == plan.response["ts"],
                )
                assert "failed" in json.dumps(update.params) and "process died" in json.dumps(
                    update.params
                )
                assert "process died during execution" in thread_text(fake_slack, plan)
        trail = [e.action for e in await store.audit_trail(approval_id)]
        assert trail.count("approval.swept") == 1 and trail[-1] == "remedy.failed"
    finally:
        await store.close()


async def test_sigterm_mid_remedy_ends_failed_with_the_reason(
    leaps_dsn: str, fake_slack: FakeSlack, faults: FaultInjector
) -> None:
    await faults.drop_view_unique_index(VIEW)
    settings = bot_settings(
        leaps_dsn,
        fake_slack,
        role_map=ROLES,
        remedy_statement_timeout_ms=60_000,
        remedy_lock_timeout_ms=60_000,
    )
    async with view_reader(leaps_dsn):
        async with running_bot(settings, fake_slack) as bot:
            plan = await request(bot, f"refresh-views {VIEW}")
            approval_id = approval_id_of(plan)
            await press(bot, plan, ADMIN)
            await wait_until(lambda: refresh_waits(leaps_dsn))
            # leaving the block is the shutdown a SIGTERM starts: drain, then cancel
        store = await open_store(settings.state_database_url)
        try:
            final = await store.get_approval(approval_id)
            trail = [e.action for e in await store.audit_trail(approval_id)]
            journal = (await store.last_refreshes())[f"public.{VIEW}"]
        finally:
            await store.close()
    assert final is not None and final.state == "failed"
    assert final.outcome is not None
    summary = str(final.outcome["summary"])
    assert summary.startswith("interrupted: the bot was stopped; verification found")
    assert trail[-1] == "remedy.failed"
    assert "interrupted: the bot was stopped" in thread_text(fake_slack, plan)
    assert journal.finished_at is not None and journal.error is not None  # the hook ran
    assert journal.error.startswith("interrupted")
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'REFRESH MATERIALIZED%%'"
        )
        assert await cur.fetchone() == (0,)  # the remedy's session did not outlive the bot


async def test_a_plan_slack_refuses_to_show_is_cancelled_and_the_requester_told(
    leaps_dsn: str, fake_slack: FakeSlack, faults: FaultInjector
) -> None:
    await faults.drop_view_unique_index(VIEW)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    async with running_bot(settings, fake_slack) as bot:
        fake_slack.fail_next("chat.postMessage", status=500, times=10)
        resp = await bot.slash(f"refresh-views {VIEW}", channel=CHANNEL, user=REQUESTER)
        assert resp.status == 200
        (told,) = await fake_slack.wait_for(
            "response_url",
            timeout=20,
            predicate=lambda c: "cancelled" in json.dumps(c.params),
        )
        await settle(bot)
        assert bot.service.store is not None
        trail = await bot.service.store.audit_trail(limit=20)
    cancelled = [e for e in trail if e.action == "approval.cancelled"]
    assert len(cancelled) == 1 and cancelled[0].approval_id is not None
    assert cancelled[0].approval_id in json.dumps(told.params)
    store = await open_store(settings.state_database_url)
    try:
        approval = await store.get_approval(cancelled[0].approval_id)
    finally:
        await store.close()
    assert approval is not None and approval.state == "cancelled"
    assert approval.outcome is not None and "could not be posted" in approval.outcome["summary"]


async def test_the_console_approves_only_console_requests(
    leaps_dsn: str, fake_slack: FakeSlack, faults: FaultInjector
) -> None:
    await faults.drop_view_unique_index(VIEW)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, f"refresh-views {VIEW}")
        from_slack = approval_id_of(plan)
        await settle(bot)
    # An ADMIN at the console may not approve what was requested in Slack.
    assert await decide_from_console(settings, from_slack, ADMIN, approve=True) == 2
    # A console request is approvable from the console.
    assert await request_from_console(settings, f"refresh-views {VIEW}", REQUESTER) == 0
    store = await open_store(settings.state_database_url)
    try:
        requested = [
            e
            for e in await store.audit_trail(limit=50)
            if e.action == "approval.requested" and e.approval_id != from_slack
        ]
        assert len(requested) == 1 and requested[0].approval_id is not None
        from_console = requested[0].approval_id
        assert await decide_from_console(settings, from_console, ADMIN, approve=True) == 0
        slack_one = await store.get_approval(from_slack)
        console_one = await store.get_approval(from_console)
        refused = [e for e in await store.audit_trail(from_slack) if e.action == "approval.refused"]
    finally:
        await store.close()
    assert slack_one is not None and slack_one.state == "pending" and slack_one.origin == "slack"
    assert console_one is not None and console_one.state == "done"
    assert console_one.origin == "console"
    assert len(refused) == 1 and refused[0].detail["origin"] == "console"
    assert "was requested in Slack" in refused[0].detail["reason"]


async def test_each_verification_tells_a_committed_change_from_none(
    leaps_dsn: str, faults: FaultInjector
) -> None:
    """Before the remedy runs its verification says `not landed`; after a committed
    execution, `landed`; an aborted (rolled back) one stays `not landed`."""
    await faults.drop_view_unique_index(VIEW)
    await faults.duplicate_external_events(3)
    await faults.missing_awards(2)
    gateway = TargetGateway(leaps_dsn)
    ctx = RunContext(gateway, FAST_THRESHOLDS)
    executor = Executor(leaps_dsn)
    try:
        for n, (remedy, args) in enumerate(
            [(REFRESH_VIEWS, [VIEW]), (DEDUPE_EVENTS, []), (RECONCILE_POINTS, [])]
        ):
            plan = await remedy.plan(ctx, args)
            assert plan.count > 0, remedy.name
            run = Execution(f"apv-verify{n}", ADMIN)

            async def verdict(
                plan: Plan = plan, run: Execution = run, remedy: Remedy = remedy
            ) -> bool:
                v = await gateway.read(lambda db: remedy.verify(db, plan, run))
                return v.landed

            assert not await verdict(), remedy.name
            drifted = plan.model_copy(update={"count": plan.count + 1})
            state, _ = await executor.apply(remedy, drifted, run.approval_id)
            assert state in ("aborted", "failed") and not await verdict(drifted), remedy.name
            state, outcome = await executor.apply(remedy, plan, run.approval_id)
            assert state == "done", outcome
            assert await verdict(), remedy.name
    finally:
        await gateway.close()
