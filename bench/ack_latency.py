"""Time to Slack's HTTP 200 for a burst of signed `/db health` commands on a busy target.

The bot runs as its own process (`python -m bot serve`), exactly as deployed, against
an embedded PostgreSQL kept busy with slow queries and one CPU-heavy query, and a fake
Slack Web API that records the replies. Slack drops a command not acknowledged within
3000 ms; the closing line gives p99 as a fraction of that limit.

    python bench/ack_latency.py [--requests 200] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from commands.fixture.seed import build_fixture  # noqa: E402
from tests.fakeslack import FakeSlack  # noqa: E402
from tests.slackreq import SIGNING_SECRET, signed_headers, slash_body  # noqa: E402

SLACK_ACK_LIMIT_MS = 3000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def keep_busy(dsn: str, sleepers: int, seconds: int) -> list[asyncio.Task[object]]:
    """Slow queries that hold connections, plus one that keeps a core busy."""

    async def run(sql: str) -> object:
        async with await psycopg.AsyncConnection.connect(dsn, application_name="bench-load") as c:
            await c.execute("SELECT set_config('statement_timeout', %s, false)", (f"{seconds}s",))
            return await c.execute(sql, (seconds,))

    tasks = [asyncio.create_task(run("SELECT pg_sleep(%s)")) for _ in range(sleepers)]
    tasks.append(
        asyncio.create_task(run("SELECT count(*) FROM generate_series(1, 2000000000 + 0 * %s)"))
    )
    await asyncio.sleep(0.5)
    return tasks


async def wait_healthy(url: str, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            if proc.returncode is not None:
                raise SystemExit(f"bot exited early with code {proc.returncode}")
            try:
                async with http.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit("bot did not become healthy")


async def burst(url: str, fake: FakeSlack, n: int, concurrency: int) -> list[float]:
    """Fire n signed commands, at most `concurrency` in flight; return ms to each HTTP 200."""
    prepared = []
    for i in range(n):
        body = slash_body("health", user=f"U{i:05d}", response_url=fake.response_url(f"u{i}"))
        prepared.append((body, signed_headers(body, secret=SIGNING_SECRET)))
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(body: str, headers: dict[str, str]) -> float:
            async with gate:
                started = time.perf_counter()
                async with http.post(f"{url}/slack/events", data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"HTTP {resp.status}")
                return (time.perf_counter() - started) * 1000

        return await asyncio.gather(*(one(b, h) for b, h in prepared))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--busy", type=int, default=8, help="sessions running pg_sleep on the target")
    args = ap.parse_args()

    pg = EmbeddedPostgres()
    pg.start()
    bot: asyncio.subprocess.Process | None = None
    try:
        dsn = pg.create_database("leaps_bench")
        await build_fixture(dsn, users=500)
        async with FakeSlack() as fake:
            port = free_port()
            env = {
                **os.environ,
                "SLACK_BOT_TOKEN": "xoxb-bench",
                "SLACK_SIGNING_SECRET": SIGNING_SECRET,
                "SLACK_API_URL": fake.api_url,
                "DATABASE_URL": dsn,
                "LOG_LEVEL": "WARNING",
            }
            bot = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "bot", "serve", "--port", str(port), "--host", "127.0.0.1"],
                cwd=ROOT,
                env=env,
            )
            url = f"http://127.0.0.1:{port}"
            await wait_healthy(url, bot)
            await burst(url, fake, 5, 5)  # warm-up: auth.test, first connections
            await fake.wait_for("chat.postEphemeral", count=5, timeout=30)
            fake.reset()

            load = await keep_busy(dsn, args.busy, 120)
            started = time.perf_counter()
            latencies = await burst(url, fake, args.requests, args.concurrency)
            acked_s = time.perf_counter() - started
            await fake.wait_for("chat.postEphemeral", count=args.requests, timeout=120)
            replied_s = time.perf_counter() - started
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)

        p50, p99 = statistics.median(latencies), pct(latencies, 99)
        print(
            f"{args.requests} signed /db health commands, {args.concurrency} in flight, "
            f"target busy with {args.busy} slow queries + 1 CPU-bound query"
        )
        print(
            f"time to HTTP 200: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(latencies):.1f} ms; "
            f"all acked in {acked_s * 1000:.0f} ms; all {args.requests} replies posted after "
            f"{replied_s:.2f} s"
        )
        print(
            f"BENCH ack_latency p50_ms={p50:.1f} p99_ms={p99:.1f} "
            f"ratio_to_slack_limit={p99 / SLACK_ACK_LIMIT_MS:.4f}"
        )
    finally:
        if bot is not None and bot.returncode is None:
            bot.terminate()
            await asyncio.wait_for(bot.wait(), timeout=15)
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
