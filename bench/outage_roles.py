"""What a target outage costs a known person's `/db health`: the role lookup that fails first.

Starts an embedded PostgreSQL with the LEAPS fixture, the fake Slack Web API and the real bot
(signed HTTP, `DIAGNOSTICS_ROLE=REVIEWER`, default `CONNECT_TIMEOUT_S`), and times from the
signed `/db health` to the reply reaching Slack, one command after the other:

1. target up, `--users` LEAPS REVIEWER/ADMIN people by Slack e-mail, roles not yet cached;
2. target down (connections refused), a restarted bot: the same people, whose roles now come
   from the state store as last known roles after the LEAPS lookup failed;
3. baseline in the same outage: a ROLE_MAP user, for whom nothing is looked up.

The first lookup in the outage waits the connect timeout; after it the resolver leaves LEAPS
alone for `LEAPS_BACKOFF_S`, so the next people are answered as fast as the baseline.

    python bench/outage_roles.py [--users 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.settings import Settings  # noqa: E402
from commands.fixture.seed import build_fixture  # noqa: E402
from tests.conftest import RunningBot, running_bot  # noqa: E402
from tests.fakeslack import FakeSlack  # noqa: E402
from tests.slackreq import SIGNING_SECRET  # noqa: E402

MAP_USER = "U0MAPPED"


async def staff_emails(dsn: str, n: int) -> list[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT email FROM users WHERE role IN ('REVIEWER', 'ADMIN') ORDER BY id LIMIT %s",
            (n,),
        )
        return [str(r[0]) for r in await cur.fetchall()]


async def reply_ms(bot: RunningBot, user: str) -> float:
    bot.fake.reset()
    started = time.perf_counter()
    await bot.slash("health", user=user)
    await bot.fake.wait_for(
        "chat.postEphemeral", timeout=30, predicate=lambda c: c.params.get("user") == user
    )
    return (time.perf_counter() - started) * 1000


async def set_connections(dsn: str, allowed: bool) -> None:
    name = str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        flag = sql.SQL("true" if allowed else "false")
        await conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(sql.Identifier(name), flag)
        )
        if not allowed:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


async def main(users: int) -> None:
    server = EmbeddedPostgres()
    server.start()
    try:
        dsn = server.create_database("leaps_outage")
        await build_fixture(dsn, users=200)
        emails = await staff_emails(dsn, users)
        state = Path(tempfile.mkdtemp(prefix="dbops-bench-")) / "state.sqlite3"
        async with FakeSlack() as fake:
            ids = [f"U0STAFF{i:03d}" for i in range(len(emails))]
            for uid, email in zip(ids, emails, strict=True):
                fake.add_user(uid, email=email)
            settings = Settings(
                slack_bot_token="xoxb-bench",
                slack_signing_secret=SIGNING_SECRET,
                slack_api_url=fake.api_url,
                database_url=dsn,
                state_database_url=f"sqlite:///{state}",
                role_map={MAP_USER: "REVIEWER"},
                coalesce_s=0,  # every command runs its own health checks
                _env_file=None,
            )
            async with running_bot(settings, fake) as bot:
                up = [await reply_ms(bot, uid) for uid in ids]
            await set_connections(dsn, allowed=False)
            try:
                async with running_bot(settings, fake) as bot:
                    stale = [await reply_ms(bot, uid) for uid in ids]
                    mapped = [await reply_ms(bot, MAP_USER) for _ in ids]
            finally:
                await set_connections(dsn, allowed=True)
    finally:
        server.stop()
    p50 = statistics.median
    print(
        f"BENCH outage_roles users={len(ids)} connect_timeout_s={settings.connect_timeout_s:g} "
        f"up_fresh_p50_ms={p50(up):.0f} down_first_lookup_ms={stale[0]:.0f} "
        f"down_last_known_p50_ms={p50(stale[1:]):.0f} "
        f"down_role_map_p50_ms={p50(mapped):.0f} (baseline: no lookup)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10)
    asyncio.run(main(parser.parse_args().users))
