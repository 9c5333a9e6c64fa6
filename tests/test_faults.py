"""Faults around the bot: the target or the state store going away, Slack refusing calls,
the Socket Mode connection dropping. Each runs the real service against real servers;
the PostgreSQL servers that are stopped here are the tests' own, never the shared one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from bot.embedded_pg import EmbeddedPostgres
from bot.slack.server import connect_socket, slack_bot
from commands.fixture.seed import build_fixture
from tests.conftest import TEST_REVIEWERS, RunningBot, bot_settings, running_bot
from tests.fakeslack import Call, FakeSlack, make_envelope
from tests.test_approvals import Victims, button_value, press, request, settle

USER = "U0ONCALL"
ADMIN = "U0LEAD"
CHANNEL = "C0INCIDENT"
# The users these tests diagnose as are REVIEWERs: every command's role is enforced.
DIAGNOSERS = ("U0FIRST", "U0DURING", "U0AFTER", "U0DIAG", "U0RATE", "U0BEFORE", "U0AFTERBYE")
ROLES = TEST_REVIEWERS | dict.fromkeys((*DIAGNOSERS, "U0AFTERDROP"), "REVIEWER")
ROLES |= {USER: "ADMIN", ADMIN: "ADMIN"}


@pytest.fixture(scope="module")
def own_pg() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of this module's own, which the tests stop and restart."""
    server = EmbeddedPostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def own_target(own_pg: EmbeddedPostgres) -> str:
    dsn = own_pg.create_database("leaps_faults")
    await build_fixture(dsn, users=50)
    return dsn


def texts_to(fake: FakeSlack, method: str, user: str | None = None) -> list[str]:
    return [
        json.dumps(c.params.get("blocks", "")) + str(c.params.get("text", ""))
        for c in fake.calls_to(method)
        if c.status == 200 and (user is None or c.params.get("user") == user)
    ]


async def reply_to(bot: RunningBot, user: str, count: int = 1) -> list[Call]:
    """The replies `user` got (ephemeral post or response_url) once `count` arrived."""

    def mine(c: Call) -> bool:
        return c.status == 200 and (
            c.params.get("user") == user or c.path.endswith(f"/response/{user}")
        )

    for _ in range(300):
        calls = [
            c
            for c in bot.fake.calls
            if c.method in ("chat.postEphemeral", "response_url") and mine(c)
        ]
        if len(calls) >= count and len(bot.service.tracker) == 0:
            return calls
        await asyncio.sleep(0.05)
    raise AssertionError(f"{user} got no reply; calls: {[c.summary() for c in bot.fake.calls]}")


async def waiting_on_lock(dsn: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'dbops-bot' AND wait_event_type = 'Lock'"
        )
        row = await cur.fetchone()
        return bool(row and row[0])


async def test_target_stopped_mid_command_then_restarted_the_pool_recovers(
    own_pg: EmbeddedPostgres, own_target: str, fake_slack: FakeSlack
) -> None:
    settings = bot_settings(
        own_target,
        fake_slack,
        role_map=ROLES,
        coalesce_s=0,
        lock_timeout_ms=20_000,
        check_timeout_ms=25_000,
    )
    async with running_bot(settings, fake_slack) as bot:
        assert (await bot.slash("health", user="U0FIRST")).status == 200
        (first,) = await reply_to(bot, "U0FIRST")
        assert "database connection failed" not in json.dumps(first.params)

        # A check of the next run waits on a lock another session holds; the server stops.
        holder = await psycopg.AsyncConnection.connect(own_target)
        await holder.execute("LOCK TABLE _prisma_migrations IN ACCESS EXCLUSIVE MODE")
        assert (await bot.slash("health", user="U0DURING")).status == 200
        for _ in range(200):
            if await waiting_on_lock(own_target):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no health check waited on the lock")
        await asyncio.to_thread(own_pg.pause)
        try:
            (during,) = await reply_to(bot, "U0DURING")
        finally:
            await asyncio.to_thread(own_pg.resume)
            await holder.close()
        during_text = json.dumps(during.params)
        assert "database connection failed" in during_text or "unreachable" in during_text
        assert "Something went wrong" not in during_text

        # Same process, same pool: the next command is answered from the restarted server.
        assert (await bot.slash("health", user="U0AFTER")).status == 200
        (after,) = await reply_to(bot, "U0AFTER")
        after_text = json.dumps(after.params)
        assert "database connection failed" not in after_text
        assert "no database connection" not in after_text
        assert "reachability" in after_text


