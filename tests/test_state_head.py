"""The state store upgrades only when it must: the head it reads from the migration scripts
(without importing Alembic) is Alembic's own, and a store one revision behind is upgraded
when it is opened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from bot.state import make_engine, open_store
from bot.state.models import VERSION_TABLE, Base
from bot.state.store import alembic_config, head_revision


def test_the_head_read_from_the_scripts_is_alembics() -> None:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    assert head_revision() == head


async def test_a_store_behind_the_head_is_upgraded_when_opened(tmp_path: Path) -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    head = scripts.get_revision("head")
    assert head is not None and isinstance(head.down_revision, str)
    previous = head.down_revision
    url = f"sqlite:///{tmp_path / 'behind.sqlite3'}"
    cfg = alembic_config()

    def upgrade_to_previous(conn: Connection) -> None:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, previous)

    def report(conn: Connection) -> tuple[str, list[Any]]:
        version = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one()  # noqa: S608
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return str(version), compare_metadata(context, Base.metadata)

    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(upgrade_to_previous)
        async with engine.connect() as conn:
            behind, _ = await conn.run_sync(report)
    finally:
        await engine.dispose()
    assert behind == previous

    store = await open_store(url)
    try:
        async with store.engine.connect() as conn:
            version, drift = await conn.run_sync(report)
    finally:
        await store.close()
    assert version == head.revision == head_revision()
    assert drift == [], "the store was not upgraded to the models"
