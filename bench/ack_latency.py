"""Time to Slack's HTTP 200 for a burst of signed `/db health` commands on a busy target.

The bot runs as its own process (`python -m bot serve`), exactly as deployed, against
an embedded PostgreSQL kept busy with slow queries and one CPU-heavy query, and a fake
Slack Web API that records the replies. Slack drops a command not acknowledged within
3000 ms; the closing line gives p99 as a fraction of that limit, and the floor: the same
bursts at a bare aiohttp handler that only verifies the signature (bench/floor.py).

    python bench/ack_latency.py [--requests 200] [--busy 8] [--cpu-load] [--text health]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psycopg
import psycopg.sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from floor import floor_server  # noqa: E402
from timing import pct  # noqa: E402  (this directory: python bench/...)

from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from commands.fixture.seed import build_fixture  # noqa: E402
from tests.botproc import free_port, wait_healthy  # noqa: E402
from tests.fakeslack import FakeSlack  # noqa: E402
from tests.slackreq import SIGNING_SECRET, signed_headers, slash_body  # noqa: E402

SLACK_ACK_LIMIT_MS = 3000.0
COALESCE_S = 2.0


async def keep_busy(dsn: str, sleepers: int, seconds: int, cpu: bool) -> list[asyncio.Task[object]]:
    """Slow queries holding connections, and locks that stall the health checks themselves.

    The lock holders make every `/db health` run wait out its lock timeout, so the
    replies are slow while the acks must not be. `cpu` adds a query that keeps one of
    the machine's two cores busy (the target shares this machine only in the bench).
    """

    async def run(sql: str) -> object:
        async with await psycopg.AsyncConnection.connect(dsn, application_name="bench-load") as c:
            await c.execute("SELECT set_config('statement_timeout', %s, false)", (f"{seconds}s",))
            return await c.execute(sql, (seconds,))

    async def hold(table: str) -> object:
        async with await psycopg.AsyncConnection.connect(dsn, application_name="bench-load") as c:
            await c.execute(
                psycopg.sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    psycopg.sql.Identifier(table)
                )
            )
            await asyncio.sleep(seconds)
            await c.rollback()
            return None

    tasks = [asyncio.create_task(run("SELECT pg_sleep(%s)")) for _ in range(sleepers)]
    tasks += [asyncio.create_task(hold(t)) for t in ("_prisma_migrations", "leaderboard_totals")]
    if cpu:
        tasks.append(
            asyncio.create_task(run("SELECT count(*) FROM generate_series(1, 2000000000 + 0 * %s)"))
        )
    await asyncio.sleep(0.5)
    return tasks


def raw_request(port: int, body: str, headers: dict[str, str]) -> bytes:
    head = [
        "POST /slack/events HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Length: {len(body.encode())}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(
        (int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length")),
        0,
    )
    if length:
        await reader.readexactly(length)
    return status


async def burst(
    port: int, fake: FakeSlack, n: int, text: str, bot_pid: int | None = None
) -> tuple[list[float], float]:
    """n signed commands sent at the same instant over n open keep-alive connections.

    A small raw HTTP/1.1 client keeps the load generator's own cost (and so its share
    of the two cores) out of the bot's figures; the connections are opened and used
    once beforehand, as a load balancer in front of the bot keeps them open. Returns
    the latencies and the bot's CPU milliseconds from the first send to the last 200.
    """
    requests = []
    for i in range(n):
        body = slash_body(text, user=f"U{i:05d}", response_url=fake.response_url(f"u{i}"))
        requests.append(raw_request(port, body, signed_headers(body, secret=SIGNING_SECRET)))
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    probe = raw_request(port, "", {"Content-Type": "text/plain"}).replace(
        b"POST /slack/events", b"GET /healthz"
    )
    for reader, writer in conns:
        writer.write(probe)
        await writer.drain()
        if await read_response(reader) != 200:
            raise SystemExit("healthz failed")
    go = asyncio.Event()

    async def one(i: int) -> float:
        reader, writer = conns[i]
        await go.wait()
        started = time.perf_counter()
        writer.write(requests[i])
        status = await read_response(reader)
        elapsed = (time.perf_counter() - started) * 1000
        if status != 200:
            raise SystemExit(f"HTTP {status}")
        return elapsed

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(0.05)
    cpu_before = process_cpu_s(bot_pid) if bot_pid else 0.0
    go.set()
    latencies = await asyncio.gather(*tasks)
    cpu_ms = (process_cpu_s(bot_pid) - cpu_before) * 1000 if bot_pid else 0.0
    for _reader, writer in conns:
        writer.close()
    return latencies, cpu_ms


def process_cpu_s(pid: int) -> float:
    """CPU seconds used by a process and its children (the workers), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--busy", type=int, default=8, help="sessions running pg_sleep on the target")
    ap.add_argument("--text", default="health", help="the command; `help` is answered in the ack")
    ap.add_argument("--cpu-load", action="store_true", help="also burn a core on the target")
    ap.add_argument("--workers", type=int, default=2, help="bot HTTP worker processes")
    ap.add_argument("--repeat", type=int, default=5, help="bursts; the median is reported")
    args = ap.parse_args()

    pg = EmbeddedPostgres()
    pg.start()
    bot: asyncio.subprocess.Process | None = None
    try:
        dsn = pg.create_database("leaps_bench")
        await build_fixture(dsn, users=500)
        async with FakeSlack() as fake, floor_server() as (floor_port, _floor_pid):
            port = free_port()
            env = {
                **os.environ,
                "SLACK_BOT_TOKEN": "xoxb-bench",
                "SLACK_SIGNING_SECRET": SIGNING_SECRET,
                "SLACK_API_URL": fake.api_url,
                "DATABASE_URL": dsn,
                "LOG_LEVEL": "WARNING",
                "COALESCE_S": str(COALESCE_S),
                # the on-call engineers typing: reviewers, so the health reports are posted
                "ROLE_MAP": json.dumps({f"U{i:05d}": "REVIEWER" for i in range(args.requests)}),
            }
            bot = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "bot", "serve", "--port", str(port), "--host", "127.0.0.1"],
                *["--workers", str(args.workers)],
                cwd=ROOT,
                env=env,
            )
            url = f"http://127.0.0.1:{port}"
            await wait_healthy(url, bot)
            # warm-up: each worker's first request calls auth.test and opens its pool
            await burst(port, fake, 40, "health")
            await fake.wait_for("chat.postEphemeral", count=40, timeout=30)

            load = await keep_busy(dsn, args.busy, 300, args.cpu_load)
            runs: list[tuple[float, float, float, float]] = []  # p50, p99, cpu ms, replies s
            floor_p99s: list[float] = []
            for run in range(args.repeat):
                await asyncio.sleep(COALESCE_S + 0.5)  # each burst starts a fresh health run
                fake.reset()
                started = time.perf_counter()
                latencies, cpu_ms = await burst(port, fake, args.requests, args.text, bot.pid)
                if args.text == "health":
                    await fake.wait_for("chat.postEphemeral", count=args.requests, timeout=120)
                replied_s = time.perf_counter() - started
                runs.append((statistics.median(latencies), pct(latencies, 99), cpu_ms, replied_s))
                # The same burst, measured the same way, at a handler that only checks signatures.
                floor_latencies, _cpu = await burst(floor_port, fake, args.requests, args.text)
                floor_p99s.append(pct(floor_latencies, 99))
                print(
                    f"run {run + 1}: time to HTTP 200 p50 {runs[-1][0]:.1f} ms, "
                    f"p99 {runs[-1][1]:.1f} ms, max {max(latencies):.1f} ms; bot CPU "
                    f"{cpu_ms / args.requests:.2f} ms a command; all replies posted after "
                    f"{replied_s:.2f} s; floor p99 {floor_p99s[-1]:.1f} ms"
                )
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)

        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        floor_p99 = statistics.median(floor_p99s)
        print(
            f"{args.requests} signed /db {args.text} commands sent at once to {args.workers} "
            f"worker(s), target busy with {args.busy} slow queries and 2 lock holders"
            + (" and a CPU-bound query" if args.cpu_load else "")
            + f"; median of {args.repeat} bursts"
        )
        print(
            f"BENCH ack_latency p50_ms={p50:.1f} p99_ms={p99:.1f} floor_p99_ms={floor_p99:.1f} "
            f"ratio_to_slack_limit={p99 / SLACK_ACK_LIMIT_MS:.4f}"
        )
    finally:
        if bot is not None and bot.returncode is None:
            bot.terminate()
            await asyncio.wait_for(bot.wait(), timeout=15)
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
