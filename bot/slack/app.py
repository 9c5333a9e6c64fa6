"""The Bolt app: `/db` is acknowledged at once, the work runs in a tracked task after.

Help, unknown commands and usage errors are answered in the ack itself (no database,
no Web API call); diagnostics are posted when ready, in channel in incident channels
and ephemeral elsewhere, falling back to the command's `response_url` when the Web API
refuses (bot not in the channel, rate limit after retries).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy.exc import SQLAlchemyError

from bot import metrics
from bot.access.roles import LOWEST, Purpose, refusal
from bot.approvals.engine import APPROVE, REJECT, Click, NotPosted
from bot.gateway import first_line
from bot.house import House
from bot.incidents.service import Reply
from bot.messages import render
from bot.messages.keyed_mac import FULL_TABLE_BUTTON, KeyedMac, button_secret
from bot.router import Answer, BotCommand, Target, new_error_id, preflight
from bot.settings import Settings, Visibility
from bot.slack.exports import SlackExports
from commands import export
from commands.base import Command, Finding, Report, UsageError, role_rank
from commands.incidents import lifecycle as incident
from commands.remedies.base import Remedy

log = logging.getLogger(__name__)


def make_web_client(settings: Settings, token: str | None = None) -> AsyncWebClient:
    """Every Slack client the bot makes: the configured API URL and the SDK's retry handlers."""
    return AsyncWebClient(
        token=token or settings.slack_bot_token,
        base_url=settings.slack_api_url,
        timeout=10,
        retry_handlers=[
            AsyncConnectionErrorRetryHandler(max_retry_count=2),
            AsyncRateLimitErrorRetryHandler(max_retry_count=2),
            AsyncServerErrorRetryHandler(max_retry_count=2),
        ],
    )


ACKED_EARLY = "dbops_acked_early"
STATE_STORE_DOWN = (
    "`{name}` is refused: the bot's state store (where approvals are kept) is unreachable, "
    "so no remedy can be approved; nothing was changed. Diagnostics still work."
)


def is_slash_command(body: str) -> bool:
    """A slash command's form body (not an interaction payload, nor Slack's SSL check)."""
    # form values are percent-encoded, so "&key=" can only be a key
    form = f"&{body}"
    return "&command=%2F" in form and "&payload=" not in form and "&ssl_check=1" not in form


def _ephemeral(text: str) -> dict[str, Any]:
    """A short answer; it echoes user input and database errors, so nothing in it is markup."""
    return {"response_type": "ephemeral", "text": render.esc(text)}


@dataclass(frozen=True)
class TableRef:
    """What a "Full table as CSV" button points at: the command to run again and its check.

    A signed reference instead of rows kept in the state store: the value stays small,
    any replica can answer the click (even after a restart) without new tables, and the
    clicker gets the rows as they are now, checked against their own role.
    """

    text: str  # the command text after /db
    check: str
    user: str  # who asked; an ephemeral reply's button is theirs alone
    channel: str
    public: bool  # the reply was in channel (upload there), else ephemeral (upload to a DM)


