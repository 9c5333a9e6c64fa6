"""The watchdog inside a real bot: the health command through the same Dispatcher and
gateway against the fixture PostgreSQL, faults made by the injector, alerts read from the
fake Slack. Ticks are driven directly (the bot's own timer is set to an hour)."""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiohttp
import psycopg

from bot.clock import ManualClock
from bot.console.console import CONSOLE_CHANNEL
from bot.console.demo import DEMO_ROLES, DEMO_THRESHOLDS, demo_service_user
from bot.console.demo_incident import WALK_APPROVAL_TTL_S, walk_incident
from bot.incidents.leader import FileLeadership, PgAdvisoryLeadership, leadership_for
from bot.incidents.watchdog import Watchdog
from bot.state import IncidentStore, open_store
from bot.state.watchdog import WatchdogStore
from commands.fixture.faults import QUOTA_TRIGGER, FaultInjector
from commands.incidents import lifecycle as incident_cmd
from tests.conftest import STATE_DIR, RunningBot, bot_settings, running_bot
from tests.fakeslack import Call, FakeSlack
from tests.test_multiprocess import bot_process

OPS = "C0OPS"
QUOTA_CHECK = "guard: AMPLIFY quota trigger"
VIEWS_CHECK = "materialized views"
_files = itertools.count()
HEALTH_RUN_S = 7.0  # one health run's budget on a busy machine (checks time out at 5 s)


def ops_texts(fake: FakeSlack, marker: str) -> list[str]:
    return [
        str(c.params.get("text", ""))
        for c in fake.calls_to("chat.postMessage")
        if c.params.get("channel") == OPS
        and isinstance(c.response, dict)
        and c.response.get("ok")
        and marker in c.params.get("text", "")
    ]


def mentioning(texts: list[str], check: str) -> list[str]:
    return [t for t in texts if f"*{check}*" in t]


@asynccontextmanager
async def watched_bot(dsn: str, fake: FakeSlack, **overrides: Any) -> AsyncIterator[RunningBot]:
    settings = bot_settings(
        dsn, fake, ops_channel=OPS, watchdog_interval_s=3600, coalesce_s=0, **overrides
    )
    async with running_bot(settings, fake) as bot:
        # the web app starts the service on its first request; /healthz is one
        async with bot.http.get(f"{bot.url}/healthz") as resp:
            assert (await resp.json())["watchdog"] == "leader"  # SQLite: the one process
        yield bot


def dog(bot: RunningBot) -> Watchdog:
    assert isinstance(bot.service.watchdog, Watchdog)
    return bot.service.watchdog


async def enable_quota_trigger(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"ALTER TABLE submissions ENABLE TRIGGER {QUOTA_TRIGGER}")


async def test_persisting_fault_alerts_once_and_its_recovery_once_across_a_restart(
    leaps_dsn: str, faults: FaultInjector, fake_slack: FakeSlack
) -> None:
    state = f"sqlite:///{STATE_DIR}/watchdog-restart-{id(faults)}.sqlite3"
    async with watched_bot(leaps_dsn, fake_slack, state_database_url=state) as bot:
        await dog(bot).tick()  # the fixture as it is: the quota trigger is fine
        assert mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK) == []
        await faults.disable_quota_trigger()
        for _ in range(3):
            await dog(bot).tick()
        alerts = mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK)
        assert len(alerts) == 1, alerts
        assert "disabled" in alerts[0]
    # A restarted bot (the same state store) remembers it has said so.
    async with watched_bot(leaps_dsn, fake_slack, state_database_url=state) as again:
        await dog(again).tick()
        assert len(mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK)) == 1
        await enable_quota_trigger(leaps_dsn)
        await dog(again).tick()
        await dog(again).tick()
        recovered = mentioning(ops_texts(fake_slack, "recovered"), QUOTA_CHECK)
        assert len(recovered) == 1, recovered
        assert "is ok again" in recovered[0]
        # and a new occurrence is news again
        await faults.disable_quota_trigger()
        await dog(again).tick()
        assert len(mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK)) == 2


