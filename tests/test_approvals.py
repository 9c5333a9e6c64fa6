"""The approval flow over real Slack plumbing: signed slash commands and button clicks
into the running bot, a real PostgreSQL target, the bot's own state store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest_asyncio

from bot.embedded_pg import password_sql, role_dsn
from tests.conftest import RunningBot, bot_settings, running_bot
from tests.fakeslack import Call, FakeSlack
from tests.slackreq import action_body, signed_headers

REQUESTER, ADMIN, ADMIN2, REVIEWER = "U0REQ", "U0ADMIN", "U0ADMIN2", "U0REVIEW"
ROLES = {REQUESTER: "REVIEWER", ADMIN: "ADMIN", ADMIN2: "ADMIN", REVIEWER: "REVIEWER"}
CHANNEL = "C0INCIDENT"


class Victims:
    """Idle sessions for kill-idle to find, each its own connection."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conns: list[psycopg.AsyncConnection[Any]] = []

    async def open(self, n: int) -> list[int]:
        """Sessions of an ordinary application role: kill-idle spares superusers."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as admin:
            await admin.execute(
                "DO $$ BEGIN CREATE ROLE leaps_app LOGIN;"
                " EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
            await admin.execute(password_sql(admin, "leaps_app", self.dsn))
        opened = []
        for _ in range(n):
            conn = await psycopg.AsyncConnection.connect(
                role_dsn(self.dsn, "leaps_app"),
                application_name="idle-victim",
                autocommit=True,
            )
            self.conns.append(conn)
            opened.append(conn.info.backend_pid)
        return opened

    async def alive(self) -> set[int]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'idle-victim'"
            )
            return {int(r[0]) for r in await cur.fetchall()}

    async def close(self) -> None:
        for conn in self.conns:
            if not conn.closed:
                try:
                    await conn.close()
                except psycopg.Error:
                    pass


@pytest_asyncio.fixture(loop_scope="session")
async def victims(leaps_dsn: str) -> AsyncIterator[Victims]:
    v = Victims(leaps_dsn)
    yield v
    await v.close()


@pytest_asyncio.fixture(loop_scope="session")
async def abot(leaps_dsn: str, fake_slack: FakeSlack) -> AsyncIterator[RunningBot]:
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES, diagnostics_role="REVIEWER")
    async with running_bot(settings, fake_slack) as bot:
        yield bot


def plan_message(fake: FakeSlack) -> Call:
    """The plan posted in the thread (the post that carries buttons)."""
    posts = [c for c in fake.calls_to("chat.postMessage") if c.params.get("thread_ts")]
    assert posts, "no plan was posted in a thread"
    return posts[-1]


def button_value(call: Call) -> str:
    for block in call.params.get("blocks", []):
        if block.get("type") == "actions":
            return str(block["elements"][0]["value"])
    raise AssertionError("the plan has no buttons")


def message_text(fake: FakeSlack, channel: str, ts: str) -> str:
    msg = fake.message(channel, ts)
    assert msg is not None
    return json.dumps(msg.get("blocks", [])) + str(msg.get("text", ""))


async def request(bot: RunningBot, text: str, user: str = REQUESTER) -> Call:
    resp = await bot.slash(text, channel=CHANNEL, user=user)
    assert resp.status == 200
    await bot.fake.wait_for(
        "chat.postMessage", timeout=15, predicate=lambda c: bool(c.params.get("thread_ts"))
    )
    return plan_message(bot.fake)


async def press(
    bot: RunningBot,
    plan: Call,
    user: str,
    action: str = "dbops_approve",
    *,
    value: str | None = None,
    channel: str = CHANNEL,
) -> None:
    ts = str(plan.response["ts"]) if plan.response else ""
    body = action_body(
        action_id=action,
        value=value if value is not None else button_value(plan),
        user=user,
        channel=channel,
        message_ts=ts,
        response_url=bot.fake.response_url(user),
    )
    resp = await bot.http.post(f"{bot.url}/slack/events", data=body, headers=signed_headers(body))
    await resp.read()
    assert resp.status == 200


async def settle(bot: RunningBot) -> None:
    """Wait until the bot's background work (clicks, executions) is finished."""
    for _ in range(200):
        if len(bot.service.tracker) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("background work did not finish")