class TableSigner:
    def __init__(self, secret: str) -> None:
        self._mac = KeyedMac.for_purpose(FULL_TABLE_BUTTON, secret, hex_chars=32)

    def sign(self, ref: TableRef) -> str:
        payload = json.dumps(
            [ref.text, ref.check, ref.user, ref.channel, int(ref.public)],
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return f"{self._mac.sign(payload)}.{payload}"

    def verify(self, value: str) -> TableRef | None:
        mac, _, payload = value.partition(".")
        if not self._mac.matches(payload, mac):
            return None
        try:
            text, check, user, channel, public = json.loads(payload)
        except ValueError:
            return None
        return TableRef(str(text), str(check), str(user), str(channel), bool(public))


class SlackFrontend:
    """Listeners and reply delivery; owns nothing the router does not give it."""

    def __init__(self, settings: Settings, house: House, client: AsyncWebClient) -> None:
        """The listeners of a built bot (`bot.house`); `client` is the one its frontend
        speaks through."""
        self.settings = settings
        self.dispatcher = house.dispatcher
        self.tracker = house.tracker
        self.roles = house.roles
        self.engine = house.engine
        self.incidents = house.incidents
        self.app = AsyncApp(
            client=client,
            signing_secret=settings.slack_signing_secret or "",
            request_verification_enabled=bool(settings.slack_signing_secret),
            process_before_response=True,  # answer from the listener, no ack polling
            raise_error_for_unhandled_request=False,
        )
        self._last_rendered: tuple[Report, render.SlackMessage] | None = None
        self.tables = TableSigner(
            button_secret(settings.slack_signing_secret, settings.slack_bot_token)
        )
        store, incidents = house.store, house.incidents
        self.exports = SlackExports(
            settings,
            client,
            lambda: store,
            incidents=lambda: incidents,  # an export joins the open incident's timeline
        )
        house.comms.register(self.app, self.tracker)  # the template picker and button
        self.app.command("/db")(self.on_db)
        self.app.action(APPROVE)(self.on_button)
        self.app.action(REJECT)(self.on_button)
        self.app.action(render.FULL_TABLE)(self.on_full_table)
        self.app.event("app_home_opened")(self.on_home)
        self.app.error(self.on_error)

    async def on_db(self, ack: AsyncAck, body: dict[str, Any], context: AsyncBoltContext) -> None:
        """The ack path: parse, answer what needs no database, hand the rest to a task.

        Kept to the bare minimum (no `respond` built here, the parse done once) because
        it runs for every command before Slack's 3-second limit.
        """
        received = time.perf_counter()
        text = str(body.get("text") or "")
        channel = str(body.get("channel_id", ""))
        early = bool(context.get(ACKED_EARLY))
        if self.settings.allowed_channels and channel not in self.settings.allowed_channels:
            metrics.COMMANDS.labels("refused", "channel").inc()
            await self._answer(ack, body, early, "dbops-bot does not answer in this channel.")
            return
        pre = preflight(text)
        if isinstance(pre, Answer):
            metrics.COMMANDS.labels(pre.outcome, pre.outcome).inc()
            await self._answer(ack, body, early, pre.text)
            return
        await ack()
        cmd, args = pre
        self.tracker.spawn(self._work(body, text, cmd, args, received), name=f"/db {text}")

    async def _answer(self, ack: AsyncAck, body: dict[str, Any], early: bool, text: str) -> None:
        """A short private answer: in the ack itself, or through `response_url` when the
        HTTP server already acknowledged the command."""
        if not early:
            await ack(text=render.esc(text), response_type="ephemeral")
            return
        await ack()
        respond = AsyncRespond(response_url=body.get("response_url"))
        await self._tell_user(respond, text)

    async def _authorize(self, user_id: str, target: Target) -> str | None:
        """None when allowed, else the refusal to show.

        Every command needs the diagnostics role and its own; requesting a remedy needs a
        role checked now, while a diagnostic also accepts the last known role (the target
        may be down, and those diagnosing it must still see it). Approving is checked per
        click, against the remedy's approver role.
        """
        needed = max(self.settings.diagnostics_role, target.role, key=role_rank)
        if needed == LOWEST:
            return None  # nothing to look up: everyone holds the lowest role
        purpose: Purpose = "request" if isinstance(target, Remedy) else "diagnose"
        return refusal(needed, await self.roles.resolve(user_id), purpose)

    async def _work(
        self, body: dict[str, Any], text: str, cmd: Target, args: list[str], received: float
    ) -> None:
        respond = AsyncRespond(response_url=body.get("response_url"))
        user, channel = str(body.get("user_id", "")), str(body.get("channel_id", ""))
        outcome = "error"
        try:
            refusal = await self._authorize(user, cmd)
            if refusal:
                outcome = "refused"
                await respond(**_ephemeral(f"`/db {text}`: {refusal}"))
                return
            if isinstance(cmd, Remedy):
                outcome = await self._request_remedy(cmd, args, body, respond)
                return
            if isinstance(cmd, BotCommand):
                outcome = await self._incident(args, body, respond)
                return
            if isinstance(cmd, Command) and cmd.name == export.NAME:
                outcome = await self._export(args, body, respond)
                return
            result = await self.dispatcher.run_command(cmd, args)
            if isinstance(result, Answer):
                outcome = result.outcome
                await respond(**_ephemeral(result.text))
                return
            if isinstance(result, Report):
                outcome = result.worst.value
                await self.deliver(body, result, respond)
                await self._join_timeline(channel, user, text, result)
                await self._follow_up(result, body, respond)
        except Exception:
            error_id = new_error_id()
            log.exception("/db %s by %s in %s failed (error id %s)", text, user, channel, error_id)
            await self._tell_user(
                respond, f"Something went wrong running `/db {text}` (error id `{error_id}`)."
            )
        finally:
            metrics.COMMANDS.labels(cmd.name, outcome).inc()
            metrics.LATENCY.labels(cmd.name).observe(time.perf_counter() - received)

    async def _export(self, args: list[str], body: dict[str, Any], respond: AsyncRespond) -> str:
        """`/db export`: the file goes where a report would (the channel, when replies are
        in channel there; else a DM with the requester, like a private table)."""
        user, channel = str(body.get("user_id", "")), str(body.get("channel_id", ""))

        async def tell(text: str) -> None:  # mrkdwn the exports module escaped itself
            try:
                await respond(text=text, response_type="ephemeral")
            except Exception:
                log.exception("could not tell %s: %s", user, text)

        if not (self.in_channel(channel) or await self._has_incident(channel)):
            try:
                opened = await self.app.client.conversations_open(users=user)
                channel = str((opened.get("channel") or {}).get("id", ""))
            except SlackClientError as exc:
                await tell(f"Cannot open a DM for the export ({_slack_reason(exc)}).")
                return "error"
            await tell("The export runs in your DM with the bot.")
        return await self.exports.handle(args, user=user, channel=channel, tell=tell)

    async def _follow_up(self, report: Report, body: dict[str, Any], respond: AsyncRespond) -> None:
        """The remedies a report asks for (`/db recover`'s steps), each requested as if the
        user had typed it: its own role check, plan and approval thread."""
        user = str(body.get("user_id", ""))
        for text in report.follow_ups:
            pre = preflight(text)
            remedy = None if isinstance(pre, Answer) else pre[0]
            if not isinstance(remedy, Remedy) or isinstance(pre, Answer):
                log.warning("follow-up %r is not a remedy; ignored", text)
                continue
            args = pre[1]
            refused = await self._authorize(user, remedy)
            if refused:
                await respond(**_ephemeral(f"`/db {text}`: {refused}"))
                continue
            await self._request_remedy(remedy, args, body, respond)

    async def _request_remedy(
        self, remedy: Remedy, args: list[str], body: dict[str, Any], respond: AsyncRespond
    ) -> str:
        try:
            approval_id = await self.engine.request(
                remedy,
                args,
                user_id=str(body.get("user_id", "")),
                user_name=str(body.get("user_name", "")),
                channel_id=str(body.get("channel_id", "")),
            )
        except UsageError as exc:
            await respond(**_ephemeral(f"{exc}\nUsage: `{remedy.usage}`"))
            return "usage"
        except NotPosted as exc:
            await self._tell_user(respond, str(exc))
            return "error"
        except psycopg.Error as exc:
            await respond(**_ephemeral(f"Could not plan `{remedy.name}`: {first_line(exc)}"))
            return "error"
        except SQLAlchemyError as exc:
            # Approvals live in the state store: without it no remedy may go ahead (fail closed).
            log.warning("state store unavailable, %s refused: %s", remedy.name, first_line(exc))
            await respond(**_ephemeral(STATE_STORE_DOWN.format(name=remedy.name)))
            return "refused"
        return "requested" if approval_id else "nothing"

    async def _incident(self, args: list[str], body: dict[str, Any], respond: AsyncRespond) -> str:
        request = incident.parse(args[0] if args else "")  # checked before the ack
        reply = await self.incidents.handle(
            request,
            user_id=str(body.get("user_id", "")),
            channel_id=str(body.get("channel_id", "")),
        )
        await self._reply(body, reply, respond)
        return "incident"

    async def _reply(self, body: dict[str, Any], reply: Reply, respond: AsyncRespond) -> None:
        message = reply.message
        blocks = message.blocks_json() or None
        if reply.public:
            try:
                await self.app.client.chat_postMessage(
                    channel=str(body.get("channel_id", "")), text=message.text, blocks=blocks
                )
                return
            except SlackClientError as exc:
                metrics.SLACK_ERRORS.labels("chat.postMessage").inc()
                log.warning("chat.postMessage failed (%s); using response_url", _slack_reason(exc))
        await respond(
            text=message.text,
            blocks=blocks,
            response_type="in_channel" if reply.public else "ephemeral",
        )

    async def _join_timeline(self, channel: str, user: str, text: str, report: Report) -> None:
        """A diagnostic in a channel with an open incident joins its timeline; its failure
        never costs the user the report they already have."""
        try:
            await self.incidents.on_report(channel, user, text, report)
        except Exception:
            log.exception("could not add /db %s to the incident timeline of %s", text, channel)

    async def on_home(self, event: dict[str, Any]) -> None:
        """App Home: open incidents and their clocks, pending approvals, the latest health."""
        if event.get("tab", "home") != "home":
            return
        user = str(event.get("user", ""))
        try:
            await self.incidents.publish_home(user)
        except Exception:
            log.exception("could not publish App Home for %s", user)

    async def on_button(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        actions = body.get("actions") or [{}]
        action = actions[0] if isinstance(actions[0], dict) else {}
        channel = body.get("channel") or {}
        container = body.get("container") or {}
        message = body.get("message") or {}
        user = body.get("user") or {}
        click = Click(
            action_id=str(action.get("action_id", "")),
            value=str(action.get("value", "")),
            user_id=str(user.get("id", "")),
            user_name=str(user.get("username") or user.get("name") or ""),
            channel_id=str(channel.get("id") or container.get("channel_id") or ""),
            message_ts=str(container.get("message_ts") or message.get("ts") or ""),
        )
        self.tracker.spawn(self._click(click), name=f"click {click.action_id}")

    async def _click(self, click: Click) -> None:
        try:
            await self.engine.on_click(click)
        except Exception:
            error_id = new_error_id()
            log.exception(
                "button %s by %s failed (error id %s)", click.action_id, click.user_id, error_id
            )
            try:
                await self.app.client.chat_postEphemeral(
                    channel=click.channel_id,
                    user=click.user_id,
                    text=f"Something went wrong handling that button (error id `{error_id}`).",
                )
            except SlackClientError:
                log.exception("could not report error %s", error_id)

    async def on_full_table(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        actions = body.get("actions") or [{}]
        action = actions[0] if isinstance(actions[0], dict) else {}
        channel = body.get("channel") or {}
        container = body.get("container") or {}
        user = str((body.get("user") or {}).get("id", ""))
        channel_id = str(channel.get("id") or container.get("channel_id") or "")
        message_ts = str(container.get("message_ts") or "")
        value = str(action.get("value", ""))
        self.tracker.spawn(self._full_table(value, user, channel_id, message_ts), name="full table")

    async def _full_table(self, value: str, user: str, channel: str, message_ts: str) -> None:
        """Run the referenced diagnostic again and upload the check's rows as CSV: in the
        report's thread when the reply was in channel, else in a DM with the clicker."""
        try:
            ref = self.tables.verify(value)
            if ref is None or ref.channel != channel or (not ref.public and ref.user != user):
                metrics.COMMANDS.labels("full-table", "tampered").inc()
                log.warning("refused a full-table button from %s in %s", user, channel)
                await self.engine.store.audit(
                    "payload.tampered",
                    actor_id=user,
                    channel_id=channel,
                    detail={"value": value[:80], "action": render.FULL_TABLE},
                )
                await self._whisper(channel, user, "This button is not valid here.")
                return
            pre = preflight(ref.text)
            if isinstance(pre, Answer) or not isinstance(pre[0], Command):
                await self._whisper(channel, user, "This button no longer points at a report.")
                return
            cmd, args = pre
            refusal = await self._authorize(user, cmd)
            if refusal:
                metrics.COMMANDS.labels("full-table", "refused").inc()
                await self._whisper(
                    channel,
                    user,
                    f"Full table of `/db {ref.text}`: {refusal}",
                )
                return
            report = await self.dispatcher.run_command(cmd, args)
            finding = (
                next((f for f in report.findings if f.check == ref.check), None)
                if isinstance(report, Report)
                else None
            )
            if finding is None or not finding.rows:
                await self._whisper(
                    channel,
                    user,
                    f"`/db {ref.text}` has no rows for {ref.check} any more.",
                )
                return
            await self._upload_table(ref, finding, user, channel, message_ts)
            metrics.COMMANDS.labels("full-table", "ok").inc()
        except Exception:
            error_id = new_error_id()
            log.exception("full table for %s failed (error id %s)", user, error_id)
            await self._whisper(
                channel, user, f"Something went wrong fetching the table (error id `{error_id}`)."
            )

    async def _upload_table(
        self, ref: TableRef, finding: Finding, user: str, channel: str, message_ts: str
    ) -> None:
        client = self.app.client
        asked, check = render.esc(ref.text), render.esc(finding.check)
        comment = (
            f"`/db {asked}`: {check}, {len(finding.rows)} rows as of "
            f"{render.slack_date(datetime.now(UTC))}"
        )
        content = render.rows_csv(finding.rows)
        filename = render.csv_filename(finding.check)
        if ref.public:
            try:
                await client.files_upload_v2(
                    channel=channel,
                    thread_ts=message_ts or None,
                    filename=filename,
                    title=filename,
                    content=content,
                    initial_comment=comment,
                )
                return
            except SlackApiError as exc:  # e.g. not_in_channel: the clicker still gets it
                metrics.SLACK_ERRORS.labels("files.completeUploadExternal").inc()
                log.warning("CSV upload to %s failed (%s); sent by DM", channel, _slack_reason(exc))
        opened = await client.conversations_open(users=user)
        dm = str((opened.get("channel") or {}).get("id", ""))
        await client.files_upload_v2(
            channel=dm, filename=filename, title=filename, content=content, initial_comment=comment
        )
        await self._whisper(channel, user, f"The full table of {finding.check} is in your DM.")

    async def _whisper(self, channel: str, user: str, text: str) -> None:
        """A private note; it echoes the command text and check names, so nothing in it
        is markup (like `_ephemeral`)."""
        try:
            await self.app.client.chat_postEphemeral(
                channel=channel, user=user, text=render.esc(text)
            )
        except SlackClientError as exc:
            log.warning("could not tell %s: %s (%s)", user, text, _slack_reason(exc))

    def in_channel(self, channel_id: str) -> bool:
        return (
            self.settings.reply_visibility is Visibility.IN_CHANNEL
            or channel_id in self.settings.incident_channels
        )

    async def _has_incident(self, channel_id: str) -> bool:
        """A channel with an open incident is an incident channel: replies go in channel."""
        try:
            return await self.incidents.store.active_in(channel_id) is not None
        except Exception:
            log.exception("could not tell whether %s has an incident", channel_id)
            return False

    def _render(self, report: Report) -> render.SlackMessage:
        """Render once per report: a burst of commands shares one coalesced report."""
        if self._last_rendered is None or self._last_rendered[0] is not report:
            self._last_rendered = (report, render.to_slack(report, table_buttons=True))
        return self._last_rendered[1]

    async def deliver(self, body: dict[str, Any], report: Report, respond: AsyncRespond) -> None:
        channel, user = str(body.get("channel_id", "")), str(body.get("user_id", ""))
        client = self.app.client
        public = self.in_channel(channel) or await self._has_incident(channel)
        message = self._render(report)
        asked = TableRef(str(body.get("text") or "").strip(), "", user, channel, public)
        blocks = render.sign_table_buttons(
            message.blocks_json(), lambda check: self.tables.sign(replace(asked, check=check))
        )
        try:
            if public:
                await client.chat_postMessage(channel=channel, text=message.text, blocks=blocks)
            else:
                await client.chat_postEphemeral(
                    channel=channel, user=user, text=message.text, blocks=blocks
                )
        except SlackClientError as exc:
            method = "chat.postMessage" if public else "chat.postEphemeral"
            metrics.SLACK_ERRORS.labels(method).inc()
            log.warning("%s failed (%s); replying through response_url", method, _slack_reason(exc))
            await respond(
                text=message.text,
                blocks=blocks,
                response_type="in_channel" if public else "ephemeral",
            )

    async def _tell_user(self, respond: AsyncRespond, text: str) -> None:
        try:
            await respond(**_ephemeral(text))
        except Exception:
            log.exception("could not tell the user: %s", text)

    async def on_error(
        self, error: Exception, body: dict[str, Any], response: BoltResponse | None
    ) -> BoltResponse | None:
        error_id = new_error_id()
        log.error("unhandled error (error id %s)", error_id, exc_info=error)
        if response is None:
            return None
        response.status = 200
        response.body = json.dumps(_ephemeral(f"Something went wrong (error id `{error_id}`)."))
        response.headers["content-type"] = ["application/json;charset=utf-8"]
        return response


def _slack_reason(exc: SlackClientError) -> str:
    if isinstance(exc, SlackApiError):
        return str(exc.response.get("error", exc.response.status_code))
    return type(exc).__name__
