"""How long readers of the leaderboard wait while the bot refreshes it.

A plain `REFRESH MATERIALIZED VIEW` holds an ACCESS EXCLUSIVE lock on the view for the
whole refresh, so every reader queues behind it; `CONCURRENTLY` takes only an EXCLUSIVE
lock and readers keep reading the old rows. This measures both, on an embedded
PostgreSQL with a fixture of `--users` users: K reader sessions query the view in a
tight loop from 200 ms before the refresh until 200 ms after it, while the refresh runs
exactly as the bot runs it (the `refresh-views` remedy planned with a RunContext and
applied by the Executor in its guarded transaction). For the plain case the view's
unique index is dropped first, so the planner falls back to plain, and the lock timeout
is long enough that the refresh waits for readers instead of failing.

    python bench/refresh_block.py [--users 100000] [--readers 4] [--extra-ledger N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale import build_scale_fixture  # noqa: E402  (this directory: python bench/...)
from timing import pct  # noqa: E402  (this directory: python bench/...)

from bot.approvals.executor import Executor  # noqa: E402
from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.gateway import TargetGateway  # noqa: E402
from bot.router import RunContext  # noqa: E402
from commands.base import Thresholds  # noqa: E402
from commands.fixture.faults import FaultInjector  # noqa: E402
from commands.remedies.refresh import REFRESH_VIEWS, RefreshData  # noqa: E402
from commands.views import CONCURRENTLY, PLAIN  # noqa: E402

VIEW = "leaderboard_totals"
READ_SQL = (
    "SELECT user_id, total_points FROM leaderboard_totals ORDER BY total_points DESC LIMIT 20"
)
MARGIN_S = 0.2  # readers run this long before the refresh starts and after it ends
LOCK_TIMEOUT_MS = 60_000  # the plain refresh must wait for readers, not give up
STATEMENT_TIMEOUT_MS = 600_000

# Bench-only ledger rows, so the refresh lasts long enough to be seen. One statement;
# ids and values derive from the series number, users are the seeded participants.
# session_replication_role=replica skips the per-row NOTIFY trigger for this load.
EXTRA_LEDGER_SQL = """
INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points, event_time, meta)
SELECT 'bench-' || g,
       p.ids[1 + g %% cardinality(p.ids)],
       (ARRAY['LEARN', 'EXPLORE', 'PRESENT'])[1 + g %% 3],
       'MANUAL',
       1 + g %% 50,
       now() - make_interval(secs => (g %% 7776000)),
       '{"bench": "refresh_block"}'
  FROM (SELECT array_agg(id ORDER BY id) AS ids FROM users WHERE role = 'PARTICIPANT') AS p,
       generate_series(1, %s) AS g
