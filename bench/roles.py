"""How long `/db roles` and `/db roles <email>` take through the real router and gateway,
against the floor of one `SELECT count(*) FROM users` through the same gateway.

The overview makes eight small queries over `users` in one read-only transaction; a
lookup by e-mail in another case scans `users` (production has no index on
`lower(email)`). Both are compared with a one-query check measured in the same run, so
the ratio says what the extra queries cost on this machine, whatever its load.

    python bench/roles.py [--users 5000] [--runs 50] [--dsn postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from timing import WARMUP, pct  # noqa: E402  (this directory: python bench/...)

from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.gateway import TargetGateway  # noqa: E402
from bot.router import Dispatcher, RunContext  # noqa: E402
from commands.base import Finding, Reader, Report, Status, Thresholds  # noqa: E402
from commands.fixture.seed import build_fixture  # noqa: E402


async def emails(dsn: str, n: int, seed: int) -> list[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT email FROM users ORDER BY id")
        everyone = [str(r[0]) for r in await cur.fetchall()]
    return random.Random(seed).sample(everyone, min(n, len(everyone)))


async def timed_report(d: Dispatcher, text: str) -> float:
    started = time.perf_counter()
    result = await d.run(text)
    elapsed = (time.perf_counter() - started) * 1000
    if not isinstance(result, Report):
        raise SystemExit(f"`/db {text}` did not give a report: {result}")
    bad = [f for f in result.findings if f.status in (Status.ERROR, Status.SKIPPED)]
    if bad:
        raise SystemExit(f"`/db {text}` failed: {bad}")
    return elapsed


async def count_users(db: Reader) -> Finding:
    rows = await db.fetch("SELECT count(*) AS n FROM users")
    return Finding(check="users", status=Status.OK, summary=str(rows[0]["n"]))


async def timed_floor(gateway: TargetGateway) -> float:
    started = time.perf_counter()
    await gateway.run_check("users", count_users)
    return (time.perf_counter() - started) * 1000


async def run(dsn: str, runs: int, seed: int) -> None:
    sample = await emails(dsn, runs, seed)
    gateway = TargetGateway(dsn)
    await gateway.open()
    try:
        d = Dispatcher(RunContext(gateway, Thresholds()), coalesce_s=0.0)
        for _ in range(WARMUP):
            await timed_report(d, "roles")
            await timed_floor(gateway)
        floor, overview, lookup = [], [], []
        for email in sample:  # interleaved, so load changes hit all three alike
            floor.append(await timed_floor(gateway))
            overview.append(await timed_report(d, "roles"))
            lookup.append(await timed_report(d, f"roles {email.swapcase()}"))
    finally:
        await gateway.close()
    base = pct(floor, 50)
    for name, values in (("count(*) floor", floor), ("roles", overview), ("lookup", lookup)):
        print(
            f"{name}: {len(values)} runs, p50 {pct(values, 50):.1f} ms,"
            f" p99 {pct(values, 99):.1f} ms"
        )
    print(
        f"BENCH roles overview_p50_ms={pct(overview, 50):.1f}"
        f" lookup_p50_ms={pct(lookup, 50):.1f} floor_p50_ms={base:.1f}"
        f" overview_ratio={pct(overview, 50) / base:.2f} lookup_ratio={pct(lookup, 50) / base:.2f}"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--users", type=int, default=5_000, help="fixture size when building")
    ap.add_argument("--runs", type=int, default=50, help="timed runs of each")
    ap.add_argument("--dsn", help="use this LEAPS database instead of building one")
    ap.add_argument("--seed", type=int, default=1, help="which random users to look up")
    args = ap.parse_args()

    if args.dsn:
        await run(args.dsn, args.runs, args.seed)
        return
    pg = EmbeddedPostgres()
    pg.start()
    try:
        dsn = pg.create_database("leaps_roles_bench")
        started = time.perf_counter()
        await build_fixture(dsn, users=args.users)
        print(f"fixture of {args.users:,} users built in {time.perf_counter() - started:.1f} s")
        await run(dsn, args.runs, args.seed)
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
