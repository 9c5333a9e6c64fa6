"""How long writers wait while an index is built, plain versus the bot's create-index.

A plain `CREATE INDEX` holds a SHARE lock on the table for the whole build, so every
INSERT/UPDATE/DELETE queues behind it; `CREATE INDEX CONCURRENTLY` (what `create-index`
runs, outside the guarded transaction) takes SHARE UPDATE EXCLUSIVE and writers go on.
On an embedded PostgreSQL with the set-based fixture of bench/scale.py, K writer
sessions update random ledger rows in a loop from 200 ms before each build until
200 ms after it. The baseline, a plain build of the same index, is measured in the same
run; the remedy is planned with a RunContext and applied by the Executor, as approved.
Also timed: `/db indexes` on that database.

    python bench/indexes.py [--users 20000] [--ledger 400000] [--writers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale import build_scale_fixture  # noqa: E402  (this directory: python bench/...)

from bot.approvals.executor import Executor  # noqa: E402
from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.gateway import TargetGateway  # noqa: E402
from bot.router import RunContext  # noqa: E402
from commands.base import Thresholds  # noqa: E402
from commands.fixture.faults import FaultInjector  # noqa: E402
from commands.indexes import indexes  # noqa: E402
from commands.remedies.indexes import CREATE_INDEX  # noqa: E402

FIXTURE_INDEX = "points_ledger_user_id_created_at_idx"
RECOMMENDED = "points_ledger_by_user_newest"
PLAIN_SQL = "CREATE INDEX bench_plain ON points_ledger (user_id, created_at DESC)"
WRITE_SQL = "UPDATE points_ledger SET delta_points = delta_points WHERE id = %s"
MARGIN_S = 0.2
TIMEOUT_MS = 600_000  # both builds must wait for writers rather than give up


async def writer(
    dsn: str, ids: list[str], ready: asyncio.Event, stop: asyncio.Event, out: list[float]
) -> None:
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, application_name="bench-writer"
    ) as conn:
        pick = random.Random(len(out)).choice
        await conn.execute(WRITE_SQL, (pick(ids),))
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            await conn.execute(WRITE_SQL, (pick(ids),))
            out.append((time.perf_counter() - started) * 1000)


async def while_writing(
    dsn: str, ids: list[str], writers: int, build: Callable[[], Awaitable[None]]
) -> tuple[list[float], float]:
    """Run `build` once every writer is writing; the writes' latencies and the build's
    duration (ms)."""
    samples: list[list[float]] = [[] for _ in range(writers)]
    stop = asyncio.Event()
    ready = [asyncio.Event() for _ in range(writers)]
    tasks = [
        asyncio.create_task(writer(dsn, ids, ready[i], stop, samples[i])) for i in range(writers)
    ]
    try:
        await asyncio.gather(*(r.wait() for r in ready))
        await asyncio.sleep(MARGIN_S)
        started = time.perf_counter()
        await build()
        build_ms = (time.perf_counter() - started) * 1000
        await asyncio.sleep(MARGIN_S)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return [ms for s in samples for ms in s], build_ms


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--ledger", type=int, default=400_000)
    ap.add_argument("--writers", type=int, default=4)
    args = ap.parse_args()

    pg = EmbeddedPostgres()
    pg.start()
    try:
        dsn = pg.create_database("leaps_bench_indexes")
        started = time.perf_counter()
        counts = await build_scale_fixture(
            dsn, users=args.users, submissions=args.users * 10, ledger=args.ledger
        )
        print(
            f"fixture: {args.users:,} users, {counts['points_ledger']:,} ledger rows, built in "
            f"{time.perf_counter() - started:.1f} s"
        )
        async with FaultInjector(dsn) as faults:
            await faults.drop_index(FIXTURE_INDEX)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT id FROM points_ledger ORDER BY md5(id) LIMIT 5000")
            ids = [str(r[0]) for r in await cur.fetchall()]

        gateway = TargetGateway(dsn, check_timeout_ms=60_000)
        ctx = RunContext(gateway, Thresholds())
        try:
            started = time.perf_counter()
            report = await indexes(ctx, [])
            report_ms = (time.perf_counter() - started) * 1000
            print(f"/db indexes: {report_ms:.0f} ms, worst {report.worst}")

            # Baseline: a plain build of the same index, then dropped again.
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:

                async def plain() -> None:
                    await conn.execute(PLAIN_SQL)

                plain_lat, plain_ms = await while_writing(dsn, ids, args.writers, plain)
                await conn.execute("DROP INDEX bench_plain")

            plan = await CREATE_INDEX.plan(ctx, [RECOMMENDED])
            executor = Executor(dsn, statement_timeout_ms=TIMEOUT_MS, lock_timeout_ms=TIMEOUT_MS)

            async def concurrently() -> None:
                state, outcome = await executor.apply(CREATE_INDEX, plan, "apv-bench-index")
                if state != "done":
                    raise SystemExit(f"create-index ended {state}: {outcome.summary}")

            conc_lat, conc_ms = await while_writing(dsn, ids, args.writers, concurrently)
        finally:
            await gateway.close()

        for name, ms, lat in (("plain", plain_ms, plain_lat), ("create-index", conc_ms, conc_lat)):
            print(
                f"{name:>13}: build {ms:.0f} ms; {len(lat)} writes, p50 "
                f"{statistics.median(lat):.2f} ms, max {max(lat):.1f} ms"
            )
        ratio = max(plain_lat) / max(conc_lat)
        print(
            f"BENCH create_index writers={args.writers} ledger_rows={counts['points_ledger']} "
            f"plain_build_ms={plain_ms:.0f} concurrent_build_ms={conc_ms:.0f} "
            f"plain_max_write_ms={max(plain_lat):.1f} concurrent_max_write_ms={max(conc_lat):.1f} "
            f"ratio={ratio:.1f} indexes_report_ms={report_ms:.0f}"
        )
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
