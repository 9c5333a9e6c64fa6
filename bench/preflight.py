"""What asking the database first costs (DESIGN.md rule 10): a remedy's plan alone,
against the preflight that tries its apply and rolls it back, on a production-sized LEAPS.

On an embedded PostgreSQL holding the scale fixture (`bench/scale.py`: by default 100,000
users, 1,000,000 submissions, 2,000,000 ledger rows), this injects each remedy's fault
with `commands/fixture/faults.py` so that its plan has rows:

- dedupe-learn: `duplicate_learn` (`--rows` users with a second, PENDING LEARN);
- reconcile-points: `missing_awards` (`--rows` user-activity pairs without their awards);
- recover-users: `data_loss` (`--rows` users lose their rows and their account, whose
  sign-up audit rows stay).

Then, for each, warm (one untimed run first), median of `--runs`: the plan
(`remedy.plan`, read-only), and the preflight (`Executor.preflight` with the bot's
defaults: PREFLIGHT_MAX_ROWS 1000, the diagnostics' 5000 ms statement and 1000 ms lock
timeouts, as a LEAPS ADMIN of the fixture). A plan bigger than the limit is tried on the
remedy's own sample (`Remedy.sample`) where it has one, else whole. One line each:

    BENCH preflight remedy=<name> rows=<planned> tried=<rows tried> plan_ms=<plan alone>
          preflight_ms=<the try>

    python bench/preflight.py [--users 100000] [--rows 2000] [--runs 3] [--max-rows 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale import scale_database  # noqa: E402  (this directory: python bench/...)

from bot.approvals.executor import Executor  # noqa: E402
from bot.gateway import TargetGateway  # noqa: E402
from bot.router import RunContext  # noqa: E402
from bot.settings import Settings  # noqa: E402
from commands.base import LeapsIdentity, Thresholds  # noqa: E402
from commands.fixture.faults import FaultInjector  # noqa: E402
from commands.remedies.base import REMEDIES, Plan, Preflight  # noqa: E402

REMEDY_NAMES = ("dedupe-learn", "reconcile-points", "recover-users")
T = TypeVar("T")


async def inject(dsn: str, users: int, rows: int) -> None:
    """Each remedy's fault, on users no other fault touched (one injector for all)."""
    async with FaultInjector(dsn) as faults:
        await faults.duplicate_learn(rows)
        await faults.missing_awards(rows)
        # data_loss takes pct % of all users; the first `rows` of them lose their account
        pct = 100.0 * rows / users
        await faults.data_loss(pct=pct, accounts=rows)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("ANALYZE")


async def timed_ms(runs: int, fn: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    """The median milliseconds of `runs` calls of `fn`, after one untimed call, and the
    last result (timing.median_s gives seconds and drops the result)."""
    result = await fn()
    times: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        result = await fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


async def bench(dsn: str, users: int, rows: int, runs: int, max_rows: int) -> None:
    await inject(dsn, users, rows)
    defaults = Settings(_env_file=None)
    gateway = TargetGateway(dsn, check_timeout_ms=60_000, pool_max_size=4)
    ctx = RunContext(gateway, Thresholds())
    executor = Executor(
        dsn,
        preflight_statement_timeout_ms=defaults.check_timeout_ms,
        preflight_lock_timeout_ms=defaults.lock_timeout_ms,
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT id FROM users WHERE role = 'ADMIN' ORDER BY created_at, id LIMIT 1"
        )
        admin = await cur.fetchone()
    assert admin is not None, "the fixture has no ADMIN"
    identity = LeapsIdentity(str(admin[0]), "ADMIN", "bench: a LEAPS ADMIN of the fixture")
    try:
        for name in REMEDY_NAMES:
            remedy = REMEDIES[name]

            async def plan_once(remedy_name: str = name) -> Plan:
                return await REMEDIES[remedy_name].plan(ctx, [])

            plan_ms, plan = await timed_ms(runs, plan_once)

            async def try_once(p: Plan = plan, remedy_name: str = name) -> Preflight:
                return await executor.preflight(
                    REMEDIES[remedy_name], p, identity, max_rows=max_rows
                )

            preflight_ms, tried = await timed_ms(runs, try_once)
            sampler = "its sampler" if remedy.sample else "no sampler: tried whole"
            print(f"{name}: {tried.describe()} ({sampler})"[:300])
            print(
                f"BENCH preflight remedy={name} rows={plan.count} tried={tried.tried} "
                f"plan_ms={plan_ms:.0f} preflight_ms={preflight_ms:.0f}"
            )
    finally:
        await gateway.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=100_000, help="scale: 10 submissions a user")
    ap.add_argument("--rows", type=int, default=2000, help="rows of each remedy's fault")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each (median reported)")
    ap.add_argument("--max-rows", type=int, default=1000, help="PREFLIGHT_MAX_ROWS")
    args = ap.parse_args()
    rows = max(1, min(args.rows, args.users // 20))  # room for the faults on small runs
    async with scale_database("leaps_preflight_bench", users=args.users) as (dsn, _counts):
        await bench(dsn, args.users, rows, args.runs, args.max_rows)


if __name__ == "__main__":
    asyncio.run(main())
