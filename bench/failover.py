"""Watchdog failover: how long after `kill -9` of the leader the next alert arrives.

Two `python -m bot serve` processes share a PostgreSQL state store. Each round finds the
leader (`/healthz`), kills it with SIGKILL, flips the AMPLIFY quota trigger (disabled
→ an alert that it turned critical; enabled → one that it recovered) and times the
survivor's post to the fake Slack. A fresh process then replaces the dead one, so every
round starts with a leader and a follower. The target is one interval plus one health
run; a duplicate is an alert for a state that was already posted.

    python bench/failover.py [--rounds 5] [--interval 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import psycopg  # noqa: E402

from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from commands.fixture.faults import QUOTA_TRIGGER  # noqa: E402
from commands.fixture.seed import build_fixture  # noqa: E402
from tests.fakeslack import Call, FakeSlack  # noqa: E402
from tests.test_multiprocess import BotProcess, bot_process  # noqa: E402

OPS = "C0OPS"
CHECK = "guard: AMPLIFY quota trigger"


async def role(bot: BotProcess) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{bot.url}/healthz") as resp:
        found: str = (await resp.json())["watchdog"]
        return found


def posts(fake: FakeSlack, marker: str) -> int:
    return sum(
        1
        for c in fake.calls_to("chat.postMessage")
        if c.params.get("channel") == OPS
        and marker in str(c.params.get("text", ""))
        and f"*{CHECK}*" in str(c.params.get("text", ""))
    )


async def set_trigger(dsn: str, enabled: bool) -> None:
    verb = "ENABLE" if enabled else "DISABLE"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"ALTER TABLE submissions {verb} TRIGGER {QUOTA_TRIGGER}")


async def bench(rounds: int, interval: float) -> None:
    pg = EmbeddedPostgres()
    await asyncio.to_thread(pg.start)
    try:
        target = await asyncio.to_thread(pg.create_database, "leaps_failover")
        state = await asyncio.to_thread(pg.create_database, "dbops_state_failover")
        await build_fixture(target, users=200)
        env = {"OPS_CHANNEL": OPS, "WATCHDOG_INTERVAL_S": f"{interval:g}"}
        takeovers: list[float] = []
        async with FakeSlack() as fake, AsyncExitStack() as stack:
            bots = [
                await stack.enter_async_context(bot_process(target, state, fake, **env))
                for _ in range(2)
            ]
            await asyncio.sleep(interval * 2)  # the first ticks: the fixture as it is
            enabled = True
            for _ in range(rounds):
                roles = [await role(b) for b in bots]
                leader = bots[roles.index("leader")]
                follower = bots[1 - roles.index("leader")]
                leader.proc.kill()
                await leader.proc.wait()
                killed = time.monotonic()
                enabled = not enabled
                marker = "recovered" if enabled else "critical"
                before = posts(fake, marker)
                await set_trigger(target, enabled)

                def arrived(_call: Call, before: int = before, marker: str = marker) -> bool:
                    return posts(fake, marker) > before

                await fake.wait_for("chat.postMessage", timeout=60, predicate=arrived)
                takeovers.append(time.monotonic() - killed)
                fresh = await stack.enter_async_context(bot_process(target, state, fake, **env))
                bots = [follower, fresh]
            await asyncio.sleep(interval * 2)  # a duplicate would arrive by now
            duplicates = (posts(fake, "critical") - (rounds + 1) // 2) + (
                posts(fake, "recovered") - rounds // 2
            )
    finally:
        await asyncio.to_thread(pg.stop)
    print(
        f"BENCH failover interval_s={interval:g} rounds={rounds} "
        f"takeover_p50_s={statistics.median(takeovers):.2f} "
        f"takeover_max_s={max(takeovers):.2f} duplicates={duplicates}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(bench(args.rounds, args.interval))


if __name__ == "__main__":
    main()
