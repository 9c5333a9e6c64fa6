"""The zero-configuration demo: an embedded PostgreSQL, the LEAPS fixture, injected faults.

Thresholds are lowered so that faults a few seconds old already show as they would
after minutes in production; everything else is the same code path as `/db health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import TextIO

from bot import render
from bot.embedded_pg import EmbeddedPostgres
from bot.gateway import TargetGateway
from bot.router import Dispatcher, RunContext
from bot.settings import Settings
from commands.base import Report, Thresholds
from commands.fixture.faults import FaultInjector
from commands.fixture.seed import build_fixture

log = logging.getLogger(__name__)

DEMO_DB = "leaps"
# Old enough after the settle pause below, so the injected faults are past their limits.
DEMO_THRESHOLDS = Thresholds(
    idle_in_tx_warn_s=1.0,
    idle_in_tx_crit_s=2.0,
    blocked_crit_s=2.0,
    idle_session_warn_s=3600.0,
)
SETTLE_S = 2.5


def demo_threshold_env() -> str:
    """The lowered limits as environment variables, so `run` sees what the demo saw."""
    default = Thresholds()
    return " ".join(
        f"THRESHOLDS__{name.upper()}={value:g}"
        for name, value in DEMO_THRESHOLDS.model_dump().items()
        if value != getattr(default, name)
    )


async def demo_report(dsn: str, settings: Settings) -> Report:
    gateway = TargetGateway(
        dsn,
        check_timeout_ms=settings.check_timeout_ms,
        lock_timeout_ms=settings.lock_timeout_ms,
        connect_timeout_s=settings.connect_timeout_s,
    )
    try:
        result = await Dispatcher(RunContext(gateway, DEMO_THRESHOLDS)).run("health")
    finally:
        await gateway.close()
    assert isinstance(result, Report)
    return result


async def run_demo(settings: Settings, *, keep: bool = False, out: TextIO = sys.stdout) -> int:
    out.write("dbops-bot demo: starting an embedded PostgreSQL …\n")
    out.flush()
    pg = EmbeddedPostgres()
    await asyncio.to_thread(pg.start)
    try:
        dsn = await asyncio.to_thread(pg.create_database, DEMO_DB)
        counts = await build_fixture(dsn)
        out.write(
            "LEAPS fixture built: "
            + ", ".join(f"{n} {t}" for t, n in counts.items())
            + "\ninjecting faults: idle-in-transaction session, blocking chain, unpopulated "
            "leaderboard_totals, failed migration, disabled quota trigger …\n\n"
        )
        out.flush()
        async with FaultInjector(dsn) as faults:
            await faults.inject_demo_faults()
            await asyncio.sleep(SETTLE_S)
            report = await demo_report(dsn, settings)
            out.write(render.to_text(report))
            if keep:
                out.write(
                    "\nThe demo database stays up with its faults until Ctrl-C. In another shell:\n"
                    f"  export DATABASE_URL={dsn} {demo_threshold_env()}\n"
                    '  python -m bot run "health"\n'
                )
                out.flush()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
        return 0
    finally:
        await asyncio.to_thread(pg.stop)
