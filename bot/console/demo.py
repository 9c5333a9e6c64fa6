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

from bot.console.console import console_frontend
from bot.embedded_pg import EmbeddedPostgres, password_sql, role_dsn
from bot.house import build_house
from bot.messages import render
from bot.settings import Settings
from bot.tasks import wait_for_signal
from commands.base import Report, Thresholds
from commands.fixture.faults import FaultInjector
from commands.fixture.seed import add_statement_statistics, an_admin_id, build_fixture

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


async def demo_report(dsn: str, settings: Settings, text: str = "health") -> Report:
    """One diagnostic of the showcase, as a one-off `run` would: the demo's limits, no
    state kept."""
    showcase = settings.model_copy(
        update={"database_url": dsn, "state_database_url": None, "thresholds": DEMO_THRESHOLDS}
    )
    async with build_house(showcase, console_frontend(), keeps_state=False) as house:
        result = await house.dispatcher.run(text)
    assert isinstance(result, Report)
    return result


async def inject_data_faults(faults: FaultInjector) -> None:
    """A few of each integrity problem, for `/db integrity` and the repairs to find."""
    await faults.orphan_submissions(2)
    await faults.orphan_ledger_rows(2)
    await faults.orphan_attachments(2)
    await faults.duplicate_learn(2)
    await faults.duplicate_external_events(2)
    await faults.missing_awards(2)
    await faults.extra_awards(2)
    await faults.negative_totals(1)


DEMO_ROLES = {"U0ONCALL": "REVIEWER", "U0LEAD": "ADMIN", "U0CTO": "SUPERADMIN"}


async def leak_idle_sessions(dsn: str, n: int) -> list[psycopg.AsyncConnection[Any]]:
    """Sessions an application role left idle, like a leaking pool: kill-idle's targets
    (the injected faults are superuser sessions, which kill-idle spares by default)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute(
            "DO $$ BEGIN CREATE ROLE demo_app LOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
        await admin.execute(password_sql(admin, "demo_app", dsn))
    app_dsn = role_dsn(dsn, "demo_app")
    return [
        await psycopg.AsyncConnection.connect(app_dsn, application_name="prisma-pool")
        for _ in range(n)
    ]


async def demo_service_user(dsn: str) -> str:
    """A LEAPS admin of the demo data for REMEDY_SERVICE_USER_ID: the console has no Slack
    profiles, so remedies act as the service identity (a rejection names its reviewer)."""
    return await an_admin_id(dsn) or ""


def keep_instructions(dsn: str, run_dir: Path, service_user_id: str = "") -> str:
    env = (
        f"export DATABASE_URL='{dsn}' {demo_threshold_env()} "
        f"STATE_DATABASE_URL='sqlite:///{run_dir}/dbops-demo-state.sqlite3' "
        f"ROLE_MAP='{json.dumps(DEMO_ROLES)}' ALLOW_SUPERUSER_KILL=true"
        + (f" REMEDY_SERVICE_USER_ID='{service_user_id}'" if service_user_id else "")
    )
    return f"""
The demo database stays up with its faults until Ctrl-C. In another shell
(roles: U0ONCALL is a REVIEWER, U0LEAD an ADMIN; every injected session is a superuser's,
hence ALLOW_SUPERUSER_KILL):

  {env}
  python -m bot run "health"
  python -m bot run "connections"
  python -m bot run "refresh-views" --user U0ONCALL        # plain refresh: waits for approval
  python -m bot approve <approval id> --user U0LEAD        # lock timeout: names the blockers
  python -m bot run "terminate <pid>" --user U0ONCALL      # each pid it named, then approve
  python -m bot run "kill-idle 0" --user U0ONCALL          # the 3 idle prisma-pool sessions
  python -m bot approve <approval id> --user U0ONCALL      # refused: no self-approval
  python -m bot approve <approval id> --user U0LEAD
  python -m bot run "views"
  python -m bot run "integrity"
  python -m bot run "cleanup-orphans all" --user U0ONCALL  # destroys data: two approvers
  python -m bot approve <approval id> --user U0LEAD
  python -m bot approve <approval id> --user U0CTO
  python -m bot run "dedupe-learn" --user U0ONCALL          # then two approvals, likewise
  python -m bot run "dedupe-ledger-events" --user U0ONCALL  # then two approvals
  python -m bot run "reconcile-points" --user U0ONCALL      # then one approval
  python -m bot run "quota <handle>"