async def audit_actions(bot: RunningBot) -> list[str]:
    assert bot.service.store is not None
    return [e.action for e in await bot.service.store.audit_trail(limit=500)]


async def test_kill_idle_goes_through_the_whole_flow(abot: RunningBot, victims: Victims) -> None:
    pids = await victims.open(3)
    await asyncio.sleep(0.3)
    plan = await request(abot, "kill-idle 0")
    parent = next(
        c for c in abot.fake.calls_to("chat.postMessage") if not c.params.get("thread_ts")
    )
    assert plan.params["thread_ts"] == parent.response["ts"]
    text = json.dumps(plan.params["blocks"])
    for pid in pids:
        assert str(pid) in text
    assert "pg_terminate_backend" in text
    assert await victims.alive() == set(pids)

    await press(abot, plan, ADMIN)
    await settle(abot)
    assert await victims.alive() == set()
    final = message_text(abot.fake, CHANNEL, str(plan.response["ts"]))
    assert "done" in final and f"<@{ADMIN}>" in final
    assert "dbops_approve" not in final  # buttons gone once decided
    actions = await audit_actions(abot)
    for step in ("approval.requested", "approval.approved", "approval.claimed", "remedy.executed"):
        assert step in actions


async def test_requester_cannot_approve_and_reviewer_is_not_enough(
    abot: RunningBot, victims: Victims
) -> None:
    pids = await victims.open(1)
    await asyncio.sleep(0.3)
    plan = await request(abot, "kill-idle 0")
    await press(abot, plan, REQUESTER)
    await press(abot, plan, REVIEWER)
    await settle(abot)
    told = [c.params["text"] for c in abot.fake.calls_to("chat.postEphemeral")]
    assert any("cannot approve your own request" in t for t in told)
    assert any("needs the role ADMIN" in t for t in told)
    assert await victims.alive() == set(pids)
    assert "approval.refused" in await audit_actions(abot)


async def test_reject_stops_it_and_later_clicks_are_told(
    abot: RunningBot, victims: Victims
) -> None:
    pids = await victims.open(1)
    await asyncio.sleep(0.3)
    plan = await request(abot, "kill-idle 0")
    await press(abot, plan, ADMIN, "dbops_reject")
    await settle(abot)
    await press(abot, plan, ADMIN2)
    await settle(abot)
    assert await victims.alive() == set(pids)
    final = message_text(abot.fake, CHANNEL, str(plan.response["ts"]))
    assert "rejected" in final
    told = [c.params["text"] for c in abot.fake.calls_to("chat.postEphemeral")]
    assert any("was rejected" in t for t in told)


async def test_tampered_and_replayed_buttons_change_nothing(
    abot: RunningBot, victims: Victims
) -> None:
    pids = await victims.open(1)
    await asyncio.sleep(0.3)
    plan = await request(abot, "kill-idle 0")
    value = button_value(plan)
    approval_id = value.split(".")[0]
    await press(abot, plan, ADMIN, value=approval_id + ".0000forged0000")
    await press(abot, plan, ADMIN, value="apv-000000000000." + value.split(".")[1])
    await press(abot, plan, ADMIN, channel="C0ELSEWHERE")
    await settle(abot)
    assert await victims.alive() == set(pids)
    assert (await audit_actions(abot)).count("payload.tampered") == 3
    assert abot.service.store is not None
    approval = await abot.service.store.get_approval(approval_id)
    assert approval is not None and approval.state == "pending"
    # the genuine button still works afterwards
    await press(abot, plan, ADMIN)
    await settle(abot)
    assert await victims.alive() == set()


