"""`/db migrations` and `migration-resolve` against a real PostgreSQL 15 fixture: a clean
fixture has no failed migration and no drift; each injected problem (a failed, a
rolled-back migration, no history table, each kind of drift) is named, worst first;
the remedy resolves a failed migration as `prisma migrate resolve` does, backed up and
verified, through the executor and over the Slack path with an approval, and refuses
any name that is not failed before an approval is asked."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from bot.approvals.executor import Executor
from bot.gateway import TargetGateway
from bot.router import Answer, Dispatcher, RunContext
from commands import migrations as mg
from commands.base import BACKUP_SCHEMA, Finding, Report, Status, UsageError
from commands.fixture.expected import dump_expected, render_expected
from commands.fixture.faults import DEFAULT_MIGRATION, FaultInjector
from commands.remedies.base import REMEDIES, Execution, backup_name
from commands.remedies.migrations import MIGRATION_RESOLVE, ResolveData, parse_args
from tests.conftest import FAST_THRESHOLDS, RunningBot, bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import ADMIN, CHANNEL, ROLES, message_text, press, request, settle

Rows = list[tuple[Any, ...]]
SECRET = "hunter2-very-secret"


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn)
    yield RunContext(gateway, FAST_THRESHOLDS)
    await gateway.close()


async def fetch(
    dsn: str, query: LiteralString | sql.Composed, params: tuple[Any, ...] = ()
) -> Rows:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params or None)
        return await cur.fetchall() if cur.description else []


async def diagnose(ctx: RunContext) -> Report:
    report = await Dispatcher(ctx).run("migrations")
    assert isinstance(report, Report), report
    return report


def checks(report: Report) -> dict[str, Finding]:
    return {f.check: f for f in report.findings}


def drift_of(report: Report, label: str) -> Finding:
    return checks(report)[f"schema drift: {label}"]


async def history(dsn: str, name: str) -> Rows:
    return await fetch(
        dsn,
        "SELECT id, finished_at IS NOT NULL, rolled_back_at IS NOT NULL, applied_steps_count,"
        " logs, checksum FROM _prisma_migrations WHERE migration_name = %s"
        " ORDER BY started_at, id",
        (name,),
    )


# --- /db migrations: the history ----------------------------------------------------------


async def test_clean_fixture_has_no_failed_migration_and_no_drift(ctx: RunContext) -> None:
    report = await diagnose(ctx)
    assert report.worst is Status.OK, [(f.check, f.summary) for f in report.findings]
    found = checks(report)
    summary = found["migrations public._prisma_migrations"].summary
    assert "5 applied (last 20250909101000_analytics_views)" in summary
    assert "none failed, none pending" in summary
    assert "matches the expected objects" in found["schema drift"].summary
    assert not [c for c in found if c.startswith("migration ")]


async def test_expected_file_is_the_fixture_dump(leaps_dsn: str) -> None:
    """The committed expected objects are what the dump script writes for the fixture:
    regenerate with `python -m bot.console.expected` after changing schema.sql."""
    dumped = render_expected(await dump_expected(leaps_dsn))
    assert dumped == mg.EXPECTED_FILE.read_text(encoding="utf-8")


async def test_failed_migration_is_found_worst_first_with_its_log_redacted(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.rolled_back_migration("20251020000000_add_badges_criteria")
    await faults.failed_migration()
    long_tail = "x" * 2000
    await fetch(
        leaps_dsn,
        "UPDATE _prisma_migrations SET logs = logs || %s WHERE migration_name = %s",
        (
            f"ALTER ROLE app PASSWORD '{SECRET}';\n"
            f"-- via postgresql://app:{SECRET}@db.example:5432/leaps\n{long_tail}",
            DEFAULT_MIGRATION,
        ),
    )
    report = await diagnose(ctx)
    assert report.worst is Status.CRIT
    assert report.findings[0].check == f"migration {DEFAULT_MIGRATION}"
    first, second = [f for f in report.findings if f.check.startswith("migration ")]
    assert first.check == f"migration {DEFAULT_MIGRATION}" and first.status is Status.CRIT
    assert "FAILED" in first.summary and "0 steps applied" in first.summary
    assert f"/db migration-resolve {DEFAULT_MIGRATION} --rolled-back" in (first.hint or "")
    (row,) = first.rows
    assert row["state"] == "failed" and row["applied_steps"] == 0
    assert row["started_at"] and row["finished_at"] is None and row["rolled_back_at"] is None
    assert 'relation "users_region_idx" already exists' in row["logs"]
    assert len(row["logs"]) <= mg.LOG_CHARS
    assert SECRET not in json.dumps(report.model_dump(mode="json"))
    assert second.check == "migration 20251020000000_add_badges_criteria"
    assert second.status is Status.WARN and "pending" in second.summary
    summary = checks(report)["migrations public._prisma_migrations"].summary
    assert "1 failed, 1 rolled back" in summary


def test_shown_log_masks_without_the_literal_scanner() -> None:
    """Passwords in a connection string or a key=value pair are masked even where the
    log shows literals (SHOW_QUERY_LITERALS) or where no quote encloses them."""
    log = f"connect postgres://app:{SECRET}@h/db failed; password={SECRET} host=h"
    shown = mg.shown_log(log, show_literals=True)
    assert SECRET not in shown
    assert "postgres://app:***@h/db" in shown and "password=***" in shown


async def test_a_running_migration_is_not_called_failed(ctx: RunContext, leaps_dsn: str) -> None:
    """While a session holds Prisma's migrate lock, the newest unfinished attempt without
    a log is in progress, not failed."""
    await fetch(
        leaps_dsn,
        "INSERT INTO _prisma_migrations (id, checksum, migration_name, started_at)"
        " VALUES ('run-1', 'c', '20251111000000_running', now())",
    )
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as holder:
        await holder.execute("SELECT pg_advisory_lock(%s)", (mg.PRISMA_LOCK_KEY,))
        report = await diagnose(ctx)
        found = checks(report)["migration 20251111000000_running"]
        assert found.status is Status.WARN and "probably still running" in found.summary
        assert f"lock held by pid {holder.info.backend_pid}" in (
            checks(report)["migrations public._prisma_migrations"].summary
        )
    report = await diagnose(ctx)
    assert checks(report)["migration 20251111000000_running"].status is Status.CRIT


async def test_absent_migrations_table_is_a_finding(ctx: RunContext, faults: FaultInjector) -> None:
    await faults.drop_migrations_table()
    report = await diagnose(ctx)
    found = checks(report)["migrations"]
    assert found.status is Status.WARN
    assert "no `_prisma_migrations` table in any schema" in found.summary
    assert "matches the expected objects" in checks(report)["schema drift"].summary


async def test_migrations_table_in_another_schema_is_read(
    ctx: RunContext, faults: FaultInjector
) -> None:
    await faults.failed_migration()
    await faults.move_migrations_table("prisma")
    report = await diagnose(ctx)
    assert report.findings[0].check == f"migration {DEFAULT_MIGRATION}"
    assert "5 applied" in checks(report)["migrations prisma._prisma_migrations"].summary


# --- /db migrations: drift, kind by kind ----------------------------------------------------


async def test_dropped_column_is_missing(ctx: RunContext, faults: FaultInjector) -> None:
    await faults.drift_drop_column("kajabi_events", "raw")
    found = drift_of(await diagnose(ctx), "columns")
    assert found.status is Status.CRIT
    assert found.rows == [
        {"object": "kajabi_events.raw", "change": "missing", "expected": "jsonb", "found": None}
    ]


async def test_changed_column_type(ctx: RunContext, faults: FaultInjector) -> None:
    await faults.drift_change_column_type("schools", "region", "varchar(40)")
    found = drift_of(await diagnose(ctx), "columns")
    assert found.rows == [
        {
            "object": "schools.region",
            "change": "changed",
            "expected": "text",
            "found": "character varying(40)",
        }
    ]


async def test_extra_table_is_extra_but_the_bots_backups_are_not(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.drift_extra_table("import_tmp_2025")
    await fetch(
        leaps_dsn,
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {s}; CREATE TABLE {t} AS SELECT 1 AS id").format(
            s=sql.Identifier(BACKUP_SCHEMA), t=sql.Identifier(BACKUP_SCHEMA, "apv_x_users")
        ),
    )
    report = await diagnose(ctx)
    found = drift_of(report, "tables")
    assert found.status is Status.WARN
    assert [r["object"] for r in found.rows] == ["import_tmp_2025"]
    assert found.rows[0]["change"] == "extra"
    assert "schema drift: unique indexes" not in checks(report)  # not its primary key again
    assert "apv_x_users" not in json.dumps(report.model_dump(mode="json"))


async def test_dropped_unique_index_is_missing(ctx: RunContext, faults: FaultInjector) -> None:
    await faults.drift_drop_unique_index("points_ledger_external_event_id_key")
    await faults.drop_view_unique_index("time_series_metrics")
    found = drift_of(await diagnose(ctx), "unique indexes")
    assert found.status is Status.CRIT
    assert {(r["found"], r["expected"]) for r in found.rows} == {
        (None, "points_ledger_external_event_id_key"),
        (None, "time_series_metrics_day_activity_key"),
    }
    assert any("WHERE external_event_id IS NOT NULL" in r["object"] for r in found.rows)


async def test_equivalent_unique_index_under_another_name_is_no_drift(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.drift_drop_unique_index("leaderboard_30d_user_id_key")
    await fetch(leaps_dsn, "CREATE UNIQUE INDEX lb30_uid ON leaderboard_30d (user_id)")
    report = await diagnose(ctx)
    assert "schema drift: unique indexes" not in checks(report)


async def test_added_enum_value(ctx: RunContext, faults: FaultInjector) -> None:
    await faults.drift_add_enum_value("SubmissionStatus", "ARCHIVED")
    found = drift_of(await diagnose(ctx), "enums")
    assert found.rows == [
        {
            "object": "SubmissionStatus values",
            "change": "extra",
            "expected": "PENDING, APPROVED, REJECTED, REVOKED",
            "found": "PENDING, APPROVED, REJECTED, REVOKED, ARCHIVED",
        }
    ]


async def test_dropped_trigger_is_missing(ctx: RunContext, faults: FaultInjector) -> None:
    await faults.drift_drop_trigger("submissions", "trg_cleanup_attachments")
    found = drift_of(await diagnose(ctx), "triggers")
    assert found.status is Status.CRIT
    assert found.rows[0]["object"] == "submissions.trg_cleanup_attachments"
    assert found.rows[0]["change"] == "missing"


async def test_views_and_functions_drift(ctx: RunContext, leaps_dsn: str) -> None:
    """A dropped materialized view, an extra view, a dropped function: each its kind."""
    await fetch(
        leaps_dsn,
        "DROP FUNCTION refresh_leaderboards(); CREATE VIEW active_users AS SELECT id FROM users;"
        " DROP MATERIALIZED VIEW school_metrics",
    )
    report = await diagnose(ctx)
    assert drift_of(report, "functions").rows[0]["object"] == "refresh_leaderboards()"
    assert drift_of(report, "views").rows == [
        {"object": "active_users", "change": "extra", "expected": None, "found": None}
    ]
    matviews = drift_of(report, "materialized views")
    assert matviews.status is Status.CRIT
    assert matviews.rows[0]["object"] == "school_metrics"
    assert matviews.rows[0]["change"] == "missing"
    # its unique index went with it: one finding for the view, not one more for the index
    assert "schema drift: unique indexes" not in checks(report)


async def test_migrations_over_slack(bot: RunningBot, faults: FaultInjector) -> None:
    await faults.failed_migration()
    await faults.drift_drop_column("kajabi_events", "raw")
    resp = await bot.slash("migrations")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=20)
    text = json.dumps(call.params["blocks"])
    assert DEFAULT_MIGRATION in text and "FAILED" in text
    assert f"/db migration-resolve {DEFAULT_MIGRATION}" in text
    assert "kajabi_events.raw" in text
    assert text.index(DEFAULT_MIGRATION) < text.index("kajabi_events.raw")


# --- migration-resolve ------------------------------------------------------------------


def test_remedy_is_registered_for_a_reviewer_with_an_admin_approving() -> None:
    assert REMEDIES["migration-resolve"] is MIGRATION_RESOLVE
    assert MIGRATION_RESOLVE.role == "REVIEWER" and MIGRATION_RESOLVE.approver_role == "ADMIN"
    assert MIGRATION_RESOLVE.approvers == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "say how it was resolved"),
        (["x"], "say how it was resolved"),
        (["x", "--rolled-back", "--applied"], "say how it was resolved"),
        (["--applied"], "name exactly one migration"),
        (["a", "b", "--applied"], "name exactly one migration"),
        (["a", "--force"], "unknown option --force"),
    ],
)
def test_arguments_are_checked(args: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_args(args)


async def test_names_that_are_not_failed_are_refused(
    ctx: RunContext, faults: FaultInjector
) -> None:
    await faults.rolled_back_migration("20251020000000_add_badges_criteria")
    cases = {
        "20250909101000_analytics_views": "not a failed migration (applied",
        "20251020000000_add_badges_criteria": "not a failed migration (rolled back",
        "no_such_migration": "no migration named `no_such_migration` is recorded",
    }
    for name, message in cases.items():
        with pytest.raises(UsageError, match=re.escape(message)) as raised:
            await MIGRATION_RESOLVE.plan(ctx, [name, "--rolled-back"])
        assert "no migration is failed now" in str(raised.value)
    await faults.failed_migration()
    with pytest.raises(UsageError, match=f"failed migrations now: {DEFAULT_MIGRATION}"):
        await MIGRATION_RESOLVE.plan(ctx, ["no_such_migration", "--applied"])


async def test_applied_is_refused_when_the_migration_is_already_applied(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    """A second, failed attempt of an applied migration: Prisma refuses --applied."""
    await faults.failed_migration("20250909101000_analytics_views")
    with pytest.raises(UsageError, match="already recorded as applied"):
        await MIGRATION_RESOLVE.plan(ctx, ["20250909101000_analytics_views", "--applied"])
    plan = await MIGRATION_RESOLVE.plan(ctx, ["20250909101000_analytics_views", "--rolled-back"])
    assert plan.count == 1


async def test_no_migrations_table_is_refused(ctx: RunContext, faults: FaultInjector) -> None:
    await faults.drop_migrations_table()
    with pytest.raises(UsageError, match="no `_prisma_migrations` table"):
        await MIGRATION_RESOLVE.plan(ctx, [DEFAULT_MIGRATION, "--rolled-back"])


async def test_rolled_back_before_and_after(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.failed_migration()
    (before,) = await history(leaps_dsn, DEFAULT_MIGRATION)
    assert before[1:4] == (False, False, 0)
    plan = await MIGRATION_RESOLVE.plan(ctx, [DEFAULT_MIGRATION, "--rolled-back"])
    assert plan.count == 1 and plan.needs_approval
    assert [t["id"] for t in plan.targets] == [before[0]]
    assert "rolled_back_at = now()" in json.dumps([s.sql for s in plan.steps])
    state, outcome = await Executor(leaps_dsn).apply(MIGRATION_RESOLVE, plan, "apv-rb")
    assert state == "done", outcome
    assert outcome.affected == 1 and outcome.backed_up == 1
    (after,) = await history(leaps_dsn, DEFAULT_MIGRATION)
    assert after[0] == before[0] and after[1:4] == (False, True, 0)
    (kept,) = await fetch(
        leaps_dsn,
        sql.SQL("SELECT id, finished_at, rolled_back_at, logs FROM {}").format(
            sql.Identifier(BACKUP_SCHEMA, backup_name("apv-rb", mg.MIGRATIONS_TABLE))
        ),
    )
    assert kept[0] == before[0] and kept[1] is None and kept[2] is None and kept[3] == before[4]
    report = await diagnose(ctx)
    assert checks(report)[f"migration {DEFAULT_MIGRATION}"].status is Status.WARN  # pending
    assert not [f for f in report.findings if "FAILED" in f.summary]
    run = Execution(approval_id="apv-rb", actor_id="test")
    verdict = await ctx.gateway.read(lambda db: MIGRATION_RESOLVE.verify(db, plan, run))
    assert verdict.landed, verdict.found
    never = Execution(approval_id="apv-never", actor_id="test")
    verdict = await ctx.gateway.read(lambda db: MIGRATION_RESOLVE.verify(db, plan, never))
    assert not verdict.landed and "no backup table" in verdict.found


async def test_applied_before_and_after(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    """As `prisma migrate resolve --applied`: the failed attempt is marked rolled back and
    one applied record added (same checksum, empty log, 0 steps)."""
    await faults.failed_migration()
    (before,) = await history(leaps_dsn, DEFAULT_MIGRATION)
    plan = await MIGRATION_RESOLVE.plan(ctx, [DEFAULT_MIGRATION, "--applied"])
    assert plan.private(ResolveData).mode == "applied"
    state, outcome = await Executor(leaps_dsn).apply(MIGRATION_RESOLVE, plan, "apv-ap")
    assert state == "done", outcome
    failed, applied = await history(leaps_dsn, DEFAULT_MIGRATION)
    assert failed[0] == before[0] and failed[1:3] == (False, True)
    assert applied[0] != before[0] and applied[1:5] == (True, False, 0, "")
    assert applied[5] == before[5]
    report = await diagnose(ctx)
    assert report.worst is Status.OK, [(f.check, f.summary) for f in report.findings]
    assert "6 applied" in checks(report)["migrations public._prisma_migrations"].summary


async def test_drift_between_plan_and_apply_changes_nothing(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.failed_migration()
    plan = await MIGRATION_RESOLVE.plan(ctx, [DEFAULT_MIGRATION, "--rolled-back"])
    await fetch(
        leaps_dsn,
        "UPDATE _prisma_migrations SET rolled_back_at = now() WHERE migration_name = %s",
        (DEFAULT_MIGRATION,),
    )
    state, outcome = await Executor(leaps_dsn).apply(MIGRATION_RESOLVE, plan, "apv-drift")
    assert state == "aborted" and "drift" in outcome.summary


async def test_a_running_prisma_migrate_blocks_the_remedy(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.failed_migration()
    plan = await MIGRATION_RESOLVE.plan(ctx, [DEFAULT_MIGRATION, "--rolled-back"])
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as holder:
        await holder.execute("SELECT pg_advisory_lock(%s)", (mg.PRISMA_LOCK_KEY,))
        warned = await MIGRATION_RESOLVE.plan(ctx, [DEFAULT_MIGRATION, "--rolled-back"])
        assert any("holds its lock" in w for w in warned.warnings)
        state, outcome = await Executor(leaps_dsn).apply(MIGRATION_RESOLVE, plan, "apv-lock")
    assert state == "aborted" and "a migration is running now" in outcome.summary
    (row,) = await history(leaps_dsn, DEFAULT_MIGRATION)
    assert row[1:3] == (False, False)


async def test_resolve_over_slack_with_an_approval(leaps_dsn: str, fake_slack: FakeSlack) -> None:
    async with FaultInjector(leaps_dsn) as faults:
        await faults.failed_migration()
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, f"migration-resolve {DEFAULT_MIGRATION} --rolled-back")
        plan_text = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert DEFAULT_MIGRATION in plan_text and "rolled_back_at" in plan_text
        (row,) = await history(leaps_dsn, DEFAULT_MIGRATION)
        assert row[1:3] == (False, False)  # nothing before the approval
        await press(bot, plan, ADMIN)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "done" in final and f"<@{ADMIN}>" in final
    (row,) = await history(leaps_dsn, DEFAULT_MIGRATION)
    assert row[1:3] == (False, True)


async def test_resolving_a_name_that_is_not_failed_over_slack_is_refused(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    async with running_bot(settings, fake_slack) as bot:
        resp = await bot.slash(
            "migration-resolve 20250909101000_analytics_views --rolled-back",
            channel=CHANNEL,
            user="U0REQ",
        )
        assert resp.status == 200
        (call,) = await fake_slack.wait_for("response_url", timeout=15)
        assert "is not a failed migration" in call.params["text"]
        assert not [c for c in fake_slack.calls_to("chat.postMessage") if c.params.get("thread_ts")]


async def test_console_dry_run_shows_the_plan(ctx: RunContext, faults: FaultInjector) -> None:
    await faults.failed_migration()
    result = await Dispatcher(ctx).run(f"migration-resolve {DEFAULT_MIGRATION} --applied")
    assert not isinstance(result, Answer | Report)
    assert result.count == 1 and "INSERT INTO" in json.dumps([s.sql for s in result.steps])