async def test_opens_an_incident_dated_to_the_first_critical_finding(
    leaps_dsn: str, faults: FaultInjector, fake_slack: FakeSlack
) -> None:
    """Slack refuses the first alert: the move is given back, the next tick posts it and
    opens the incident, whose detection is the first critical health run, not the post."""
    clock = ManualClock(datetime(2026, 11, 30, 9, 0, tzinfo=UTC))
    async with watched_bot(
        leaps_dsn, fake_slack, watchdog_opens_incident=True, watchdog_incident_severity="sev1"
    ) as bot:
        assert bot.service.incidents is not None
        bot.service.incidents.clock = clock
        dog(bot).clock = clock
        await dog(bot).tick()
        await faults.disable_quota_trigger()
        first_critical = clock.advance(seconds=60)
        fake_slack.fail_next("chat.postMessage", status=200, error="channel_not_found")
        await dog(bot).tick()
        assert mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK) == []
        store: IncidentStore = bot.service.incidents.store
        assert await store.active_in(OPS) is None  # no alert posted, no incident yet
        posted_at = clock.advance(seconds=60)
        await dog(bot).tick()
        assert len(mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK)) == 1
        incident = await store.active_in(OPS)
        assert incident is not None
        assert incident.detected_at == first_critical
        assert incident.detected_by == "watchdog"
        assert incident.started_at == posted_at
        assert incident.severity == "sev1"
        assert incident.commander_id == "watchdog"
        assert QUOTA_CHECK in incident.title
        clock.advance(seconds=60)
        await dog(bot).tick()  # the problem persists: no second alert, no second incident
        assert len(mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK)) == 1
        assert [i.id for i in await store.active()] == [incident.id]
        await enable_quota_trigger(leaps_dsn)
        clock.advance(seconds=60)
        await dog(bot).tick()
        watched = [e.text for e in await store.timeline(incident.id) if e.kind == "watchdog"]
        assert len(watched) == 2, watched
        assert "turned critical" in watched[0] and "is ok again" in watched[1]