async def test_two_distinct_approvers_when_policy_says_two(
    leaps_dsn: str, fake_slack: FakeSlack, victims: Victims
) -> None:
    settings = bot_settings(
        leaps_dsn,
        fake_slack,
        role_map=ROLES,
        remedy_policies={"kill-idle": {"approvers": 2}},
    )
    async with running_bot(settings, fake_slack) as bot:
        pids = await victims.open(2)
        await asyncio.sleep(0.3)
        plan = await request(bot, "kill-idle 0")
        await press(bot, plan, ADMIN)
        await settle(bot)
        await press(bot, plan, ADMIN)  # the same person twice counts once
        await settle(bot)
        assert await victims.alive() == set(pids)
        middle = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "1 more of 2" in middle
        await press(bot, plan, ADMIN2)
        await settle(bot)
        assert await victims.alive() == set()


async def test_expired_approval_refuses(
    leaps_dsn: str, fake_slack: FakeSlack, victims: Victims
) -> None:
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES, approval_ttl_s=0.5)
    async with running_bot(settings, fake_slack) as bot:
        pids = await victims.open(1)
        await asyncio.sleep(0.3)
        plan = await request(bot, "kill-idle 0")
        await asyncio.sleep(0.8)
        await press(bot, plan, ADMIN)
        await settle(bot)
        assert await victims.alive() == set(pids)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "expired" in final
        assert "approval.expired" in await audit_actions(bot)


async def test_unauthorised_requester_and_wrong_channel(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    settings = bot_settings(
        leaps_dsn,
        fake_slack,
        role_map={"U0NOBODY": "PARTICIPANT"},
        diagnostics_role="REVIEWER",
        allowed_channels=[CHANNEL],
    )
    async with running_bot(settings, fake_slack) as bot:
        resp = await bot.slash("kill-idle 0", channel=CHANNEL, user="U0NOBODY")
        assert resp.status == 200
        (refusal,) = await fake_slack.wait_for("response_url", timeout=10)
        assert "You need the role REVIEWER" in refusal.params["text"]
        elsewhere = await bot.slash("health", channel="C0RANDOM", user="U0NOBODY")
        assert elsewhere.status == 200
        answers = await fake_slack.wait_for("response_url", count=2, timeout=10)
        assert "does not answer in this channel" in answers[1].params["text"]
        await settle(bot)
        assert not fake_slack.calls_to("chat.postMessage")


async def test_concurrent_refresh_runs_without_approval_and_is_logged(abot: RunningBot) -> None:
    """Every view has its unique index: CONCURRENTLY for all, so a REVIEWER runs it at once."""
    plan = await request(abot, "refresh-views")
    await settle(abot)
    final = message_text(abot.fake, CHANNEL, str(plan.response["ts"]) if plan.response else "")
    assert "done" in final and "dbops_approve" not in final
    assert abot.service.store is not None
    approvals = [e for e in await abot.service.store.audit_trail(limit=50)]
    assert [e.action for e in approvals][-1] == "remedy.executed"
    log = await abot.service.store.last_refreshes()
    assert len(log) == 6 and all(e.mode == "concurrently" and e.error is None for e in log.values())

    abot.fake.reset()
    await abot.slash("views", channel=CHANNEL, user=REQUESTER)
    (report,) = await abot.fake.wait_for("chat.postEphemeral", timeout=15)
    assert "last refreshed by the bot" in json.dumps(report.params["blocks"])


async def test_plain_refresh_waits_for_an_admin(abot: RunningBot, faults: Any) -> None:
    await faults.unpopulated_view("leaderboard_totals")
    plan = await request(abot, "refresh-views leaderboard_totals")
    text = json.dumps(plan.params["blocks"])
    assert "blocks every reader" in text and "dbops_approve" in text
    await press(abot, plan, ADMIN)
    await settle(abot)
    async with await psycopg.AsyncConnection.connect(abot.service.settings.database_url or "") as c:
        cur = await c.execute(
            "SELECT ispopulated FROM pg_matviews WHERE matviewname = 'leaderboard_totals'"
        )
        assert (await cur.fetchone()) == (True,)
    assert abot.service.store is not None
    log = await abot.service.store.last_refreshes()
    assert log["public.leaderboard_totals"].mode == "plain"
    assert log["public.leaderboard_totals"].rows
