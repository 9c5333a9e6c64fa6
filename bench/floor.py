"""The floor for ack benchmarks: a bare aiohttp server that only verifies Slack's signature.

Nothing answers a signed request faster in Python on this machine, so the bot's time to
HTTP 200 is reported next to this server's, measured the same way in the same run.

    python bench/floor.py --port N     (what the benches start; GET /healthz when ready)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from slack_sdk.signature import SignatureVerifier

ROOT = Path(__file__).resolve().parent.parent
FLOOR_SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(ROOT))

from tests.botproc import free_port, wait_healthy  # noqa: E402
from tests.slackreq import SIGNING_SECRET  # noqa: E402


def floor_app(secret: str) -> web.Application:
    verifier = SignatureVerifier(secret)

    async def events(request: web.Request) -> web.Response:
        body = await request.text()
        ok = verifier.is_valid_request(body, request.headers)
        return web.Response(status=200 if ok else 401)

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/slack/events", events)
    app.router.add_get("/healthz", healthz)
    return app


@contextlib.asynccontextmanager
async def floor_server() -> AsyncIterator[tuple[int, int]]:
    """The floor server as its own process, as the bot runs: yields (port, pid)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(FLOOR_SCRIPT), "--port", str(port), cwd=ROOT
    )
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield port, proc.pid
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    web.run_app(
        floor_app(SIGNING_SECRET),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        backlog=1024,
    )


if __name__ == "__main__":
    main()
