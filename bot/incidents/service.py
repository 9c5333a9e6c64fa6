"""Incidents in Slack: `/db incident …`, the pinned header, SLA reminders, App Home.

The state store holds the truth (`bot.state.incidents`); this module turns requests
into store changes and Slack messages, through `IncidentSlack` so the console runs the
same code. Anything another replica may be doing at the same time (a reminder, a header
edit, a first response) is decided by a conditional write in the store, never here.

Entry points for the other parts of the bot:
- `on_report(channel, user, command, report)`: a `/db` diagnostic joins the timeline; a
  recovery verification is recorded (the hooks) and, clean, marks full recovery.
- `on_command(channel, user, command, report)`: the timeline alone.
- `note_watchdog_critical(channel, at)` / `start(..., detected_by="watchdog")`: the
  watchdog's first critical finding is the detection time.
- `mark_recovered(channel, evidence)`: a clean recovery verification.
- `record_communication(channel, user, text, detail)`: a template posted.
- `hooks` (given at construction; `IncidentHooks`): templates and summaries, the summary
  posted on `resolve`, and the posts retried every tick (`bot.incidents.comms` is them).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from slack_sdk.errors import SlackApiError

from bot.approvals.engine import process_id
from bot.clock import Clock
from bot.incidents.views import (
    clocks_of,
    digest,
    header_message,
    home_view,
    timeline_message,
)
from bot.messages.notify import SLACK_FAILURES
from bot.messages.render import SlackMessage, esc
from bot.state import Incident, IncidentExists, IncidentStore
from bot.state.incidents import HEALTH_KEPT, WATCHDOG
from bot.state.models import DetectedBy
from commands.base import Report, Status, UsageError, human_duration
from commands.incidents.comms import Summary, Template
from commands.incidents.lifecycle import (
    Assign,
    IncidentRequest,
    Simple,
    SlaTargets,
    Start,
    Update,
    channel_name,
    command_text,
    reminder_text,
    since_datetime,
    who,
    worst_findings,
)
from commands.recover import BaselineConditions, recovery_evidence, recovery_verified
from commands.remedies.freeze import FreezeState

if TYPE_CHECKING:  # the Slack stack loads where Slack is served, not for a console run
    from slack_sdk.web.async_client import AsyncWebClient


log = logging.getLogger(__name__)

# A freeze reminder's claim (the reminders' table): one per interval, keyed by its minute.
FREEZE_MILESTONE = "freeze"
# Whether the target's writes are frozen now (`commands.remedies.freeze.freeze_state`).
FreezeProbe = Callable[[], Awaitable[FreezeState]]
POSTING = "posting"  # the header digest while one replica posts the header
NAME_ATTEMPTS = 5  # inc-…-2, -3, … when a channel name is taken
# How far back the watchdog's first critical finding may date an incident's detection.
WATCHDOG_LOOKBACK = timedelta(hours=24)


class IncidentSlack(Protocol):
    """What incidents need of Slack (the console prints instead)."""

    async def post(self, channel: str, message: SlackMessage) -> str:
        """A message in the channel; returns its ts."""
        ...

    async def update(self, channel: str, ts: str, message: SlackMessage) -> None: ...

    async def pin(self, channel: str, ts: str) -> None: ...

    async def create_channel(self, name: str) -> str | None:
        """The new channel's id; None when the name is taken."""
        ...

    async def invite(self, channel: str, user_id: str) -> None: ...

    async def publish_home(self, user_id: str, view: dict[str, Any]) -> None: ...


