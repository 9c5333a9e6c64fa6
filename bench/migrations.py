"""How long `/db migrations` (history plus the schema-drift catalog read) takes, next to
`/db health` measured the same way in the same run, through the real router and gateway.

Builds the LEAPS fixture on an embedded PostgreSQL, adds `--history` applied migration
rows and `--platform-tables` tables in another schema (a Supabase project's `auth`,
`storage` ...: the drift check reads only the expected schema, so they should not
count), injects one failed migration, then times `--runs` runs of each command one
after the other (the dispatcher's coalescing window is 0, so every run reads).

    python bench/migrations.py [--runs 30] [--history 2000] [--platform-tables 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from timing import command_ms  # noqa: E402  (this directory: python bench/...)

from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.gateway import TargetGateway  # noqa: E402
from bot.router import Dispatcher, RunContext  # noqa: E402
from commands.base import Status, Thresholds  # noqa: E402
from commands.fixture.faults import FaultInjector  # noqa: E402
from commands.fixture.seed import build_fixture  # noqa: E402


async def grow(dsn: str, history: int, platform_tables: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO _prisma_migrations (id, checksum, finished_at, migration_name,"
            " started_at, applied_steps_count)"
            " SELECT gen_random_uuid()::text, md5(i::text), now() - make_interval(days => i),"
            " to_char(i, 'FM20240000000000') || '_bench', now() - make_interval(days => i), 1"
            " FROM generate_series(1, %s) AS i",
            (history,),
        )
        await conn.execute("CREATE SCHEMA IF NOT EXISTS bench_platform")
        for i in range(platform_tables):
            await conn.execute(
                sql.SQL("CREATE TABLE {} (id text PRIMARY KEY, a int, b jsonb)").format(
                    sql.Identifier("bench_platform", f"t{i}")
                )
            )


async def main(runs: int, history: int, platform_tables: int) -> None:
    server = EmbeddedPostgres()
    server.start()
    try:
        dsn = server.create_database("leaps_bench_migrations")
        await build_fixture(dsn, users=200)
        await grow(dsn, history, platform_tables)
        async with FaultInjector(dsn) as faults:
            await faults.failed_migration()
        gateway = TargetGateway(dsn, check_timeout_ms=60_000)
        try:
            d = Dispatcher(RunContext(gateway, Thresholds()), coalesce_s=0)
            mig, report = await command_ms(d, "migrations", runs)
            assert report.findings[0].status is Status.CRIT, report.findings[0]
            assert not [f for f in report.findings if f.check.startswith("schema drift:")]
            health, _ = await command_ms(d, "health", runs)
        finally:
            await gateway.close()
    finally:
        server.stop()
    p50_m, p50_h = statistics.median(mig), statistics.median(health)
    print(
        f"BENCH migrations runs={runs} history={history} platform_tables={platform_tables}"
        f" p50_ms={p50_m:.1f} max_ms={max(mig):.1f} health_p50_ms={p50_h:.1f}"
        f" ratio_vs_health={p50_m / p50_h:.2f}"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--history", type=int, default=2000)
    ap.add_argument("--platform-tables", type=int, default=500)
    a = ap.parse_args()
    asyncio.run(main(a.runs, a.history, a.platform_tables))
