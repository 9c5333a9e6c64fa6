"""What the benchmarks measure with: a percentile, a `/db` command timed through the
router, and the median of a call. Imported as `from timing import …` (this directory
is on the path when a benchmark runs as `python bench/x.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bot.router import Dispatcher
from commands.base import Report

WARMUP = 3


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def command_ms(d: Dispatcher, text: str, runs: int) -> tuple[list[float], Report]:
    """`runs` timed runs of `/db text` in milliseconds after WARMUP untimed ones, and the
    last report (each run must give one)."""
    for _ in range(WARMUP):
        await d.run(text)
    times: list[float] = []
    report: Report | None = None
    for _ in range(runs):
        started = time.perf_counter()
        result = await d.run(text)
        times.append((time.perf_counter() - started) * 1000)
        assert isinstance(result, Report), result
        report = result
    assert report is not None
    return times, report


async def median_s(fn: Callable[[], Awaitable[Any]], runs: int) -> float:
    """The median seconds of `runs` calls of `fn`, after one untimed call."""
    await fn()
    seconds: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        await fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)