class SlackIncidents:
    def __init__(self, client: AsyncWebClient) -> None:
        self.client = client

    async def post(self, channel: str, message: SlackMessage) -> str:
        posted = await self.client.chat_postMessage(
            channel=channel, text=message.text, blocks=message.blocks_json() or None
        )
        return str(posted["ts"])

    async def update(self, channel: str, ts: str, message: SlackMessage) -> None:
        await self.client.chat_update(
            channel=channel, ts=ts, text=message.text, blocks=message.blocks_json() or None
        )

    async def pin(self, channel: str, ts: str) -> None:
        await self.client.pins_add(channel=channel, timestamp=ts)

    async def create_channel(self, name: str) -> str | None:
        try:
            created = await self.client.conversations_create(name=name)
        except SlackApiError as exc:
            if exc.response.get("error") == "name_taken":
                return None
            raise
        channel = created["channel"]
        assert isinstance(channel, dict)
        return str(channel["id"])

    async def invite(self, channel: str, user_id: str) -> None:
        try:
            await self.client.conversations_invite(channel=channel, users=user_id)
        except SlackApiError as exc:
            if exc.response.get("error") not in ("already_in_channel", "cant_invite_self"):
                raise

    async def publish_home(self, user_id: str, view: dict[str, Any]) -> None:
        await self.client.views_publish(user_id=user_id, view=view)


class ConsoleIncidents:
    """Prints what Slack would show; message ids are local counters."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._n = 0

    def _print(self, message: SlackMessage) -> None:
        lines = []
        for block in message.blocks_json():
            text = block.get("text")
            if isinstance(text, dict):
                lines.append(str(text.get("text", "")))
            for element in block.get("elements", []) or []:
                if isinstance(element, dict) and element.get("text"):
                    lines.append(str(element["text"]))
        body = "\n".join(lines) or message.text
        self.out.write(body.replace("*", "").replace("`", "") + "\n")
        self.out.flush()

    async def post(self, channel: str, message: SlackMessage) -> str:
        self._print(message)
        self._n += 1
        return f"console.{self._n}"

    async def update(self, channel: str, ts: str, message: SlackMessage) -> None:
        self.out.write("— header updated —\n")
        self._print(message)

    async def pin(self, channel: str, ts: str) -> None:
        return None

    async def create_channel(self, name: str) -> str | None:
        self.out.write(f"(the console has no channels: {name} not created)\n")
        return None

    async def invite(self, channel: str, user_id: str) -> None:
        return None

    async def publish_home(self, user_id: str, view: dict[str, Any]) -> None:
        return None


@dataclass(frozen=True)
class Reply:
    """What the requester sees: public in the incident channel, or a private note."""

    message: SlackMessage
    public: bool = False


def _note(text: str, public: bool = False) -> Reply:
    return Reply(SlackMessage(text=text, blocks=[]), public)


class IncidentHooks(Protocol):
    """What the incident service calls of its communications (`bot.incidents.comms`),
    handed in when the service is built."""

    async def handle(self, request: Template | Summary, incident: Incident, user_id: str) -> Reply:
        """`/db incident template|summary`."""
        ...

    async def post_summary(self, incident: Incident) -> None:
        """Run after `resolve`: the summary in the incident channel."""
        ...

    async def retry_unsent(self) -> int:
        """Run by every tick: posts Slack did not answer ok, again; returns how many."""
        ...

    async def record_verification(self, channel_id: str, user_id: str, report: Report) -> bool:
        """A `/db recover` report joins the channel's incident as a `verification` event."""
        ...


class NoComms:
    """The hooks of a service built alone (a unit test): no templates, no summary."""

    async def handle(self, request: Template | Summary, incident: Incident, user_id: str) -> Reply:
        return _note("Templates and summaries are not set up in this bot.")

    async def post_summary(self, incident: Incident) -> None:
        return None

    async def retry_unsent(self) -> int:
        return 0

    async def record_verification(self, channel_id: str, user_id: str, report: Report) -> bool:
        return False


def _reason(exc: Exception) -> str:
    if isinstance(exc, SlackApiError):
        return str(exc.response.get("error", exc.response.status_code))
    return type(exc).__name__


