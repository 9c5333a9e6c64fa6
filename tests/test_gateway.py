"""The gateway against a real server: read-only, timeouts, privileges, masking."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import quote

import psycopg
import pytest
import pytest_asyncio
from hypothesis import example, given
from hypothesis import strategies as st

from bot.embedded_pg import password_sql, role_dsn
from bot.gateway import TargetGateway, describe_target, mask_dsn
from bot.router import Dispatcher, RunContext
from commands.base import APPLICATION_NAME, Finding, Reader, Report, Status
from tests.conftest import FAST_THRESHOLDS


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(leaps_dsn: str) -> AsyncIterator[TargetGateway]:
    gw = TargetGateway(leaps_dsn, check_timeout_ms=300, lock_timeout_ms=5000)
    yield gw
    await gw.close()


async def test_checks_run_read_only_with_limits_and_name(gateway: TargetGateway) -> None:
    async def settings_seen(db: Reader) -> Finding:
        rows = await db.fetch(
            "SELECT current_setting('transaction_read_only') AS ro,"
            " current_setting('statement_timeout') AS st,"
            " current_setting('lock_timeout') AS lt, current_setting('application_name') AS app"
        )
        return Finding(check="seen", status=Status.OK, summary="", rows=rows)

    finding = await gateway.run_check("seen", settings_seen)
    assert finding.rows == [{"ro": "on", "st": "300ms", "lt": "5s", "app": APPLICATION_NAME}]


async def test_a_check_cannot_write(gateway: TargetGateway, leaps_dsn: str) -> None:
    async def vandal(db: Reader) -> Finding:
        await db.fetch("DELETE FROM points_ledger")
        return Finding(check="vandal", status=Status.OK, summary="deleted")

    finding = await gateway.run_check("vandal", vandal)
    assert finding.status is Status.ERROR
    assert "read-only transaction" in finding.summary
    async with await psycopg.AsyncConnection.connect(leaps_dsn) as conn:
        cur = await conn.execute("SELECT count(*) FROM points_ledger")
        row = await cur.fetchone()
        assert row is not None and row[0] > 0


async def test_statement_timeout_becomes_skipped_and_others_still_arrive(
    gateway: TargetGateway, leaps_dsn: str
) -> None:
    """A lock held on _prisma_migrations stalls only the migrations check."""
    holder = await psycopg.AsyncConnection.connect(leaps_dsn)
    try:
        await holder.execute("BEGIN; LOCK TABLE _prisma_migrations IN ACCESS EXCLUSIVE MODE")
        report = await Dispatcher(RunContext(gateway, FAST_THRESHOLDS)).run("health")
    finally:
        await holder.rollback()
        await holder.close()
    assert isinstance(report, Report)
    by_check = {f.check: f for f in report.findings}
    assert by_check["migrations"].status is Status.SKIPPED
    assert "timed out" in by_check["migrations"].summary
    assert by_check["reachability"].status is Status.OK
    assert by_check["materialized views"].status is Status.OK
    assert len(by_check) == 16  # with the two webhook alerts, the audit trail and the freeze


async def test_lock_timeout_becomes_skipped(leaps_dsn: str) -> None:
    gw = TargetGateway(leaps_dsn, check_timeout_ms=5000, lock_timeout_ms=200)
    holder = await psycopg.AsyncConnection.connect(leaps_dsn)
    try:
        await holder.execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")

        async def reads_users(db: Reader) -> Finding:
            await db.fetch("SELECT count(*) FROM users")
            return Finding(check="users", status=Status.OK, summary="")

        finding = await gw.run_check("users", reads_users)
    finally:
        await holder.rollback()
        await holder.close()
        await gw.close()
    assert finding.status is Status.SKIPPED
    assert "lock" in finding.summary


async def test_missing_privilege_becomes_skipped(leaps_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as admin:
        await admin.execute("DROP ROLE IF EXISTS monitor_only")
        await admin.execute("CREATE ROLE monitor_only LOGIN IN ROLE pg_monitor")
        await admin.execute(password_sql(admin, "monitor_only", leaps_dsn))
    dsn = role_dsn(leaps_dsn, "monitor_only")
    gw = TargetGateway(dsn)
    try:
        report = await Dispatcher(RunContext(gw, FAST_THRESHOLDS)).run("health")
    finally:
        await gw.close()
    assert isinstance(report, Report)
    by_check = {f.check: f for f in report.findings}
    assert by_check["migrations"].status is Status.SKIPPED
    assert "lacks privilege" in by_check["migrations"].summary
    assert by_check["connections"].status is Status.OK  # pg_monitor may read activity


async def test_unexpected_bug_in_a_check_is_an_error_finding(gateway: TargetGateway) -> None:
    async def buggy(db: Reader) -> Finding:
        raise KeyError("boom")

    finding = await gateway.run_check("buggy", buggy)
    assert finding.status is Status.ERROR
    assert "KeyError" in finding.summary


async def test_slow_check_times_out_without_stalling_the_others(gateway: TargetGateway) -> None:
    async def slow(db: Reader) -> Finding:
        await db.fetch("SELECT pg_sleep(5)")
        return Finding(check="slow", status=Status.OK, summary="")

    async def quick(db: Reader) -> Finding:
        await db.fetch("SELECT 1")
        return Finding(check="quick", status=Status.OK, summary="fine")

    slow_f, quick_f = await asyncio.gather(
        gateway.run_check("slow", slow), gateway.run_check("quick", quick)
    )
    assert slow_f.status is Status.SKIPPED and "timed out" in slow_f.summary
    assert quick_f.summary == "fine"


passwords = st.text(
    alphabet=st.characters(codec="ascii", categories=["L", "N", "P", "S"]), max_size=30
).map(lambda tail: "Pw" + tail)  # "Pw" appears nowhere else in these DSNs


@given(password=passwords)
@example(password="Pw://")  # once taken for a URL because it holds "://"
def test_mask_dsn_never_shows_the_password(password: str) -> None:
    url = f"postgresql://leaps:{quote(password, safe='')}@db.example.org:6543/x?sslmode=require"
    masked = mask_dsn(url)
    assert "Pw" not in masked
    assert masked == "postgresql://leaps:***@db.example.org:6543/x?sslmode=require"
    plain = password.replace("'", "").replace("\\", "")
    kv = mask_dsn(f"host=db.example.org dbname=leaps password='{plain}'")
    assert "Pw" not in kv and "***" in kv


@pytest.mark.parametrize(
    ("dsn", "target"),
    [
        ("postgresql://u:p@h:6543/db", "h:6543/db"),
        ("postgres://u@h/db", "h:5432/db"),
        ("host=h dbname=x", "h:5432/x"),
    ],
)
def test_describe_target(dsn: str, target: str) -> None:
    assert describe_target(dsn.replace("postgres://", "postgresql://")) == target
