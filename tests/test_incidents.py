"""Incidents over real Slack plumbing: signed slash commands, button clicks and events into
the running bot, the fake Slack Web API, a real target and state store, a clock the test
moves (SLA clocks run for hours)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest_asyncio

from bot.clock import ManualClock
from bot.incidents.service import IncidentService, SlackIncidents
from bot.slack.app import make_web_client
from bot.state import Incident, IncidentStore, open_store
from bot.state.baselines import StoreBaselines
from commands.incidents.lifecycle import SlaTargets, Start
from tests.conftest import RunningBot, bot_settings, fresh_state_url, running_bot
from tests.fakeslack import Call, FakeSlack
from tests.slackreq import signed_headers
from tests.test_approvals import ADMIN, REQUESTER, ROLES, Victims, plan_message, press, settle

CHANNEL = "C0INCIDENT"
ALICE, BOB = "U0ALICE", "U0BOB"
T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest_asyncio.fixture(loop_scope="session")
async def ibot(leaps_dsn: str, fake_slack: FakeSlack) -> AsyncIterator[RunningBot]:
    roles = {**ROLES, ALICE: "REVIEWER", BOB: "REVIEWER"}
    settings = bot_settings(leaps_dsn, fake_slack, role_map=roles)
    async with running_bot(settings, fake_slack) as bot:
        assert bot.service.incidents is not None
        bot.service.incidents.clock = ManualClock(T0)
        yield bot


@pytest_asyncio.fixture(loop_scope="session")
async def idle(leaps_dsn: str) -> AsyncIterator[Victims]:
    """Idle sessions for `kill-idle`, a remedy that needs an approval."""
    sessions = Victims(leaps_dsn)
    yield sessions
    await sessions.close()


def clock_of(bot: RunningBot) -> ManualClock:
    assert bot.service.incidents is not None
    clock = bot.service.incidents.clock
    assert isinstance(clock, ManualClock)
    return clock


def service(bot: RunningBot) -> IncidentService:
    assert bot.service.incidents is not None
    return bot.service.incidents


async def command(bot: RunningBot, text: str, user: str = ALICE, channel: str = CHANNEL) -> None:
    resp = await bot.slash(text, channel=channel, user=user)
    assert resp.status == 200
    await settle(bot)


async def active(bot: RunningBot, channel: str = CHANNEL) -> Incident:
    incident = await service(bot).store.active_in(channel)
    assert incident is not None, f"no active incident in {channel}"
    return incident


def blocks_text(call: Call) -> str:
    return json.dumps(call.params.get("blocks", [])) + str(call.params.get("text", ""))


def header_now(fake: FakeSlack, incident: Incident) -> str:
    assert incident.header_ts is not None
    msg = fake.message(incident.channel_id, incident.header_ts)
    assert msg is not None
    return json.dumps(msg.get("blocks", [])) + str(msg.get("text", ""))


def told(fake: FakeSlack) -> list[str]:
    """What users were told privately (response_url answers and ephemerals)."""
    texts = [str(c.params.get("text", "")) for c in fake.calls_to("chat.postEphemeral")]
    return texts + [str(c.params.get("text", "")) for c in fake.calls if c.method == "response_url"]


def posts_in(fake: FakeSlack, channel: str, contains: str = "") -> list[Call]:
    """Messages Slack accepted in the channel (refused attempts are not posts)."""
    return [
        c
        for c in fake.calls_to("chat.postMessage")
        if c.params.get("channel") == channel
        and contains in blocks_text(c)
        and isinstance(c.response, dict)
        and c.response.get("ok")
    ]


async def test_start_here_pins_a_header_and_the_work_joins_the_timeline(ibot: RunningBot) -> None:
    fake = ibot.fake
    await command(ibot, "incident start Leaderboard shows zero points sev1")
    incident = await active(ibot)
    assert (incident.title, incident.severity, incident.commander_id) == (
        "Leaderboard shows zero points",
        "sev1",
        ALICE,
    )
    assert incident.detected_at == T0 and incident.detected_by == "start"
    header = posts_in(fake, CHANNEL, "Incident #")[0]
    assert header.response is not None and header.response["ts"] == incident.header_ts
    pins = fake.calls_to("pins.add")
    assert [(p.params["channel"], p.params["timestamp"]) for p in pins] == [
        (CHANNEL, incident.header_ts)
    ]
    text = header_now(fake, incident)
    assert "Leaderboard shows zero points" in text and "SEV1" in text and f"<@{ALICE}>" in text
    assert "Response" in text and "30m00s left" in text

    clock_of(ibot).advance(minutes=4)
    await command(ibot, "health", user=BOB)
    clock_of(ibot).advance(minutes=6)
    await command(ibot, "incident update Restarted the refresh job, watching", user=BOB)
    incident = await active(ibot)
    assert incident.responded_at == T0 + timedelta(minutes=4)
    assert incident.communicated_at == T0 + timedelta(minutes=10)
    assert posts_in(fake, CHANNEL, "Restarted the refresh job")
    text = header_now(fake, incident)
    assert "*Response* (target 30m00s): met in 4m00s" in text
    assert "*Communication* (target 1h00m): met in 10m00s" in text

    await command(ibot, "incident timeline", user=BOB)
    timeline = blocks_text(posts_in(fake, CHANNEL, "Timeline of incident")[-1])
    for line in (
        "`09:00` <@U0ALICE> incident started",
        "`09:04` <@U0BOB> ran `/db health`",
        "`09:10` <@U0BOB> update: Restarted the refresh job",
    ):
        assert line in timeline, timeline
    events = await service(ibot).store.timeline(incident.id)
    health = next(e for e in events if e.kind == "command")
    assert health.detail["command"] == "health" and health.detail["worst"] in (
        "ok",
        "warn",
        "crit",
        "error",
        "skipped",
    )


async def test_one_open_incident_per_channel(ibot: RunningBot) -> None:
    await command(ibot, "incident start First problem")
    await command(ibot, "incident start Second problem", user=BOB)
    assert (await active(ibot)).title == "First problem"
    assert any("already has an open incident (#" in t for t in told(ibot.fake))
    await asyncio.gather(
        command(ibot, "incident start Race one", channel="C0RACE"),
        command(ibot, "incident start Race two", channel="C0RACE", user=BOB),
    )
    assert (await active(ibot, "C0RACE")).title in ("Race one", "Race two")
    assert len(posts_in(ibot.fake, "C0RACE", "Incident #")) == 1


async def test_start_with_channel_creates_it_and_invites_the_requester(ibot: RunningBot) -> None:
    fake = ibot.fake
    fake.add_channel("C0TAKEN", "inc-20261130-db-down")
    await command(ibot, "incident start DB down! sev2 --channel --since 08:50", channel="C0OPS")
    created = fake.calls_to("conversations.create")
    assert [c.params["name"] for c in created] == ["inc-20261130-db-down", "inc-20261130-db-down-1"]
    new = str(created[-1].response["channel"]["id"])
    assert fake.calls_to("conversations.invite")[0].params == {"channel": new, "users": ALICE}
    incident = await active(ibot, new)
    assert incident.origin_channel_id == "C0OPS"
    assert incident.detected_at == T0 - timedelta(minutes=10) and incident.detected_by == "since"
    # --since is the operator's word: the watchdog never moves it.
    assert not await service(ibot).note_watchdog_critical(new, T0 - timedelta(hours=1))
    assert fake.calls_to("pins.add")[0].params["channel"] == new
    assert posts_in(fake, "C0OPS", f"<#{new}>")
    assert any(f"opened in <#{new}>" in t for t in told(fake))
    # Detection: declared 10 minutes after detection, within 15.
    assert "*Detection* (target 15m00s): met in 10m00s" in header_now(fake, incident)


async def test_assign_resolve_reopen_recover(ibot: RunningBot) -> None:
    fake = ibot.fake
    await command(ibot, "incident start Submissions lost sev1")
    await command(ibot, f"incident assign <@{BOB}|bob>")
    incident = await active(ibot)
    assert incident.commander_id == BOB
    assert f"*Commander:* <@{BOB}>" in header_now(fake, incident)
    clock_of(ibot).advance(hours=1)
    await command(ibot, "incident resolve", user=BOB)
    incident = await active(ibot)
    assert incident.state == "resolved" and incident.resolved_at == T0 + timedelta(hours=1)
    assert "RESOLVED" in header_now(fake, incident)
    await command(ibot, "incident resolve", user=BOB)
    assert any("nothing to resolve" in t for t in told(fake))
    await command(ibot, "incident reopen", user=BOB)
    incident = await active(ibot)
    assert (incident.state, incident.resolved_at, incident.reopened) == ("reopened", None, 1)
    clock_of(ibot).advance(minutes=30)
    await command(ibot, "incident recovered", user=BOB)
    assert await service(ibot).store.active_in(CHANNEL) is None
    done = await service(ibot).store.get(incident.id)
    assert done is not None and done.state == "recovered"
    assert done.recovered_at == done.resolved_at == T0 + timedelta(minutes=90)
    assert "RECOVERED" in header_now(fake, done)
    kinds = [e.kind for e in await service(ibot).store.timeline(incident.id)]
    assert kinds == ["started", "assign", "resolved", "reopened", "recovered"]
    # The channel is free again.
    await command(ibot, "incident start Next one")
    assert (await active(ibot)).id != incident.id


async def test_status_outside_an_incident_and_usage_in_the_ack(ibot: RunningBot) -> None:
    await command(ibot, "incident start")
    await command(ibot, "incident launch x")
    await command(ibot, "incident status")
    await ibot.fake.wait_for("response_url", count=3)
    said = told(ibot.fake)
    assert any("`start` needs a title" in t for t in said)
    assert any("unknown incident command `launch`" in t for t in said)
    assert any("No open incident in this channel" in t for t in said)


async def test_a_remedy_approval_joins_the_timeline_by_itself(
    ibot: RunningBot, idle: Victims
) -> None:
    await command(ibot, "incident start Connections exhausted", user=REQUESTER)
    pids = await idle.open(2)
    await asyncio.sleep(0.3)
    clock_of(ibot).advance(minutes=2)
    await command(ibot, "kill-idle 0", user=REQUESTER)
    plan = plan_message(ibot.fake)
    clock_of(ibot).advance(minutes=1)
    await press(ibot, plan, ADMIN, channel=CHANNEL)
    await settle(ibot)
    assert await idle.alive() == set()
    incident = await active(ibot)
    events = await service(ibot).store.timeline(incident.id)
    lines = [(e.kind, e.actor_id, e.text) for e in events]
    assert lines[1] == ("approval", REQUESTER, "requested `kill-idle` (2 rows planned)"), lines
    assert ("approval", ADMIN, "approved `kill-idle`") in lines
    done = next(e for e in events if e.kind == "remedy")
    assert done.actor_id == ADMIN and done.text.startswith("`kill-idle` done: 2 rows changed")
    assert done.detail["affected"] == len(pids)
    assert incident.responded_at == T0 + timedelta(minutes=2)


async def test_a_reminder_fires_once_at_80_percent_and_overdue_shows(ibot: RunningBot) -> None:
    fake = ibot.fake
    await command(ibot, "incident start Slow leaderboard sev2")
    incidents, clock = service(ibot), clock_of(ibot)
    clock.advance(minutes=23)
    assert await incidents.tick() == 0  # 77 % of the 30-minute response target
    clock.advance(minutes=1)
    assert await incidents.tick() == 1  # 80 %: the commander is reminded
    assert await incidents.tick() == 0  # the next tick does not remind again
    reminders = posts_in(fake, CHANNEL, ":alarm_clock:")
    assert len(reminders) == 1
    assert reminders[0].params["text"].startswith(f"<@{ALICE}> :alarm_clock: *Response* SLA")
    assert "80%" in reminders[0].params["text"]
    incident = await active(ibot)
    assert "OVERDUE" not in header_now(fake, incident)
    clock.advance(minutes=7)
    assert await incidents.tick() == 0
    text = header_now(fake, incident)
    assert "OVERDUE by 1m00s" in text and ":rotating_light:" in text
    assert len(posts_in(fake, CHANNEL, ":alarm_clock:")) == 1
    kinds = [e.kind for e in await incidents.store.timeline(incident.id)]
    assert kinds.count("reminder") == 1


async def test_a_reminder_slack_refused_is_sent_at_the_next_tick(ibot: RunningBot) -> None:
    await command(ibot, "incident start Flaky Slack")
    clock_of(ibot).advance(minutes=25)
    ibot.fake.fail_next("chat.postMessage", status=500, times=3)  # the SDK retries twice
    assert await service(ibot).tick() == 0
    assert not posts_in(ibot.fake, CHANNEL, ":alarm_clock:")
    assert await service(ibot).tick() == 1
    assert await service(ibot).tick() == 0
    assert len(posts_in(ibot.fake, CHANNEL, ":alarm_clock:")) == 1


async def test_a_header_slack_refused_at_the_start_is_posted_by_the_next_tick(
    ibot: RunningBot,
) -> None:
    ibot.fake.fail_next("chat.postMessage", status=500, times=3)
    await command(ibot, "incident start Header later")
    incident = await active(ibot)
    assert incident.header_ts is None and not posts_in(ibot.fake, CHANNEL, "Incident #")
    await asyncio.gather(service(ibot).tick(), service(ibot).tick())
    incident = await active(ibot)
    assert incident.header_ts is not None
    assert len(posts_in(ibot.fake, CHANNEL, "Incident #")) == 1
    assert ibot.fake.calls_to("pins.add")[-1].params["timestamp"] == incident.header_ts


async def test_two_engines_on_postgresql_remind_once(
    pg_dsn_factory: Callable[[str], str], leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    url = pg_dsn_factory("incidents")
    settings = bot_settings(leaps_dsn, fake_slack, state_database_url=url)
    clock = ManualClock(T0)
    stores = [await open_store(url), await open_store(url)]
    engines = [
        IncidentService(
            IncidentStore.attach(s, clock),
            SlackIncidents(make_web_client(settings)),
            SlaTargets(),
        )
        for s in stores
    ]
    try:
        await engines[0].start(
            Start("Quota trigger off", "sev1", False, None), user_id=ALICE, channel_id=CHANNEL
        )
        clock.advance(minutes=48)  # 80 % of communication (1 h); response overdue (160 %)
        sent = await asyncio.gather(*(e.tick() for e in engines * 3))
        assert sum(sent) == 2  # response and communication, once each
        reminders = posts_in(fake_slack, CHANNEL, ":alarm_clock:")
        assert sorted(c.params["text"].split("*")[1] for c in reminders) == [
            "Communication",
            "Response",
        ]
        headers = fake_slack.calls_to("chat.update")
        assert len(headers) == 1  # one engine edited the header for the new clocks
    finally:
        for s in stores:
            await s.close()


async def test_a_restart_mid_incident_loses_nothing(
    leaps_dsn: str, fake_slack: FakeSlack, tmp_path: Path
) -> None:
    settings = bot_settings(
        leaps_dsn, fake_slack, state_database_url=f"sqlite:///{tmp_path}/state.sqlite3"
    )
    clock = ManualClock(T0)
    async with running_bot(settings, fake_slack) as first:
        service(first).clock = clock
        await command(first, "incident start Views stale sev3")
        clock.advance(minutes=5)
        await command(first, "incident update Refreshing views", user=BOB)
        before = await active(first)
        events_before = await service(first).store.timeline(before.id)
    async with running_bot(settings, fake_slack) as second:
        service(second).clock = clock
        after = await active(second)
        assert after == before
        assert await service(second).store.timeline(after.id) == events_before
        clock.advance(minutes=43)  # 80 % of communication? no: met. Resolution 4 h: 20 %.
        assert await service(second).tick() == 0
        clock.advance(hours=2, minutes=30)  # 3h18m: 82 % of resolution
        assert await service(second).tick() == 1
        await command(second, "incident status", user=BOB)
        status = posts_in(fake_slack, CHANNEL, "Incident #")[-1]
        assert "Views stale" in blocks_text(status) and "SEV3" in blocks_text(status)
        edits = [c for c in fake_slack.calls_to("chat.update") if c.params["ts"] == after.header_ts]
        assert edits, "the header posted before the restart is edited after it"


def event_body(event: dict[str, object]) -> str:
    return json.dumps(
        {
            "token": "legacy-token-unused",
            "team_id": "T0001",
            "api_app_id": "A0DBOPS",
            "event": event,
            "type": "event_callback",
            "event_id": f"Ev{time.time_ns()}",
            "event_time": int(time.time()),
        }
    )


async def test_app_home_shows_incidents_approvals_and_health(
    ibot: RunningBot, idle: Victims
) -> None:
    await command(ibot, "incident start Ledger drift sev1", channel="C0HOME")
    await command(ibot, "health", channel="C0HOME", user=BOB)
    await idle.open(1)
    await asyncio.sleep(0.3)
    await command(ibot, "kill-idle 0", user=REQUESTER)
    body = event_body(
        {"type": "app_home_opened", "user": ALICE, "channel": "D0HOME", "tab": "home"}
    )
    headers = signed_headers(body)
    headers["Content-Type"] = "application/json"
    resp = await ibot.http.post(f"{ibot.url}/slack/events", data=body, headers=headers)
    assert resp.status == 200
    published = (await ibot.fake.wait_for("views.publish"))[0]
    assert published.params["user_id"] == ALICE
    view = published.params["view"]
    assert view["type"] == "home"
    text = json.dumps(view["blocks"])
    assert "Ledger drift" in text and "<#C0HOME>" in text and "Full recovery" in text
    assert "`kill-idle` in <#C0INCIDENT>" in text
    assert "Latest health" in text and f"by <@{BOB}> in <#C0HOME>" in text


async def test_watchdog_detection_and_clean_recovery_verification(ibot: RunningBot) -> None:
    """The APIs the watchdog and `/db recover` call: the first critical run of the watchdog
    dates a later incident's detection; a clean verification fully recovers it once it
    is resolved."""
    from commands.base import Finding, Report, Status

    incidents, clock = service(ibot), clock_of(ibot)
    crit = Report(
        title="Database health",
        target="db",
        findings=[Finding(check="views", status=Status.CRIT, summary="leaderboard empty")],
    )
    fine = Report(title="Database health", target="db", findings=[])
    clock.set(T0 - timedelta(minutes=30))
    await incidents.note_health("C0OPS", "watchdog", crit)  # an earlier, finished run
    clock.set(T0 - timedelta(minutes=25))
    await incidents.note_health("C0OPS", "watchdog", fine)
    for minutes in (12, 11, 10):
        clock.set(T0 - timedelta(minutes=minutes))
        await incidents.note_health("C0OPS", "watchdog", crit)
    clock.set(T0)
    await command(ibot, "incident start Leaderboard empty sev1")
    incident = await active(ibot)
    assert (incident.detected_at, incident.detected_by) == (
        T0 - timedelta(minutes=12),
        "watchdog",
    )
    assert "*Detection* (target 15m00s): met in 12m00s" in header_now(ibot.fake, incident)
    # A watchdog report moves detection earlier, never later.
    assert not await incidents.note_watchdog_critical(CHANNEL, T0 - timedelta(minutes=5))
    assert await incidents.note_watchdog_critical(CHANNEL, T0 - timedelta(minutes=14))
    incident = await active(ibot)
    assert "*Detection* (target 15m00s): met in 14m00s" in header_now(ibot.fake, incident)
    clock.advance(hours=2)
    evidence = {"users_pct": 100.0, "submissions_pct": 97.8}
    # open: a clean verification does not close it
    assert not await incidents.mark_recovered(CHANNEL, evidence)
    still = await active(ibot)
    assert still.state == "open" and still.recovered_at is None
    assert posts_in(ibot.fake, CHANNEL, "Recovery verification clean: resolve to close")
    await command(ibot, "incident resolve")
    assert await incidents.mark_recovered(CHANNEL, evidence)
    done = await incidents.store.get(incident.id)
    assert done is not None and done.state == "recovered"
    assert done.recovery_evidence == evidence and done.recovered_at == T0 + timedelta(hours=2)
    assert not await incidents.mark_recovered(CHANNEL, evidence)  # nothing active any more
    last = (await incidents.store.timeline(incident.id))[-1]
    assert (last.kind, last.actor_id, last.detail["submissions_pct"]) == ("recovered", "bot", 97.8)


def test_the_console_runs_incidents_through_the_same_service() -> None:
    from tests.test_cli import bot_cli

    env = {
        "DATABASE_URL": "postgresql://127.0.0.1:9/none",  # incidents need no target
        "STATE_DATABASE_URL": fresh_state_url(),  # a copy of the migrated template
        "ROLE_MAP": json.dumps({"U0ONCALL": "REVIEWER"}),
    }
    started = bot_cli("run", "incident start Console drill sev3", "--user", "U0ONCALL", env=env)
    assert started.returncode == 0, started.stderr
    assert "Incident #1: Console drill" in started.stdout and "SEV3" in started.stdout
    again = bot_cli("run", "incident start Another", "--user", "U0ONCALL", env=env)
    assert "already has an open incident (#1: Console drill)" in again.stdout
    bot_cli("run", "incident update We're on it", "--user", "U0ONCALL", env=env)
    timeline = bot_cli("run", "incident timeline", "--user", "U0ONCALL", env=env)
    assert timeline.returncode == 0, timeline.stderr
    assert "incident started: Console drill (sev3)" in timeline.stdout
    assert "update: We're on it" in timeline.stdout
    plain = bot_cli("run", "incident status", env=env)
    assert plain.returncode == 2 and "--user" in plain.stderr


async def test_console_diagnostics_and_approvals_join_the_console_incident(
    leaps_dsn: str, idle: Victims
) -> None:
    from tests.test_cli import bot_cli

    env = {
        "DATABASE_URL": leaps_dsn,
        "STATE_DATABASE_URL": fresh_state_url(),  # a copy of the migrated template
        "ROLE_MAP": json.dumps({"U0ONCALL": "REVIEWER", "U0LEAD": "ADMIN"}),
    }
    assert bot_cli("run", "incident start Drill", "--user", "U0ONCALL", env=env).returncode == 0
    health = bot_cli("run", "health", "--user", "U0ONCALL", env=env)
    assert health.returncode == 0, health.stderr
    assert "Database health" in health.stdout
    await idle.open(1)
    await asyncio.sleep(0.3)
    asked = bot_cli("run", "kill-idle 0", "--user", "U0ONCALL", env=env)
    assert asked.returncode == 0, asked.stderr
    approval_id = asked.stdout.split("approval ")[-1].split()[0]
    done = bot_cli("approve", approval_id, "--user", "U0LEAD", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    timeline = bot_cli("run", "incident timeline", "--user", "U0LEAD", env=env).stdout
    assert "U0ONCALL ran /db health: " in timeline.replace("<@", "").replace(">", "")
    assert "requested kill-idle (1 rows planned)" in timeline
    assert "approved kill-idle" in timeline
    assert "kill-idle done: 1 rows changed" in timeline


async def test_replies_go_in_channel_while_an_incident_is_open(ibot: RunningBot) -> None:
    await command(ibot, "health", channel="C0QUIET")
    assert not posts_in(ibot.fake, "C0QUIET", "Database health")
    assert ibot.fake.calls_to("chat.postEphemeral")
    await command(ibot, "incident start Noisy sev3", channel="C0QUIET")
    await command(ibot, "health", channel="C0QUIET")
    assert posts_in(ibot.fake, "C0QUIET", "Database health")


async def test_a_channel_slack_refuses_to_create_is_said_and_nothing_opens(
    ibot: RunningBot,
) -> None:
    ibot.fake.fail_next("conversations.create", status=200, error="restricted_action")
    await command(ibot, "incident start Blocked --channel", channel="C0LOCKED")
    assert any("restricted_action" in t and "without `--channel`" in t for t in told(ibot.fake))
    assert await service(ibot).store.active() == []


async def test_a_long_timeline_and_title_stay_within_slack_limits(ibot: RunningBot) -> None:
    from tests.fakeslack import block_errors

    title = "Ledger & leaderboard <disagree> " * 10
    await command(ibot, f"incident start {title}")
    incident = await active(ibot)
    store = service(ibot).store
    for i in range(300):
        await store.add_event(
            incident.id, kind="update", actor_id=BOB, text=f"update {i}: " + "x" * 90, at=T0
        )
    await command(ibot, "incident timeline")
    posted = posts_in(ibot.fake, CHANNEL, "Timeline of incident")[-1]
    assert posted.status == 200 and posted.response and posted.response["ok"]
    blocks = posted.params["blocks"]
    assert not block_errors(blocks) and len(blocks) <= 50
    text = json.dumps(blocks)
    assert "update 299:" in text and "earlier lines not shown" in text
    header = posts_in(ibot.fake, CHANNEL, "Incident #")[0]
    assert not block_errors(header.params["blocks"])


async def test_the_service_timer_reminds_once_by_itself(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    settings = bot_settings(leaps_dsn, fake_slack, incident_tick_s=0.2)
    async with running_bot(settings, fake_slack) as bot:
        clock = ManualClock(T0)
        service(bot).clock = clock
        await command(bot, "incident start Timer drill")
        clock.advance(minutes=25)
        await fake_slack.wait_for(
            "chat.postMessage", predicate=lambda c: ":alarm_clock:" in str(c.params.get("text"))
        )
        await asyncio.sleep(1.0)  # five more ticks
        assert len(posts_in(fake_slack, CHANNEL, ":alarm_clock:")) == 1
        incident = await active(bot)
        assert "*Response* (target 30m00s): 5m00s left" in header_now(fake_slack, incident)


async def test_no_baseline_is_taken_while_an_incident_is_open(ibot: RunningBot) -> None:
    """A snapshot of the damaged database must not become what recovery is measured by:
    none while an incident is open or resolved, none within BASELINE_QUIET_S (1 h) after
    it recovered."""
    baselines = ibot.service.ctx.baselines
    assert isinstance(baselines, StoreBaselines)
    assert ibot.service.settings.baseline_quiet_s == 3600.0  # the default
    clock = clock_of(ibot)
    target = ibot.service.ctx.gateway.target
    before = len(await baselines.all(target))
    assert await ibot.service.take_baseline()
    assert len(await baselines.all(target)) == before + 1
    await command(ibot, "incident start Submissions lost sev1")
    assert not await ibot.service.take_baseline()
    await command(ibot, "incident resolve")
    assert not await ibot.service.take_baseline()  # resolved, not yet recovered
    await command(ibot, "incident recovered")
    assert not await ibot.service.take_baseline()  # recovered just now: the quiet hour
    clock.advance(minutes=59)
    assert not await ibot.service.take_baseline()
    clock.advance(minutes=1)
    assert await ibot.service.take_baseline()
    assert len(await baselines.all(target)) == before + 2


async def watchdog_saw(bot: RunningBot, *critical: str) -> None:
    """A watchdog health run in which these checks were critical (and no other)."""
    from commands.base import Finding, Report, Status

    findings = [Finding(check=c, status=Status.CRIT, summary="broken") for c in critical]
    findings.append(Finding(check="connections", status=Status.OK, summary="fine"))
    report = Report(title="Database health", target="db", findings=findings)
    await service(bot).note_health("C0OPS", "watchdog", report)


async def test_no_baseline_while_a_check_is_newly_critical(ibot: RunningBot) -> None:
    """The first baseline is taken whatever is critical; then a check critical that was
    not at the last baseline stops them, one critical throughout does not, and one that
    cleared and came back is newly critical again."""
    baselines = ibot.service.ctx.baselines
    assert isinstance(baselines, StoreBaselines)
    target = ibot.service.ctx.gateway.target
    clock = clock_of(ibot)
    assert await baselines.latest(target, include_flagged=True) is None
    await watchdog_saw(ibot, "guard: AMPLIFY quota trigger")
    assert await ibot.service.take_baseline()  # none yet: taken despite the critical check
    first = await baselines.latest(target)
    assert first is not None and first.critical == frozenset({"guard: AMPLIFY quota trigger"})
    assert first.taken_at == T0 and not first.counts_only and first.flagged is None

    clock.advance(hours=1)
    await watchdog_saw(ibot, "guard: AMPLIFY quota trigger")
    assert await ibot.service.take_baseline()  # critical throughout: no stop

    clock.advance(hours=1)
    await watchdog_saw(ibot, "guard: AMPLIFY quota trigger", "materialized views")
    assert not await ibot.service.take_baseline()  # views turned critical since
    clock.advance(minutes=1)
    await watchdog_saw(ibot, "guard: AMPLIFY quota trigger")
    assert await ibot.service.take_baseline()  # views are fine again

    clock.advance(hours=1)
    await watchdog_saw(ibot)  # all clean, then the quota check comes back: a new spell
    clock.advance(minutes=1)
    await watchdog_saw(ibot, "guard: AMPLIFY quota trigger")
    assert not await ibot.service.take_baseline()
    assert len(await baselines.all(target)) == 3


async def test_since_iso_with_a_zone_and_detection_from_the_current_spell(
    ibot: RunningBot,
) -> None:
    """`--since` in ISO 8601 with a zone is taken as given; one in the future is refused.
    Without it, a check critical for 20 hours, then clean, then critical again dates the
    incident to its return, not 20 hours back."""
    await command(ibot, "incident start Future --since 2026-11-30T17:01+08:00")  # 09:01 UTC
    assert any("is in the future" in t for t in told(ibot.fake))
    assert await service(ibot).store.active_in(CHANNEL) is None
    await command(ibot, "incident start Slow pages --since 2026-11-30T16:50+08:00")
    incident = await active(ibot)
    assert (incident.detected_at, incident.detected_by) == (T0 - timedelta(minutes=10), "since")
    await command(ibot, "incident resolve")
    await command(ibot, "incident recovered")

    clock = clock_of(ibot)
    for hours in range(20, 0, -1):
        clock.set(T0 + timedelta(hours=4) - timedelta(hours=hours))
        await watchdog_saw(ibot, "materialized views")
    clock.set(T0 + timedelta(hours=3, minutes=30))
    await watchdog_saw(ibot)  # all clean
    back = T0 + timedelta(hours=3, minutes=50)
    clock.set(back)
    await watchdog_saw(ibot, "materialized views")
    clock.set(T0 + timedelta(hours=4))
    await command(ibot, "incident start Leaderboard empty again", channel="C0AGAIN")
    again = await active(ibot, "C0AGAIN")
    assert (again.detected_at, again.detected_by) == (back, "watchdog")
