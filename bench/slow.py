"""How long `/db slow` and `/db explain` take, next to `/db connections` measured the same
way in the same run, through the real router and gateway.

Builds the LEAPS fixture on an embedded PostgreSQL (which preloads pg_stat_statements),
creates the extension in schema `extensions` as Supabase does, fills it with
`--statements` distinct statements (an IN list of each length is a statement of its
own), opens `--sleepers` sessions sleeping in a query, then times `--runs` runs of each
command one after the other (the dispatcher's coalescing window is 0, so every run reads).

    python bench/slow.py [--runs 30] [--users 2000] [--statements 2000] [--sleepers 20]
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
from commands.fixture.seed import build_fixture  # noqa: E402


async def fill_statements(dsn: str, statements: int) -> float:
    """The statements, and the megabytes of statement text pg_stat_statements then keeps."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE SCHEMA extensions")
        await conn.execute("CREATE EXTENSION pg_stat_statements SCHEMA extensions")
        for n in range(1, statements + 1):
            items = sql.SQL(", ").join(sql.Literal(i) for i in range(n))
            await conn.execute(
                sql.SQL("SELECT count(*) FROM users WHERE length(handle) IN ({})").format(items)
            )
        cur = await conn.execute("SELECT sum(length(query)) FROM extensions.pg_stat_statements")
        row = await cur.fetchone()
    return int(row[0] if row else 0) / 1e6


async def main(runs: int, users: int, statements: int, sleepers: int) -> None:
    server = EmbeddedPostgres()
    server.start()
    conns: list[psycopg.AsyncConnection[tuple[object, ...]]] = []
    tasks: list[asyncio.Task[object]] = []
    try:
        dsn = server.create_database("leaps_bench_slow")
        await build_fixture(dsn, users=users)
        texts_mb = await fill_statements(dsn, statements)
        for _ in range(sleepers):
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            conns.append(conn)
            tasks.append(asyncio.create_task(conn.execute("SELECT pg_sleep(3600), 'x'")))
        await asyncio.sleep(0.5)
        gateway = TargetGateway(dsn, check_timeout_ms=60_000)
        try:
            d = Dispatcher(RunContext(gateway, Thresholds()), coalesce_s=0)
            results: dict[str, list[float]] = {}
            for text in (
                "connections",
                "slow",
                "explain review-queue",
                "explain review-queue --analyze",
            ):
                results[text], report = await command_ms(d, text, runs)
                assert not [f for f in report.findings if f.status is Status.ERROR], report
                if text == "slow":
                    running = next(f for f in report.findings if f.check == "running queries")
                    assert running.summary.startswith(f"{sleepers} queries"), running.summary
                    top = next(f for f in report.findings if f.check == "top statements")
                    assert len(top.rows) == Thresholds().max_rows, top
        finally:
            await gateway.close()
    finally:
        for conn in conns:
            conn.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in conns:
            await conn.close()
        server.stop()
    base = statistics.median(results["connections"])
    for text, key in (
        ("slow", "slow"),
        ("explain review-queue", "explain"),
        ("explain review-queue --analyze", "explain_analyze"),
    ):
        p50 = statistics.median(results[text])
        print(
            f"BENCH {key} runs={runs} users={users} statements={statements}"
            f" texts_mb={texts_mb:.1f} sleepers={sleepers}"
            f" p50_ms={p50:.1f} max_ms={max(results[text]):.1f}"
            f" connections_p50_ms={base:.1f} ratio_vs_connections={p50 / base:.2f}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--statements", type=int, default=2000)
    ap.add_argument("--sleepers", type=int, default=20)
    a = ap.parse_args()
    asyncio.run(main(a.runs, a.users, a.statements, a.sleepers))