class IncidentService:
    def __init__(
        self,
        store: IncidentStore,
        slack: IncidentSlack,
        targets: SlaTargets,
        clock: Clock | None = None,
        oncall_groups: Sequence[str] = (),
        hooks: IncidentHooks | None = None,
        freeze: FreezeProbe | None = None,
        freeze_remind_s: float = 1800.0,
    ) -> None:
        self.store = store
        self.slack = slack
        self.targets = targets
        # Slack user groups (ROLE_GROUPS) a reminder of an incident the watchdog opened
        # mentions: its commander is the watchdog, which no one reads as "me".
        self.oncall_groups = list(oncall_groups)
        if clock is not None:
            self.store.clock = clock
        self.claimer = process_id()
        self.hooks: IncidentHooks = hooks or NoComms()
        # Whether the target's writes are frozen (`freeze-writes`): while they are, every
        # active incident's commander is reminded every `freeze_remind_s`. None: never.
        self.freeze = freeze
        self.freeze_remind_s = freeze_remind_s

    @property
    def clock(self) -> Clock:
        return self.store.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self.store.clock = clock  # the audit hook dates its events by the same clock

    def now(self) -> datetime:
        return self.clock.now()

    # -- /db incident ---------------------------------------------------------------------

    async def handle(self, request: IncidentRequest, *, user_id: str, channel_id: str) -> Reply:
        if isinstance(request, Start):
            return await self.start(request, user_id=user_id, channel_id=channel_id)
        if isinstance(request, Simple) and request.verb == "reopen":
            return await self._reopen(user_id, channel_id)
        incident = await self.store.active_in(channel_id)
        if incident is None:
            return _note(
                "No open incident in this channel. Start one: "
                "`/db incident start <title> [sev1|sev2|sev3] [--channel]`"
            )
        if isinstance(request, Update):
            return await self._update(incident, user_id, request.text)
        if isinstance(request, Assign):
            return await self._assign(incident, user_id, request.user_id)
        if isinstance(request, Template | Summary):
            return await self.hooks.handle(request, incident, user_id)
        if request.verb == "status":
            return Reply(header_message(incident, self.targets, self.now()), public=True)
        if request.verb == "timeline":
            events = await self.store.timeline(incident.id)
            return Reply(timeline_message(incident, events), public=True)
        if request.verb == "resolve":
            return await self._resolve(incident, user_id)
        return await self._recovered(incident, user_id, evidence=None)

    async def start(
        self,
        request: Start,
        *,
        user_id: str,
        channel_id: str,
        detected_at: datetime | None = None,
        detected_by: DetectedBy | None = None,
    ) -> Reply:
        """Open an incident in this channel or a new one, post and pin its header."""
        now = self.now()
        if request.since is not None:
            try:
                detected_at, detected_by = since_datetime(request.since, now), "since"
            except UsageError as exc:
                return _note(str(exc))
        elif detected_at is None:
            first = await self.store.first_critical_since(now - WATCHDOG_LOOKBACK)
            detected_at, detected_by = (first, "watchdog") if first else (now, "start")
        else:
            detected_by = detected_by or "watchdog"  # the caller that knows is the watchdog
        detected_at = min(detected_at, now)
        origin = None
        if request.new_channel:
            try:
                target = await self._new_channel(request.title, now, user_id)
            except SLACK_FAILURES as exc:
                log.warning("conversations.create failed: %s", exc)
                return _note(
                    f"Slack would not create the incident channel ({_reason(exc)}); "
                    "start the incident here without `--channel`, or ask an admin."
                )
            if target is None:
                return _note("Could not create an incident channel (every name was taken).")
            origin, channel_id = channel_id, target
        try:
            incident = await self.store.open_incident(
                channel_id=channel_id,
                title=request.title,
                severity=request.severity,
                commander_id=user_id,
                created_by=user_id,
                started_at=now,
                detected_at=detected_at,
                detected_by=detected_by or "start",
                origin_channel_id=origin,
            )
        except IncidentExists as exc:
            where = f" (#{exc.existing.id}: {exc.existing.title})" if exc.existing else ""
            return _note(
                f"This channel already has an open incident{where}. "
                "Use `/db incident status`, or `start … --channel` for a new channel."
            )
        posted = await self._post_header(incident)
        if origin is not None:
            await self._post(
                origin,
                f":rotating_light: Incident #{incident.id} *{request.title}* "
                f"({request.severity}) opened by {who(user_id)} in <#{channel_id}>.",
            )
            return _note(f"Incident #{incident.id} opened in <#{channel_id}>; you were invited.")
        if not posted:
            return _note(
                f"Incident #{incident.id} started; Slack refused its header for now, "
                "the bot posts it at its next check."
            )
        return _note(f"Incident #{incident.id} started; the header is pinned in this channel.")

    async def _new_channel(self, title: str, now: datetime, user_id: str) -> str | None:
        for attempt in range(NAME_ATTEMPTS):
            created = await self.slack.create_channel(channel_name(title, now, attempt))
            if created is not None:
                try:
                    await self.slack.invite(created, user_id)
                except SLACK_FAILURES:
                    log.exception("could not invite %s to %s", user_id, created)
                return created
        return None

    async def _post_header(self, incident: Incident) -> bool:
        """Post and pin the header once: the digest moves from nothing to `POSTING` first,
        so a replica's tick racing the start does not post a second one."""
        if not await self.store.claim_header_edit(incident.id, old=None, new=POSTING):
            return False
        message = header_message(incident, self.targets, self.now())
        try:
            ts = await self.slack.post(incident.channel_id, message)
        except SLACK_FAILURES:
            log.exception("could not post the header of incident %s", incident.id)
            await self.store.claim_header_edit(incident.id, old=POSTING, new=None)  # retry
            return False
        await self.store.set_header(incident.id, header_ts=ts, digest=digest(message))
        try:
            await self.slack.pin(incident.channel_id, ts)
        except SLACK_FAILURES:
            log.exception("could not pin the header of incident %s", incident.id)
        return True

    async def _post(self, channel: str, text: str) -> bool:
        try:
            await self.slack.post(channel, SlackMessage(text=text, blocks=[]))
        except SLACK_FAILURES:
            log.exception("could not post to %s: %s", channel, text)
            return False
        return True

    async def _update(self, incident: Incident, user_id: str, text: str) -> Reply:
        await self.store.add_event(
            incident.id,
            kind="update",
            actor_id=user_id,
            text=f"update: {text}",
            at=self.now(),
            reaches=("responded", "communicated"),
        )
        await self.refresh_header(incident.id)
        return _note(f":mega: *Update* from {who(user_id)}: {text}", public=True)

    async def _assign(self, incident: Incident, user_id: str, commander: str) -> Reply:
        changed = await self.store.change(
            incident,
            from_states=("open", "reopened", "resolved"),
            values={"commander_id": commander},
            event=("assign", user_id, f"commander is now {who(commander)}", {}),
            at=self.now(),
        )
        if changed is None:
            return _note("The incident changed meanwhile; try again.")
        await self.refresh_header(incident.id)
        return _note(f"{who(commander)} is now the commander of incident #{incident.id}.", True)

    async def _resolve(self, incident: Incident, user_id: str) -> Reply:
        now = self.now()
        resolved = await self.store.change(
            incident,
            from_states=("open", "reopened"),
            values={"state": "resolved", "resolved_at": now},
            event=("resolved", user_id, "resolved", {}),
            at=now,
        )
        if resolved is None:
            return _note(f"Incident #{incident.id} is {incident.state}; nothing to resolve.")
        await self.refresh_header(incident.id)
        try:
            await self.hooks.post_summary(resolved)
        except Exception:
            log.exception("posting the summary failed for incident %s", incident.id)
        return _note(
            f":large_green_circle: Incident #{incident.id} resolved by {who(user_id)}. "
            "The full-recovery clock runs until `/db incident recovered` "
            "(or a clean `/db recover` verification).",
            public=True,
        )

    async def _recovered(
        self, incident: Incident, actor_id: str, evidence: Mapping[str, Any] | None
    ) -> Reply:
        now = self.now()
        values: dict[str, Any] = {
            "state": "recovered",
            "recovered_at": now,
            "resolved_at": incident.resolved_at or now,
        }
        if evidence is not None:
            values["recovery_evidence"] = dict(evidence)
        text = "fully recovered" + (" (recovery verification clean)" if evidence else "")
        recovered = await self.store.change(
            incident,
            from_states=("open", "reopened", "resolved"),
            values=values,
            event=("recovered", actor_id, text, dict(evidence or {})),
            at=now,
        )
        if recovered is None:
            return _note(f"Incident #{incident.id} is {incident.state} already.")
        await self.refresh_header(incident.id)
        return _note(
            f":white_check_mark: Incident #{incident.id} fully recovered ({who(actor_id)}).",
            public=True,
        )

    async def _reopen(self, user_id: str, channel_id: str) -> Reply:
        latest = await self.store.latest_in(channel_id)
        if latest is None or latest.state in ("open", "reopened"):
            return _note("There is no resolved incident to reopen in this channel.")
        try:
            reopened = await self.store.change(
                latest,
                from_states=("resolved", "recovered"),
                values={
                    "state": "reopened",
                    "resolved_at": None,
                    "recovered_at": None,
                    "reopened": latest.reopened + 1,
                },
                event=("reopened", user_id, "reopened", {}),
                at=self.now(),
            )
        except IncidentExists:
            return _note("This channel has another open incident; reopen refused.")
        if reopened is None:
            return _note("The incident changed meanwhile; try again.")
        await self.refresh_header(latest.id)
        return _note(f":fire: Incident #{latest.id} reopened by {who(user_id)}.", public=True)

    # -- what other parts call ------------------------------------------------------------

    async def on_report(self, channel_id: str, user_id: str, command: str, report: Report) -> None:
        """A report run in a channel joins its incident: the timeline (`on_command`), a
        recovery verification as its own event (the hooks), and a clean one marks full
        recovery (`mark_recovered`)."""
        await self.on_command(channel_id, user_id, command, report)
        await self.hooks.record_verification(channel_id, user_id, report)
        if recovery_verified(report):  # a clean `/db recover`: full recovery reached
            await self.mark_recovered(channel_id, recovery_evidence(report), user_id)

    async def on_command(self, channel_id: str, user_id: str, command: str, report: Report) -> None:
        """A diagnostic run anywhere: the timeline of the channel's incident (with its worst
        findings), and App Home's latest health."""
        now = self.now()
        worst = worst_findings(report)
        if command.split()[0:1] == ["health"]:
            await self.note_health(channel_id, user_id, report)
        event = await self.store.add_event_in(
            channel_id,
            kind="command",
            actor_id=user_id,
            text=command_text(command, report, worst),
            at=now,
            detail={
                "command": command,
                "worst": report.worst.value,
                "findings": [f.model_dump(mode="json", exclude={"rows"}) for f in worst],
            },
            reaches=("responded",),
        )
        if event is not None:
            await self.refresh_header(event.incident_id)

    async def note_health(self, channel_id: str, actor_id: str, report: Report) -> None:
        """A health report seen: App Home shows the latest. The watchdog calls this with
        `actor_id="watchdog"`; its first critical run dates a later incident's detection."""
        await self.store.note_health(
            channel_id=channel_id,
            actor_id=actor_id,
            worst=report.worst.value,
            findings=[
                {"check": f.check, "status": f.status.value, "summary": f.summary}
                for f in worst_findings(report)
            ],
            at=self.now(),
            critical=[f.check for f in report.findings if f.status is Status.CRIT],
        )

    async def record_communication(
        self, channel_id: str, user_id: str, text: str, detail: Mapping[str, Any] | None = None
    ) -> bool:
        """A template (or any communication) posted for the channel's incident."""
        event = await self.store.add_event_in(
            channel_id,
            kind="template",
            actor_id=user_id,
            text=text,
            at=self.now(),
            detail=detail,
            reaches=("responded", "communicated"),
        )
        if event is not None:
            await self.refresh_header(event.incident_id)
        return event is not None

    async def mark_recovered(
        self, channel_id: str, evidence: Mapping[str, Any], actor_id: str = "bot"
    ) -> bool:
        """A clean recovery verification: a resolved incident is fully recovered. An open
        one is not closed by it (the problem may still be writing damage): the channel is
        told "clean: resolve to close". False unless the incident was marked."""
        incident = await self.store.active_in(channel_id)
        if incident is None:
            return False
        if incident.state != "resolved":
            text = (
                f"Recovery verification clean: resolve to close. Incident #{incident.id} is "
                f"{incident.state}; full recovery is marked by a clean `/db recover` after "
                "`/db incident resolve`."
            )
            await self.store.add_event(
                incident.id,
                kind="verification",
                actor_id=actor_id,
                text="recovery verification clean: resolve to close",
                at=self.now(),
                detail={"clean": True, "open": True},
            )
            await self._post(channel_id, text)
            return False
        reply = await self._recovered(incident, actor_id, evidence)
        if reply.public:
            await self._post(channel_id, reply.message.text)
        return reply.public

    async def baseline_conditions(self, quiet_s: float) -> BaselineConditions:
        """What the baseline rule (`commands.recover.baseline_refusal`) needs: the open
        incidents, the latest full recovery and the checks critical in the watchdog's
        latest health run with the start of their spells, all by this service's clock."""
        now = self.now()
        return BaselineConditions(
            now=now,
            open_incidents=tuple(i.id for i in await self.store.active()),
            recovered_at=await self.store.last_recovered_at(),
            quiet_s=quiet_s,
            critical=await self.store.critical_spells(now - HEALTH_KEPT),
        )

    async def note_watchdog_critical(self, channel_id: str, at: datetime) -> bool:
        """The watchdog saw a critical finding at `at`: an incident started later dates its
        detection back to it (never past `--since`)."""
        incident = await self.store.active_in(channel_id)
        if incident is None:
            return False
        moved = await self.store.mark_detected(incident.id, at, "watchdog")
        if moved:
            await self.refresh_header(incident.id)
        return moved

    # -- the header and the scheduler -----------------------------------------------------

    async def refresh_header(self, incident_id: int) -> None:
        """Edit the pinned header if what it shows changed; one replica edits it. A header
        never posted (Slack refused at the start) is posted now."""
        incident = await self.store.get(incident_id)
        if incident is None:
            return
        if incident.header_ts is None:
            if incident.header_digest is None:
                await self._post_header(incident)
            return
        message = header_message(incident, self.targets, self.now())
        new = digest(message)
        if new == incident.header_digest:
            return
        if not await self.store.claim_header_edit(incident.id, old=incident.header_digest, new=new):
            return
        try:
            await self.slack.update(incident.channel_id, incident.header_ts, message)
        except SLACK_FAILURES:
            log.exception("could not edit the header of incident %s", incident.id)
            await self.store.claim_header_edit(incident.id, old=new, new="retry")

    async def tick(self) -> int:
        """Send the SLA reminders due (each once, across replicas) and keep the headers
        current; returns how many reminders this call sent."""
        sent = 0
        now = self.now()
        for incident in await self.store.active():
            for clock in clocks_of(incident, self.targets, now):
                if not clock.remind:
                    continue
                claimed = await self.store.claim_reminder(
                    incident.id, clock.milestone, incident.reopened, at=now, claimer=self.claimer
                )
                if not claimed:
                    continue
                text = reminder_text(clock, incident.commander_id)
                if incident.created_by == WATCHDOG and self.oncall_groups:
                    groups = " ".join(f"<!subteam^{esc(g)}>" for g in self.oncall_groups)
                    text = f"{groups} {text}"
                if not await self._post(incident.channel_id, text):
                    # Not answered ok (refused after the SDK's retries, timed out, the
                    # connection dropped): give the claim back, so the next tick (here or
                    # on another replica) tries again.
                    await self.store.release_reminder(
                        incident.id, clock.milestone, incident.reopened
                    )
                    continue
                await self.store.mark_reminder_sent(
                    incident.id, clock.milestone, incident.reopened, at=now
                )
                sent += 1
                await self.store.add_event(
                    incident.id,
                    kind="reminder",
                    actor_id="bot",
                    text=f"reminded {who(incident.commander_id)}: {clock.label} SLA at "
                    f"{clock.elapsed_s / clock.target_s:.0%}",
                    at=now,
                    detail={"milestone": clock.milestone},
                )
            await self.refresh_header(incident.id)
        sent += await self._freeze_reminders(now)
        try:
            await self.hooks.retry_unsent()
        except Exception:
            log.exception("retrying unsent posts failed")
        return sent

    async def _freeze_reminders(self, now: datetime) -> int:
        """While writes are frozen, remind each active incident's commander every
        `freeze_remind_s`, counted from the freeze (a freeze made by hand: from the
        incident's start). Once per interval across replicas (the reminder's claim, keyed
        by the minute it fell due), and sent only when Slack answered ok: a failed post
        gives its claim back for the next tick. Only the latest interval due is sent."""
        if self.freeze is None:
            return 0
        incidents = await self.store.active()
        if not incidents:
            return 0
        try:
            state = await self.freeze()
        except Exception:  # the target may be the thing that is sick
            log.exception("could not tell whether writes are frozen")
            return 0
        if not state.active:
            return 0
        sent = 0
        for incident in incidents:
            since = state.record.frozen_at if state.record else incident.started_at
            elapsed = (now - since).total_seconds()
            due = int(elapsed // self.freeze_remind_s)
            if due < 1:
                continue
            due_at = since.timestamp() + due * self.freeze_remind_s
            epoch = int(due_at // 60)  # the minute it fell due: one reminder per interval
            claimed = await self.store.claim_reminder(
                incident.id, FREEZE_MILESTONE, epoch, at=now, claimer=self.claimer
            )
            if not claimed:
                continue
            text = (
                f":snowflake: {who(incident.commander_id)} {esc(state.describe())} "
                f"({human_duration(elapsed)} so far). Lift the freeze with "
                "`/db unfreeze-writes` once the recovery is verified."
            )
            if incident.created_by == WATCHDOG and self.oncall_groups:
                groups = " ".join(f"<!subteam^{esc(g)}>" for g in self.oncall_groups)
                text = f"{groups} {text}"
            if not await self._post(incident.channel_id, text):
                await self.store.release_reminder(incident.id, FREEZE_MILESTONE, epoch)
                continue
            await self.store.mark_reminder_sent(incident.id, FREEZE_MILESTONE, epoch, at=now)
            sent += 1
            await self.store.add_event(
                incident.id,
                kind="reminder",
                actor_id="bot",
                text=f"reminded {who(incident.commander_id)}: writes frozen for "
                f"{human_duration(elapsed)} ({esc(', '.join(state.frozen))})",
                at=now,
                detail={"milestone": FREEZE_MILESTONE, "frozen": list(state.frozen)},
            )
        return sent

    async def publish_home(self, user_id: str) -> None:
        now = self.now()
        view = home_view(
            await self.store.active(),
            await self.store.pending_approvals(),  # approvals expire by the system clock
            await self.store.latest_health(),
            self.targets,
            now,
        )
        await self.slack.publish_home(user_id, view.to_dict())