"""


async def walk_demo_incident(settings: Settings, dsn: str, run_dir: Path, out: TextIO) -> None:
    """Act one: a whole incident on the clean fixture (`bot.console.demo_incident`)."""
    from bot.console.demo_incident import WALK_APPROVAL_TTL_S, walk_incident

    out.write("\n═══ An incident, from the watchdog's alert to the summary ═══\n")
    walk_settings = settings.model_copy(
        update={
            "database_url": dsn,
            "state_database_url": f"sqlite:///{run_dir}/dbops-demo-state.sqlite3",
            "role_map": DEMO_ROLES,
            "remedy_service_user_id": await demo_service_user(dsn) or None,
            "thresholds": DEMO_THRESHOLDS,
            "approval_ttl_s": WALK_APPROVAL_TTL_S,
        }
    )
    missing = await walk_incident(walk_settings, dsn, out)
    if missing:
        out.write("\nThe incident did not end as planned: " + "; ".join(missing) + "\n")
    out.write("═══ End of the incident; now the health and integrity showcase ═══\n\n")
    out.flush()


async def walk_demo_emergency(
    settings: Settings, pg: EmbeddedPostgres, dsn: str, out: TextIO
) -> None:
    """Act two: the guide's emergency recovery, on a database of its own
    (`bot.console.demo_recovery`): a freeze, a restore from a copy, the runbook."""
    from bot.console.demo_recovery import walk_emergency

    out.write("\n═══ Emergency recovery: freeze the writes, restore from a copy, one runbook ═══\n")
    missing = await walk_emergency(
        settings.model_copy(update={"thresholds": DEMO_THRESHOLDS}),
        pg,
        await demo_service_user(dsn),
        pg.data_dir.parent,
        out,
    )
    if missing:
        out.write("\nThe recovery did not end as planned: " + "; ".join(missing) + "\n")
    out.write("═══ End of the emergency recovery ═══\n\n")
    out.flush()


async def inject_guide_faults(faults: FaultInjector) -> None:
    """A fault for each of the guide's later sections: Kajabi webhooks waiting and
    mis-matched, a payload received twice, a role outside the four, a recommended index
    dropped and another one doubled."""
    await faults.unmatched_webhook_backlog(55)
    await faults.miscased_unmatched_events(2)
    await faults.duplicate_webhook_payloads(2)
    await faults.invalid_role()
    await faults.drop_index()
    await faults.duplicate_index()


async def show_the_rest_of_the_guide(
    faults: FaultInjector, dsn: str, settings: Settings, out: TextIO
) -> None:
    out.write(
        "injecting faults: 55 unmatched Kajabi events, mis-cased e-mails, repeated payloads, "
        "an invalid role, a dropped and a duplicated index …\n\n"
    )
    out.flush()
    await inject_guide_faults(faults)
    for text in ("webhooks", "roles", "indexes", "leaderboard", "slow"):
        out.write(render.to_text(await demo_report(dsn, settings, text)) + "\n")
        out.flush()


async def run_demo(settings: Settings, *, keep: bool = False, out: TextIO = sys.stdout) -> int:
    out.write("dbops-bot demo: starting an embedded PostgreSQL …\n")
    out.flush()
    pg = EmbeddedPostgres()
    await asyncio.to_thread(pg.start)
    try:
        dsn = await asyncio.to_thread(pg.create_database, DEMO_DB)
        counts = await build_fixture(dsn)
        await add_statement_statistics(dsn)  # as on Supabase, for `/db slow`
        out.write("LEAPS fixture built: " + ", ".join(f"{n} {t}" for t, n in counts.items()) + "\n")
        await walk_demo_incident(settings, dsn, pg.data_dir.parent, out)
        await walk_demo_emergency(settings, pg, dsn, out)
        out.write(
            "\ninjecting data faults: orphans, duplicate LEARN, duplicate webhook awards, "
            "missing and extra awards, a negative total …\n\n"
        )
        out.flush()
        async with FaultInjector(dsn) as faults:
            # data first: the blocking chain below would stall these writes and reads
            await inject_data_faults(faults)
            out.write(render.to_text(await demo_report(dsn, settings, "integrity")) + "\n")
            await show_the_rest_of_the_guide(faults, dsn, settings, out)
            out.write(
                "injecting faults: idle-in-transaction session, blocking chain, unpopulated "
                "leaderboard_totals, failed migration, disabled quota trigger …\n\n"
            )
            out.flush()
            # `users` is read now: the blocking chain below queues every reader of it
            service = await demo_service_user(dsn) if keep else ""
            await faults.inject_demo_faults()
            await asyncio.sleep(SETTLE_S)
            report = await demo_report(dsn, settings)
            out.write(render.to_text(report))
            if keep:
                leaked = await leak_idle_sessions(dsn, 3)
                out.write(keep_instructions(dsn, pg.data_dir.parent, service))
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