async def watchdog_role(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as resp:
        role: str = (await resp.json())["watchdog"]
        return role


async def test_failover_a_killed_leader_is_replaced_within_one_interval(
    leaps_dsn: str,
    pg_dsn_factory: Callable[[str], str],
    faults: FaultInjector,
    fake_slack: FakeSlack,
) -> None:
    """Two `python -m bot serve` processes on one PostgreSQL state store: one leads; after
    `kill -9` the other posts the next alert within one interval (plus one health run),
    and does not post again the problem the dead leader already posted."""
    interval = 3.0
    env = {"OPS_CHANNEL": OPS, "WATCHDOG_INTERVAL_S": f"{interval:g}"}
    state_url = pg_dsn_factory("state")
    async with (
        bot_process(leaps_dsn, state_url, fake_slack, **env) as one,
        bot_process(leaps_dsn, state_url, fake_slack, **env) as two,
    ):
        roles = {p.url: await watchdog_role(p.url) for p in (one, two)}
        assert sorted(roles.values()) == ["follower", "leader"], roles
        leader, follower = (one, two) if roles[one.url] == "leader" else (two, one)

        await faults.disable_quota_trigger()
        await fake_slack.wait_for(
            "chat.postMessage", timeout=4 * interval, predicate=alert_about(QUOTA_CHECK)
        )
        # killed between Slack's ok and its marking, the alert would rightly go out again
        await until_alerted(state_url, QUOTA_CHECK)

        leader.proc.kill()  # no clean shutdown: the lock goes with its connection
        await leader.proc.wait()
        killed_at = time.monotonic()
        await faults.unpopulated_view()
        await fake_slack.wait_for(
            "chat.postMessage",
            timeout=interval + HEALTH_RUN_S,
            predicate=alert_about(VIEWS_CHECK),
        )
        took = time.monotonic() - killed_at
        assert await watchdog_role(follower.url) == "leader"
        await asyncio.sleep(interval)  # one more tick of the new leader
        assert len(mentioning(ops_texts(fake_slack, "critical"), QUOTA_CHECK)) == 1
        assert len(mentioning(ops_texts(fake_slack, "critical"), VIEWS_CHECK)) == 1
        print(f"failover: the next alert {took:.1f} s after kill -9 (interval {interval:g} s)")


async def until_alerted(state_url: str, check: str) -> None:
    """Until the leader has marked the alert about `check` sent (Slack answered ok)."""
    store = await open_store(state_url)
    try:
        for _ in range(200):
            state = (await WatchdogStore(store).checks()).get(check)
            if state is not None and state.alerted:
                return
            await asyncio.sleep(0.05)
    finally:
        await store.close()
    raise AssertionError(f"the alert about {check} was not marked sent")


def alert_about(check: str) -> Callable[[Call], bool]:
    def match(call: Call) -> bool:
        text = str(call.params.get("text", ""))
        return call.params.get("channel") == OPS and "critical" in text and f"*{check}*" in text

    return match


async def test_demo_walks_an_incident_from_the_watchdog_alert_to_full_recovery(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    settings = bot_settings(
        leaps_dsn,
        fake_slack,
        role_map=DEMO_ROLES,
        remedy_service_user_id=await demo_service_user(leaps_dsn),
        thresholds=DEMO_THRESHOLDS,
        approval_ttl_s=WALK_APPROVAL_TTL_S,
    )
    printed = io.StringIO()
    missing = await walk_incident(settings, leaps_dsn, printed)
    out = printed.getvalue()
    assert out.count("Watchdog: critical on") == 1
    assert out.count("Watchdog: recovered on") == 1
    assert "cannot approve your own request" in out
    assert re.search(r"\ndone \S+ \(approved by U0LEAD", out)
    summary = out[out.rindex("Summary of incident") :]
    for milestone in ("Detection", "Response", "Communication", "Resolution", "Full recovery"):
        assert re.search(rf"{milestone} +\S+ +\S+ \(\d\d:\d\d UTC\) +met\n", summary), milestone
    assert "approved by <@U0LEAD>, done: 1 rows changed" in summary
    store = await open_store(settings.state_database_url)
    try:
        incidents = IncidentStore(store)
        (incident,) = [i for i in [await incidents.latest_in(CONSOLE_CHANNEL)] if i]
        assert incident.detected_by == "watchdog"
        assert incident.state == "recovered"
        assert incident.recovery_evidence is not None
        assert incident.recovery_evidence["percentages"]["users"] == 100.0
        kinds = [e.kind for e in await incidents.timeline(incident.id)]
        assert kinds.count("command") == 3 and kinds.count("update") == 1  # views x2, recover
        assert kinds.count("verification") == 1
        assert kinds.count("watchdog") == 2
    finally:
        await store.close()
    assert missing == []
    assert "recovery verification: users 100 %, submissions 100 %" in out
    assert "Full recovery  8h00m   20m00s" in summary


async def eventually(attempt: Callable[[], Awaitable[bool]], limit_s: float = 5.0) -> bool:
    for _ in range(int(limit_s / 0.05)):
        if await attempt():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_advisory_lock_elects_one_leader_and_hands_over_when_it_goes(
    pg_dsn_factory: Callable[[str], str],
) -> None:
    state_url = pg_dsn_factory("state")
    first, second = leadership_for(state_url), leadership_for(state_url)
    assert isinstance(first, PgAdvisoryLeadership)
    try:
        assert await first.hold() is True
        assert await second.hold() is False
        assert await first.hold() is True  # still the leader: its connection is alive
        await first.release()  # the session ends, and the lock with it (its backend exits
        # a moment after the client closes: the next try, as the next interval would)
        assert await eventually(second.hold)
        assert await first.hold() is False
    finally:
        await first.release()
        await second.release()


async def test_sqlite_state_file_elects_one_leader_by_flock() -> None:
    state_url = f"sqlite:///{STATE_DIR}/leader-{next(_files)}.sqlite3"
    first, second = leadership_for(state_url), leadership_for(state_url)
    assert isinstance(first, FileLeadership)
    try:
        assert (await first.hold(), await second.hold()) == (True, False)
        await first.release()
        assert (await second.hold(), await first.hold()) == (True, False)
    finally:
        await first.release()
        await second.release()
    assert await leadership_for("sqlite:///:memory:").hold() is True


async def test_a_check_critical_for_hours_does_not_backdate_a_new_problem(
    leaps_dsn: str, faults: FaultInjector, fake_slack: FakeSlack
) -> None:
    """The quota trigger has been critical for 20 hours (its incident long recovered);
    then the views break: the watchdog's new incident is detected when they broke."""
    clock = ManualClock(datetime(2026, 11, 30, 9, 0, tzinfo=UTC))
    async with watched_bot(leaps_dsn, fake_slack, watchdog_opens_incident=True) as bot:
        assert bot.service.incidents is not None
        incidents = bot.service.incidents
        incidents.clock = clock
        dog(bot).clock = clock
        await faults.disable_quota_trigger()
        await dog(bot).tick()  # critical: alert and incident
        first = await incidents.store.active_in(OPS)
        assert first is not None and first.detected_at == clock.now()
        await incidents.mark_recovered(OPS, {})  # open: not closed by a verification
        assert await incidents.store.active_in(OPS) is not None
        await incidents.handle(incident_cmd.parse("recovered"), user_id="U0X", channel_id=OPS)
        assert await incidents.store.active_in(OPS) is None
        clock.advance(hours=20)
        await dog(bot).tick()  # still critical: nothing new
        await faults.unpopulated_view()
        broke = clock.advance(minutes=1)
        await dog(bot).tick()
        second = await incidents.store.active_in(OPS)
        assert second is not None and second.id != first.id and VIEWS_CHECK in second.title
        assert (second.detected_at, second.detected_by) == (broke, "watchdog")
