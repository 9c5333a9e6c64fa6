"""`/db indexes`, `create-index` and `drop-index` against a real PostgreSQL 15 with the
fixture's guards present and each index fault injected the way it happens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from bot.approvals.executor import Executor, execution_lock_key
from bot.gateway import TargetGateway
from bot.router import RunContext
from commands.base import Context, Finding, LeapsIdentity, Reader, Report, Status, UsageError
from commands.fixture.faults import FaultInjector
from commands.indexes import RECOMMENDED, indexes, normalise_predicate, parse_min_size
from commands.remedies.base import (
    REMEDIES,
    Execution,
    Outcome,
    Plan,
    Remedy,
    Verification,
    Writer,
)
from commands.remedies.indexes import CREATE_INDEX, DROP_INDEX, parse_create_args
from tests.conftest import FAST_THRESHOLDS, bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import CHANNEL, message_text, press, request, settle

REQUESTER, ADMIN = "U0REQ", "U0ADMIN"
ROLES = {REQUESTER: "REVIEWER", ADMIN: "ADMIN"}
DUPLICATE = "submissions_user_id_copy_idx"
NEWEST = "points_ledger_by_user_newest"


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn)
    yield RunContext(gateway, FAST_THRESHOLDS)
    await gateway.close()


async def fetch(
    dsn: str, query: LiteralString, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params or None)
        return await cur.fetchall() if cur.description is not None else []


async def index_state(dsn: str, name: str) -> bool | None:
    """True valid, False invalid, None absent."""
    rows = await fetch(
        dsn,
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = %s",
        (name,),
    )
    return bool(rows[0][0]) if rows else None


async def report(ctx: RunContext, *args: str) -> dict[str, Finding]:
    result: Report = await indexes(ctx, list(args))
    return {f.check: f for f in result.findings}


def column(finding: Finding, key: str) -> list[Any]:
    return [r[key] for r in finding.rows]


# --- the diagnosis ------------------------------------------------------------------


def test_remedies_are_registered_with_their_roles() -> None:
    for name, remedy in (("create-index", CREATE_INDEX), ("drop-index", DROP_INDEX)):
        assert REMEDIES[name] is remedy
        assert (remedy.role, remedy.approver_role, remedy.approvers) == ("REVIEWER", "ADMIN", 1)
        assert not remedy.destroys_data


def test_predicates_compare_as_written_and_as_postgresql_prints_them() -> None:
    assert normalise_predicate("status = 'PENDING'") == normalise_predicate(
        """(status = 'PENDING'::"SubmissionStatus")"""
    )
    assert normalise_predicate("status = 'PENDING'") != normalise_predicate(
        """(status = 'APPROVED'::"SubmissionStatus")"""
    )


async def test_the_healthy_fixture_has_every_recommended_index_and_nothing_broken(
    ctx: RunContext,
) -> None:
    found = await report(ctx)
    for check in (
        "invalid indexes",
        "duplicate indexes",
        "recommended indexes",
        "foreign keys without index",
        "unused indexes",
    ):
        assert found[check].status is Status.OK, found[check]
    # Found by definition: the fixture names its indexes otherwise than the bot does.
    recommended = found["recommended indexes"].summary
    assert f"{NEWEST} as public.points_ledger_user_id_created_at_idx" in recommended
    assert "submissions_pending_by_age as public.submissions_pending_created_at_idx" in recommended
    assert len(RECOMMENDED) == 3


async def test_a_dropped_recommended_index_is_missing_with_its_fix(
    ctx: RunContext, faults: FaultInjector
) -> None:
    await faults.drop_index("points_ledger_user_id_created_at_idx")
    finding = (await report(ctx))["recommended indexes"]
    assert finding.status is Status.WARN
    assert column(finding, "recommended") == [NEWEST]
    (row,) = finding.rows
    assert row["definition"] == "public.points_ledger(user_id, created_at DESC)"
    assert row["fix"] == f"/db create-index {NEWEST}" and row["table_size"].endswith("B")


async def test_a_partial_index_with_another_predicate_does_not_count(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.drop_index("submissions_pending_created_at_idx")
    await fetch(
        leaps_dsn,
        "CREATE INDEX approved_by_age ON submissions (created_at, status)"
        " WHERE status = 'APPROVED'",
    )
    finding = (await report(ctx))["recommended indexes"]
    assert column(finding, "recommended") == ["submissions_pending_by_age"]


async def test_an_exact_duplicate_is_found_and_unused(
    ctx: RunContext, faults: FaultInjector
) -> None:
    before = await report(ctx, "0")
    assert before["duplicate indexes"].status is Status.OK
    assert f"public.{DUPLICATE}" not in column(before["unused indexes"], "index")

    await faults.duplicate_index()
    found = await report(ctx, "0")
    dup = found["duplicate indexes"]
    assert dup.status is Status.WARN
    (row,) = dup.rows
    assert row["index"] == f"public.{DUPLICATE}"
    assert row["duplicate_of"] == "public.submissions_user_id_idx"
    assert row["fix"] == f"/db drop-index public.{DUPLICATE}"
    assert row["size"].endswith("kB") and row["definition"].startswith("CREATE INDEX")
    unused = found["unused indexes"]
    assert unused.status is Status.WARN and f"public.{DUPLICATE}" in column(unused, "index")
    # Unique and constraint indexes are never offered as unused, whatever their scans.
    assert "public.users_pkey" not in column(unused, "index")
    assert "public.users_email_key" not in column(unused, "index")
    # Nor the only index of a foreign key: its scans are deletes of users, never counted.
    assert "public.learn_tag_grants_user_id_idx" not in column(unused, "index")
    assert "the only index of a foreign key" in unused.summary
    # Above the default size floor the small fixture has no unused index.
    assert (await report(ctx))["unused indexes"].status is Status.OK


async def test_an_invalid_index_left_by_a_failed_concurrent_build_is_found(
    ctx: RunContext, faults: FaultInjector
) -> None:
    assert (await report(ctx))["invalid indexes"].status is Status.OK
    name = await faults.invalid_index()
    finding = (await report(ctx))["invalid indexes"]
    assert finding.status is Status.WARN
    (row,) = finding.rows
    assert row["index"] == f"public.{name}"
    assert row["fix"] == f'DROP INDEX CONCURRENTLY "public"."{name}"'
    # The unique build failed before the index was ready: it refuses nothing.
    assert (row["unique"], row["written"]) == (True, False)
    assert "still refuses duplicate values" not in finding.summary


async def test_a_foreign_key_without_index_is_found(ctx: RunContext, faults: FaultInjector) -> None:
    dropped = await faults.unindexed_foreign_key("learn_tag_grants", "user_id")
    assert dropped == ["learn_tag_grants_user_id_idx"]
    finding = (await report(ctx))["foreign keys without index"]
    assert finding.status is Status.WARN
    (row,) = finding.rows
    assert (row["table"], row["columns"], row["references"]) == (
        "public.learn_tag_grants",
        ["user_id"],
        "public.users",
    )
    assert row["fix"] == "/db create-index public.learn_tag_grants(user_id)"


async def test_an_index_leading_a_wider_one_is_an_overlap(
    ctx: RunContext, faults: FaultInjector
) -> None:
    pair = ("public.points_ledger_user_id_idx", "public.points_ledger_user_id_created_at_idx")
    found = (await report(ctx))["overlapping indexes"]
    assert pair in zip(column(found, "index"), column(found, "covered_by"), strict=True)
    # Unique indexes are never "covered": they enforce a rule.
    assert "public.submissions_one_live_learn_per_user" not in column(found, "index")
    await faults.drop_index("points_ledger_user_id_created_at_idx")
    found = (await report(ctx))["overlapping indexes"]
    assert "public.points_ledger_user_id_idx" not in column(found, "index")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=60), max_size=4))
def test_any_arguments_parse_or_are_refused_plainly(args: list[str]) -> None:
    """User text is parsed in Python only (names are then looked up in the catalog and
    never written into SQL): anything else than a usage error is a bug."""
    for parse in (parse_min_size, parse_create_args):
        try:
            parse(args)
        except UsageError:
            pass


async def test_bad_size_argument(ctx: RunContext) -> None:
    with pytest.raises(UsageError, match="not a size"):
        await indexes(ctx, ["lots"])


# --- create-index -------------------------------------------------------------------


async def test_create_index_builds_a_recommended_index_concurrently(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.drop_index("points_ledger_user_id_created_at_idx")
    plan = await CREATE_INDEX.plan(ctx, [NEWEST])
    (step,) = plan.steps
    assert step.sql == (
        f'CREATE INDEX CONCURRENTLY "{NEWEST}" ON "public"."points_ledger"'
        ' USING btree ("user_id", "created_at" DESC)'
    )
    assert plan.count == 1 and plan.needs_approval
    assert any("cannot run inside a transaction" in w for w in plan.warnings)
    assert await index_state(leaps_dsn, NEWEST) is None

    # The executor's own transaction is a transaction block, where PostgreSQL refuses
    # CONCURRENTLY: the build running at all shows it went outside, on its own session.
    state, outcome = await Executor(leaps_dsn).apply(CREATE_INDEX, plan, "apv-ci1")
    assert state == "done", outcome
    assert outcome.affected == 1 and "valid" in outcome.summary
    assert await index_state(leaps_dsn, NEWEST) is True
    assert (await report(ctx))["recommended indexes"].status is Status.OK
    verdict = await ctx.gateway.read(
        lambda db: CREATE_INDEX.verify(db, plan, Execution("apv-ci1", "bot"))
    )
    assert verdict.landed, verdict
    # Guards still in place: nothing was disabled to build it.
    disabled = await fetch(
        leaps_dsn, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgenabled = 'D'"
    )
    assert disabled == [(0,)]


async def test_create_index_on_named_columns_fixes_an_unindexed_foreign_key(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.unindexed_foreign_key("learn_tag_grants", "user_id")
    plan = await CREATE_INDEX.plan(ctx, ["public.learn_tag_grants(user_id)"])
    assert plan.steps[0].sql == (
        'CREATE INDEX CONCURRENTLY "learn_tag_grants_user_id_idx" ON "public"."learn_tag_grants"'
        ' USING btree ("user_id")'
    )
    state, outcome = await Executor(leaps_dsn).apply(CREATE_INDEX, plan, "apv-ci2")
    assert state == "done", outcome
    assert (await report(ctx))["foreign keys without index"].status is Status.OK


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "takes a recommended index"),
        (["submissions(user_id,", "nope)"], "has no column `nope`"),
        (["nowhere(id)"], "there is no table `nowhere`"),
        (["users(school);", "DROP", "TABLE", "users"], "neither a recommended index"),
        (['users("school"', "DESC)"], "has no column"),
        ([NEWEST], "already serves"),
        (["submissions(user_id)"], "already serves"),
        (["points_ledger_by_user_newst"], f"did you mean `{NEWEST}`"),
    ],
)
async def test_create_index_checks_its_arguments_against_the_catalog(
    ctx: RunContext, args: list[str], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        await CREATE_INDEX.plan(ctx, args)


async def _building_pid(dsn: str) -> int:
    """The session running the build, once it waits for a lock."""
    for _ in range(200):
        rows = await fetch(
            dsn,
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%%'"
            " AND wait_event_type = 'Lock' AND application_name = 'dbops-bot'",
        )
        if rows:
            return int(rows[0][0])
        await asyncio.sleep(0.05)
    raise AssertionError("the build never waited for the open writer")


async def test_a_cancelled_build_leaves_no_invalid_index_and_says_so(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.drop_index("points_ledger_user_id_created_at_idx")
    plan = await CREATE_INDEX.plan(ctx, [NEWEST])
    # A writer with an open transaction: the build's catalog entry is committed, then it
    # waits for the writer, and is cancelled there, leaving an INVALID index.
    writer = await psycopg.AsyncConnection.connect(leaps_dsn)
    try:
        await writer.execute("UPDATE points_ledger SET meta = meta WHERE false")
        executor = Executor(leaps_dsn, lock_timeout_ms=10_000)
        task = asyncio.create_task(executor.apply(CREATE_INDEX, plan, "apv-ci3"))
        pid = await _building_pid(leaps_dsn)
        assert await index_state(leaps_dsn, NEWEST) is False  # the half-built index
        await fetch(leaps_dsn, "SELECT pg_cancel_backend(%s)", (pid,))
        await asyncio.sleep(0.2)
        await writer.rollback()
        state, outcome = await task
    finally:
        await writer.close()
    assert state == "failed"
    assert "canceling statement due to user request" in outcome.summary
    assert f"the INVALID index public.{NEWEST} it left was dropped" in outcome.summary
    assert await index_state(leaps_dsn, NEWEST) is None
    assert (await report(ctx))["invalid indexes"].status is Status.OK
    verdict = await ctx.gateway.read(
        lambda db: CREATE_INDEX.verify(db, plan, Execution("apv-ci3", "bot"))
    )
    assert not verdict.landed


@pytest.mark.parametrize(
    ("statement_ms", "lock_ms", "said"),
    [(60_000, 300, "lock timeout"), (300, 60_000, "statement timeout")],
)
async def test_a_timed_out_build_that_cannot_clean_up_names_what_remains(
    ctx: RunContext,
    faults: FaultInjector,
    leaps_dsn: str,
    statement_ms: int,
    lock_ms: int,
    said: str,
) -> None:
    """The executor's limits hold on the build's own session too; while the writer it
    waits for stays, the cleanup cannot drop the INVALID index either, and says so."""
    await faults.drop_index("points_ledger_user_id_created_at_idx")
    writer = await psycopg.AsyncConnection.connect(leaps_dsn)
    try:
        await writer.execute("UPDATE points_ledger SET meta = meta WHERE false")
        plan = await CREATE_INDEX.plan(ctx, [NEWEST])
        pid = writer.info.backend_pid
        assert any(
            f"public.points_ledger is locked now by pid {pid}" in w and "RowExclusiveLock" in w
            for w in plan.warnings
        ), plan.warnings
        executor = Executor(leaps_dsn, statement_timeout_ms=statement_ms, lock_timeout_ms=lock_ms)
        state, outcome = await executor.apply(CREATE_INDEX, plan, "apv-ci4")
    finally:
        await writer.close()
    assert state == "failed"
    assert f"canceling statement due to {said}" in outcome.summary
    assert f"sessions locking the table: pid {pid}" in outcome.summary
    assert outcome.offers == [f"terminate {pid}"]
    drop = f'DROP INDEX CONCURRENTLY "public"."{NEWEST}"'
    assert "could not be dropped" in outcome.summary and drop in outcome.summary
    finding = (await report(ctx))["invalid indexes"]
    assert column(finding, "index") == [f"public.{NEWEST}"]
    verdict = await ctx.gateway.read(
        lambda db: CREATE_INDEX.verify(db, plan, Execution("apv-ci4", "bot"))
    )
    assert not verdict.landed and "INVALID" in verdict.found


async def _probe_plan(ctx: Context, args: list[str]) -> Plan:
    return Plan(remedy="probe", args=args, title="probe", summary="probe", steps=[], count=0)


async def _probe_apply(writer: Writer, plan: Plan) -> Outcome:
    key = sql.Literal(execution_lock_key(writer.approval_id))
    await writer.run_outside_transaction(
        sql.SQL(
            "CREATE TABLE outside_probe AS SELECT current_setting('app.user_id', true) AS uid,"
            " current_setting('app.user_role', true) AS role,"
            " current_setting('statement_timeout') AS statement_timeout,"
            " current_setting('lock_timeout') AS lock_timeout,"
            " current_setting('application_name') AS app,"
            " pg_backend_pid() AS pid, pg_try_advisory_xact_lock({}) AS lock_free"
        ).format(key)
    )
    (mine,) = await writer.fetch("SELECT pg_backend_pid() AS pid")
    return Outcome(ok=True, summary="probed", rows=[mine])


async def _probe_verify(db: Reader, plan: Plan, run: Execution) -> Verification:
    return Verification(landed=True, found="a probe")


# A remedy of this test only (never registered): what the outside step's session is.
OUTSIDE_PROBE = Remedy(
    name="probe", usage="", summary="", plan=_probe_plan, apply=_probe_apply, verify=_probe_verify
)


async def test_the_outside_step_has_the_transactions_limits_and_identity(
    ctx: RunContext, leaps_dsn: str
) -> None:
    identity = LeapsIdentity("u-admin-1", "ADMIN", "a test identity")
    executor = Executor(leaps_dsn, statement_timeout_ms=12_345, lock_timeout_ms=678)
    plan = await OUTSIDE_PROBE.plan(ctx, [])
    state, outcome = await executor.apply(OUTSIDE_PROBE, plan, "apv-probe", identity)
    assert state == "done", outcome
    ((uid, role, statement, lock, app, pid, lock_free),) = await fetch(
        leaps_dsn, "SELECT * FROM outside_probe"
    )
    assert (uid, role, app) == ("u-admin-1", "ADMIN", "dbops-bot")
    assert (statement, lock) == ("12345ms", "678ms")
    # Its own session, while the guarded transaction held the approval's lock around it.
    assert pid != outcome.rows[0]["pid"] and lock_free is False


# --- drop-index ---------------------------------------------------------------------


async def test_drop_index_removes_an_exact_duplicate_and_keeps_its_definition(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.duplicate_index()
    definition = (await fetch(leaps_dsn, "SELECT pg_get_indexdef(%s::regclass)", (DUPLICATE,)))[0][
        0
    ]
    plan = await DROP_INDEX.plan(ctx, [DUPLICATE])
    assert plan.steps[0].sql == f'DROP INDEX CONCURRENTLY "public"."{DUPLICATE}"'
    assert plan.backup is not None and definition in plan.backup
    assert [t["role"] for t in plan.targets] == ["dropped", "stays"]
    assert plan.targets[1]["index"] == "public.submissions_user_id_idx"

    state, outcome = await Executor(leaps_dsn).apply(DROP_INDEX, plan, "apv-di1")
    assert state == "done", outcome
    assert definition in outcome.summary
    assert await index_state(leaps_dsn, DUPLICATE) is None
    assert await index_state(leaps_dsn, "submissions_user_id_idx") is True
    assert (await report(ctx))["duplicate indexes"].status is Status.OK
    verdict = await ctx.gateway.read(
        lambda db: DROP_INDEX.verify(db, plan, Execution("apv-di1", "bot"))
    )
    assert verdict.landed, verdict


async def test_drop_index_aborts_when_the_twin_is_gone(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.duplicate_index()
    plan = await DROP_INDEX.plan(ctx, [DUPLICATE])
    await faults.drop_index("submissions_user_id_idx")
    state, outcome = await Executor(leaps_dsn).apply(DROP_INDEX, plan, "apv-di2")
    assert state == "aborted" and "drift" in outcome.summary
    assert await index_state(leaps_dsn, DUPLICATE) is True


async def test_a_drop_stopped_midway_leaves_it_invalid_and_can_be_requested_again(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.duplicate_index()
    plan = await DROP_INDEX.plan(ctx, [DUPLICATE])
    writer = await psycopg.AsyncConnection.connect(leaps_dsn)
    try:
        await writer.execute("UPDATE submissions SET updated_at = updated_at WHERE false")
        executor = Executor(leaps_dsn, lock_timeout_ms=300)
        state, outcome = await executor.apply(DROP_INDEX, plan, "apv-di3")
    finally:
        await writer.close()
    assert state == "failed"
    assert "it is left INVALID" in outcome.summary and "request drop-index again" in outcome.summary
    assert "CREATE INDEX submissions_user_id_copy_idx" in outcome.summary  # the definition
    assert await index_state(leaps_dsn, DUPLICATE) is False
    again = await DROP_INDEX.plan(ctx, [DUPLICATE])
    state, outcome = await Executor(leaps_dsn).apply(DROP_INDEX, again, "apv-di4")
    assert state == "done", outcome
    assert await index_state(leaps_dsn, DUPLICATE) is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("submissions_user_id_idx", "not an exact duplicate"),
        ("users_pkey", "primary key"),
        ("users_email_key", "backs constraint users_email_key"),
        ("submissions_one_live_learn_per_user", "it is unique"),
        ("no_such_index", "there is no index"),
    ],
)
async def test_drop_index_refuses_anything_but_an_exact_duplicate(
    ctx: RunContext, name: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        await DROP_INDEX.plan(ctx, [name])


async def test_drop_index_refuses_a_unique_twin_of_a_plain_index(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    """The plain one may go (the unique one answers its queries); never the unique one."""
    await fetch(leaps_dsn, "CREATE INDEX users_handle_plain ON users (handle)")
    with pytest.raises(UsageError, match="backs constraint users_handle_key"):
        await DROP_INDEX.plan(ctx, ["users_handle_key"])
    plan = await DROP_INDEX.plan(ctx, ["users_handle_plain"])
    assert plan.targets[1]["index"] == "public.users_handle_key"


# --- over Slack ---------------------------------------------------------------------


async def test_indexes_over_slack(leaps_dsn: str, fake_slack: FakeSlack) -> None:
    async with FaultInjector(leaps_dsn) as inj:
        await inj.duplicate_index()
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    async with running_bot(settings, fake_slack) as bot:
        resp = await bot.slash("indexes", channel=CHANNEL, user=REQUESTER)
        assert resp.status == 200
        (call,) = await fake_slack.wait_for("chat.postEphemeral", timeout=15)
        text = json.dumps(call.params)
        assert "drop-index public.submissions_user_id_copy_idx" in text


async def test_create_index_approved_over_slack(leaps_dsn: str, fake_slack: FakeSlack) -> None:
    async with FaultInjector(leaps_dsn) as inj:
        await inj.drop_index("points_ledger_user_id_created_at_idx")
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, f"create-index {NEWEST}")
        plan_text = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "CREATE INDEX CONCURRENTLY" in plan_text
        await press(bot, plan, REQUESTER)  # a reviewer may not approve
        await settle(bot)
        assert await index_state(leaps_dsn, NEWEST) is None
        await press(bot, plan, ADMIN)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "done" in final and f"built public.{NEWEST} CONCURRENTLY" in final
    assert await index_state(leaps_dsn, NEWEST) is True


async def test_drop_index_approved_over_slack(leaps_dsn: str, fake_slack: FakeSlack) -> None:
    async with FaultInjector(leaps_dsn) as inj:
        await inj.duplicate_index()
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, f"drop-index {DUPLICATE}")
        plan_text = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "CREATE INDEX submissions_user_id_copy_idx" in plan_text  # the backup
        await press(bot, plan, ADMIN)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "done" in final and f"dropped public.{DUPLICATE}" in final
    assert await index_state(leaps_dsn, DUPLICATE) is None
    assert await index_state(leaps_dsn, "submissions_user_id_idx") is True
