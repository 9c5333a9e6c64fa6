"""A minute of an incident: 1,000 signed slash commands over 60 s on three bot processes.

Three `python -m bot serve` processes (as three replicas behind a load balancer) share
one PostgreSQL state store; the target database is kept busy (slow queries, and lock
holders that stall every health check until its lock timeout). The commands arrive at
random instants (a Poisson process, seeded) and go round-robin to the replicas; a mix
of what on-call engineers type: health, connections, help, and kill-idle requests that
write approvals to the shared state store and post plans. In the same run every
command is also sent to the floor (bench/floor.py: a bare aiohttp handler that only
verifies the signature), at the same instant, so both see the same machine.

A failure is an ack that is not HTTP 200 within Slack's 3 s, or a command whose reply
never reached the fake Slack. Peak RSS is the largest VmHWM of the three bot processes.

    python bench/load.py [--requests 1000] [--seconds 60] [--busy 8] [--cpu-load]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ack_latency import keep_busy, raw_request, read_response  # noqa: E402
from floor import floor_server  # noqa: E402
from timing import pct  # noqa: E402

from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from commands.fixture.seed import build_fixture  # noqa: E402
from tests.botproc import free_port, wait_healthy  # noqa: E402
from tests.fakeslack import Call, FakeSlack  # noqa: E402
from tests.slackreq import SIGNING_SECRET, signed_headers, slash_body  # noqa: E402

REPLICAS = 3
SLACK_ACK_LIMIT_S = 3.0
CONNECTIONS_PER_SERVER = 16  # keep-alive connections, as a load balancer keeps them
MIX = [("health", 0.6), ("connections", 0.15), ("help", 0.1), ("kill-idle 30", 0.15)]
REPLY_GRACE_S = 90.0


@dataclass
class Command:
    at: float  # seconds after the start
    text: str
    user: str
    replica: int


class Pool:
    """Open keep-alive connections to one server; a request borrows one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def open(self, n: int) -> None:
        for _ in range(n):
            self.free.put_nowait(await asyncio.open_connection("127.0.0.1", self.port))

    async def send(self, request: bytes) -> tuple[int, float]:
        """Status and milliseconds to the response (0 status when the connection failed)."""
        reader, writer = await self.free.get()
        started = time.perf_counter()
        try:
            writer.write(request)
            async with asyncio.timeout(SLACK_ACK_LIMIT_S):
                status = await read_response(reader)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            status = 0
        elapsed = (time.perf_counter() - started) * 1000
        self.free.put_nowait((reader, writer))
        return status, elapsed

    async def close(self) -> None:
        while not self.free.empty():
            _reader, writer = self.free.get_nowait()
            writer.close()


def schedule(n: int, seconds: float, seed: int) -> list[Command]:
    rng = random.Random(seed)
    instants = sorted(rng.uniform(0, seconds) for _ in range(n))
    texts, weights = zip(*MIX, strict=True)
    return [
        Command(at, rng.choices(texts, weights)[0], f"U{i:05d}", i % REPLICAS)
        for i, at in enumerate(instants)
    ]


def replied(cmd: Command) -> Callable[[Call], bool]:
    token = f"/response/{cmd.user}"

    def match(call: Call) -> bool:
        if call.status != 200:
            return False
        if call.path.endswith(token) or call.params.get("user") == cmd.user:
            return True
        return f"<@{cmd.user}>" in str(call.params.get("text", ""))

    return match


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def start_bots(
    target_dsn: str, state_dsn: str, fake: FakeSlack, users: list[str]
) -> list[tuple[asyncio.subprocess.Process, int]]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "PROMETHEUS_"))},
        "SLACK_BOT_TOKEN": "xoxb-bench",
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": fake.api_url,
        "DATABASE_URL": target_dsn,
        "STATE_DATABASE_URL": state_dsn,
        "LOG_LEVEL": "WARNING",
        "WEB_CONCURRENCY": "1",
        "ROLE_MAP": json.dumps(dict.fromkeys(users, "REVIEWER")),
    }
    bots = []
    for _ in range(REPLICAS):
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "bot", "serve", "--port", str(port), "--host", "127.0.0.1"],
            cwd=ROOT,
            env=env,
        )
        bots.append((proc, port))
    for proc, port in bots:
        await wait_healthy(f"http://127.0.0.1:{port}", proc, limit_s=60)
    return bots


