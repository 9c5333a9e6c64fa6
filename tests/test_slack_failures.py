"""Slack failures do not eat messages: a post Slack did not answer ok (a timeout, a dropped
connection, not only an API error) is not marked sent, and the next tick posts it exactly
once. The real bot against the fake Slack, told to hang past the client's timeout or to
close the connection; the clocks are the test's."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Literal

import pytest
from slack_sdk.web.async_client import AsyncWebClient

from bot.clock import ManualClock
from bot.incidents.comms import record_verification
from bot.incidents.service import SlackIncidents
from bot.state import IncidentStore
from bot.state.incidents import CLAIM_LEASE, WATCHDOG
from commands.fixture.faults import FaultInjector
from tests.conftest import RunningBot
from tests.fakeslack import FakeSlack
from tests.test_incident_comms import USERS_CHANNEL, press_post, preview_of, recover_report
from tests.test_incidents import (
    ALICE,
    CHANNEL,
    active,
    clock_of,
    command,
    ibot,
    posts_in,
    service,
    told,
)
from tests.test_watchdog import OPS, QUOTA_CHECK, dog, mentioning, ops_texts, watched_bot

__all__ = ["ibot"]  # the incident bot fixture, shared with tests/test_incidents.py

Failure = Literal["timeout", "drop"]
CLIENT_TIMEOUT_S = 1  # the bot's Slack client gives up this soon here (10 s in production)
ONCALL = "S0ONCALL"


def client_of(bot: RunningBot) -> AsyncWebClient:
    """The bot's own Slack client (every post of incidents, watchdog and templates)."""
    slack = service(bot).slack
    assert isinstance(slack, SlackIncidents)
    return slack.client


def fail_next_post(fake: FakeSlack, bot: RunningBot, how: Failure) -> None:
    """The next post is never answered ok: it hangs past the client's timeout, or its
    connection is dropped on every attempt the SDK makes (it retries twice)."""
    if how == "timeout":
        client_of(bot).timeout = CLIENT_TIMEOUT_S
        fake.hang_next("chat.postMessage")
    else:
        fake.drop_next("chat.postMessage", times=3)


def unanswered(fake: FakeSlack) -> int:
    return sum(1 for c in fake.calls_to("chat.postMessage") if c.status == 0)


@pytest.mark.parametrize("how", ["timeout", "drop"])
async def test_a_watchdog_alert_slack_did_not_answer_is_posted_by_the_next_tick(
    leaps_dsn: str, faults: FaultInjector, fake_slack: FakeSlack, how: Failure
) -> None:
    async with watched_bot(leaps_dsn, fake_slack) as bot:
        await faults.disable_quota_trigger()
        fail_next_post(fake_slack, bot, how)
        await dog(bot).tick()  # no exception escapes the tick
        assert unanswered(fake_slack) >= 1
        assert mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK) == []
        state = (await dog(bot).store.checks())[QUOTA_CHECK]
        assert state.status == "crit" and not state.alerted  # seen, not marked sent
        await dog(bot).tick()
        assert len(mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK)) == 1
        assert (await dog(bot).store.checks())[QUOTA_CHECK].alerted
        await dog(bot).tick()  # sent: never again while it stays critical
        assert len(mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK)) == 1


@pytest.mark.parametrize("how", ["timeout", "drop"])
async def test_an_sla_reminder_slack_did_not_answer_is_sent_by_the_next_tick(
    ibot: RunningBot, how: Failure
) -> None:
    await command(ibot, "incident start Flaky network")
    incidents = service(ibot)
    clock_of(ibot).advance(minutes=25)
    fail_next_post(ibot.fake, ibot, how)
    assert await incidents.tick() == 0
    assert unanswered(ibot.fake) >= 1
    assert not posts_in(ibot.fake, CHANNEL, ":alarm_clock:")
    incident = await active(ibot)
    assert "reminder" not in [e.kind for e in await incidents.store.timeline(incident.id)]
    assert await incidents.tick() == 1
    assert await incidents.tick() == 0
    assert len(posts_in(ibot.fake, CHANNEL, ":alarm_clock:")) == 1
    kinds = [e.kind for e in await incidents.store.timeline(incident.id)]
    assert kinds.count("reminder") == 1


