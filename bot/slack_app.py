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
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot import metrics, render
from bot.router import Answer, Dispatcher, new_error_id, preflight
from bot.settings import Settings, Visibility
from bot.tasks import TaskTracker
from commands.base import Command, Report

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


def _ephemeral(text: str) -> dict[str, Any]:
    return {"response_type": "ephemeral", "text": text}


class SlackFrontend:
    """Listeners and reply delivery; owns nothing the router does not give it."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher, tracker: TaskTracker) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.tracker = tracker
        self.app = AsyncApp(
            client=make_web_client(settings),
            signing_secret=settings.slack_signing_secret or "",
            request_verification_enabled=bool(settings.slack_signing_secret),
            process_before_response=True,  # answer from the listener, no ack polling
            raise_error_for_unhandled_request=False,
        )
        self._last_rendered: tuple[Report, render.SlackMessage] | None = None
        self.app.command("/db")(self.on_db)
        self.app.error(self.on_error)

    async def on_db(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        """The ack path: parse, answer what needs no database, hand the rest to a task.

        Kept to the bare minimum (no `respond` built here, the parse done once) because
        it runs for every command before Slack's 3-second limit.
        """
        received = time.perf_counter()
        text = str(body.get("text") or "")
        pre = preflight(text)
        if isinstance(pre, Answer):
            metrics.COMMANDS.labels(pre.outcome, pre.outcome).inc()
            await ack(text=pre.text, response_type="ephemeral")
            return
        await ack()
        cmd, args = pre
        self.tracker.spawn(self._work(body, text, cmd, args, received), name=f"/db {text}")

    async def _work(
        self, body: dict[str, Any], text: str, cmd: Command, args: list[str], received: float
    ) -> None:
        respond = AsyncRespond(response_url=body.get("response_url"))
        outcome = "error"
        try:
            result = await self.dispatcher.run_command(cmd, args)
            if isinstance(result, Answer):
                outcome = result.outcome
                await respond(**_ephemeral(result.text))
                return
            outcome = result.worst.value
            await self.deliver(body, result, respond)
        except Exception:
            error_id = new_error_id()
            log.exception("/db %s failed (error id %s)", text, error_id)
            await self._tell_user(
                respond, f"Something went wrong running `/db {text}` (error id `{error_id}`)."
            )
        finally:
            metrics.COMMANDS.labels(cmd.name, outcome).inc()
            metrics.LATENCY.labels(cmd.name).observe(time.perf_counter() - received)

    def in_channel(self, channel_id: str) -> bool:
        return (
            self.settings.reply_visibility is Visibility.IN_CHANNEL
            or channel_id in self.settings.incident_channels
        )

    def _render(self, report: Report) -> render.SlackMessage:
        """Render once per report: a burst of commands shares one coalesced report."""
        if self._last_rendered is None or self._last_rendered[0] is not report:
            self._last_rendered = (report, render.to_slack(report))
        return self._last_rendered[1]

    async def deliver(self, body: dict[str, Any], report: Report, respond: AsyncRespond) -> None:
        message = self._render(report)
        channel, user = str(body.get("channel_id", "")), str(body.get("user_id", ""))
        client = self.app.client
        public = self.in_channel(channel)
        try:
            if public:
                await client.chat_postMessage(
                    channel=channel, text=message.text, blocks=message.blocks_json()
                )
            else:
                await client.chat_postEphemeral(
                    channel=channel, user=user, text=message.text, blocks=message.blocks_json()
                )
        except SlackClientError as exc:
            method = "chat.postMessage" if public else "chat.postEphemeral"
            metrics.SLACK_ERRORS.labels(method).inc()
            log.warning("%s failed (%s); replying through response_url", method, _slack_reason(exc))
            await respond(
                text=message.text,
                blocks=message.blocks_json(),
                response_type="in_channel" if public else "ephemeral",
            )
            return
        if public:
            for filename, content in message.files:
                try:
                    await client.files_upload_v2(
                        channel=channel, filename=filename, content=content, title=filename
                    )
                except SlackClientError as exc:
                    metrics.SLACK_ERRORS.labels("files.upload").inc()
                    log.warning("upload of %s failed: %s", filename, _slack_reason(exc))

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
