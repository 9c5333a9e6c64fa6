"""`/db explain`: the plans of the hot queries on the LEAPS fixture, `--analyze` run
read-only and rolled back (a writing statement cannot run there at all), the findings
drawn from real plans, and the command over signed HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import errors as pgerr

from bot.gateway import TargetGateway
from bot.router import Answer, Dispatcher, RunContext
from commands.base import REGISTRY, Finding, Reader, Report, Status, Thresholds
from commands.performance import (
    HOT_QUERIES,
    disk_finding,
    estimate_finding,
    explain_json,
    plan_lines,
    seq_scan_finding,
)
from tests.conftest import RunningBot
from tests.test_health_e2e import section_texts


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(leaps_dsn: str) -> AsyncIterator[TargetGateway]:
    gw = TargetGateway(leaps_dsn)
    await gw.open()
    try:
        yield gw
    finally:
        await gw.close()


async def run(gw: TargetGateway, text: str, th: Thresholds | None = None) -> Report | Answer:
    result = await Dispatcher(RunContext(gw, th or Thresholds()), coalesce_s=0.0).run(text)
    assert not isinstance(result, Report) or result.title.startswith("Explain"), result
    assert isinstance(result, Report | Answer)
    return result


async def report_of(gw: TargetGateway, text: str, th: Thresholds | None = None) -> Report:
    result = await run(gw, text, th)
    assert isinstance(result, Report), result
    return result


def finding(report: Report, check: str) -> Finding:
    (found,) = [f for f in report.findings if f.check == check]
    return found


async def one(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
    assert row is not None
    return row[0]


async def busy_user(dsn: str) -> tuple[str, str, str]:
    """(id, handle, email) of the user with the most submissions."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT u.id, u.handle, u.email FROM users u JOIN submissions s ON s.user_id = u.id"
            " GROUP BY u.id ORDER BY count(*) DESC, u.id LIMIT 1"
        )
        row = await cur.fetchone()
    assert row is not None
    return str(row[0]), str(row[1]), str(row[2])


async def test_each_hot_query_is_planned_without_running(
    gateway: TargetGateway, leaps_dsn: str
) -> None:
    user_id, handle, _email = await busy_user(leaps_dsn)
    expected_scan = {
        "leaderboard": "leaderboard_totals",
        "user-submissions": "submissions",
        "review-queue": "submissions",
    }
    for name, table in expected_scan.items():
        text = f"explain {name}" + (f" {handle}" if name == "user-submissions" else "")
        report = await report_of(gateway, text)
        plan = finding(report, "plan")
        assert plan.status is Status.OK, plan
        assert HOT_QUERIES[name].what in plan.summary
        assert f"public.{table}" in plan.summary
        assert "actual time" not in plan.summary  # planned only
        assert "```" in plan.summary and plan.rows
        assert finding(report, "seq scans").status is Status.OK
        estimates = finding(report, "row estimates")
        assert estimates.status is Status.OK and "--analyze" in (estimates.hint or "")
        assert report.worst is Status.OK
        assert not [f for f in report.findings if f.check == "work_mem"]
    report = await report_of(gateway, f"explain user-submissions {handle}")
    assert finding(report, "user").summary == f"handle `{handle}`: LEAPS user `{handle}`"
    # the bound user id is a literal in the plan, shown as '…' like any other
    assert user_id not in report.model_dump_json()
    assert "user_id = '…'::text" in finding(report, "plan").summary


