"""Incident communications: template previews, posting them, and the summary.

`/db incident template user|tech` posts a preview in the incident thread with a channel
picker and a "Post to channel…" button; the click renders the template again (the
figures are those of the moment it goes out), posts it, and records the communication
in the timeline through the incidents API, which also reaches the "communicated" SLA
milestone. A template missing a value is refused with the value's name, at preview and
at posting. The summary goes out when an incident is resolved (these communications are
the incident service's `hooks`, handed to it as it is built: `IncidentComms` builds the
service it serves) and on demand, with `--file` as a Markdown upload.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from jinja2 import TemplateError

from bot.incidents import templates
from bot.incidents.facts import (
    VERIFICATION,
    Facts,
    facts,
    template_values,
    verification_from_report,
    verification_text,
)
from bot.incidents.service import IncidentHooks, IncidentService, Reply
from bot.incidents.summary import summary_markdown, summary_message
from bot.messages.notify import SLACK_FAILURES
from bot.messages.render import SlackMessage, esc, unesc
from bot.state import Incident
from bot.tasks import TaskTracker
from commands.base import Report
from commands.incidents.comms import AUDIENCES, Audience, Summary, Template
from commands.incidents.lifecycle import who

if TYPE_CHECKING:  # the Slack stack loads where Slack is served, not for a console run
    from slack_bolt.async_app import AsyncAck, AsyncApp
    from slack_sdk.web.async_client import AsyncWebClient


log = logging.getLogger(__name__)

# Decides whether a user may post a template: None when allowed, else the refusal.
Authorize = Callable[[str], Awaitable[str | None]]
# Builds the incident service these communications serve, with them as its hooks.
ServiceWithHooks = Callable[[IncidentHooks], IncidentService]


class Publisher(Protocol):
    """What communications need of Slack (the console prints instead)."""

    async def post(self, channel: str, message: SlackMessage, thread_ts: str | None = None) -> str:
        """A message (in a thread when `thread_ts`); returns its ts."""
        ...

    async def upload(self, channel: str, filename: str, content: str, title: str) -> None: ...

    async def tell(self, channel: str, user: str, text: str) -> None:
        """A private note to one person."""
        ...


class SlackPublisher:
    def __init__(self, client: AsyncWebClient) -> None:
        self.client = client

    async def post(self, channel: str, message: SlackMessage, thread_ts: str | None = None) -> str:
        posted = await self.client.chat_postMessage(
            channel=channel,
            text=message.text,
            blocks=message.blocks_json() or None,
            thread_ts=thread_ts,
        )
        return str(posted["ts"])

    async def upload(self, channel: str, filename: str, content: str, title: str) -> None:
        await self.client.files_upload_v2(
            channel=channel, filename=filename, content=content, title=title
        )

    async def tell(self, channel: str, user: str, text: str) -> None:
        await self.client.chat_postEphemeral(channel=channel, user=user, text=text)


class ConsolePublisher:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    async def post(self, channel: str, message: SlackMessage, thread_ts: str | None = None) -> str:
        self.out.write(unesc(message.text if not message.blocks else _plain(message)) + "\n")
        return "console"

    async def upload(self, channel: str, filename: str, content: str, title: str) -> None:
        self.out.write(content)

    async def tell(self, channel: str, user: str, text: str) -> None:
        self.out.write(unesc(text) + "\n")


def _plain(message: SlackMessage) -> str:
    lines = []
    for block in message.blocks_json():
        text = block.get("text")
        if isinstance(text, dict):
            lines.append(str(text.get("text", "")))
        for element in block.get("elements", []) or []:
            if isinstance(element, dict) and isinstance(element.get("text"), str):
                lines.append(str(element["text"]))
    return "\n".join(lines)


def _note(text: str, public: bool = False) -> Reply:
    return Reply(SlackMessage(text=text, blocks=[]), public)


def post_key(audience: Audience, preview_ts: str, channel: str) -> tuple[str, int]:
    """A (milestone, epoch) pair for the incident store's once-only claim: one post per
    preview and channel, across replicas and double clicks."""
    return f"tpl-{audience}", zlib.crc32(f"{preview_ts}/{channel}".encode()) & 0x7FFFFFFF


class IncidentComms:
    """Templates, summaries and recovery notes of incidents; the hooks (`IncidentHooks`)
    of the incident service it builds with `service` (`bot.house` passes it)."""

    def __init__(
        self,
        service: ServiceWithHooks,
        publisher: Publisher,
        template_dir: Path | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        self.publisher = publisher
        self.template_dir = template_dir
        self.authorize = authorize
        self.incidents = service(self)

    async def facts(self, incident: Incident) -> Facts:
        store = self.incidents.store
        now = self.incidents.now()
        return facts(
            incident,
            await store.timeline(incident.id),
            self.incidents.targets,
            now,
            await store.pending_approvals(),  # approvals expire by the system clock
        )

    async def render(self, incident: Incident, audience: Audience) -> str:
        """The filled template; `templates.MissingValue` when a value is missing."""
        values = template_values(await self.facts(incident))
        return templates.render(audience, values, self.template_dir)

    # -- /db incident template|summary ------------------------------------------------------

    async def handle(self, request: Template | Summary, incident: Incident, user_id: str) -> Reply:
        if isinstance(request, Template):
            return await self.preview(incident, request.audience)
        return await self.summary(incident, file=request.file)

    async def preview(self, incident: Incident, audience: Audience) -> Reply:
        name = templates.TEMPLATE_FILES[audience]
        try:
            text = await self.render(incident, audience)
        except templates.MissingValue as exc:
            return _note(f"Not rendered: {exc.explain(name)}. Nothing was posted.")
        except TemplateError as exc:  # an override with a mistake in it
            return _note(f"`{name}` cannot be rendered: {esc(exc)}. Nothing was posted.")
        message = templates.preview(audience, text, incident.id, incident.origin_channel_id)
        await self.publisher.post(incident.channel_id, message, thread_ts=incident.header_ts)
        where = "the incident thread" if incident.header_ts else "this channel"
        return _note(f"Preview of the {AUDIENCES[audience]} posted in {where}.")

    async def summary(self, incident: Incident, *, file: bool) -> Reply:
        f = await self.facts(incident)
        if file:
            await self.publisher.upload(
                incident.channel_id,
                f"incident-{incident.id}-summary.md",
                summary_markdown(f),
                f"Incident #{incident.id} summary and timeline",
            )
        return Reply(summary_message(f), public=True)

    async def record_verification(self, channel_id: str, user_id: str, report: Report) -> bool:
        """The hook `on_report` calls: a recovery verification joins the timeline."""
        return await record_verification(self.incidents, channel_id, user_id, report)

    async def post_summary(self, incident: Incident) -> None:
        """On resolve: the summary in the incident channel."""
        await self.publisher.post(incident.channel_id, summary_message(await self.facts(incident)))

    # -- the button ---------------------------------------------------------------------------

    async def post_template(
        self, *, value: str, user_id: str, channel_id: str, preview_ts: str, target: str | None
    ) -> str:
        """The click on "Post to channel…": what the clicker is told."""
        try:
            asked = json.loads(value)
            incident_id, audience = int(asked["incident"]), str(asked["audience"])
        except (ValueError, KeyError, TypeError):
            return "That button is not one of this bot's."
        if audience not in templates.TEMPLATE_FILES:
            return "That button is not one of this bot's."
        if self.authorize is not None:
            refused = await self.authorize(user_id)
            if refused:
                return f"Not posted: {refused}"
        if not target:
            return "Choose a channel in the preview first, then press the button."
        store = self.incidents.store
        incident = await store.get(incident_id)
        if incident is None:
            return f"Incident #{incident_id} is not known to this bot."
        kind: Audience = "user" if audience == "user" else "tech"
        name = templates.TEMPLATE_FILES[kind]
        try:
            text = await self.render(incident, kind)
        except templates.MissingValue as exc:
            return f"Not posted: {exc.explain(name)}."
        except TemplateError as exc:
            return f"Not posted: `{name}` cannot be rendered: {esc(exc)}."
        milestone, epoch = post_key(kind, preview_ts, target)
        payload = {
            "audience": kind,
            "channel": target,
            "preview_ts": preview_ts,
            "user": user_id,
            "told": channel_id,
        }
        claimed = await store.claim_reminder(
            incident.id,
            milestone,
            epoch,
            at=self.incidents.now(),
            claimer=self.incidents.claimer,
            payload=payload,
        )
        if not claimed:
            return f"This preview was already posted to <#{target}>."
        label = AUDIENCES[kind]
        if not await self._send(incident, kind, text, milestone, epoch, payload):
            return (
                f"Slack did not take the post to <#{target}> yet; "
                f"the bot posts the {label} at its next check."
            )
        return f"The {label} was posted to <#{target}>."

    async def _send(
        self,
        incident: Incident,
        kind: Audience,
        text: str,
        milestone: str,
        epoch: int,
        payload: dict[str, Any],
    ) -> bool:
        """Post a claimed template; only once Slack answered ok is it marked sent and
        recorded. Any failure (refused, timed out, connection dropped) frees the claim
        for the next tick (`retry_unsent`)."""
        store = self.incidents.store
        target, user_id, preview_ts = payload["channel"], payload["user"], payload["preview_ts"]
        try:
            ts = await self.publisher.post(target, templates.message(kind, text))
        except SLACK_FAILURES:
            await store.release_reminder(incident.id, milestone, epoch)
            log.exception("could not post the %s template to %s; retried next tick", kind, target)
            return False
        await store.mark_reminder_sent(incident.id, milestone, epoch, at=self.incidents.now())
        label = AUDIENCES[kind]
        detail = {"template": kind, "channel": target, "ts": ts, "preview_ts": preview_ts}
        said = f"posted the {label} to <#{target}>"
        recorded = await self.incidents.record_communication(
            incident.channel_id, user_id, said, detail
        )
        if not recorded:  # the incident is no longer active: keep the line all the same
            await store.add_event(
                incident.id,
                kind="template",
                actor_id=user_id,
                text=said,
                at=self.incidents.now(),
                detail=detail,
            )
        try:  # the team sees it in the thread, not only the clicker
            note = SlackMessage(text=f"{who(user_id)} {said}.", blocks=[])
            await self.publisher.post(incident.channel_id, note, thread_ts=incident.header_ts)
        except SLACK_FAILURES:
            log.exception("could not note the post of the %s template", kind)
        return True

    async def retry_unsent(self) -> int:
        """Every tick: template posts Slack did not answer ok are posted again (rendered
        again: the figures of the moment it goes out), each once across replicas."""
        store = self.incidents.store
        sent = 0
        for unsent in await store.unsent_posts(self.incidents.now()):
            audience = str(unsent.payload.get("audience", ""))
            if not unsent.milestone.startswith("tpl-") or audience not in templates.TEMPLATE_FILES:
                continue
            claimed = await store.claim_reminder(
                unsent.incident_id,
                unsent.milestone,
                unsent.epoch,
                at=self.incidents.now(),
                claimer=self.incidents.claimer,
                payload=unsent.payload,
            )
            incident = await store.get(unsent.incident_id) if claimed else None
            if incident is None:
                continue
            kind: Audience = "user" if audience == "user" else "tech"
            target, user = str(unsent.payload["channel"]), str(unsent.payload["user"])
            try:
                text = await self.render(incident, kind)
            except (templates.MissingValue, TemplateError) as exc:
                await store.forget_reminder(unsent.incident_id, unsent.milestone, unsent.epoch)
                await self._tell(
                    str(unsent.payload.get("told") or incident.channel_id),
                    user,
                    f"The {AUDIENCES[kind]} for <#{target}> no longer renders "
                    f"({esc(exc)}); it was not posted.",
                )
                continue
            if await self._send(
                incident, kind, text, unsent.milestone, unsent.epoch, unsent.payload
            ):
                sent += 1
                await self._tell(
                    str(unsent.payload.get("told") or incident.channel_id),
                    user,
                    f"The {AUDIENCES[kind]} was posted to <#{target}>.",
                )
        return sent

    async def _tell(self, channel_id: str, user_id: str, text: str) -> None:
        try:
            await self.publisher.tell(channel_id, user_id, text)
        except SLACK_FAILURES:
            log.exception("could not tell %s: %s", user_id, text)

    def register(self, app: AsyncApp, tracker: TaskTracker) -> None:
        """This feature's own listeners: the picker (acknowledged, read at the click) and
        the button (acknowledged at once, the work in a tracked task)."""

        async def on_pick(ack: AsyncAck) -> None:
            await ack()

        async def on_post(ack: AsyncAck, body: dict[str, Any]) -> None:
            await ack()
            action = (body.get("actions") or [{}])[0]
            user = str((body.get("user") or {}).get("id", ""))
            container = body.get("container") or {}
            channel = str(
                (body.get("channel") or {}).get("id") or container.get("channel_id") or ""
            )
            ts = str(container.get("message_ts") or (body.get("message") or {}).get("ts") or "")
            tracker.spawn(
                self._click(
                    value=str(action.get("value", "")),
                    user_id=user,
                    channel_id=channel,
                    preview_ts=ts,
                    target=templates.chosen_channel(body),
                ),
                name="post template",
            )

        app.action(templates.PICK)(on_pick)
        app.action(templates.POST)(on_post)

    async def _click(
        self, *, value: str, user_id: str, channel_id: str, preview_ts: str, target: str | None
    ) -> None:
        try:
            said = await self.post_template(
                value=value,
                user_id=user_id,
                channel_id=channel_id,
                preview_ts=preview_ts,
                target=target,
            )
        except Exception:
            log.exception("posting a template for %s failed", user_id)
            said = "Something went wrong posting that template; nothing was recorded."
        await self._tell(channel_id, user_id, said)


async def record_verification(
    incidents: IncidentService, channel_id: str, user_id: str, report: Report
) -> bool:
    """A `/db recover` report in a channel with an active incident joins its timeline as a
    `verification` event (what templates and the summary read the data impact from)."""
    verification = verification_from_report(report, incidents.now())
    if verification is None:
        return False
    event = await incidents.store.add_event_in(
        channel_id,
        kind=VERIFICATION,
        actor_id=user_id,
        text=verification_text(verification),
        at=incidents.now(),
        detail=verification.model_dump(mode="json"),
    )
    return event is not None
