"""The demo's emergency recovery (the guide's last chapter), on the console.

The same parts as in Slack (the approval engine, executor, state store), on a database of
its own so that the rest of the demo keeps its faults:
1. a baseline, then a data loss: users deleted with their submissions and ledger rows;
2. a copy of the database from before the loss stands for a restored backup (a Supabase
   restore or `pg_basebackup` with a recovery target; the tests run a real point-in-time
   recovery, `tests/test_pitr.py`): RECOVERY_DATABASE_URL names it;
3. `freeze-writes`, approved by an ADMIN: `health` says the writes are frozen;
4. the runbook (`/db recover --runbook`): one approval by two ADMINs runs
   `restore-from-copy` and the steps after it, each re-planned, bounded and verified, and
   ends with `unfreeze-writes` (the writes were frozen when it was asked for);
5. `/db recover --status`; `health` no longer reports a freeze.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from bot.clock import ManualClock
from bot.console.console import CONSOLE_CHANNEL, console_click, console_frontend
from bot.embedded_pg import EmbeddedPostgres
from bot.house import House, build_house
from bot.messages import render
from bot.settings import Settings
from commands.base import Report
from commands.fixture.faults import FaultInjector
from commands.fixture.seed import build_fixture
from commands.recover import take_baseline
from commands.remedies.base import REMEDIES

ONCALL, LEAD, LEAD2 = "U0ONCALL", "U0LEAD", "U0LEAD2"
ROLES = {ONCALL: "REVIEWER", LEAD: "ADMIN", LEAD2: "ADMIN"}
EMERGENCY_DB = "leaps_emergency"
COPY_DB = "leaps_emergency_restored"
FREEZE_CHECK = "writes frozen"
WALK_APPROVAL_TTL_S = 7200.0


class EmergencyWalk:
    def __init__(self, house: House, out: TextIO) -> None:
        self.house = house
        self.out = out

    def say(self, text: str) -> None:
        self.out.write(f"\n── {text}\n")
        self.out.flush()

    async def diagnose(self, text: str, *, only: str | None = None) -> Report:
        """`/db <text>`, printed; `only`: just that check's finding (health is long)."""
        result = await self.house.dispatcher.run(text)
        assert isinstance(result, Report), result
        shown = result
        if only is not None:
            shown = result.model_copy(
                update={"findings": [f for f in result.findings if f.check == only]}
            )
        self.out.write(render.to_text(shown))
        return result

    async def request(self, remedy: str, args: list[str]) -> str:
        return await self.house.engine.request(
            REMEDIES[remedy],
            args,
            user_id=ONCALL,
            user_name=ONCALL,
            channel_id=CONSOLE_CHANNEL,
            origin="console",
        )

    async def approve(self, approval_id: str, *approvers: str) -> str:
        """Each approver clicks Approve; returns the approval's final state."""
        engine = self.house.engine
        for user_id in approvers:
            approval = await engine.store.get_approval(approval_id)
            assert approval is not None
            await engine.on_click(console_click(engine, approval, user_id))
        final = await engine.store.get_approval(approval_id)
        return final.state if final is not None else "missing"


def _frozen(report: Report) -> bool:
    return any(f.check == FREEZE_CHECK and f.status == "crit" for f in report.findings)


async def walk_emergency(
    settings: Settings, pg: EmbeddedPostgres, service_user_id: str, run_dir: Path, out: TextIO
) -> list[str]:
    """The emergency recovery on a database of its own; returns what did not go as
    planned (nothing, when every part works)."""
    missing: list[str] = []
    dsn = await asyncio.to_thread(pg.create_database, EMERGENCY_DB)
    await build_fixture(dsn)
    # The copy is taken now, before the loss: it stands for last night's restored backup.
    copy_dsn = await asyncio.to_thread(pg.create_database, COPY_DB, template=EMERGENCY_DB)
    walk_settings = settings.model_copy(
        update={
            "database_url": dsn,
            "recovery_database_url": copy_dsn,
            "state_database_url": f"sqlite:///{run_dir}/dbops-emergency-state.sqlite3",
            "role_map": ROLES,
            "remedy_service_user_id": service_user_id or None,
            "approval_ttl_s": WALK_APPROVAL_TTL_S,
            "coalesce_s": 0.0,
            "baseline_interval_s": 0.0,
            "watchdog_interval_s": 0.0,
        }
    )
    clock = ManualClock(datetime.now(UTC))
    async with (
        build_house(walk_settings, console_frontend(out, clock)) as house,
        FaultInjector(dsn) as faults,
    ):
        walk = EmergencyWalk(house, out)
        walk.say(
            f"a database of its own ({EMERGENCY_DB}) and a copy of it ({COPY_DB}) standing "
            "for a restored backup (RECOVERY_DATABASE_URL); the hourly baseline is taken"
        )
        if await take_baseline(house.ctx) is None:
            missing.append("emergency: no baseline")
        loss = await faults.data_loss(pct=3.0, accounts=2)
        walk.say(
            f"data loss: {len(loss.users)} users lose every submission and ledger row, "
            f"{len(loss.accounts)} of them their account too (plain deletes, no audit)"
        )

        walk.say(f"{ONCALL} stops the application's writes (`/db freeze-writes`), {LEAD} approves")
        state = await walk.approve(await walk.request("freeze-writes", []), LEAD)
        if state != "done":
            missing.append(f"freeze-writes ended {state}")
        walk.say("`/db health` while frozen (its freeze finding)")
        if not _frozen(await walk.diagnose("health", only=FREEZE_CHECK)):
            missing.append("health did not report the freeze")

        walk.say(
            f"{ONCALL} asks for the whole recovery as one runbook (`/db recover --runbook`), "
            "which ends with the unfreeze; restore-from-copy needs two ADMINs: "
            f"{LEAD} and {LEAD2} approve"
        )
        runbook = await walk.request("recover-runbook", [])
        state = await walk.approve(runbook, LEAD, LEAD2) if runbook else "not requested"
        if state != "done":
            missing.append(f"the runbook ended {state}")
        walk.say("`/db recover --status`")
        await walk.diagnose("recover --status")

        walk.say("`/db health` after the runbook (its freeze finding)")
        if _frozen(await walk.diagnose("health", only=FREEZE_CHECK)):
            missing.append("still frozen after the runbook")
    return missing
