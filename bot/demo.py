"""The zero-configuration demo: an embedded PostgreSQL, the LEAPS fixture, injected faults.

Thresholds are lowered so that faults a few seconds old already show as they would
after minutes in production; everything else is the same code path as `/db health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import psycopg

from bot import render
from bot.embedded_pg import EmbeddedPostgres
from bot.gateway import gateway_from_settings
from bot.router import Dispatcher, RunContext
from bot.settings import Settings
from bot.tasks import wait_for_signal
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
    gateway = gateway_from_settings(settings, dsn)
    try:
        result = await Dispatcher(RunContext(gateway, DEMO_THRESHOLDS)).run("health")
    finally:
        await gateway.close()
    assert isinstance(result, Report)
    return result


DEMO_ROLES = {"U0ONCALL": "REVIEWER", "U0LEAD": "ADMIN", "U0CTO": "SUPERADMIN"}


async def leak_idle_sessions(dsn: str, n: int) -> list[psycopg.AsyncConnection[Any]]:
    """Sessions an application role left idle, like a leaking pool: kill-idle's targets
    (the injected faults are superuser sessions, which kill-idle spares by default)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute(
            "DO $$ BEGIN CREATE ROLE demo_app LOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
    app_dsn = dsn.replace("postgres@", "demo_app@", 1)
    return [
        await psycopg.AsyncConnection.connect(app_dsn, application_name="prisma-pool")
        for _ in range(n)
    ]


def keep_instructions(dsn: str, run_dir: Path) -> str:
    env = (
        f"export DATABASE_URL='{dsn}' {demo_threshold_env()} "
        f"STATE_DATABASE_URL='sqlite:///{run_dir}/dbops-demo-state.sqlite3' "
        f"ROLE_MAP='{json.dumps(DEMO_ROLES)}' ALLOW_SUPERUSER_KILL=true"
    )
    return f"""
The demo database stays up with its faults until Ctrl-C. In another shell
(roles: U0ONCALL is a REVIEWER, U0LEAD an ADMIN; every injected session is a superuser's,
hence ALLOW_SUPERUSER_KILL):

  {env}
  python -m bot run "health"
  python -m bot run "connections"
  python -m bot run "refresh-views" --user U0ONCALL        # plain refresh: waits for approval
  python -m bot approve <approval id> --user U0LEAD
  python -m bot run "kill-idle 0" --user U0ONCALL          # the 3 idle prisma-pool sessions
  python -m bot approve <approval id> --user U0ONCALL      # refused: no self-approval
  python -m bot approve <approval id> --user U0LEAD
  python -m bot run "views"
"""


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
                leaked = await leak_idle_sessions(dsn, 3)
                out.write(keep_instructions(dsn, pg.data_dir.parent))
                out.flush()
                try:
                    await wait_for_signal()
                finally:
                    for conn in leaked:
                        with contextlib.suppress(psycopg.Error):
                            await conn.close()
        return 0
    finally:
        await asyncio.to_thread(pg.stop)
