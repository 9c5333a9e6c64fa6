"""How long `/db quota <handle>` takes through the real router and gateway.

Builds the LEAPS fixture with `commands.fixture.seed.build_fixture` (`--users`, default
10,000) on an embedded PostgreSQL, or uses the database given with `--dsn`, then runs
`/db quota <handle>` for `--runs` random existing handles through
`Dispatcher(RunContext(TargetGateway(dsn), Thresholds())).run(...)`, one after the other,
as a user in Slack would. A few untimed runs first open the pool and fill the cached
table-wide spelling count, whose cost is printed on its own line. Timed too, for
information: the same users looked up by their e-mail typed in another case, which
takes the case-insensitive path.

    python bench/quota.py [--users 10000] [--runs 200] [--dsn postgresql://...]

The default is not 100,000 users because the seed builder is slow at that size (its
AMPLIFY rows go through the quota trigger one by one): 20,000 users took 204 s on two
busy cores, 100,000 had not finished after 11 minutes. For the 100,000-user,
1,000,000-submission fixture, run `bench/scale.py --keep` and pass the DSN it prints:

    python bench/scale.py --keep &    # prints "DSN postgresql://..."
    python bench/quota.py --dsn postgresql://postgres@127.0.0.1:<port>/leaps_scale
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
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
from commands.base import Report, Status, Thresholds  # noqa: E402
from commands.fixture.seed import build_fixture  # noqa: E402

EMAIL_RUNS = 50


async def pick_users(dsn: str, n: int, seed: int) -> list[tuple[str, str]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT handle, email FROM users ORDER BY id")
        everyone = [(str(h), str(e)) for h, e in await cur.fetchall()]
    return random.Random(seed).sample(everyone, min(n, len(everyone)))


async def timed(d: Dispatcher, text: str) -> tuple[float, Report]:
    started = time.perf_counter()
    result = await d.run(text)
    elapsed = (time.perf_counter() - started) * 1000
    if not isinstance(result, Report):
        raise SystemExit(f"`/db {text}` did not give a report: {result}")
    bad = [f for f in result.findings if f.status in (Status.ERROR, Status.SKIPPED)]
    if bad or not any(f.check == "AMPLIFY quota" for f in result.findings):
        raise SystemExit(f"`/db {text}` did not find the user: {result.findings}")
    return elapsed, result


async def run(dsn: str, runs: int, seed: int) -> None:
    users = await pick_users(dsn, runs + WARMUP, seed)
    gateway = TargetGateway(dsn)
    await gateway.open()
    try:
        d = Dispatcher(RunContext(gateway, Thresholds()), coalesce_s=0.0)
        first_ms, _ = await timed(d, f"quota {users[0][0]}")
        for handle, _email in users[1:WARMUP]:
            await timed(d, f"quota {handle}")
        by_handle = [(await timed(d, f"quota {h}"))[0] for h, _e in users[WARMUP:]]
        by_email = [(await timed(d, f"quota {e.swapcase()}"))[0] for _h, e in users[:EMAIL_RUNS]]
    finally:
        await gateway.close()
    print(f"first run (opens the pool, counts payload spellings table-wide): {first_ms:.1f} ms")
    print(
        f"{len(by_email)} runs by e-mail in another case: p50 {pct(by_email, 50):.1f} ms,"
        f" p99 {pct(by_email, 99):.1f} ms"
    )
    print(
        f"{len(by_handle)} runs by handle: p50 {pct(by_handle, 50):.1f} ms,"
        f" p99 {pct(by_handle, 99):.1f} ms, mean {statistics.fmean(by_handle):.1f} ms,"
        f" max {max(by_handle):.1f} ms"
    )
    print(f"BENCH quota p50_ms={pct(by_handle, 50):.1f} p99_ms={pct(by_handle, 99):.1f}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--users", type=int, default=10_000, help="fixture size when building")
    ap.add_argument("--runs", type=int, default=200, help="timed `/db quota <handle>` runs")
    ap.add_argument("--dsn", help="use this LEAPS database instead of building one")
    ap.add_argument("--seed", type=int, default=1, help="which random users to ask about")
    args = ap.parse_args()

    if args.dsn:
        await run(args.dsn, args.runs, args.seed)
        return
    pg = EmbeddedPostgres()
    pg.start()
    try:
        dsn = pg.create_database("leaps_quota_bench")
        started = time.perf_counter()
        await build_fixture(dsn, users=args.users)
        print(f"fixture of {args.users:,} users built in {time.perf_counter() - started:.1f} s")
        await run(dsn, args.runs, args.seed)
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
