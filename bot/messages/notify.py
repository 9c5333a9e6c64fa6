"""Where the approval engine speaks: Slack threads, or the console for the demo.

The engine never calls Slack directly, so the same rules (roles, expiry, exactly-once,
drift) run when an approval is requested and approved from the command line.
"""

from __future__ import annotations

import itertools
import logging
import sys
from typing import Protocol, TextIO

import aiohttp
from slack_sdk.errors import SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from bot.messages.render import SlackMessage, plain_dates, unesc

log = logging.getLogger(__name__)

# Every way a Web API call can fail to be answered ok, once the SDK's own retries are
# spent: Slack's refusal (`SlackApiError`), and the transport: a timeout (`TimeoutError`,
# which `asyncio.TimeoutError` is), a dropped or refused connection (`aiohttp.ClientError`,
# `ConnectionError`). A post that ended in one of these was not sent, and is tried again.
SLACK_FAILURES: tuple[type[Exception], ...] = (SlackClientError, aiohttp.ClientError, OSError)


class Notifier(Protocol):
    async def post_request(self, channel_id: str, text: str) -> str:
        """The parent message in the channel; returns its ts (the thread)."""
        ...

    async def post_plan(self, channel_id: str, thread_ts: str, message: SlackMessage) -> str:
        """The plan in the thread; returns its ts (the message updated on every change)."""
        ...

    async def update_plan(self, channel_id: str, ts: str, message: SlackMessage) -> None: ...

    async def update_request(self, channel_id: str, ts: str, text: str) -> None:
        """The parent message again, once the approval is final: the outcome in the channel."""
        ...

    async def tell(self, channel_id: str, user_id: str, text: str, thread_ts: str | None) -> None:
        """A private note to one person (ephemeral in Slack)."""
        ...


class SlackNotifier:
    def __init__(self, client: AsyncWebClient) -> None:
        self.client = client

    async def post_request(self, channel_id: str, text: str) -> str:
        posted = await self.client.chat_postMessage(channel=channel_id, text=text)
        return str(posted["ts"])

    async def post_plan(self, channel_id: str, thread_ts: str, message: SlackMessage) -> str:
        posted = await self.client.chat_postMessage(
            channel=channel_id, thread_ts=thread_ts, text=message.text, blocks=message.blocks_json()
        )
        return str(posted["ts"])

    async def update_plan(self, channel_id: str, ts: str, message: SlackMessage) -> None:
        try:
            await self.client.chat_update(
                channel=channel_id, ts=ts, text=message.text, blocks=message.blocks_json()
            )
        except SLACK_FAILURES as exc:
            log.warning("could not update plan message %s: %s", ts, exc)

    async def update_request(self, channel_id: str, ts: str, text: str) -> None:
        try:
            await self.client.chat_update(channel=channel_id, ts=ts, text=text)
        except SLACK_FAILURES as exc:
            log.warning("could not update request message %s: %s", ts, exc)

    async def tell(self, channel_id: str, user_id: str, text: str, thread_ts: str | None) -> None:
        try:
            await self.client.chat_postEphemeral(
                channel=channel_id, user=user_id, text=text, thread_ts=thread_ts
            )
        except SLACK_FAILURES as exc:
            log.warning("could not tell %s: %s (%s)", user_id, text, exc)


class ConsoleNotifier:
    """Prints what Slack would show; message ids are local counters."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self._ts = itertools.count(1)

    def _print_blocks(self, message: SlackMessage) -> None:
        if message.console:  # the message's own text rendering: SQL and values as written
            self.out.write(message.console + "\n")
            if any(b.get("type") == "actions" for b in message.blocks_json()):
                self.out.write(
                    "[Approve] [Reject]  (python -m bot approve|reject <id> --user U…)\n"
                )
            self.out.flush()
            return
        for block in message.blocks_json():
            text = block.get("text")
            if isinstance(text, dict) and text.get("text"):
                self.out.write(unesc(plain_dates(str(text["text"])).replace("```", "")) + "\n")
            elif block.get("type") == "actions":
                self.out.write(
                    "[Approve] [Reject]  (python -m bot approve|reject <id> --user U…)\n"
                )
        self.out.flush()

    async def post_request(self, channel_id: str, text: str) -> str:
        self.out.write(_plain(text) + "\n")
        return f"console.{next(self._ts)}"

    async def post_plan(self, channel_id: str, thread_ts: str, message: SlackMessage) -> str:
        self._print_blocks(message)
        return f"console.{next(self._ts)}"

    async def update_plan(self, channel_id: str, ts: str, message: SlackMessage) -> None:
        self.out.write("— updated —\n")
        self._print_blocks(message)

    async def update_request(self, channel_id: str, ts: str, text: str) -> None:
        self.out.write(_plain(text) + "\n")
        self.out.flush()

    async def tell(self, channel_id: str, user_id: str, text: str, thread_ts: str | None) -> None:
        self.out.write(f"(to {user_id}) {_plain(text)}\n")
        self.out.flush()


def _plain(text: str) -> str:
    """A Slack mrkdwn line as the console shows it: values as written, times in UTC ISO."""
    return unesc(plain_dates(text).replace("`", ""))
