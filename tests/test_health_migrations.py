"""`/db health`'s migrations check reads Prisma's history where `/db migrations` does: in
any schema that holds `_prisma_migrations`, not only the search path. A failed migration
in a table moved out of the search path is still critical, a missing table is said, and
the hint sends the reader to `/db migrations`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from bot.gateway import TargetGateway
from bot.router import Dispatcher, RunContext
from commands.base import Finding, Report, Status
from commands.fixture.faults import DEFAULT_MIGRATION, FaultInjector
from tests.conftest import FAST_THRESHOLDS, RunningBot
from tests.test_health_e2e import section_texts


@pytest_asyncio.fixture(loop_scope="session")
async def dispatcher(leaps_dsn: str) -> AsyncIterator[Dispatcher]:
    gateway = TargetGateway(leaps_dsn)
    try:
        yield Dispatcher(RunContext(gateway, FAST_THRESHOLDS), coalesce_s=0.0)
    finally:
        await gateway.close()


async def migrations_of(d: Dispatcher) -> Finding:
    report = await d.run("health")
    assert isinstance(report, Report), report
    (found,) = [f for f in report.findings if f.check == "migrations"]
    return found


async def test_clean_history_is_ok_and_names_its_table(dispatcher: Dispatcher) -> None:
    found = await migrations_of(dispatcher)
    assert found.status is Status.OK, found
    assert found.summary.startswith("public._prisma_migrations: 5 applied (last ")
    assert "none failed, none pending" in found.summary and found.hint is None


async def test_failed_migration_in_a_moved_table_is_still_critical(
    dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    await faults.failed_migration()
    await faults.move_migrations_table("prisma")
    found = await migrations_of(dispatcher)
    assert found.status is Status.CRIT, found
    assert "prisma._prisma_migrations: 5 applied" in found.summary
    assert f"1 failed: {DEFAULT_MIGRATION}" in found.summary
    assert found.rows == [{"schema": "prisma", "migration": DEFAULT_MIGRATION, "state": "failed"}]
    assert found.hint is not None and "`/db migrations`" in found.hint


async def test_rolled_back_migration_is_a_warning(
    dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    await faults.rolled_back_migration()
    found = await migrations_of(dispatcher)
    assert found.status is Status.WARN, found
    assert f"1 rolled back: {DEFAULT_MIGRATION}" in found.summary


async def test_absent_table_is_said(dispatcher: Dispatcher, faults: FaultInjector) -> None:
    await faults.drop_migrations_table()
    found = await migrations_of(dispatcher)
    assert found.status is Status.WARN
    assert "no `_prisma_migrations` table in any schema" in found.summary
    assert found.hint is not None and "`/db migrations`" in found.hint


async def test_moved_failed_migration_end_to_end(bot: RunningBot, faults: FaultInjector) -> None:
    await faults.failed_migration()
    await faults.move_migrations_table("prisma")
    resp = await bot.slash("health")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    (section,) = [t for t in section_texts(call) if "migrations" in t.splitlines()[0]]
    assert "CRIT" in section.splitlines()[0]
    assert f"1 failed: {DEFAULT_MIGRATION}" in section
    assert "/db migrations" in section
