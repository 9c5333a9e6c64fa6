"""Exactly-once across processes and restarts: real `python -m bot serve` processes
sharing one PostgreSQL state store, clicked at through signed HTTP requests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bot.state import open_store
from tests.botproc import free_port, output_file, wait_healthy
from tests.fakeslack import Call, FakeSlack
from tests.slackreq import SIGNING_SECRET, action_body, signed_headers, slash_body
from tests.test_approvals import CHANNEL, Victims, button_value

ROOT = Path(__file__).resolve().parent.parent
ADMINS = [f"U0ADM{i:03d}" for i in range(50)]
REQUESTER = "U0REQ"


@dataclass
class BotProcess:
    proc: asyncio.subprocess.Process
    url: str


@asynccontextmanager
async def bot_process(
    target_dsn: str, state_url: str, fake: FakeSlack, **extra: str
) -> AsyncIterator[BotProcess]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "THRESHOLDS"))},
        "SLACK_BOT_TOKEN": "xoxb-test",
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": fake.api_url,
        "DATABASE_URL": target_dsn,
        "STATE_DATABASE_URL": state_url,
        "ROLE_MAP": json.dumps({REQUESTER: "REVIEWER", **dict.fromkeys(ADMINS, "ADMIN")}),
        "LOG_LEVEL": "WARNING",
        **extra,
    }
    with output_file("output of a python -m bot serve process") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "serve", "--port", str(port), "--host", "127.0.0.1",
            cwd=ROOT, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        async with _running(proc, f"http://127.0.0.1:{port}") as running:
            yield running


@asynccontextmanager
async def _running(proc: asyncio.subprocess.Process, url: str) -> AsyncIterator[BotProcess]:
    try:
        await wait_healthy(url, proc)
        yield BotProcess(proc, url)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def post(url: str, body: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/slack/events", data=body, headers=signed_headers(body)) as resp,
    ):
        await resp.read()
        return resp.status


async def request_plan(bot: BotProcess, fake: FakeSlack, text: str) -> Call:
    body = slash_body(text, channel=CHANNEL, user=REQUESTER, response_url=fake.response_url("r"))
    assert await post(bot.url, body) == 200
    (plan,) = await fake.wait_for(
        "chat.postMessage", timeout=20, predicate=lambda c: bool(c.params.get("thread_ts"))
    )
    return plan


def click(plan: Call, user: str, fake: FakeSlack) -> str:
    return action_body(
        action_id="dbops_approve",
        value=button_value(plan),
        user=user,
        channel=CHANNEL,
        message_ts=str(plan.response["ts"]) if plan.response else "",
        response_url=fake.response_url(user),
    )


async def wait_until(check: Callable[[], object], limit_s: float = 20) -> None:
    for _ in range(int(limit_s / 0.1)):
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def test_fifty_concurrent_approvals_on_two_processes_execute_once(
    leaps_dsn: str, pg_dsn_factory: Callable[[str], str], fake_slack: FakeSlack
) -> None:
    state_url = pg_dsn_factory("state")
    victims = Victims(leaps_dsn)
    try:
        await victims.open(3)
        await asyncio.sleep(0.3)
        async with (
            bot_process(leaps_dsn, state_url, fake_slack) as one,
            bot_process(leaps_dsn, state_url, fake_slack) as two,
        ):
            plan = await request_plan(one, fake_slack, "kill-idle 0")
            bodies = [
                (one if i % 2 else two, click(plan, admin, fake_slack))
                for i, admin in enumerate(ADMINS)
            ]
            statuses = await asyncio.gather(*(post(b.url, body) for b, body in bodies))
            assert statuses == [200] * 50
            store = await open_store(state_url)
            try:

                async def finished() -> bool:
                    trail = [e.action for e in await store.audit_trail(limit=1000)]
                    return "remedy.executed" in trail

                await wait_until(finished)
                await asyncio.sleep(2.0)  # let every other click be answered
                trail = [e.action for e in await store.audit_trail(limit=1000)]
            finally:
                await store.close()
        assert trail.count("approval.claimed") == 1
        assert trail.count("remedy.executed") == 1
        assert await victims.alive() == set()
        told = {
            c.params["user"]: c.params["text"] for c in fake_slack.calls_to("chat.postEphemeral")
        }
        assert len(told) >= 49, told
        assert all("already" in t and "<@U0ADM" in t for t in told.values()), told
    finally:
        await victims.close()


async def test_killed_process_leaves_pending_approvals_to_the_next(
    leaps_dsn: str, pg_dsn_factory: Callable[[str], str], fake_slack: FakeSlack
) -> None:
    state_url = pg_dsn_factory("state")
    victims = Victims(leaps_dsn)
    try:
        pids = await victims.open(2)
        await asyncio.sleep(0.3)
        async with bot_process(leaps_dsn, state_url, fake_slack) as first:
            plan = await request_plan(first, fake_slack, "kill-idle 0")
            first.proc.kill()  # no clean shutdown
            await first.proc.wait()
        assert await victims.alive() == set(pids)
        async with bot_process(leaps_dsn, state_url, fake_slack) as second:
            assert await post(second.url, click(plan, ADMINS[0], fake_slack)) == 200

            async def gone() -> bool:
                return await victims.alive() == set()

            await wait_until(gone)
    finally:
        await victims.close()


async def test_approved_but_unclaimed_is_completed_at_start_and_expired_refuses(
    leaps_dsn: str, pg_dsn_factory: Callable[[str], str], fake_slack: FakeSlack
) -> None:
    """A process that died between the decision and the claim: the next one finishes it;
    an approval that expired meanwhile is refused."""
    state_url = pg_dsn_factory("state")
    victims = Victims(leaps_dsn)
    try:
        await victims.open(1)
        await asyncio.sleep(0.3)
        async with bot_process(leaps_dsn, state_url, fake_slack, APPROVAL_TTL_S="60") as first:
            plan = await request_plan(first, fake_slack, "kill-idle 0")
            approval_id = button_value(plan).split(".")[0]
            first.proc.kill()
            await first.proc.wait()
        store = await open_store(state_url)
        try:
            await store.record_decision(
                approval_id, user_id=ADMINS[1], user_name="a1", role="ADMIN", decision="approve"
            )
        finally:
            await store.close()
        async with bot_process(leaps_dsn, state_url, fake_slack):

            async def gone() -> bool:
                return await victims.alive() == set()

            await wait_until(gone)

        more = await victims.open(1)
        await asyncio.sleep(0.3)
        fake_slack.reset()
        async with bot_process(leaps_dsn, state_url, fake_slack, APPROVAL_TTL_S="1") as third:
            plan = await request_plan(third, fake_slack, "kill-idle 0")
            third.proc.kill()
            await third.proc.wait()
        await asyncio.sleep(1.5)
        async with bot_process(leaps_dsn, state_url, fake_slack, APPROVAL_TTL_S="1") as fourth:
            assert await post(fourth.url, click(plan, ADMINS[2], fake_slack)) == 200
            await fake_slack.wait_for(
                "chat.postEphemeral", timeout=15, predicate=lambda c: "expired" in c.params["text"]
            )
        assert await victims.alive() == set(more)
    finally:
        await victims.close()
