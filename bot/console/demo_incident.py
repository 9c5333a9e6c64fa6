"""The demo's incident, from the first alert to the summary, on the console.

The same parts as in Slack, speaking through the console: the watchdog (its health run
through the Dispatcher and gateway), the incident service and its state store, the
approval engine and executor. Only the clock is the demo's: it moves a few minutes
between steps, so the SLA clocks read like an incident's, not like a script's seconds.

Steps, each printed as it happens:
1. a baseline of the target's counts, the way the watchdog leader takes one every hour;
2. the watchdog's tick on the healthy database, then `leaderboard_totals` is left
   unpopulated (the fault injector), and the next tick posts it and opens the incident;
3. the on-call engineer takes command, runs `views` and posts an update (response,
   communication);
4. `refresh-views` is requested, refused for self-approval, approved by the lead, run;
5. the watchdog's next tick posts the recovery; `views` confirms; resolving posts the
   summary;
6. `recover` verifies against the baseline and, the incident being resolved, marks it
   fully recovered (a clean verification never closes an open incident);
7. the summary again, every SLA met, with the data impact, and the whole timeline.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TextIO

from bot.clock import ManualClock
from bot.console.console import CONSOLE_CHANNEL, console_click, console_frontend
from bot.house import House, build_house
from bot.incidents.views import timeline_message
from bot.incidents.watchdog import Watchdog
from bot.messages import render
from bot.settings import Settings
from commands.base import Report
from commands.fixture.faults import FaultInjector
from commands.incidents import lifecycle as incident_cmd
from commands.recover import recovery_verified, take_baseline
from commands.remedies.base import REMEDIES

log = logging.getLogger(__name__)

ONCALL, LEAD = "U0ONCALL", "U0LEAD"
FAULT_VIEW = "leaderboard_totals"
WALK_APPROVAL_TTL_S = 7200.0


class Walk:
    def __init__(self, house: House, clock: ManualClock, out: TextIO) -> None:
        self.house = house
        self.engine = house.engine
        self.incidents = house.incidents
        self.out = out
        self.clock = clock

    def say(self, text: str) -> None:
        self.out.write(f"\n── {self.clock.now():%H:%M} {text}\n")
        self.out.flush()

    def later(self, minutes: float) -> datetime:
        return self.clock.advance(minutes=minutes)

    async def incident(self, user_id: str, text: str) -> None:
        """`/db incident …` as `user_id`, the reply printed as Slack would show it."""
        request = incident_cmd.parse(text)
        reply = await self.incidents.handle(request, user_id=user_id, channel_id=CONSOLE_CHANNEL)
        await self.incidents.slack.post(CONSOLE_CHANNEL, reply.message)

    async def diagnose(self, user_id: str, text: str) -> Report:
        result = await self.house.dispatcher.run(text)
        assert isinstance(result, Report)
        self.out.write(render.to_text(result))
        await self.incidents.on_report(CONSOLE_CHANNEL, user_id, text, result)
        return result

    async def click(self, approval_id: str, user_id: str) -> None:
        approval = await self.engine.store.get_approval(approval_id)
        assert approval is not None
        await self.engine.on_click(console_click(self.engine, approval, user_id))


def walk_settings(settings: Settings) -> Settings:
    """The demo's bot: the watchdog posts to the console's channel and opens a sev2
    incident, ticked by the walk (never on a timer); every diagnostic runs afresh; the walk
    takes the one baseline itself."""
    return settings.model_copy(
        update={
            "ops_channel": CONSOLE_CHANNEL,
            "watchdog_interval_s": 60.0,
            "watchdog_opens_incident": True,
            "watchdog_incident_severity": "sev2",
            "coalesce_s": 0.0,
            "baseline_interval_s": 0.0,
        }
    )


async def walk_incident(settings: Settings, dsn: str, out: TextIO) -> list[str]:
    """The whole incident on `dsn` (a clean fixture); returns what did not go as planned
    (nothing, when every part works)."""
    missing: list[str] = []
    # The demo's minutes for the incidents and the watchdog (the baseline and approvals
    # keep system time; the demo's approvals live long enough for the walk's half hour).
    clock = ManualClock(datetime.now(UTC))
    frontend = console_frontend(out, clock)
    async with (
        build_house(walk_settings(settings), frontend) as house,
        FaultInjector(dsn) as faults,
    ):
        engine, incidents, comms = house.engine, house.incidents, house.comms
        walk = Walk(house, clock, out)
        watchdog = house.watchdog
        assert isinstance(watchdog, Watchdog)

        walk.say("the watchdog leader takes the hourly baseline of the target's counts")
        # as the leader does: none while an incident is open, in the quiet hour after one
        # recovered, or while a check is newly critical
        conditions = await incidents.baseline_conditions(settings.baseline_quiet_s)
        baseline = await take_baseline(house.ctx, conditions)
        if baseline is None:
            missing.append("baseline: not taken (see the log for why)")
        else:
            out.write(
                f"{baseline.name} stored in the state store: {dict(baseline.counts)}, and per "
                "table the rows by day of creation (a loss cannot hide behind growth)\n"
            )

        walk.say("watchdog tick: the database is healthy, nothing is posted")
        await watchdog.tick()

        walk.later(7)
        walk.say(f"fault injected: {FAULT_VIEW} left unpopulated (REFRESH … WITH NO DATA)")
        await faults.unpopulated_view(FAULT_VIEW)
        walk.later(1)
        walk.say("watchdog tick: the check turned critical → alert and incident")
        await watchdog.tick()

        walk.later(2)
        walk.say("watchdog tick: the problem persists → nothing new is posted")
        await watchdog.tick()

        walk.later(2)
        walk.say(f"{ONCALL} takes the incident and looks")
        await walk.incident(ONCALL, f"assign <@{ONCALL}>")
        await walk.diagnose(ONCALL, "views")

        walk.later(3)
        await walk.incident(
            ONCALL,
            f"update {FAULT_VIEW} is unpopulated, the leaderboard is down; "
            "refreshing it (plain refresh, needs approval)",
        )

        walk.later(2)
        walk.say(f"{ONCALL} requests the fix")
        approval_id = await engine.request(
            REMEDIES["refresh-views"],
            [FAULT_VIEW],
            user_id=ONCALL,
            user_name=ONCALL,
            channel_id=CONSOLE_CHANNEL,
            origin="console",
        )
        walk.say(f"{ONCALL} tries to approve their own request")
        await walk.click(approval_id, ONCALL)
        walk.later(3)
        walk.say(f"{LEAD} approves")
        await walk.click(approval_id, LEAD)

        walk.later(1)
        walk.say("watchdog tick: the check is back → recovery posted")
        await watchdog.tick()

        walk.later(1)
        walk.say(f"{ONCALL} confirms")
        await walk.diagnose(ONCALL, "views")

        walk.later(1)
        walk.say(f"{ONCALL} resolves: the summary is posted")
        await walk.incident(ONCALL, "resolve")

        walk.later(5)
        walk.say(f"{ONCALL} verifies the recovery against the baseline (`recover --dry-run`)")
        # joins the timeline as a verification; clean, it marks full recovery (`on_report`)
        report = await walk.diagnose(ONCALL, "recover --dry-run")
        if not recovery_verified(report):
            missing.append("full recovery: the verification was not clean")

        walk.later(1)
        walk.say("the summary, with every SLA, then the whole timeline")
        current = await incidents.store.latest_in(CONSOLE_CHANNEL)
        assert current is not None
        summary = await comms.summary(current, file=False)  # of a closed incident, too
        await incidents.slack.post(CONSOLE_CHANNEL, summary.message)
        events = await incidents.store.timeline(current.id)
        await incidents.slack.post(CONSOLE_CHANNEL, timeline_message(current, events))
    return missing
