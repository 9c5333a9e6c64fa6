"""`/db slow`: a query sleeping in another session, pg_stat_statements wherever it is
installed (schema `extensions`, as on Supabase), not installed or not loaded, and temp
files, on real PostgreSQL servers; then the command over signed HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import errors as pgerr

from bot.embedded_pg import EmbeddedPostgres
from bot.gateway import TargetGateway
from bot.router import Dispatcher, RunContext
from commands.base import Finding, Report, Status, Thresholds
from tests.conftest import RunningBot
from tests.test_health_e2e import section_texts

SLEEP_SQL = "SELECT pg_sleep(30), 'hunter2-literal' AS secret"
SLOW = Thresholds(long_query_warn_s=0.5, long_query_crit_s=60.0)


async def report_for(dsn: str, text: str = "slow", th: Thresholds = SLOW) -> Report:
    gateway = TargetGateway(dsn)
    await gateway.open()
    try:
        result = await Dispatcher(RunContext(gateway, th), coalesce_s=0.0).run(text)
    finally:
        await gateway.close()
    assert isinstance(result, Report), result
    return result


def finding(report: Report, check: str) -> Finding:
    (found,) = [f for f in report.findings if f.check == check]
    return found


async def execute(dsn: str, *statements: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement)


@pytest_asyncio.fixture(loop_scope="session")
async def sleeper(leaps_dsn: str) -> AsyncIterator[int]:
    """The pid of a session in `pg_sleep`, with a string literal in its query; cancelled
    at the end."""
    conn = await psycopg.AsyncConnection.connect(
        leaps_dsn, autocommit=True, application_name="slow-app"
    )
    task = asyncio.create_task(conn.execute(SLEEP_SQL))
    pid = conn.info.backend_pid
    try:
        async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as watch:
            for _ in range(200):
                cur = await watch.execute(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)
                )
                row = await cur.fetchone()
                if row is not None and row[0] == "PgSleep":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the sleeping query never showed in pg_stat_activity")
        yield pid
    finally:
        conn.cancel()
        with pytest.raises(pgerr.QueryCanceled):
            await task
        await conn.close()


async def test_a_sleeping_query_shows_longest_first_with_wait_event_and_no_literal(
    leaps_dsn: str, sleeper: int
) -> None:
    await asyncio.sleep(0.6)  # past SLOW's warning limit
    report = await report_for(leaps_dsn)
    running = finding(report, "running queries")
    assert running.status is Status.WARN
    assert f"pid {sleeper}" in running.summary and "Timeout:PgSleep" in running.summary
    top = running.rows[0]
    assert top["pid"] == sleeper
    assert top["wait"] == "Timeout:PgSleep"
    assert top["app"] == "slow-app" and top["state"] == "active"
    assert top["query"] == "SELECT pg_sleep(30), '…' AS secret"
    assert "hunter2" not in report.model_dump_json()
    assert "`/db cancel <pid>`" in (running.hint or "")


async def test_literals_are_shown_when_the_setting_allows(leaps_dsn: str, sleeper: int) -> None:
    report = await report_for(leaps_dsn, th=SLOW.model_copy(update={"show_query_literals": True}))
    (row,) = [r for r in finding(report, "running queries").rows if r["pid"] == sleeper]
    assert row["query"] == SLEEP_SQL


def test_the_test_server_preloads_pg_stat_statements(pg: EmbeddedPostgres) -> None:
    """The embedded server preloads it when the binaries ship it (they do here)."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        (available,) = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'"
        ).fetchone() or (0,)
        (preload,) = conn.execute("SHOW shared_preload_libraries").fetchone() or ("",)
    assert available == 1, "this machine's PostgreSQL lacks pg_stat_statements"
    assert preload == "pg_stat_statements"


SPILL_SQL = (
    "SELECT count(*) FROM (SELECT md5(g::text) AS m FROM generate_series(1, 60000) g"
    " ORDER BY m) sorted"
)


async def spill(dsn: str) -> None:
    """A sort bigger than a tiny work_mem: PostgreSQL writes it to temp files."""
    await execute(dsn, "SET work_mem = '64kB'", SPILL_SQL)