"""

SIZED = ("users", "submissions", "points_ledger", VIEW)


@dataclass
class Run:
    mode: str
    apply_ms: float  # the whole guarded transaction: checks, REFRESH, count, commit
    refresh_ms: float  # the REFRESH statement alone, as the remedy timed it
    view_rows: int
    latencies_ms: list[float]


async def reader(dsn: str, ready: asyncio.Event, stop: asyncio.Event, out: list[float]) -> None:
    """Queries the view until `stop`; autocommit, so no lock outlives its own query."""
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, application_name="bench-reader"
    ) as conn:
        await conn.execute(READ_SQL)  # connection and plan warm before timing starts
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            cur = await conn.execute(READ_SQL)
            await cur.fetchall()
            out.append((time.perf_counter() - started) * 1000)


async def measure(dsn: str, readers: int, expect: str) -> Run:
    gateway = TargetGateway(dsn)
    try:
        plan = await REFRESH_VIEWS.plan(RunContext(gateway, Thresholds()), [VIEW])
    finally:
        await gateway.close()
    mode = plan.private(RefreshData).modes.get(f"public.{VIEW}")
    if mode != expect:
        raise SystemExit(f"the plan chose {mode!r}, expected {expect!r}: {plan.summary}")
    executor = Executor(
        dsn, statement_timeout_ms=STATEMENT_TIMEOUT_MS, lock_timeout_ms=LOCK_TIMEOUT_MS
    )

    samples: list[list[float]] = [[] for _ in range(readers)]
    stop = asyncio.Event()
    ready = [asyncio.Event() for _ in range(readers)]
    tasks = [asyncio.create_task(reader(dsn, ready[i], stop, samples[i])) for i in range(readers)]
    try:
        await asyncio.gather(*(r.wait() for r in ready))
        await asyncio.sleep(MARGIN_S)
        started = time.perf_counter()
        state, outcome = await executor.apply(REFRESH_VIEWS, plan, f"apv-bench-{expect}")
        apply_ms = (time.perf_counter() - started) * 1000
        await asyncio.sleep(MARGIN_S)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    if state != "done":
        raise SystemExit(f"{expect} refresh ended {state}: {outcome.summary} ({outcome.error})")
    (done,) = outcome.rows
    latencies = [ms for s in samples for ms in s]
    return Run(expect, apply_ms, float(done["seconds"]) * 1000, int(done["rows"]), latencies)


async def add_ledger_rows(dsn: str, rows: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(EXTRA_LEDGER_SQL, (rows,))
        await conn.execute("RESET session_replication_role")
        await conn.execute("ANALYZE points_ledger")
        # The views must include the new rows before the measured refreshes: those
        # should rewrite as little as a routine refresh does, not catch up.
        await conn.execute("SELECT refresh_all_analytics()")


async def print_sizes(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for name in SIZED:
            query = sql.SQL("SELECT count(*), pg_size_pretty(pg_total_relation_size({})) FROM {}")
            cur = await conn.execute(query.format(sql.Literal(name), sql.Identifier(name)))
            row = await cur.fetchone()
            assert row is not None
            print(f"  {name:<20} {row[0]:>10,} rows {row[1]:>10}")


def report(run: Run) -> None:
    lat = run.latencies_ms
    print(
        f"{run.mode:>12}: refresh {run.refresh_ms:.0f} ms ({run.view_rows:,} rows; "
        f"remedy transaction {run.apply_ms:.0f} ms); "
        f"{len(lat)} reader queries, p50 {statistics.median(lat):.2f} ms, "
        f"p99 {pct(lat, 99):.2f} ms, max {max(lat):.1f} ms"
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--readers", type=int, default=4, help="concurrent reader sessions")
    ap.add_argument(
        "--extra-ledger",
        type=int,
        default=0,
        help="bench-only points_ledger rows added to the seed, for a longer refresh "
        "(the seed alone makes it last about a second at 100,000 users)",
    )
    args = ap.parse_args()

    begun = time.perf_counter()
    pg = EmbeddedPostgres()
    pg.start()
    try:
        dsn = pg.create_database("leaps_bench")
        started = time.perf_counter()
        # set-based, the production-sized fixture of bench/scale.py (the row-by-row seed
        # takes far too long at this size)
        counts = await build_scale_fixture(dsn, users=args.users)
        print(
            f"fixture of {args.users:,} users ({counts['points_ledger']:,} ledger rows) built "
            f"in {time.perf_counter() - started:.1f} s"
        )
        if args.extra_ledger:
            started = time.perf_counter()
            await add_ledger_rows(dsn, args.extra_ledger)
            print(
                f"{args.extra_ledger:,} bench-only ledger rows added in "
                f"{time.perf_counter() - started:.1f} s"
            )
        await print_sizes(dsn)

        concurrent = await measure(dsn, args.readers, CONCURRENTLY)
        async with FaultInjector(dsn) as faults:
            await faults.drop_view_unique_index(VIEW)
        plain = await measure(dsn, args.readers, PLAIN)

        print(
            f"{args.readers} readers of {VIEW}, from {MARGIN_S * 1000:.0f} ms before each "
            f"refresh to {MARGIN_S * 1000:.0f} ms after it"
        )
        report(concurrent)
        report(plain)
        c_max, p_max = max(concurrent.latencies_ms), max(plain.latencies_ms)
        print(f"plain/concurrent max wait ratio {p_max / c_max:.1f}")
        print(f"total runtime {time.perf_counter() - begun:.1f} s")
        print(
            f"BENCH refresh_block concurrent_max_wait_ms={c_max:.1f} plain_max_wait_ms={p_max:.1f}"
        )
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
