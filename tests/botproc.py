"""Running `python -m bot serve` as its own process, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import aiohttp

from tests import leakcheck


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_healthy(url: str, proc: asyncio.subprocess.Process, limit_s: float = 15.0) -> None:
    """Until the bot answers /healthz; fails at once if the process exits."""
    async with aiohttp.ClientSession() as http:
        for _ in range(int(limit_s / 0.05)):
            if proc.returncode is not None:
                raise AssertionError(f"bot exited with code {proc.returncode}")
            try:
                async with http.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"bot at {url} did not become healthy within {limit_s} s")


@contextmanager
def output_file(where: str) -> Iterator[IO[bytes]]:
    """Where a child process writes stdout and stderr: afterwards its text goes to the leak
    check, and to our stderr, which pytest shows for a failed test."""
    with tempfile.TemporaryFile() as out:
        try:
            yield out
        finally:
            out.seek(0)
            text = out.read().decode("utf-8", "replace")
            leakcheck.collect(where, text)
            sys.stderr.write(text)