async def test_a_reminder_claimed_by_a_process_that_died_is_sent_after_its_lease(
    ibot: RunningBot,
) -> None:
    await command(ibot, "incident start The replica died mid-post")
    incidents, clock = service(ibot), clock_of(ibot)
    incident = await active(ibot)
    clock.advance(minutes=25)
    # another replica claimed the reminder and died before Slack answered
    assert await incidents.store.claim_reminder(
        incident.id, "response", incident.reopened, at=clock.now(), claimer="dead-replica"
    )
    assert await incidents.tick() == 0  # its claim may still be in flight
    clock.advance(seconds=CLAIM_LEASE.total_seconds() + 1)
    assert await incidents.tick() == 1
    assert await incidents.tick() == 0
    assert len(posts_in(ibot.fake, CHANNEL, ":alarm_clock:")) == 1


async def test_a_header_slack_did_not_answer_is_posted_by_the_next_tick(ibot: RunningBot) -> None:
    fail_next_post(ibot.fake, ibot, "timeout")
    await command(ibot, "incident start Header timed out")
    incident = await active(ibot)
    assert unanswered(ibot.fake) == 1
    assert incident.header_ts is None and not posts_in(ibot.fake, CHANNEL, "Incident #")
    assert any("posts it at its next check" in t for t in told(ibot.fake))
    await service(ibot).tick()
    await service(ibot).tick()
    incident = await active(ibot)
    assert incident.header_ts is not None
    assert len(posts_in(ibot.fake, CHANNEL, "Incident #")) == 1
    assert ibot.fake.calls_to("pins.add")[-1].params["timestamp"] == incident.header_ts


async def test_a_template_post_slack_did_not_answer_is_posted_by_the_next_tick(
    ibot: RunningBot,
) -> None:
    fake, incidents = ibot.fake, service(ibot)
    await command(ibot, "incident start Points wrong sev2")
    await record_verification(incidents, CHANNEL, ALICE, recover_report())
    await command(ibot, "incident template user")
    preview = preview_of(ibot)
    clock_of(ibot).advance(minutes=5)
    fail_next_post(fake, ibot, "drop")
    await press_post(ibot, preview, ALICE, USERS_CHANNEL)
    assert unanswered(fake) == 3  # the SDK tried three times
    assert not posts_in(fake, USERS_CHANNEL)
    assert "at its next check" in fake.calls_to("chat.postEphemeral")[-1].params["text"]
    incident = await active(ibot)
    assert incident.communicated_at is None  # nothing recorded as communicated
    assert "template" not in [e.kind for e in await incidents.store.timeline(incident.id)]
    posted_at = clock_of(ibot).advance(minutes=1)
    await incidents.tick()
    await incidents.tick()
    posted = posts_in(fake, USERS_CHANNEL)
    assert len(posted) == 1
    assert "submissions: 97.8 % back" in json.dumps(posted[0].params.get("blocks", []))
    incident = await active(ibot)
    assert incident.communicated_at == posted_at
    events = [e for e in await incidents.store.timeline(incident.id) if e.kind == "template"]
    assert [(e.actor_id, e.text) for e in events] == [
        (ALICE, f"posted the user notification to <#{USERS_CHANNEL}>")
    ]
    assert (
        f"was posted to <#{USERS_CHANNEL}>"
        in fake.calls_to("chat.postEphemeral")[-1].params["text"]
    )
    await press_post(ibot, preview, ALICE, USERS_CHANNEL)  # a late click: no second post
    assert len(posts_in(fake, USERS_CHANNEL)) == 1


async def test_reminders_of_an_incident_the_watchdog_opened_mention_the_oncall_groups(
    leaps_dsn: str, faults: FaultInjector, fake_slack: FakeSlack
) -> None:
    clock = ManualClock(datetime(2026, 12, 1, 9, 0, tzinfo=UTC))
    async with watched_bot(
        leaps_dsn,
        fake_slack,
        watchdog_opens_incident=True,
        role_groups={ONCALL: "ADMIN", "S0DBA": "SUPERADMIN"},
    ) as bot:
        incidents = bot.service.incidents
        assert incidents is not None
        incidents.clock = clock
        dog(bot).clock = clock
        await faults.disable_quota_trigger()
        await dog(bot).tick()
        store: IncidentStore = incidents.store
        incident = await store.active_in(OPS)
        assert incident is not None and incident.created_by == WATCHDOG
        clock.advance(minutes=25)
        assert await incidents.tick() == 1
        reminders = posts_in(fake_slack, OPS, ":alarm_clock:")
        assert len(reminders) == 1
        text = reminders[0].params["text"]
        assert text.startswith(f"<!subteam^{ONCALL}> <!subteam^S0DBA> watchdog :alarm_clock:")
