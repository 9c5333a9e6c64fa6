"""What `/db leaderboard` and `/db analytics` cost, against what the cure costs.

Both diagnoses run each view's definition once (and the ledger or base-table
aggregates beside it), so their natural yardstick is the refresh they may recommend:
`REFRESH MATERIALIZED VIEW` of the same views, timed in the same run on the same data.
Builds the LEAPS fixture (`--users`, default 5,000) on an embedded PostgreSQL, or uses
`--dsn`; injects nothing (a stale or broken view costs the same to diagnose).

    python bench/leaderboard.py [--users 5000] [--runs 5] [--dsn postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.gateway import TargetGateway  # noqa: E402
from bot.router import Dispatcher, RunContext  # noqa: E402
from commands.base import Report, Status, Thresholds  # noqa: E402
from commands.fixture.seed import build_fixture  # noqa: E402

LEADERBOARDS = ("leaderboard_totals", "leaderboard_30d")
ANALYTICS = (
    *LEADERBOARDS,
    "activity_metrics",
    "cohort_metrics",
    "school_metrics",
    "time_series_metrics",
)


async def refresh_ms(dsn: str, views: tuple[str, ...]) -> float:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        for view in views:
            await conn.execute(
                psycopg.sql.SQL("REFRESH MATERIALIZED VIEW {}").format(psycopg.sql.Identifier(view))
            )
        return (time.perf_counter() - started) * 1000


async def command_ms(d: Dispatcher, text: str) -> float:
    started = time.perf_counter()
    result = await d.run(text)
    elapsed = (time.perf_counter() - started) * 1000
    if not isinstance(result, Report):
        raise SystemExit(f"`/db {text}` did not give a report: {result}")
    bad = [f for f in result.findings if f.status is not Status.OK]
    if bad:
        raise SystemExit(f"`/db {text}` on a clean fixture: {bad}")
    return elapsed


async def run(dsn: str, runs: int) -> None:
    gateway = TargetGateway(dsn, check_timeout_ms=300_000)
    await gateway.open()
    try:
        d = Dispatcher(RunContext(gateway, Thresholds()), coalesce_s=0.0)
        await command_ms(d, "leaderboard")  # opens the pool, warms the cache
        measured: dict[str, list[float]] = {"leaderboard": [], "analytics": []}
        baseline: dict[str, list[float]] = {"leaderboard": [], "analytics": []}
        for _ in range(runs):
            baseline["leaderboard"].append(await refresh_ms(dsn, LEADERBOARDS))
            measured["leaderboard"].append(await command_ms(d, "leaderboard"))
            baseline["analytics"].append(await refresh_ms(dsn, ANALYTICS))
            measured["analytics"].append(await command_ms(d, "analytics"))
    finally:
        await gateway.close()
    for name in ("leaderboard", "analytics"):
        ms = statistics.median(measured[name])
        base = statistics.median(baseline[name])
        print(
            f"/db {name}: median {ms:.1f} ms over {runs} runs; refreshing its views: "
            f"median {base:.1f} ms"
        )
        print(f"BENCH {name} median_ms={ms:.1f} refresh_ms={base:.1f} ratio={ms / base:.2f}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--users", type=int, default=5_000, help="fixture size when building")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each")
    ap.add_argument("--dsn", help="use this LEAPS database instead of building one")
    args = ap.parse_args()
    if args.dsn:
        await run(args.dsn, args.runs)
        return
    pg = EmbeddedPostgres()
    pg.start()
    try:
        dsn = pg.create_database("leaps_leaderboard_bench")
        started = time.perf_counter()
        await build_fixture(dsn, users=args.users)
        print(f"fixture of {args.users:,} users built in {time.perf_counter() - started:.1f} s")
        await run(dsn, args.runs)
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
