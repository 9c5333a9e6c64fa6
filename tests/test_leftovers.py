"""Leftovers of the last round, each over the real Slack path: an approver's refusal names
where the role came from (and since when, for a last known one); a burst of commands by one
never-seen person costs one role lookup; the two button signers share one keyed MAC."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

import pytest

from bot.access.roles import RoleResolver
from bot.approvals.engine import APPROVE
from bot.gateway import TargetGateway
from bot.messages import render
from bot.messages.keyed_mac import APPROVAL_BUTTON, FULL_TABLE_BUTTON, KeyedMac
from bot.slack.app import make_web_client
from commands.base import REGISTRY, Command, Context, Finding, Reader, Report, Status
from commands.roles import role_for_email
from tests.conftest import RunningBot, bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.slackreq import action_body, signed_headers
from tests.test_approvals import (
    REQUESTER,
    Victims,
    audit_actions,
    button_value,
    press,
    request,
    settle,
)
from tests.test_roles import leaps_email

T = TypeVar("T")

# --- 1. an approver's refusal names the role's origin ------------------------------------


async def test_an_approver_refusal_names_where_the_role_came_from(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    reviewer_email = await leaps_email(leaps_dsn, "REVIEWER")
    fake_slack.add_user("U0LEAPSREV", email=reviewer_email)
    fake_slack.add_user("U0STALE", email="stale@example.org")
    fake_slack.set_usergroup("S0READ", ["U0GRPREV"])
    fake_slack.set_usergroup("S0ONCALL", [])  # U0STALE was on call, is no more known to be
    settings = bot_settings(
        leaps_dsn,
        fake_slack,
        diagnostics_role="REVIEWER",
        role_map={REQUESTER: "REVIEWER", "U0MAPREV": "REVIEWER"},
        role_groups={"S0ONCALL": "ADMIN", "S0READ": "REVIEWER"},
    )
    victims = Victims(leaps_dsn)
    try:
        async with running_bot(settings, fake_slack) as bot:
            store = bot.service.store
            assert store is not None
            since = datetime.now(UTC) - timedelta(hours=3)
            await store.remember_role(
                "U0STALE", role="ADMIN", source="group", detail="S0ONCALL", at=since
            )
            await victims.open(1)
            await asyncio.sleep(0.3)
            plan = await request(bot, "kill-idle 0")
            approval_id = button_value(plan).split(".")[0]

            origins = {
                "U0MAPREV": "(from ROLE_MAP)",
                "U0GRPREV": "(from the Slack user group S0READ)",
                "U0LEAPSREV": "(from the LEAPS users table, by your Slack e-mail)",
            }
            for user in origins:
                await press(bot, plan, user)
            await settle(bot)
            # Slack cannot say now who U0STALE is: the last known role answers, for diagnostics
            fake_slack.fail_next("users.info", status=500, times=3)
            await press(bot, plan, "U0STALE")
            await settle(bot)

            told = {
                str(c.params["user"]): str(c.params.get("text", ""))
                for c in fake_slack.calls_to("chat.postEphemeral")
            }
            for user, origin in origins.items():
                assert told[user] == (
                    f"You cannot approve `{approval_id}`: it needs the role ADMIN, "
                    f"yours is REVIEWER {origin}."
                ), told[user]
            assert told["U0STALE"] == (
                f"You cannot approve `{approval_id}`: it needs the role ADMIN, checked now; "
                f"yours is ADMIN, the last known role from {since:%Y-%m-%d %H:%M} UTC "
                "(from the Slack user group S0ONCALL); it could not be looked up now: Slack "
                "did not answer users.info. A last known role counts for diagnostics only."
            ), told["U0STALE"]

            approval = await store.get_approval(approval_id)
            assert approval is not None and approval.state == "pending"
            trail = await store.audit_trail(approval_id)
            refused = {e.actor_id: e.detail for e in trail if e.action == "approval.refused"}
            assert refused["U0STALE"]["role"] == "PARTICIPANT"  # what counted: not the stale one
            assert "the last known role from" in refused["U0STALE"]["role_origin"]
    finally:
        await victims.close()


# --- 2. a burst by one never-seen person costs one role lookup ---------------------------

PROBE = "burst-probe"


@pytest.fixture
def probe_command() -> Iterator[str]:
    """A cheap diagnostic that needs REVIEWER, registered for one test only."""

    async def diagnose(ctx: Context, args: list[str]) -> Report:
        finding = Finding(check="probe", status=Status.OK, summary="answered")
        return Report(title="Probe", target=ctx.gateway.target, findings=[finding])

    REGISTRY[PROBE] = Command(PROBE, f"/db {PROBE}", "test", "REVIEWER", diagnose)
    try:
        yield PROBE
    finally:
        del REGISTRY[PROBE]


async def test_a_burst_by_a_never_seen_person_looks_the_role_up_once(
    leaps_dsn: str, fake_slack: FakeSlack, probe_command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_slack.add_user("U0BURST", email=await leaps_email(leaps_dsn, "REVIEWER"))
    fake_slack.set_usergroup("S0ONCALL", ["U0SOMEONE"])
    settings = bot_settings(
        leaps_dsn, fake_slack, diagnostics_role="REVIEWER", role_groups={"S0ONCALL": "ADMIN"}
    )
    async with running_bot(settings, fake_slack) as bot:
        # the LEAPS lookups, seen where they reach the target (the gateway itself still reads)
        gateway = bot.service.gateway
        real_read = gateway.read
        lookups: list[str] = []

        async def read(fn: Callable[[Reader], Awaitable[T]]) -> T:
            if isinstance(fn, partial) and fn.func is role_for_email:
                lookups.append(str(fn.args[0]))
            return await real_read(fn)

        monkeypatch.setattr(gateway, "read", read)
        sent = await asyncio.gather(*(bot.slash(probe_command, user="U0BURST") for _ in range(20)))
        assert all(r.status == 200 for r in sent)
        answers = await fake_slack.wait_for(
            "chat.postEphemeral",
            count=20,
            timeout=30,
            predicate=lambda c: c.params.get("user") == "U0BURST",
        )
        await settle(bot)
        assert len(answers) == 20
        assert all("answered" in str(a.params.get("blocks")) for a in answers)
        assert not fake_slack.calls_to("response_url")  # nobody was refused
        assert [c.params["user"] for c in fake_slack.calls_to("users.info")] == ["U0BURST"]
        assert len(fake_slack.calls_to("usergroups.users.list")) == 1
        assert len(lookups) == 1
        resolved = await bot.service.roles.resolve("U0BURST")
        assert (resolved.role, resolved.source, resolved.stale) == ("REVIEWER", "leaps", False)


async def test_a_failed_lookup_is_shared_by_the_burst_waiting_for_it(
    leaps_dsn: str, fake_slack: FakeSlack, probe_command: str
) -> None:
    """Slack failing for a burst: one users.info (and the SDK's retries), every command
    refused with the reason."""
    fake_slack.add_user("U0BURST", email=await leaps_email(leaps_dsn, "REVIEWER"))
    settings = bot_settings(leaps_dsn, fake_slack, diagnostics_role="REVIEWER")
    async with running_bot(settings, fake_slack) as bot:
        fake_slack.fail_next("users.info", status=500, times=3)  # the first try and 2 retries
        await asyncio.gather(*(bot.slash(probe_command, user="U0BURST") for _ in range(10)))
        refused = await fake_slack.wait_for("response_url", count=10, timeout=30)
        await settle(bot)
        assert len(refused) == 10
        assert all("Slack did not answer users.info" in str(r.params["text"]) for r in refused)
        assert len(fake_slack.calls_to("users.info")) == 3


def lookups_running() -> list[asyncio.Task[object]]:
    """Role lookups still under way in this loop (a lookup nobody waits for must not be)."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "") == "RoleResolver._resolve_now"
    ]


