"""The watchdog: `health` on a schedule, on one leader, posting only what changed.

An on-call channel that hears about the same broken trigger every minute stops reading
it; so a check is posted when it turns critical and when it recovers (back to ok or
warn), never while it stays so. The last status of every check lives in the state
store (`bot.state.watchdog`), so a restart or a new leader after a failover does not
post the same problem again. The health run goes through the same Dispatcher and
gateway as `/db health`: what the watchdog sees is what a person would see.

The leader (see `bot.incidents.leader`) also takes the periodic baseline snapshot that
`/db recover` compares against, so replicas do not each take one.

What a tick costs the database: the two health checks that read whole tables (the
webhook backlog, and replayed awards while no unique index rules them out:
`commands.health.scan_checks`) are counted exactly on one tick in `scan_every`, about
every SCAN_INTERVAL_S (10 minutes, inside the operators' 15-minute detection target),
by `/db health --exact`; the counts are kept (`commands.health.remember_counts`) until
the next such tick, and `/db health` on the ticks between (and anyone's in this
process) shows them, marked with their time, instead of counting again. Their alerts
come at most one scan interval late, never not at all; every other check is read every
tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

from bot.clock import Clock, SystemClock
from bot.incidents.leader import Leadership
from bot.messages.notify import SLACK_FAILURES
from bot.messages.render import SlackMessage, cut, esc
from bot.router import Dispatcher
from bot.state.incidents import WATCHDOG
from bot.state.watchdog import CheckStatus, WatchdogStore
from commands.base import Finding, Report, Status
from commands.health import EXACT, forget_counts, remember_counts
from commands.incidents.lifecycle import Severity, Start

if TYPE_CHECKING:
    from bot.incidents.service import IncidentService

log = logging.getLogger(__name__)

# Statuses that say something about the database; `skipped` and `error` (a check that
# could not run) neither raise nor clear an alert.
TRACKED: dict[Status, CheckStatus] = {Status.OK: "ok", Status.WARN: "warn", Status.CRIT: "crit"}
MESSAGE_CHARS = 3000  # one Block Kit section's worth, should the text become one
LOOKBACK = timedelta(hours=24)  # how far back the current run of critical health dates detection
# The whole-table checks are counted about this often (see the module's docstring).
SCAN_INTERVAL_S = 600.0

Baseline = Callable[[], Awaitable[object]]


class Poster(Protocol):
    """Where alerts go: Slack (`bot.incidents.service.SlackIncidents`) or the console."""

    async def post(self, channel: str, message: SlackMessage) -> str: ...


@dataclass(frozen=True)
class Change:
    """A check that turned critical, or came back from critical."""

    check: str
    old: CheckStatus | None
    new: CheckStatus
    finding: Finding


def critical_message(target: str, turned: Sequence[Change]) -> SlackMessage:
    lines = [f":rotating_light: *Watchdog*: critical on `{esc(target)}`"]
    for c in turned:
        hint = f" (next: {esc(c.finding.hint)})" if c.finding.hint else ""
        lines.append(f"• *{esc(c.check)}*: {esc(c.finding.summary)}{hint}")
    lines.append("Posted once; the watchdog says so here when it recovers.")
    return SlackMessage(text=cut("\n".join(lines), MESSAGE_CHARS), blocks=[])


def recovered_message(target: str, cleared: Sequence[Change]) -> SlackMessage:
    lines = [f":white_check_mark: *Watchdog*: recovered on `{esc(target)}`"]
    for c in cleared:
        lines.append(f"• *{esc(c.check)}* is {c.new} again: {esc(c.finding.summary)}")
    return SlackMessage(text=cut("\n".join(lines), MESSAGE_CHARS), blocks=[])


class Watchdog:
    def __init__(
        self,
        dispatcher: Dispatcher,
        store: WatchdogStore,
        poster: Poster,
        *,
        ops_channel: str | None,
        incidents: IncidentService | None = None,
        opens_incident: bool = False,
        severity: Severity = "sev2",
        clock: Clock | None = None,
        baseline: Baseline | None = None,
        baseline_interval_s: float = 3600.0,
        leadership: Leadership,
        interval_s: float,
        scan_every: int | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.store = store
        self.poster = poster
        self.ops_channel = ops_channel
        self.incidents = incidents
        self.opens_incident = opens_incident
        self.severity: Severity = severity
        self.clock: Clock = clock or SystemClock()
        self.baseline = baseline
        self.baseline_interval_s = baseline_interval_s
        self._next_baseline: float | None = None  # loop time; None: due now
        self.ticks = 0
        self.leadership = leadership
        self.interval_s = interval_s
        # one full health run in this many ticks (at least every tick); the others quick
        self.scan_every = scan_every or (
            max(1, round(SCAN_INTERVAL_S / interval_s)) if interval_s > 0 else 1
        )
        self._counted = False  # whether this leader counted the whole-table checks yet
        self._since_counted = 0  # ticks since it last did

    @property
    def role(self) -> str:
        """`leader` or `follower`: which replica runs the watchdog, for operators."""
        return "leader" if self.leadership.leader else "follower"

    async def tick(self) -> list[Change]:
        """One health run; posts what turned critical or recovered. Returns the changes
        this process won (another leader's, should there ever be two, are not posted)."""
        at = self.clock.now()
        exact = not self._counted or self._since_counted + 1 >= self.scan_every
        result = await self.dispatcher.run(f"health {EXACT}" if exact else "health")
        self.ticks += 1
        if not isinstance(result, Report):
            log.error("watchdog: health gave no report: %s", getattr(result, "text", result))
            return []
        if exact:
            # good until the next counting tick, and one more interval should it be late
            remember_counts(result, at, (self.scan_every + 1) * self.interval_s)
            self._counted, self._since_counted = True, 0
        else:
            self._since_counted += 1
        if self.incidents is not None:
            # App Home's latest health, and the detection time of an incident opened later
            await self.incidents.note_health(self.ops_channel or WATCHDOG, WATCHDOG, result)
        if self.ops_channel is None:
            return []  # nowhere to post: leave the alert state for when there is
        known = await self.store.checks()
        changes: list[Change] = []
        for finding in result.findings:
            new = TRACKED.get(finding.status)
            if new is None:
                continue
            prev = known.get(finding.check)
            old = prev.status if prev else None
            alerted = prev.alerted if prev else False
            if old != new:
                if not await self.store.move(
                    finding.check, old, new, summary=finding.summary, at=at
                ):
                    continue  # moved meanwhile by another process: its news, not ours
            elif not alerted and new != "crit":
                continue
            # what Slack last accepted differs from now: news (again, if not posted before)
            if (new == "crit") != alerted:
                was = old if old != new else ("crit" if alerted else None)
                changes.append(Change(finding.check, was, new, finding))
        turned = [c for c in changes if c.new == "crit"]
        cleared = [c for c in changes if c.new != "crit"]
        if turned and await self._announce(turned, critical_message(result.target, turned)):
            await self._incident(turned)
            await self._timeline(turned)
        if cleared and await self._announce(cleared, recovered_message(result.target, cleared)):
            await self._timeline(cleared)
        return changes

    async def _timeline(self, changes: Sequence[Change]) -> None:
        """What the watchdog posted joins the timeline of the ops channel's incident."""
        if self.incidents is None:
            return
        assert self.ops_channel is not None
        for c in changes:
            verb = "turned critical" if c.new == "crit" else f"is {c.new} again"
            await self.incidents.store.add_event_in(
                self.ops_channel,
                kind="watchdog",
                actor_id=WATCHDOG,
                text=f"*{esc(c.check)}* {verb}: {esc(c.finding.summary)}",
                at=self.clock.now(),
                detail={"check": c.check, "old": c.old, "new": c.new},
            )

    async def _announce(self, changes: Sequence[Change], message: SlackMessage) -> bool:
        """Post; only once Slack answered ok are the checks marked alerted. When it fails
        (an API error after the SDK's retries, a timeout, a dropped connection) nothing is
        marked, so the next tick (here or on the next leader) posts it again."""
        assert self.ops_channel is not None
        try:
            await self.poster.post(self.ops_channel, message)
        except SLACK_FAILURES:
            log.exception(
                "watchdog: could not post to %s; the next tick tries again", self.ops_channel
            )
            return False
        for c in changes:
            await self.store.mark_alerted(c.check, c.new)
        return True

    async def _incident(self, turned: Sequence[Change]) -> None:
        """Open the incident (WATCHDOG_OPENS_INCIDENT), or date an open one's detection."""
        if self.incidents is None:
            return
        assert self.ops_channel is not None
        now = self.clock.now()
        # the spell of the checks that turned critical: one critical for hours does not
        # backdate the problem at hand
        checks = [c.check for c in turned]
        first = await self.incidents.store.first_critical_since(now - LOOKBACK, checks)
        detected = first or now
        if await self.incidents.store.active_in(self.ops_channel) is not None:
            await self.incidents.note_watchdog_critical(self.ops_channel, detected)
            return
        if not self.opens_incident:
            return
        title = "Watchdog: " + ", ".join(c.check for c in turned) + " critical"
        reply = await self.incidents.start(
            Start(title=title, severity=self.severity, new_channel=False, since=None),
            user_id=WATCHDOG,
            channel_id=self.ops_channel,
            detected_at=detected,
            detected_by="watchdog",
        )
        log.info("watchdog: %s", reply.message.text)

    def _stop_counting(self) -> None:
        """No longer the leader: the counts kept here are not kept fresh any more, and a
        new leadership counts on its first tick."""
        if self._counted:
            forget_counts(self.dispatcher.ctx.gateway.target)
        self._counted = False

    async def take_baseline_if_due(self) -> bool:
        """The periodic baseline snapshot for `/db recover` (the hook `baseline`)."""
        if self.baseline is None:
            return False
        loop = asyncio.get_running_loop()
        if self._next_baseline is not None and loop.time() < self._next_baseline:
            return False
        self._next_baseline = loop.time() + self.baseline_interval_s
        try:
            await self.baseline()
        except Exception:
            log.exception("watchdog: baseline snapshot failed")
            return False
        return True

    async def run(self) -> None:
        """Every `interval_s`: try to be (or stay) the leader; the leader ticks. A follower
        tries the lock every interval, so it takes over within one after the leader dies."""
        leadership, interval_s = self.leadership, self.interval_s
        loop = asyncio.get_running_loop()
        # The first health run waits one interval: replicas restarting together do not
        # burst the target, and a restart mid-problem has the store's memory anyway.
        next_at = loop.time() + interval_s
        try:
            try:
                # at once, so /healthz names the leader, and a baseline is there from the start
                if await leadership.hold():
                    await self.take_baseline_if_due()
            except Exception:
                log.exception("watchdog start failed")
            while True:
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                try:
                    if await leadership.hold():
                        await self.tick()
                        await self.take_baseline_if_due()
                    else:
                        self._next_baseline = None  # a new leader takes one at once
                        self._stop_counting()
                except Exception:
                    log.exception("watchdog tick failed")
                next_at = max(next_at + interval_s, loop.time())
        finally:
            await leadership.release()


class OffWatchdog:
    """WATCHDOG_INTERVAL_S=0: no health runs on a schedule (nor baselines by a leader)."""

    role = "off"

    async def run(self) -> None:
        return None
