"""Alembic environment for the bot's own state store.

The bot runs this itself at start-up (`bot.state.store.migrate`), handing over a connection that
already holds the migration lock inside an open transaction; Alembic then runs in that
transaction. Run by hand (to write a revision), it connects to the URL of
`bot.state.store.alembic_config(url)` or to `STATE_DATABASE_URL`:

    command.revision(alembic_config(url), "what changed", autogenerate=True, rev_id="0002")
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection

from bot.state.models import VERSION_TABLE, Base

config = context.config


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    from bot.state.store import make_state_url

    return config.get_main_option("sqlalchemy.url") or make_state_url(
        os.environ.get("STATE_DATABASE_URL")
    )


async def _run_standalone() -> None:
    from bot.state.store import make_engine

    engine = make_engine(_url())
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


def main() -> None:
    if context.is_offline_mode():
        context.configure(
            url=_url(),
            target_metadata=Base.metadata,
            version_table=VERSION_TABLE,
            literal_binds=True,
            dialect_opts={"paramstyle": "named"},
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
    else:
        asyncio.run(_run_standalone())


main()