async def test_a_cancelled_command_leaves_the_lookup_to_the_others_and_the_last_ends_it(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    fake_slack.add_user("U0SLOW", email=await leaps_email(leaps_dsn, "REVIEWER"))
    settings = bot_settings(leaps_dsn, fake_slack)
    gateway = TargetGateway(leaps_dsn, connect_timeout_s=2.0)
    try:
        fake_slack.latency = 1.0
        roles = RoleResolver({}, make_web_client(settings), gateway)
        first = asyncio.ensure_future(roles.resolve("U0SLOW"))
        second = asyncio.ensure_future(roles.resolve("U0SLOW"))
        await asyncio.sleep(0.1)
        first.cancel()
        assert (await second).role == "REVIEWER"
        assert first.cancelled()
        assert len(fake_slack.calls_to("users.info")) == 1

        # nobody waits any more (shutdown): the lookup stops, and a later command starts afresh
        later = RoleResolver({}, make_web_client(settings), gateway)
        alone = asyncio.ensure_future(later.resolve("U0SLOW"))
        await asyncio.sleep(0.1)
        alone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await alone
        for _ in range(30):  # its cancellation lands well before Slack would have answered
            if not lookups_running():
                break
            await asyncio.sleep(0.01)
        assert not lookups_running()
        again = await later.resolve("U0SLOW")
        assert (again.role, again.stale) == ("REVIEWER", False)
        assert not lookups_running()
    finally:
        fake_slack.latency = 0.0
        await gateway.close()


# --- 3. one keyed MAC for both button signers -------------------------------------------


async def click(bot: RunningBot, action_id: str, value: str) -> None:
    body = action_body(
        action_id=action_id,
        value=value,
        user="U0ALICE",
        channel="C0GENERAL",
        message_ts="",
        response_url=bot.fake.response_url("U0ALICE"),
    )
    resp = await bot.http.post(f"{bot.url}/slack/events", data=body, headers=signed_headers(body))
    await resp.read()
    assert resp.status == 200


def test_each_purpose_has_its_own_key_and_posted_buttons_stay_valid() -> None:
    secret = "s3cret"
    approval = KeyedMac.for_purpose(APPROVAL_BUTTON, secret, hex_chars=24)
    table = KeyedMac.for_purpose(FULL_TABLE_BUTTON, secret, hex_chars=24)
    message = "apv-1|C0INCIDENT"
    assert approval.key != table.key
    assert not table.matches(message, approval.sign(message))  # no MAC crosses purposes
    # the derivation and format the two signers had before: values already in Slack verify
    before = hashlib.sha256(b"dbops-approval:" + secret.encode()).digest()
    posted = hmac.new(before, message.encode(), "sha256").hexdigest()[:24]
    assert approval.matches(message, posted)
    engine_value = f"apv-1.{posted}"
    assert engine_value == f"apv-1.{approval.sign(message)}"
    # any text is an answer, never an exception
    for mac in ("", "é" * 24, "\ud800" * 24, posted.upper(), posted + "0"):
        assert not approval.matches(message, mac)
    assert not approval.matches("apv-\ud800|C0INCIDENT", posted)
    with pytest.raises(ValueError, match="plain name"):
        KeyedMac.for_purpose("dbops-approval:x", secret, hex_chars=24)


async def test_non_ascii_button_values_are_refused_as_tampered(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    """Both buttons, over signed HTTP: a value no signer made, in text that neither ASCII
    nor UTF-8 takes, is refused and audited like any tampering, not an internal error."""
    settings = bot_settings(leaps_dsn, fake_slack)
    async with running_bot(settings, fake_slack) as bot:
        payload = json.dumps(["health", "idle", "U0ALICE", "C0GENERAL", 0])
        table_values = ["é" * 32 + "." + payload, "0" * 32 + "." + payload + "\ud800"]
        for value in table_values:
            await click(bot, render.FULL_TABLE, value)
        for value in ("apv-é.0123456789abcdef01234567", "apv-\ud800.00", "apv-1.\ud800é"):
            await click(bot, APPROVE, value)
        await settle(bot)
        told = [str(c.params.get("text", "")) for c in fake_slack.calls_to("chat.postEphemeral")]
        assert told.count("This button is not valid here.") == 2, told
        assert told.count("This button is not valid here; nothing was changed.") == 3, told
        assert not [t for t in told if "Something went wrong" in t]
        assert (await audit_actions(bot)).count("payload.tampered") == 5