async def temp_files_seen(dsn: str) -> int:
    """The database's temp_files once this session's statistics are flushed."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(100):
            cur = await conn.execute(
                "SELECT temp_files FROM pg_stat_database WHERE datname = current_database()"
            )
            row = await cur.fetchone()
            if row and row[0]:
                return int(row[0])
            await asyncio.sleep(0.1)
    raise AssertionError("temp files never showed in pg_stat_database")


async def test_top_statements_from_the_extensions_schema_and_temp_spills(
    leaps_dsn: str,
) -> None:
    await execute(
        leaps_dsn,
        "CREATE SCHEMA extensions",
        "CREATE EXTENSION pg_stat_statements SCHEMA extensions",
    )
    await spill(leaps_dsn)
    # A utility statement keeps its text as written, literals and all.
    await execute(leaps_dsn, "DO $$ BEGIN PERFORM pg_sleep(0.3); RAISE NOTICE 'hunter2-do'; END $$")
    files = await temp_files_seen(leaps_dsn)
    # The DO block sleeps 0.3 s: a statement slow on average at a 0.25 s limit.
    report = await report_for(leaps_dsn, th=Thresholds(long_query_warn_s=0.25))

    top = finding(report, "top statements")
    assert top.status is Status.WARN
    assert "take 250ms or more on average" in top.summary
    # the first three are named in the summary too (Slack shows no table of an ok finding)
    lines = top.summary.splitlines()
    assert len(lines) == 4 and lines[1].endswith(f": {top.rows[0]['query']}")
    assert lines[1].startswith(f"{top.rows[0]['total']} in {top.rows[0]['calls']} calls")
    assert "extensions.pg_stat_statements" in top.summary
    queries = [str(r["query"]) for r in top.rows]
    assert any("generate_series" in q and "ORDER BY m" in q for q in queries)
    assert "DO '…'" in queries
    assert set(top.rows[0]) >= {
        "calls",
        "total",
        "mean",
        "rows",
        "shared_blks_hit",
        "shared_blks_read",
        "temp_blks_written",
    }
    assert "hunter2" not in report.model_dump_json()

    spills = finding(report, "temp spills")
    assert spills.status is Status.WARN
    assert "generate_series" in str(spills.rows[0]["query"])
    assert int(spills.rows[0]["temp_blks_written"]) > 0

    temp = finding(report, "temp files")
    assert temp.status is Status.WARN
    assert temp.summary.startswith(f"{leaps_dsn.rsplit('/', 1)[1]}: ")
    assert "work_mem = 4MB" in temp.summary
    (here,) = [r for r in temp.rows if r["db"] == leaps_dsn.rsplit("/", 1)[1]]
    assert int(here["temp_files"]) >= files


async def test_not_installed_says_how_to_enable_it(leaps_dsn: str) -> None:
    report = await report_for(leaps_dsn)
    top = finding(report, "top statements")
    assert top.status is Status.SKIPPED
    assert "not installed in this database" in top.summary
    assert "shared_preload_libraries" in (top.hint or "")
    assert "CREATE EXTENSION pg_stat_statements SCHEMA extensions" in (top.hint or "")
    assert finding(report, "temp files").status is Status.OK  # a fresh copy spilled nothing
    assert not [f for f in report.findings if f.check == "temp spills"]


async def test_installed_but_not_preloaded_says_so() -> None:
    """A server of its own: preloading is fixed when a server starts."""
    with EmbeddedPostgres(settings={"shared_preload_libraries": ""}) as server:
        dsn = server.create_database("unloaded")
        await execute(dsn, "CREATE EXTENSION pg_stat_statements")
        report = await report_for(dsn)
    top = finding(report, "top statements")
    assert top.status is Status.SKIPPED
    assert "installed (schema public) but not loaded" in top.summary
    assert "shared_preload_libraries" in (top.hint or "")
    assert "CREATE EXTENSION" not in (top.hint or "")  # it is there already


def _texts(call: Any) -> str:
    return "\n".join(section_texts(call))


async def test_slow_over_signed_http(bot: RunningBot, leaps_dsn: str, sleeper: int) -> None:
    resp = await bot.slash("slow")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    text = _texts(call)
    assert call.params["blocks"][0]["text"]["text"].startswith("Slow queries")
    assert "running queries" in text and f"pid {sleeper}" in text
    assert "Timeout:PgSleep" in text
    assert "top statements" in text and "temp files" in text
    assert "hunter2" not in json.dumps(call.params)
