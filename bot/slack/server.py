"""The running bot in Slack: its frontend for `bot.house`, the HTTP server, Socket Mode.

HTTP mode serves `/slack/events` (Bolt verifies the signature), `/healthz` for
orchestrators and `/metrics` for Prometheus on one aiohttp server.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.request.internals import parse_body
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot import metrics
from bot.clock import SystemClock
from bot.house import Frontend, House, build_house
from bot.incidents.comms import SlackPublisher
from bot.incidents.service import SlackIncidents
from bot.messages.notify import SlackNotifier
from bot.settings import Settings
from bot.slack.app import ACKED_EARLY, SlackFrontend, is_slash_command, make_web_client
from bot.tasks import wait_for_signal

log = logging.getLogger(__name__)


def slack_frontend(settings: Settings, client: AsyncWebClient) -> Frontend:
    """Slack's frontend: approvals, incidents and their comms speak through `client`, on
    system time, and the bot serves."""
    return Frontend(
        notifier=SlackNotifier(client),
        publisher=SlackPublisher(client),
        incident_slack=SlackIncidents(client),
        clock=SystemClock(),
        slack_client=client,
        serves=True,
    )


@dataclass(frozen=True)
class SlackBot:
    """One bot process in Slack: the house (`bot.house`) and its Bolt listeners."""

    house: House
    slack: SlackFrontend


@asynccontextmanager
async def slack_bot(settings: Settings) -> AsyncIterator[SlackBot]:
    """The bot built (serving: timers running) with its listeners; torn down after."""
    client = make_web_client(settings)
    async with build_house(settings, slack_frontend(settings, client)) as house:
        yield SlackBot(house, SlackFrontend(settings, house, client))


_Obj = dict[str, Any]


class InteractionShape(BaseModel):
    """What Bolt reads of an interaction payload before any listener runs, in Slack's shapes.

    Bolt trusts these shapes (it parses the JSON even before checking the signature): a
    payload of another shape would end in a 500 and a traceback instead of a refusal.
    """

    model_config = ConfigDict(extra="allow")

    type: str | None = None
    team: _Obj | None = None
    enterprise: _Obj | None = None
    user: _Obj | None = None
    channel: _Obj | None = None
    container: _Obj | None = None
    message: _Obj | None = None
    view: _Obj | None = None
    actions: list[_Obj] | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _absent_not_null(cls, data: Any) -> Any:
        """Bolt tells "absent" from "present"; a present null breaks it like a wrong type."""
        if isinstance(data, dict):
            nulls = [k for k in cls.model_fields if k in data and data[k] is None]
            if nulls:
                raise ValueError(f"null {', '.join(nulls)}")
        return data


def readable_by_bolt(body: str, content_type: str | None) -> bool:
    """Whether Bolt can read this body (its own parser, then the shapes it relies on)."""
    try:
        parsed = parse_body(body, content_type)
        InteractionShape.model_validate(parsed)
    except (ValueError, ValidationError):
        return False
    return True


def add_probe_routes(app: web.Application, house: House) -> None:
    """`/healthz` for the orchestrator (the image's HEALTHCHECK) and `/metrics` for
    Prometheus, the same in HTTP and in Socket Mode."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "pending_tasks": len(house.tracker),
                "pid": os.getpid(),
                # `leader`, `follower` or `off`: which replica runs the watchdog
                "watchdog": house.watchdog.role,
            }
        )

    async def metrics_view(_request: web.Request) -> web.Response:
        resp = web.Response(body=metrics.exposition())
        resp.headers["Content-Type"] = metrics.CONTENT_TYPE
        return resp

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)


def build_web_app(bot: SlackBot) -> web.Application:
    """The HTTP server of a built bot: `/slack/events` and the probes."""
    bolt, tracker, settings = bot.slack.app, bot.house.tracker, bot.house.settings

    verifier = (
        SignatureVerifier(settings.slack_signing_secret) if settings.slack_signing_secret else None
    )

    async def slack_events(request: web.Request) -> web.Response:
        body = await request.text()
        if verifier is not None and is_slash_command(body):
            # Slack wants only a 200 for a slash command: verify the signature here, answer
            # at once, and let Bolt dispatch it in a tracked task. A burst of commands then
            # costs the ack path a signature check each instead of Bolt's whole chain.
            if not verifier.is_valid_request(body, request.headers):
                return web.Response(status=401)
            early = AsyncBoltRequest(
                body=body,
                query=request.query_string,
                headers=request.headers,  # type: ignore[arg-type]
                context={ACKED_EARLY: True},
            )
            tracker.spawn(bolt.async_dispatch(early), name="slash command")
            return web.Response(status=200)
        if not readable_by_bolt(body, request.content_type):
            if verifier is not None and not verifier.is_valid_request(body, request.headers):
                return web.Response(status=401)
            log.warning("refused an interaction payload not shaped as Slack sends them")
            return web.Response(status=200)
        bolt_request = AsyncBoltRequest(
            body=body,
            query=request.query_string,
            headers=request.headers,  # type: ignore[arg-type]
        )
        bolt_response = await bolt.async_dispatch(bolt_request)
        if bolt_response.status == 404:
            # Signed, but no listener wants it (a button of another app version, an unknown
            # action): Slack needs only the 200; Bolt has logged what it was.
            return web.Response(status=200)
        return await to_aiohttp_response(bolt_response)

    app = web.Application()
    app.router.add_post("/slack/events", slack_events)
    add_probe_routes(app, bot.house)
    return app


async def serve_http(
    settings: Settings, port: int, host: str = "0.0.0.0", reuse_port: bool = False
) -> None:
    settings.require("slack_bot_token", "slack_signing_secret", "database_url")
    async with slack_bot(settings) as bot:
        runner = web.AppRunner(build_web_app(bot), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
            await site.start()
            # Everything loaded so far lives as long as the process: keep it out of the
            # cyclic GC, so that a full collection during a burst of commands does not
            # stall the acks.
            gc.collect()
            gc.freeze()
            log.info("dbops-bot listening on %s:%d (/slack/events, /healthz, /metrics)", host, port)
            await wait_for_signal()
        finally:
            await runner.cleanup()


async def connect_socket(bot: SlackBot, app_token: str) -> AsyncSocketModeHandler:
    """Open the Socket Mode connection for a built bot (`apps.connections.open` goes
    through the bot's Web API client, so SLACK_API_URL applies)."""
    handler = AsyncSocketModeHandler(bot.slack.app, app_token)
    await handler.connect_async()  # type: ignore[no-untyped-call]
    return handler


async def serve_socket(settings: Settings, port: int | None = None, host: str = "0.0.0.0") -> None:
    """Socket Mode, plus `/healthz` and `/metrics` on PORT: Slack needs no inbound port,
    but the container's HEALTHCHECK and Prometheus do."""
    settings.require("slack_bot_token", "slack_app_token", "database_url")
    assert settings.slack_app_token is not None
    async with slack_bot(settings) as bot:
        probes = web.Application()
        add_probe_routes(probes, bot.house)
        runner = web.AppRunner(probes, access_log=None)
        handler: AsyncSocketModeHandler | None = None
        try:
            await runner.setup()
            await web.TCPSite(runner, host, port or settings.port).start()
            handler = await connect_socket(bot, settings.slack_app_token)
            log.info(
                "dbops-bot connected in Socket Mode (/healthz, /metrics on %s:%d)",
                host,
                port or settings.port,
            )
            await wait_for_signal()
        finally:
            if handler is not None:
                await handler.close_async()  # type: ignore[no-untyped-call]
            await runner.cleanup()
