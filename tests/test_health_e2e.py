"""`/db health` end to end: signed HTTP into the real Bolt app, a real PostgreSQL with
injected faults, and the reply as the fake Slack Web API received it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from commands.fixture.faults import FaultInjector
from tests.conftest import RunningBot, bot_settings, running_bot
from tests.fakeslack import Call, FakeSlack

DEMO_FAULT_CHECKS = {
    "idle in transaction",
    "blocked sessions",
    "materialized views",
    "migrations",
    "guard: AMPLIFY quota trigger",
}


def section_texts(call: Call) -> list[str]:
    return [b["text"]["text"] for b in call.params.get("blocks", []) if b.get("type") == "section"]


def crit_checks(call: Call) -> set[str]:
    """The check names that a posted message shows as CRIT."""
    found = set()
    for text in section_texts(call):
        first = text.splitlines()[0]
        if "*CRIT" in first:
            found.add(first.split("CRIT", 1)[1].strip(" *"))
    return found


async def test_health_posts_crit_findings_of_injected_faults(
    bot: RunningBot, faults: FaultInjector
) -> None:
    injected = await faults.inject_demo_faults()
    await asyncio.sleep(1.2)  # past the lowered thresholds
    started = time.perf_counter()
    resp = await bot.slash("health")
    ack_s = time.perf_counter() - started
    assert resp.status == 200
    assert ack_s < 3.0, "Slack drops commands not acknowledged within 3 s"
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    assert call.params["channel"] == "C0GENERAL"
    assert call.params["user"] == "U0ALICE"
    assert crit_checks(call) == DEMO_FAULT_CHECKS
    text = "\n".join(section_texts(call))
    chain = injected["blocking_chain"]
    assert isinstance(chain, dict)
    assert f"{chain['holder']} ← {chain['blocked']} ← {chain['second_blocked']}" in text
    assert f"pid {injected['idle_in_transaction_pid']}" in text
    assert "leaderboard_totals" in text
    assert "disabled" in text
    assert "failed" in text
    # worst first: every CRIT section comes before any OK one
    statuses = [t.splitlines()[0] for t in section_texts(call)]
    last_crit = max(i for i, s in enumerate(statuses) if "CRIT" in s)
    first_ok = min(i for i, s in enumerate(statuses) if "*OK" in s)
    assert last_crit < first_ok


async def test_incident_channel_gets_the_report_in_channel(
    leaps_dsn: str, fake_slack: FakeSlack, faults: FaultInjector
) -> None:
    await faults.disable_quota_trigger()
    settings = bot_settings(leaps_dsn, fake_slack, incident_channels=["C0INCIDENT"])
    async with running_bot(settings, fake_slack) as bot:
        resp = await bot.slash("health", channel="C0INCIDENT")
        assert resp.status == 200
        (call,) = await fake_slack.wait_for("chat.postMessage", timeout=15)
    assert call.params["channel"] == "C0INCIDENT"
    assert crit_checks(call) == {"guard: AMPLIFY quota trigger"}
    assert not fake_slack.calls_to("chat.postEphemeral")


async def test_bad_signature_and_stale_timestamp_are_refused(bot: RunningBot) -> None:
    forged = await bot.slash("health", secret="not-the-secret")
    assert forged.status == 401
    stale = await bot.slash("health", timestamp=int(time.time()) - 6 * 60)
    assert stale.status == 401
    await asyncio.sleep(0.3)
    assert not bot.fake.calls_to("chat.postEphemeral")
    assert not bot.fake.calls_to("chat.postMessage")


async def private_answer(bot: RunningBot, text: str, user: str) -> Call:
    """The command is acknowledged with an empty 200; the answer follows on response_url."""
    resp = await bot.slash(text, user=user)
    assert resp.status == 200
    assert await resp.text() == ""
    (call,) = await bot.fake.wait_for(
        "response_url", timeout=10, predicate=lambda c: c.path.endswith("/" + user)
    )
    return call


async def test_help_and_unknown_command_get_a_private_answer(bot: RunningBot) -> None:
    listing = await private_answer(bot, "", "U0HELP1")
    assert "/db health" in listing.params["text"]
    assert "kill-idle" in listing.params["text"]
    assert listing.params["response_type"] == "ephemeral"
    again = await private_answer(bot, "help", "U0HELP2")
    assert again.params["text"] == listing.params["text"]

    answer = await private_answer(bot, "heatlh now", "U0TYPO")
    assert answer.params["response_type"] == "ephemeral"
    assert "unknown command `heatlh`" in answer.params["text"]
    assert "`health`" in answer.params["text"] and "/db health" in answer.params["text"]
    assert not bot.fake.calls_to("chat.postEphemeral")


async def test_usage_error_is_one_clear_message(bot: RunningBot) -> None:
    resp = await bot.slash("health extra")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("response_url", timeout=10)
    assert "takes no arguments" in call.params["text"]
    assert "Usage: `/db health [--exact]`" in call.params["text"]


async def test_target_down_gives_a_clear_message_within_5s(
    pg_dsn_factory: Any, fake_slack: FakeSlack
) -> None:
    settings = bot_settings(
        "postgresql://postgres:hunter2secret@127.0.0.1:9/leaps", fake_slack, connect_timeout_s=2.0
    )
    async with running_bot(settings, fake_slack) as bot:
        started = time.perf_counter()
        resp = await bot.slash("health")
        assert resp.status == 200
        (call,) = await fake_slack.wait_for("chat.postEphemeral", timeout=5)
        assert time.perf_counter() - started < 5
        # the bot is still up and answers the next request
        health = await bot.http.get(f"{bot.url}/healthz")
        assert health.status == 200
    text = "\n".join(section_texts(call))
    assert "cannot connect to 127.0.0.1:9/leaps" in text
    assert crit_checks(call) == {"reachability"}
    assert "hunter2secret" not in json.dumps(call.params)


async def test_rate_limited_post_is_retried(bot: RunningBot) -> None:
    bot.fake.fail_next("chat.postEphemeral", status=429, times=1, retry_after=1)
    resp = await bot.slash("health")
    assert resp.status == 200
    calls = await bot.fake.wait_for("chat.postEphemeral", count=2, timeout=15)
    assert len(calls) == 2  # one 429, one retry that went through
    assert not bot.fake.calls_to("response_url")


async def test_slack_refusing_the_post_falls_back_to_response_url(bot: RunningBot) -> None:
    bot.fake.fail_next("chat.postEphemeral", status=500, times=10)
    resp = await bot.slash("health")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("response_url", timeout=20)
    assert call.params["response_type"] == "ephemeral"
    assert any("reachability" in b["text"]["text"] for b in call.params["blocks"] if "text" in b)


async def test_metrics_and_healthz(bot: RunningBot) -> None:
    await bot.slash("health")
    await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    await asyncio.sleep(0.1)
    async with bot.http.get(f"{bot.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert 'dbops_commands_total{command="health",outcome="ok"}' in text
    assert "dbops_command_seconds_bucket" in text
    async with bot.http.get(f"{bot.url}/healthz") as resp:
        assert (await resp.json())["status"] == "ok"


async def test_burst_of_health_commands_shares_one_run(bot: RunningBot) -> None:
    async def one(i: int) -> aiohttp.ClientResponse:
        return await bot.slash("health", user=f"U{i:04d}")

    responses = await asyncio.gather(*(one(i) for i in range(20)))
    assert all(r.status == 200 for r in responses)
    calls = await bot.fake.wait_for("chat.postEphemeral", count=20, timeout=20)
    assert {c.params["user"] for c in calls} == {f"U{i:04d}" for i in range(20)}
    assert bot.service.dispatcher.runs["health"] == 1
