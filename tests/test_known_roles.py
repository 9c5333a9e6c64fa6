"""The last known roles in the state store (migration 0002), on SQLite and on PostgreSQL:
the latest resolution wins, and a deployment at 0001 upgrades (and downgrades) with its
audit trail intact."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from bot.state import open_store
from bot.state.models import VERSION_TABLE
from bot.state.store import StateStore, alembic_config, make_engine

T0 = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite3'}"
    factory: Callable[[str], str] = request.getfixturevalue("pg_dsn_factory")
    return factory("known_roles")


async def test_the_latest_resolution_wins(state_url: str) -> None:
    async with await open_store(state_url) as store:
        assert await store.known_role("U0OPS") is None
        await store.remember_role("U0OPS", role="REVIEWER", source="leaps", at=T0)
        later = (T0 + timedelta(hours=2)).astimezone(timezone(timedelta(hours=-5)))
        await store.remember_role(
            "U0OPS", role="ADMIN", source="group", detail="S0ONCALL", at=later
        )
        await store.remember_role("U0OTHER", role="PARTICIPANT", source="default", at=T0)
        kept = await store.known_role("U0OPS")
        assert kept is not None
        assert (kept.role, kept.source, kept.detail) == ("ADMIN", "group", "S0ONCALL")
        assert kept.resolved_at == T0 + timedelta(hours=2)
        assert kept.resolved_at.tzinfo is not None and kept.resolved_at.utcoffset() == timedelta(0)
        other = await store.known_role("U0OTHER")
        assert other is not None and (other.role, other.detail) == ("PARTICIPANT", None)


def _version_and_tables(conn: Connection) -> tuple[str | None, set[str]]:
    version = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one_or_none()  # noqa: S608
    return version, set(inspect(conn).get_table_names())


async def _alembic(url: str, action: Callable[..., None], revision: str) -> None:
    engine = make_engine(url)
    cfg = alembic_config()

    def run(sync_conn: Connection) -> None:
        cfg.attributes["connection"] = sync_conn
        action(cfg, revision)

    try:
        async with engine.connect() as conn, conn.begin():
            await conn.run_sync(run)
    finally:
        await engine.dispose()


async def test_upgrade_from_0001_and_back(state_url: str) -> None:
    """A deployment of the first schema keeps its audit trail through 0002 and back."""
    await _alembic(state_url, command.upgrade, "0001")
    engine = make_engine(state_url)
    try:
        await StateStore(engine).audit("approval.requested", actor_id="U0REQ", at=T0)
    finally:
        await engine.dispose()

    async with await open_store(state_url) as store:  # the bot starts: upgrade to head
        async with store.engine.connect() as conn:
            version, tables = await conn.run_sync(_version_and_tables)
        assert version == HEAD and "dbops_known_roles" in tables
        assert [e.action for e in await store.audit_trail()] == ["approval.requested"]
        await store.remember_role("U0OPS", role="ADMIN", source="leaps", at=T0)

    await _alembic(state_url, command.downgrade, "0001")
    engine = make_engine(state_url)
    try:
        async with engine.connect() as conn:
            version, tables = await conn.run_sync(_version_and_tables)
        assert version == "0001" and "dbops_known_roles" not in tables
        trail = await StateStore(engine).audit_trail()
        assert [(e.action, e.at) for e in trail] == [("approval.requested", T0)]
    finally:
        await engine.dispose()