async def test_analyze_runs_each_query_and_changes_nothing(
    gateway: TargetGateway, leaps_dsn: str
) -> None:
    _id, _handle, email = await busy_user(leaps_dsn)
    counts = (
        "SELECT row((SELECT count(*) FROM submissions), (SELECT count(*) FROM users),"
        " (SELECT count(*) FROM leaderboard_totals), (SELECT count(*) FROM audit_log))::text"
    )
    before = await one(leaps_dsn, counts)
    for text in (
        "explain leaderboard --analyze",
        f"explain user-submissions {email.upper()} --analyze",
        "explain --analyze review-queue",
    ):
        report = await report_of(gateway, text)
        plan = finding(report, "plan")
        assert plan.status is Status.OK, plan
        assert "actual time=" in plan.summary and "(rolled back)" in plan.summary
        assert finding(report, "row estimates").status in (Status.OK, Status.WARN)
    assert await one(leaps_dsn, counts) == before


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM submissions",
        "WITH gone AS (DELETE FROM submissions RETURNING 1) SELECT count(*) FROM gone",
        "SELECT refresh_all_analytics()",  # a function that writes
    ],
)
async def test_a_writing_statement_cannot_run_on_the_read_path(
    gateway: TargetGateway, leaps_dsn: str, statement: Any
) -> None:
    before = await one(leaps_dsn, "SELECT count(*) FROM submissions")

    async def analyze(db: Reader) -> dict[str, Any]:
        return await explain_json(db, statement, {}, analyze=True)

    with pytest.raises(pgerr.ReadOnlySqlTransaction):
        await gateway.read(analyze)
    assert await one(leaps_dsn, "SELECT count(*) FROM submissions") == before


async def test_unknown_names_and_wrong_arguments_are_usage_errors(gateway: TargetGateway) -> None:
    for text in (
        "explain",
        "explain leaderbord",
        "explain review-queue extra",
        "explain user-submissions",
        "explain user-submissions a\x00b",
    ):
        answer = await run(gateway, text)
        assert isinstance(answer, Answer) and answer.outcome == "usage", text
    answer = await run(gateway, "explain nope")
    assert isinstance(answer, Answer)
    for name in HOT_QUERIES:
        assert f"`{name}`" in answer.text


async def test_unknown_user_gets_the_closest_handles(
    gateway: TargetGateway, leaps_dsn: str
) -> None:
    _id, handle, _email = await busy_user(leaps_dsn)
    report = await report_of(gateway, f"explain user-submissions {handle}x")
    user = finding(report, "user")
    assert user.status is Status.WARN and f"`{handle}x`" in user.summary
    assert f"`{handle}`" in (user.hint or "")
    assert not [f for f in report.findings if f.check == "plan"]


async def test_seq_scan_of_a_big_table_is_named(gateway: TargetGateway, leaps_dsn: str) -> None:
    """The user-submissions plan with index scans switched off: a real sequential scan
    of submissions, judged against a limit below and above the table's size."""
    user_id, _handle, _email = await busy_user(leaps_dsn)
    total = int(await one(leaps_dsn, "SELECT count(*) FROM submissions"))

    async def plan(db: Reader) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        await db.fetch("SET LOCAL enable_indexscan = off")
        await db.fetch("SET LOCAL enable_bitmapscan = off")
        doc = await explain_json(
            db, HOT_QUERIES["user-submissions"].sql, {"user_id": user_id}, analyze=True
        )
        sizes = await db.fetch(
            "SELECT 'public' AS schema, 'submissions' AS relation,"
            " reltuples::bigint AS est_rows, pg_total_relation_size(oid) AS bytes"
            " FROM pg_class WHERE oid = 'submissions'::regclass"
        )
        return doc["Plan"], sizes

    doc, sizes = await gateway.read(plan)
    est = int(sizes[0]["est_rows"])
    assert est > 0.9 * total
    big = seq_scan_finding(doc, sizes, min_rows=est)
    assert big.status is Status.WARN
    assert big.rows[0]["relation"] == "public.submissions"
    assert big.rows[0]["filter"] == f"(submissions.user_id = '{user_id}'::text)"
    assert int(big.rows[0]["removed_by_filter"]) > 0
    small = seq_scan_finding(doc, sizes, min_rows=est + 1)
    assert small.status is Status.OK and "public.submissions" in small.summary


async def test_estimates_far_from_actual_rows_are_named(gateway: TargetGateway) -> None:
    """A set-returning function is estimated at 100 rows whatever it returns."""

    async def plan(db: Reader) -> dict[str, Any]:
        doc = await explain_json(
            db,
            "SELECT count(*) FROM jsonb_array_elements(%(items)s::jsonb) e",
            {"items": json.dumps(list(range(5000)))},
            analyze=True,
        )
        return dict(doc["Plan"])

    doc = await gateway.read(plan)
    assert disk_finding(doc, "4MB") is None
    off = estimate_finding(doc, analyzed=True)
    assert off.status is Status.WARN
    (row,) = off.rows
    assert row["node"] == "Function Scan on pg_catalog.jsonb_array_elements e"
    assert (row["estimated"], row["actual"], row["off_by"]) == (100, 5000, "50x more")


