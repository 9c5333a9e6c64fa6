"""`/db analytics` against a real PostgreSQL: base-table counts against each view's
counts, empty and unpopulated views, freshness measured against each definition run
now and read from the bot's refresh journal; over Slack end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from bot.gateway import TargetGateway
from bot.router import Dispatcher, RunContext
from commands.analytics import analytics
from commands.base import Finding, Report, Status, UsageError
from commands.fixture.faults import FaultInjector
from tests.conftest import FAST_THRESHOLDS, RunningBot
from tests.test_health_e2e import section_texts
from tests.test_leaderboard import refresh, run

VIEWS = (
    "leaderboard_totals",
    "leaderboard_30d",
    "activity_metrics",
    "cohort_metrics",
    "school_metrics",
    "time_series_metrics",
)
MEASURED = ("activity_metrics", "cohort_metrics", "school_metrics", "time_series_metrics")


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn, check_timeout_ms=30_000)
    yield RunContext(gateway, FAST_THRESHOLDS)
    await gateway.close()


def by_check(report: Report) -> dict[str, Finding]:
    return {f.check: f for f in report.findings}


def expected_checks() -> set[str]:
    return (
        {"base tables"} | {f"view {v}" for v in VIEWS} | {f"{v} vs base tables" for v in MEASURED}
    )


async def test_clean_fixture_agrees(ctx: RunContext, leaps_dsn: str) -> None:
    report = await Dispatcher(ctx).run("analytics")
    assert isinstance(report, Report)
    found = by_check(report)
    assert set(found) == expected_checks()
    for name, finding in found.items():
        assert finding.status is Status.OK, (name, finding.summary)
    ((subs, ledger),) = await run(
        leaps_dsn, "SELECT (SELECT count(*) FROM submissions), (SELECT count(*) FROM points_ledger)"
    )
    base = found["base tables"].rows[0]
    assert (base["submissions"], base["points_ledger"]) == (subs, ledger)
    assert subs > 0 and ledger > 0
    cohort = found["view cohort_metrics"]
    assert "matches its definition run now" in cohort.summary
    assert "no refresh recorded by the bot" in cohort.summary
    assert "newest day" in found["view time_series_metrics"].summary


async def test_stale_views_are_fixed_by_a_refresh(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.stale_views(points=500)
    found = by_check(await analytics(ctx, []))
    for view in ("activity_metrics", "cohort_metrics", "school_metrics", "time_series_metrics"):
        finding = found[f"{view} vs base tables"]
        assert finding.status is Status.WARN, (view, finding.summary)
        assert "its definition run now agrees" in finding.summary
        assert finding.hint == f"refresh fixes it: /db refresh-views {view}"
        assert found[f"view {view}"].status is Status.WARN
        assert "is stale: 1 of its" in found[f"view {view}"].summary
    (present,) = found["activity_metrics vs base tables"].rows
    assert present["activity"] == "PRESENT"
    assert present["table_points"] - present["view_points"] == 500
    assert present["view_submissions"] == present["table_submissions"]
    (today,) = found["time_series_metrics vs base tables"].rows
    assert today["day"] == datetime.now(UTC).date().isoformat()
    assert today["table_points"] - today["view_points"] == 500

    await refresh(leaps_dsn, "activity_metrics")
    found = by_check(await analytics(ctx, []))
    assert found["activity_metrics vs base tables"].status is Status.OK
    assert found["view activity_metrics"].status is Status.OK
    assert found["cohort_metrics vs base tables"].status is Status.WARN  # not refreshed


async def test_empty_and_unpopulated_views(ctx: RunContext, faults: FaultInjector) -> None:
    activities = await faults.views_refreshed_while_empty("activities", ["activity_metrics"])
    await faults.unpopulated_view("cohort_metrics")
    found = by_check(await analytics(ctx, []))
    empty = found["view activity_metrics"]
    assert empty.status is Status.WARN
    assert f"is EMPTY, but its definition gives {activities:,} rows now" in empty.summary
    assert empty.hint == "refresh fixes it: /db refresh-views activity_metrics"
    counts = found["activity_metrics vs base tables"]
    assert counts.status is Status.WARN
    assert f"({activities} missing from the view, 0 no longer in the tables)" in counts.summary
    unpopulated = found["view cohort_metrics"]
    assert unpopulated.status is Status.CRIT and "NOT populated" in unpopulated.summary
    assert unpopulated.hint and "/db refresh-views cohort_metrics" in unpopulated.hint
    assert found["cohort_metrics vs base tables"].status is Status.SKIPPED
    assert "agrees with the base tables" in found["cohort_metrics vs base tables"].summary
    assert found["base tables"].status is Status.OK  # the data is there


async def test_freshness_reads_the_bots_refresh_journal(ctx: RunContext) -> None:
    now = datetime.now(UTC)
    records: dict[str, dict[str, Any]] = {
        "public.school_metrics": {
            "started_at": now - timedelta(hours=3, seconds=4),
            "finished_at": now - timedelta(hours=3),
            "rows": 12,
            "error": None,
            "mode": "concurrently",
        },
        "activity_metrics": {
            "started_at": now - timedelta(minutes=20),
            "finished_at": None,
            "rows": None,
            "error": "canceling statement due to lock timeout",
            "mode": "concurrently",
        },
    }

    async def refresh_log() -> dict[str, dict[str, Any]]:
        return records

    report = await analytics(RunContext(ctx.gateway, FAST_THRESHOLDS, refresh_log=refresh_log), [])
    found = by_check(report)
    school = found["view school_metrics"]
    assert school.status is Status.OK
    assert "last refreshed by the bot 3h00m ago (concurrently, 12 rows, took 4s)" in school.summary
    failed = found["view activity_metrics"]
    assert failed.status is Status.WARN and "lock timeout" in failed.summary
    assert failed.hint == "/db refresh-views activity_metrics tries again"


async def test_definition_that_disagrees_is_not_fixed_by_a_refresh(
    ctx: RunContext, leaps_dsn: str
) -> None:
    """school_metrics recreated to count every user, not participants only."""
    ((text,),) = await run(leaps_dsn, "SELECT pg_get_viewdef('school_metrics'::regclass)")
    broken = str(text).replace("'PARTICIPANT'::\"Role\"", "u.role")  # u.role = u.role
    assert broken != text
    await run(
        leaps_dsn,
        "CREATE MATERIALIZED VIEW school_metrics_broken AS " + broken.rstrip(";"),
        "DROP MATERIALIZED VIEW school_metrics",
        "ALTER MATERIALIZED VIEW school_metrics_broken RENAME TO school_metrics",
    )
    finding = by_check(await analytics(ctx, []))["school_metrics vs base tables"]
    assert finding.status is Status.CRIT
    assert "a refresh would not fix it" in finding.summary
    assert (
        finding.rows
        and finding.rows[0]["view_participants"] > finding.rows[0]["table_participants"]
    )


async def test_locked_view_names_the_holder(ctx: RunContext, leaps_dsn: str) -> None:
    holder = await psycopg.AsyncConnection.connect(leaps_dsn, application_name="lock-holder")
    try:
        await holder.execute("REFRESH MATERIALIZED VIEW cohort_metrics")
        found = by_check(await analytics(ctx, []))
        locked = found["view cohort_metrics"]
        assert locked.status is Status.SKIPPED
        assert f"pid {holder.info.backend_pid} (lock-holder" in locked.summary
        assert "cohort_metrics vs base tables" not in found
        assert found["school_metrics vs base tables"].status is Status.OK
    finally:
        await holder.rollback()
        await holder.close()


async def test_view_without_the_expected_columns(ctx: RunContext, leaps_dsn: str) -> None:
    await run(
        leaps_dsn, "ALTER MATERIALIZED VIEW cohort_metrics RENAME COLUMN total_points TO points"
    )
    found = by_check(await analytics(ctx, []))
    counts = found["cohort_metrics vs base tables"]
    assert counts.status is Status.WARN
    assert "has no column total_points" in counts.summary
    assert counts.hint and "/db migrations" in counts.hint
    assert found["view cohort_metrics"].status is Status.OK  # freshness still measured


async def test_arguments_are_refused(ctx: RunContext) -> None:
    with pytest.raises(UsageError):
        await analytics(ctx, ["now"])


async def test_analytics_over_slack(bot: RunningBot, faults: FaultInjector) -> None:
    await faults.stale_views(points=250)
    await faults.views_refreshed_while_empty("activities", ["activity_metrics"])
    resp = await bot.slash("analytics")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=30)
    text = "\n".join(section_texts(call))
    assert "activity_metrics is EMPTY" in text
    assert "refresh fixes it: /db refresh-views cohort_metrics" in text