async def run_load(
    commands: list[Command], bot_pools: list[Pool], floor_pool: Pool, fake: FakeSlack
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    bot_results: list[tuple[int, float]] = [(0, 0.0)] * len(commands)
    floor_results: list[tuple[int, float]] = [(0, 0.0)] * len(commands)
    requests = []
    for cmd in commands:
        body = slash_body(cmd.text, user=cmd.user, response_url=fake.response_url(cmd.user))
        requests.append(raw_request(bot_pools[cmd.replica].port, body, signed_headers(body)))

    async def one(i: int, start: float) -> None:
        cmd = commands[i]
        await asyncio.sleep(max(0.0, start + cmd.at - time.perf_counter()))
        bot_send = bot_pools[cmd.replica].send(requests[i])
        floor_send = floor_pool.send(requests[i])
        bot_results[i], floor_results[i] = await asyncio.gather(bot_send, floor_send)

    start = time.perf_counter() + 0.2
    await asyncio.gather(*(one(i, start) for i in range(len(commands))))
    return bot_results, floor_results


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--busy", type=int, default=8, help="sessions running pg_sleep on the target")
    ap.add_argument("--cpu-load", action="store_true", help="also burn a core on the target")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    begun = time.perf_counter()

    commands = schedule(args.requests, args.seconds, args.seed)
    users = [c.user for c in commands] + [f"UWARM{i}" for i in range(REPLICAS * 4)]
    pg = EmbeddedPostgres()
    pg.start()
    bots: list[tuple[asyncio.subprocess.Process, int]] = []
    try:
        target = pg.create_database("leaps_load")
        state = pg.create_database("dbops_state_load")  # shared by the replicas, not the target
        await build_fixture(target, users=500)
        async with FakeSlack() as fake, floor_server() as (floor_port, _floor_pid):
            bots = await start_bots(target, state, fake, users)
            # Warm-up: each replica's first request calls auth.test and opens its pools.
            for r, (_proc, port) in enumerate(bots):
                pool = Pool(port)
                await pool.open(1)
                for k in range(4):
                    body = slash_body("health", user=f"UWARM{r * 4 + k}")
                    await pool.send(raw_request(port, body, signed_headers(body)))
                await pool.close()
            await fake.wait_for("chat.postEphemeral", count=REPLICAS * 4, timeout=60)
            busy = await keep_busy(target, args.busy, int(args.seconds) + 240, args.cpu_load)
            bot_pools = [Pool(port) for _proc, port in bots]
            floor_pool = Pool(floor_port)
            for pool in [*bot_pools, floor_pool]:
                await pool.open(CONNECTIONS_PER_SERVER)
            fake.reset()

            sent_at = time.perf_counter()
            bot_res, floor_res = await run_load(commands, bot_pools, floor_pool, fake)
            load_s = time.perf_counter() - sent_at

            deadline = time.perf_counter() + REPLY_GRACE_S
            matchers = [replied(c) for c in commands]
            missing = list(range(len(commands)))
            while missing and time.perf_counter() < deadline:
                calls = list(fake.calls)
                missing = [i for i in missing if not any(matchers[i](c) for c in calls)]
                if missing:
                    await asyncio.sleep(0.5)
            replies_s = time.perf_counter() - sent_at
            for pool in [*bot_pools, floor_pool]:
                await pool.close()
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
            rss = max(peak_rss_mb(proc.pid) for proc, _port in bots)
    finally:
        for proc, _port in bots:
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), timeout=20)
        pg.stop()

    acks = [ms for status, ms in bot_res if status == 200]
    floor = [ms for status, ms in floor_res if status == 200]
    bad_acks = sum(1 for status, ms in bot_res if status != 200 or ms > SLACK_ACK_LIMIT_S * 1000)
    failures = bad_acks + len(missing)
    p99, floor_p99 = pct(acks, 99) if acks else float("nan"), pct(floor, 99)
    kinds = ", ".join(f"{t} {sum(c.text == t for c in commands)}" for t, _w in MIX)
    print(
        f"{len(commands)} signed /db commands at random instants over {load_s:.1f} s, round-robin "
        f"to {REPLICAS} `serve` processes sharing a PostgreSQL state store ({kinds}); target "
        f"busy with {args.busy} slow queries and 2 lock holders"
        + (" and a CPU-bound query" if args.cpu_load else "")
    )
    print(
        f"bot: time to HTTP 200 p50 {pct(acks, 50):.1f} ms, p99 {p99:.1f} ms, max "
        f"{max(acks, default=0):.1f} ms; floor (signature check only) p50 {pct(floor, 50):.1f} "
        f"ms, p99 {floor_p99:.1f} ms; acks failed {bad_acks}, replies missing {len(missing)} "
        f"(all replies in {replies_s:.1f} s); p99/floor {p99 / floor_p99:.2f} (target <= 2)"
    )
    print(f"total runtime {time.perf_counter() - begun:.1f} s")
    print(
        f"BENCH load p99_ack_ms={p99:.1f} floor_p99_ms={floor_p99:.1f} failures={failures} "
        f"max_rss_mb={rss:.0f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
