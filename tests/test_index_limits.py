"""The "limits" line of create-index and drop-index plans says how the statement really
runs (CONCURRENTLY, outside any transaction, on its own session, with the executor's
timeouts, and what a failure leaves), not the executor's usual "one transaction"."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest_asyncio

from bot.approvals.executor import Executor
from bot.gateway import TargetGateway
from bot.messages.render import PLAIN, plan_text
from bot.router import RunContext
from commands.fixture.faults import FaultInjector
from commands.remedies.base import REMEDIES
from commands.remedies.indexes import CREATE_INDEX, DROP_INDEX
from tests.conftest import FAST_THRESHOLDS, bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import CHANNEL, message_text, request

REQUESTER, ADMIN = "U0REQ", "U0ADMIN"
ROLES = {REQUESTER: "REVIEWER", ADMIN: "ADMIN"}
NEWEST = "points_ledger_by_user_newest"
DUPLICATE = "submissions_user_id_copy_idx"


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn)
    yield RunContext(gateway, FAST_THRESHOLDS)
    await gateway.close()


def limits_line(text: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("limits: ")]
    return line


async def test_create_index_plan_says_it_builds_outside_a_transaction(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.drop_index("points_ledger_user_id_created_at_idx")
    plan = await CREATE_INDEX.plan(ctx, [NEWEST])
    executor = Executor(leaps_dsn, statement_timeout_ms=45_000, lock_timeout_ms=1_500)
    line = limits_line(plan_text(plan, executor.limits_for(plan), PLAIN))
    assert "one transaction" not in line
    assert line.startswith("limits: CREATE INDEX CONCURRENTLY outside any transaction")
    assert "INVALID index it leaves is dropped with DROP INDEX CONCURRENTLY" in line
    assert line.endswith("statement_timeout 45000 ms, lock_timeout 1500 ms")


async def test_drop_index_plan_says_so_too_and_other_remedies_keep_one_transaction(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.duplicate_index()
    plan = await DROP_INDEX.plan(ctx, [DUPLICATE])
    executor = Executor(leaps_dsn)
    line = limits_line(plan_text(plan, executor.limits_for(plan), PLAIN))
    assert line.startswith("limits: DROP INDEX CONCURRENTLY outside any transaction")
    assert "one transaction" not in line and "lock_timeout 2000 ms" in line
    other = await REMEDIES["refresh-views"].plan(ctx, [])
    assert not other.limits
    assert executor.limits_for(other) == executor.limits
    assert executor.limits.startswith("one transaction; statement_timeout 60000 ms")


async def test_the_approval_request_over_slack_shows_the_real_limits(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    async with FaultInjector(leaps_dsn) as inj:
        await inj.drop_index("points_ledger_user_id_created_at_idx")
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, f"create-index {NEWEST}")
        text = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))  # blocks as JSON
        found = re.search(r"limits: ([^\\\n]*)", text)
        assert found is not None, text
        shown = found.group(1)
        assert "CREATE INDEX CONCURRENTLY outside any transaction" in shown
        assert "one transaction" not in shown
        assert f"statement_timeout {settings.remedy_statement_timeout_ms} ms" in text