async def test_state_store_unreachable_remedies_refused_diagnostics_answer(
    own_pg: EmbeddedPostgres, leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    """The approvals live in the state store: without it a remedy is refused (fail closed),
    while diagnostics, which need only the target, still answer."""
    state_url = own_pg.create_database("state_faults")
    victims = Victims(leaps_dsn)
    settings = bot_settings(
        leaps_dsn, fake_slack, state_database_url=state_url, role_map=ROLES, coalesce_s=0
    )
    try:
        pids = await victims.open(2)
        await asyncio.sleep(0.3)
        async with running_bot(settings, fake_slack) as bot:
            await settle(bot)  # the start-up recovery pass has read the store
            await asyncio.to_thread(own_pg.pause)
            try:
                assert (await bot.slash("kill-idle 0", channel=CHANNEL, user=USER)).status == 200
                (refusal,) = await reply_to(bot, USER)
                assert (await bot.slash("health", user="U0DIAG")).status == 200
                (report,) = await reply_to(bot, "U0DIAG")
            finally:
                await asyncio.to_thread(own_pg.resume)
            text = json.dumps(refusal.params)
            assert "state store" in text and "nothing was changed" in text, text
            assert "Something went wrong" not in text
            assert "reachability" in json.dumps(report.params)
            # Nothing was posted for approval and nothing ran.
            assert not fake_slack.calls_to("chat.postMessage")
            assert await victims.alive() == set(pids)
            assert bot.service.store is not None
            actions = [e.action for e in await bot.service.store.audit_trail(limit=100)]
            assert "remedy.executed" not in actions and "approval.requested" not in actions
    finally:
        await victims.close()


async def test_slack_429_and_500_every_message_arrives_once(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    """The SDK's retry handlers ride out rate limits (after Retry-After) and server errors;
    the bot sends nothing twice on top of them."""
    victims = Victims(leaps_dsn)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    try:
        await victims.open(1)
        await asyncio.sleep(0.3)
        async with running_bot(settings, fake_slack) as bot:
            fake_slack.fail_next("chat.postEphemeral", status=429, retry_after=1)
            fake_slack.fail_next("chat.postEphemeral", status=500)
            assert (await bot.slash("health", user="U0RATE")).status == 200
            await reply_to(bot, "U0RATE")
            tries = fake_slack.calls_to("chat.postEphemeral")
            assert [c.status for c in tries] == [429, 500, 200]
            assert tries[1].at - tries[0].at >= 0.9  # Retry-After was honoured
            assert not fake_slack.calls_to("response_url")  # no second copy by the fallback

            fake_slack.fail_next("chat.postMessage", status=500)
            fake_slack.fail_next("chat.postMessage", status=429, retry_after=1)
            plan = await request(bot, "kill-idle 0", user=USER)
            fake_slack.fail_next("chat.update", status=429, retry_after=1)
            fake_slack.fail_next("chat.update", status=503)
            await press(bot, plan, ADMIN)
            await settle(bot)
            assert await victims.alive() == set()
            posted = [c for c in fake_slack.calls_to("chat.postMessage") if c.status == 200]
            assert len(posted) == 2  # the parent and the plan in its thread, once each
            assert [c.status for c in fake_slack.calls_to("chat.postMessage")] == [
                500, 429, 200, 200
            ]  # fmt: skip
            in_channel = [key for key in fake_slack.messages if key[0] == CHANNEL]
            assert len(in_channel) == 2
            final = fake_slack.message(CHANNEL, str(plan.response["ts"]))
            assert final is not None and "done" in json.dumps(final.get("blocks"))
            assert button_value(plan)  # the plan that was approved carried its buttons
            assert bot.service.store is not None
            actions = [e.action for e in await bot.service.store.audit_trail(limit=100)]
            assert actions.count("remedy.executed") == 1
    finally:
        await victims.close()


def socket_command(fake: FakeSlack, user: str) -> dict[str, Any]:
    return make_envelope(
        "slash_commands",
        {
            "command": "/db",
            "text": "health",
            "user_id": user,
            "channel_id": "C0SOCKET",
            "team_id": "T0001",
            "response_url": fake.response_url(user),
        },
    )


async def answered_over_socket(fake: FakeSlack, user: str) -> None:
    envelope = socket_command(fake, user)
    await fake.send_socket_envelope(envelope)
    await fake.wait_for_socket_ack(str(envelope["envelope_id"]), timeout=15)
    await fake.wait_for(
        "chat.postEphemeral", timeout=20, predicate=lambda c: c.params.get("user") == user
    )


async def test_socket_mode_connection_dropped_the_bot_reconnects(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    settings = bot_settings(leaps_dsn, fake_slack, slack_app_token="xapp-1-test", role_map=ROLES)
    async with slack_bot(settings) as bot:
        handler = await connect_socket(bot, "xapp-1-test")
        try:
            await answered_over_socket(fake_slack, "U0BEFORE")

            # Slack's own goodbye (it refreshes connections every few hours) ...
            await fake_slack.disconnect_sockets()
            await fake_slack.wait_for("apps.connections.open", count=2, timeout=20)
            await answered_over_socket(fake_slack, "U0AFTERBYE")

            # ... and a connection that just dies, without a word.
            await fake_slack.drop_sockets()
            await fake_slack.wait_for("apps.connections.open", count=3, timeout=30)
            await answered_over_socket(fake_slack, "U0AFTERDROP")
        finally:
            await handler.close_async()  # type: ignore[no-untyped-call]
            await asyncio.sleep(0)
