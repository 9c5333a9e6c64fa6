"""The operators' two webhook alerts (LEAPS_SCHEMA.md) in `/db health`: more than 50
Kajabi events unmatched for over 15 minutes, and any repeated external_event_id. Against
the real fixture PostgreSQL with injected faults, over signed Slack requests, and through
the watchdog, which posts a check that turns critical once to OPS_CHANNEL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest_asyncio

from bot.gateway import TargetGateway
from bot.router import RunContext
from commands.base import Finding, Report, Status
from commands.fixture.faults import FaultInjector
from commands.health import LEDGER_EVENTS, health
from commands.webhooks import ALERT
from tests.conftest import FAST_THRESHOLDS, RunningBot
from tests.fakeslack import FakeSlack
from tests.test_health_e2e import crit_checks, section_texts
from tests.test_watchdog import dog, mentioning, ops_texts, watched_bot


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn)
    yield RunContext(gateway, FAST_THRESHOLDS)
    await gateway.close()


async def checks(ctx: RunContext) -> dict[str, Finding]:
    return {f.check: f for f in (await health(ctx, [])).findings}


async def test_clean_fixture_raises_neither_alert(ctx: RunContext) -> None:
    by = await checks(ctx)
    assert by[ALERT].status is Status.OK, by[ALERT]
    assert by[ALERT].summary.endswith("processed with no user or one who no longer exists")
    assert by[LEDGER_EVENTS].status is Status.OK, by[LEDGER_EVENTS]
    assert "unique index points_ledger_external_event_id_key" in by[LEDGER_EVENTS].summary


async def test_backlog_over_fifty_is_critical_with_the_way_out(
    ctx: RunContext, faults: FaultInjector
) -> None:
    base = int((await checks(ctx))[ALERT].summary.split()[0])  # the seed's NO_USER_FOUND
    await faults.unmatched_webhook_backlog(50 - base)
    assert (await checks(ctx))[ALERT].status is Status.OK  # exactly 50: not more than 50
    await faults.unmatched_webhook_backlog(1)
    found = (await checks(ctx))[ALERT]
    assert found.status is Status.CRIT
    assert found.summary.startswith("51 events unmatched for over 15m00s (alert above 50)")
    assert found.hint is not None
    for command in ("/db webhooks", "/db reprocess-webhooks", "/db rematch-emails"):
        assert command in found.hint


async def test_any_repeated_external_event_id_is_critical(
    ctx: RunContext, faults: FaultInjector
) -> None:
    await faults.duplicate_external_events(1)
    found = (await checks(ctx))[LEDGER_EVENTS]
    assert found.status is Status.CRIT
    assert found.summary.startswith("1 external_event_ids appear more than once (1 extra ledger")
    assert found.hint is not None
    assert "/db webhooks" in found.hint and "/db dedupe-ledger-events" in found.hint
    assert [int(r["copies"]) for r in found.rows] == [2]


async def test_without_kajabi_events_the_backlog_check_is_skipped(
    ctx: RunContext, leaps_dsn: str
) -> None:
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute("DROP TABLE kajabi_events CASCADE")
    report = await health(ctx, [])
    found = next(f for f in report.findings if f.check == ALERT)
    assert found.status is Status.SKIPPED
    assert "no kajabi_events table" in found.summary
    assert not [f for f in report.findings if f.status is Status.ERROR]


async def test_backlog_alert_over_slack(bot: RunningBot, faults: FaultInjector) -> None:
    await faults.unmatched_webhook_backlog(51)
    resp = await bot.slash("health")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=20)
    assert crit_checks(call) == {ALERT}
    (section,) = [t for t in section_texts(call) if ALERT in t]
    assert "/db webhooks" in section and "/db reprocess-webhooks" in section


async def test_watchdog_posts_the_backlog_alert_once(
    leaps_dsn: str, faults: FaultInjector, fake_slack: FakeSlack
) -> None:
    async with watched_bot(leaps_dsn, fake_slack) as bot:
        await dog(bot).tick()  # the clean fixture: nothing about webhooks
        assert mentioning(ops_texts(fake_slack, "critical"), ALERT) == []
        assert mentioning(ops_texts(fake_slack, "critical"), LEDGER_EVENTS) == []
        await faults.unmatched_webhook_backlog(60)
        for _ in range(3):
            await dog(bot).tick()
        alerts = mentioning(ops_texts(fake_slack, "critical"), ALERT)
        assert len(alerts) == 1, alerts
        assert "events unmatched for over 15m00s (alert above 50)" in alerts[0]
        assert "/db webhooks" in alerts[0] and "/db reprocess-webhooks" in alerts[0]


async def test_watchdog_counts_whole_tables_on_one_tick_in_scan_every(
    leaps_dsn: str, faults: FaultInjector, fake_slack: FakeSlack
) -> None:
    """The backlog (a whole-table count) is counted on the watchdog's counting ticks only:
    between them `/db health`, the watchdog's and anyone's, shows that count with its
    time; `--exact` counts now; the alert comes on the next counting tick, never lost."""
    async with watched_bot(leaps_dsn, fake_slack) as bot:
        watchdog = dog(bot)
        watchdog.scan_every = 3
        await watchdog.tick()  # counts: the clean fixture
        await faults.unmatched_webhook_backlog(60)
        for _ in range(2):  # shown from that count
            await watchdog.tick()
        assert mentioning(ops_texts(fake_slack, "critical"), ALERT) == []
        shown = await bot.service.dispatcher.run("health")
        exact = await bot.service.dispatcher.run("health --exact")
        assert isinstance(shown, Report) and isinstance(exact, Report)
        kept = {f.check: f for f in shown.findings}[ALERT]
        assert kept.status is Status.OK and "by the watchdog" in kept.summary
        assert {f.check: f for f in exact.findings}[ALERT].status is Status.CRIT
        await watchdog.tick()  # the third after the count: counts again
        alerts = mentioning(ops_texts(fake_slack, "critical"), ALERT)
        assert len(alerts) == 1, alerts
        assert "by the watchdog" not in alerts[0]