async def test_explain_over_signed_http_with_a_slack_mention(
    bot: RunningBot, leaps_dsn: str
) -> None:
    _id, handle, email = await busy_user(leaps_dsn)
    bot.fake.add_user("U0MENTIONED", email=email)
    resp = await bot.slash("explain user-submissions <@U0MENTIONED|someone> --analyze")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    text = "\n".join(section_texts(call))
    assert call.params["blocks"][0]["text"]["text"].startswith("Explain user-submissions")
    assert f"LEAPS user `{handle}`" in text
    assert "actual time=" in text and "public.submissions" in text
    assert "```" in text


async def test_a_sort_that_outgrows_work_mem_is_named(gateway: TargetGateway) -> None:
    async def plan(db: Reader) -> dict[str, Any]:
        await db.fetch("SET LOCAL work_mem = '64kB'")
        doc = await explain_json(
            db,
            "SELECT e FROM jsonb_array_elements(%(items)s::jsonb) e ORDER BY e::text",
            {"items": json.dumps([f"item {i}" for i in range(20000)])},
            analyze=True,
        )
        return dict(doc["Plan"])

    doc = await gateway.read(plan)
    spilled = disk_finding(doc, "64kB")
    assert spilled is not None and spilled.status is Status.WARN
    (row,) = spilled.rows
    assert row["node"] == "Sort" and row["spilled"].endswith("kB")
    assert "work_mem = 64kB" in spilled.summary
    assert "Sort Method: external merge  Disk: " in "\n".join(plan_lines(doc))


async def test_analyze_is_rolled_back_to_its_savepoint(gateway: TargetGateway) -> None:
    """What a read-only transaction still allows (a transaction-local setting here) is
    undone before the check goes on: the savepoint is rolled back, not released."""

    async def analyze_then_look(db: Reader) -> Any:
        await explain_json(
            db, "SELECT set_config('dbops.marker', 'left behind', true)", {}, analyze=True
        )
        (row,) = await db.fetch("SELECT current_setting('dbops.marker', true) AS marker")
        return row["marker"]

    assert await gateway.read(analyze_then_look) in (None, "")

    async def plan_then_look(db: Reader) -> Any:
        await db.fetch("SELECT set_config('dbops.marker', 'kept', true)")
        await explain_json(db, "SELECT 1", {}, analyze=True)
        (row,) = await db.fetch("SELECT current_setting('dbops.marker', true) AS marker")
        return row["marker"]

    assert await gateway.read(plan_then_look) == "kept"  # only the explained part is undone


async def test_the_plan_is_cut_to_the_table_limit_and_a_dash_flag_counts(
    gateway: TargetGateway,
) -> None:
    # Slack may turn a typed `--analyze` into `—analyze`.
    report = await report_of(gateway, "explain review-queue \u2014analyze", Thresholds(max_rows=3))
    plan = finding(report, "plan")
    assert "actual time=" in plan.summary
    body = plan.summary.split("```")[1].strip().splitlines()
    assert len(body) == 4 and body[3] == f"… {len(plan.rows) - 3} more plan lines"
    assert [r["line"] for r in plan.rows[:3]] == body[:3]
    assert len(plan.rows) > 4


WORDS = st.sampled_from(
    [*HOT_QUERIES, "--analyze", "\u2014analyze", "<@U0NOBODY>", "<#C1|x>", "a@b.c", "'", "\x00"]
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(args=st.lists(st.one_of(WORDS, st.text(max_size=30)), max_size=4))
async def test_any_arguments_get_a_report_or_a_usage_answer(
    gateway: TargetGateway, args: list[str]
) -> None:
    for command in ("explain", "slow"):
        result = await Dispatcher(RunContext(gateway, Thresholds()), coalesce_s=0.0).run_command(
            REGISTRY[command], args
        )
        if isinstance(result, Answer):
            assert result.outcome == "usage"
        else:
            assert isinstance(result, Report)
            assert not [f for f in result.findings if f.status is Status.ERROR], result
