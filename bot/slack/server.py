"""The running bot: its parts wired together, the HTTP server, and Socket Mode.

HTTP mode serves `/slack/events` (Bolt verifies the signature), `/healthz` for
orchestrators and `/metrics` for Prometheus on one aiohttp server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.request.internals import parse_body
from slack_sdk.signature import SignatureVerifier

from bot import metrics
from bot.access.roles import RoleResolver, refusal
from bot.approvals.engine import ApprovalEngine, refresh_history
from bot.approvals.executor import executor_from_settings
from bot.clock import Clock, SystemClock
from bot.gateway import gateway_from_settings
from bot.incidents.comms import IncidentComms, SlackPublisher
from bot.incidents.leader import Leadership, leadership_for
from bot.incidents.service import IncidentService, SlackIncidents
from bot.incidents.watchdog import Watchdog
from bot.messages.notify import SlackNotifier
from bot.router import Dispatcher, RunContext
from bot.settings import Settings
from bot.slack.app import ACKED_EARLY, SlackFrontend, is_slash_command
from bot.state import IncidentStore, StateStore, open_store
from bot.state.baselines import StoreBaselines
from bot.state.watchdog import WatchdogStore
from bot.tasks import TaskTracker, wait_for_signal
from commands.recover import BaselineConditions, take_baseline

log = logging.getLogger(__name__)


class Service:
    """One bot process: gateway, router, state store, approvals and the Slack frontend."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        settings.require("database_url")
        assert settings.database_url is not None
        self.settings = settings
        self.gateway = gateway_from_settings(settings)
        self.ctx = RunContext(
            self.gateway,
            settings.thresholds,
            allow_superuser_kill=settings.allow_superuser_kill,
            refresh_log=self._refresh_log,
            service_identity=settings.service_identity,
        )
        self.dispatcher = Dispatcher(self.ctx, coalesce_s=settings.coalesce_s)
        self.tracker = TaskTracker()
        self.slack = SlackFrontend(settings, self.dispatcher, self.tracker)
        self.roles = RoleResolver(
            settings.role_map,
            self.slack.app.client,
            self.gateway,
            settings.role_cache_ttl_s,
            role_groups=settings.role_groups,
            stale_max_s=settings.role_stale_max_s,
        )
        self.slack.roles = self.roles
        self.ctx.slack_email = self.roles.email_of  # `/db quota @user` reads the profile e-mail
        self.ctx.role_changed = self.roles.leaps_role_changed  # set-role takes effect now
        self.executor = executor_from_settings(settings)
        self.store: StateStore | None = None
        self.engine: ApprovalEngine | None = None
        self.sweeper: asyncio.Task[None] | None = None
        self.clock: Clock = clock or SystemClock()
        self.incidents: IncidentService | None = None
        self.incident_timer: asyncio.Task[None] | None = None
        self.watchdog: Watchdog | None = None
        self.leadership: Leadership | None = None
        self.watchdog_task: asyncio.Task[None] | None = None
        self.comms: IncidentComms | None = None
        self.baseliner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.gateway.open()
        try:
            self.store = await open_store(self.settings.state_database_url)
        except BaseException:
            # The open pool would keep the process alive: a bot that cannot start must exit.
            await self.gateway.close()
            raise
        self.roles.store = self.store  # from now on resolved roles are kept for outages
        self.engine = ApprovalEngine(
            self.settings,
            self.store,
            self.ctx,
            self.executor,
            SlackNotifier(self.slack.app.client),
            self.roles,
        )
        self.ctx.baselines = StoreBaselines(self.store, self.settings.baseline_keep_days)
        self.slack.engine = self.engine
        self.tracker.spawn(self.engine.recover(), name="recover approvals")
        self.sweeper = asyncio.get_running_loop().create_task(
            self._sweep_every(self.engine, self.settings.sweep_interval_s), name="sweep timer"
        )
        self.incidents = IncidentService(
            IncidentStore.attach(self.store, self.clock),
            SlackIncidents(self.slack.app.client),
            self.settings.sla,
            oncall_groups=list(self.settings.role_groups),
        )
        self.slack.incidents = self.incidents
        self.comms = IncidentComms(
            self.incidents,
            SlackPublisher(self.slack.app.client),
            self.settings.template_dir,
            self._may_post,
        )
        self.comms.register(self.slack.app, self.tracker)
        self.incident_timer = asyncio.get_running_loop().create_task(
            self._incident_ticks(self.incidents, self.settings.incident_tick_s),
            name="incident timer",
        )
        self._start_watchdog(self.store, self.incidents)
        if self.watchdog is None and self.settings.baseline_interval_s > 0:
            # no watchdog to take the baselines: every replica takes its own
            self.baseliner = asyncio.get_running_loop().create_task(
                self._baseline_every(self.settings.baseline_interval_s), name="baseline timer"
            )

    def _start_watchdog(self, store: StateStore, incidents: IncidentService) -> None:
        """The watchdog on every replica; only the one holding the leader lock ticks."""
        if self.settings.watchdog_interval_s <= 0:
            return
        if not self.settings.ops_channel:
            log.warning("OPS_CHANNEL is not set: the watchdog checks health but posts nothing")
        self.watchdog = Watchdog(
            self.dispatcher,
            WatchdogStore(store),
            incidents.slack,
            ops_channel=self.settings.ops_channel or None,
            incidents=incidents,
            opens_incident=self.settings.watchdog_opens_incident,
            severity=self.settings.watchdog_incident_severity,
            clock=self.clock,
            baseline=self.take_baseline_hook(),
            baseline_interval_s=self.settings.baseline_interval_s,
        )
        self.leadership = leadership_for(self.settings.state_database_url)
        self.watchdog_task = asyncio.get_running_loop().create_task(
            self.watchdog.run(self.leadership, self.settings.watchdog_interval_s),
            name="watchdog",
        )

    def take_baseline_hook(self) -> Callable[[], Awaitable[object]] | None:
        """The hourly baseline snapshot `/db recover` compares against, taken by the
        watchdog's leader (BASELINE_INTERVAL_S; 0: never)."""
        if self.settings.baseline_interval_s <= 0:
            return None

        async def tracked() -> None:
            # a tracked task: shutdown drains it like any other work
            await self.tracker.spawn(self.take_baseline(), name="take baseline")

        return tracked

    async def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()  # the timer never ends by itself; a sweep running is drained
        if self.incident_timer is not None:
            self.incident_timer.cancel()
        if self.watchdog_task is not None:
            self.watchdog_task.cancel()  # its `finally` gives the leader lock back
            with contextlib.suppress(asyncio.CancelledError):
                await self.watchdog_task
        if self.baseliner is not None:
            self.baseliner.cancel()
        await self.tracker.drain()
        await self.gateway.close()
        if self.store is not None:
            await self.store.close()

    async def _sweep_every(self, engine: ApprovalEngine, interval_s: float) -> None:
        """A sweep at start-up and every `interval_s`, each a tracked task (a failed one is
        logged by the tracker and never stops the next)."""
        while True:
            self.tracker.spawn(engine.sweep(), name="sweep executing approvals")
            await asyncio.sleep(interval_s)

    async def _incident_ticks(self, incidents: IncidentService, interval_s: float) -> None:
        """SLA reminders and header clocks, every `interval_s` (each tick a tracked task).

        A tick still running when the next is due is not doubled: under a slow state store
        or Slack, ticks would otherwise pile up behind each other."""
        running: asyncio.Task[Any] | None = None
        while True:
            await asyncio.sleep(interval_s)
            if running is None or running.done():
                running = self.tracker.spawn(incidents.tick(), name="incident tick")

    async def _may_post(self, user_id: str) -> str | None:
        """Posting a template needs what any `/db incident` command needs."""
        return refusal(
            self.settings.diagnostics_role, await self.roles.resolve(user_id), "diagnose"
        )

    async def take_baseline(self) -> bool:
        """One snapshot of the target for `/db recover` (the watchdog's leader takes it
        over: it is one call). A snapshot of a damaged database would become the baseline
        a recovery is measured against, and `/db recover` would call the loss 100 %: so
        none while an incident is open, within BASELINE_QUIET_S after one recovered, or
        while a check is critical that was not at the last baseline
        (`commands.recover.baseline_refusal`). Returns whether one was taken."""
        conditions = await self.baseline_conditions()
        return await take_baseline(self.ctx, conditions) is not None

    async def baseline_conditions(self) -> BaselineConditions:
        """What the baseline rule needs, from the incidents and the watchdog's health runs."""
        if self.incidents is None:
            return BaselineConditions(now=self.clock.now(), quiet_s=self.settings.baseline_quiet_s)
        return await self.incidents.baseline_conditions(self.settings.baseline_quiet_s)

    async def _baseline_every(self, interval_s: float) -> None:
        """A baseline at start-up and every `interval_s`, each a tracked task."""
        while True:
            self.tracker.spawn(self.take_baseline(), name="take baseline")
            await asyncio.sleep(interval_s)

    async def _refresh_log(self) -> dict[str, dict[str, Any]]:
        return await refresh_history(self.store) if self.store is not None else {}


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


def watchdog_role(service: Service) -> str:
    """`leader`, `follower` or `off`: which replica runs the watchdog, for operators."""
    if service.leadership is None:
        return "off"
    return "leader" if service.leadership.leader else "follower"


def add_probe_routes(app: web.Application, service: Service) -> None:
    """`/healthz` for the orchestrator (the image's HEALTHCHECK) and `/metrics` for
    Prometheus, the same in HTTP and in Socket Mode."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "pending_tasks": len(service.tracker),
                "pid": os.getpid(),
                "watchdog": watchdog_role(service),
            }
        )

    async def metrics_view(_request: web.Request) -> web.Response:
        resp = web.Response(body=metrics.exposition())
        resp.headers["Content-Type"] = metrics.CONTENT_TYPE
        return resp

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)


def build_web_app(service: Service) -> web.Application:
    bolt = service.slack.app

    verifier = (
        SignatureVerifier(service.settings.slack_signing_secret)
        if service.settings.slack_signing_secret
        else None
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
            service.tracker.spawn(bolt.async_dispatch(early), name="slash command")
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

    async def on_startup(_app: web.Application) -> None:
        await service.start()

    async def on_cleanup(_app: web.Application) -> None:
        await service.stop()

    app = web.Application()
    app.router.add_post("/slack/events", slack_events)
    add_probe_routes(app, service)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve_http(
    settings: Settings, port: int, host: str = "0.0.0.0", reuse_port: bool = False
) -> None:
    settings.require("slack_bot_token", "slack_signing_secret", "database_url")
    service = Service(settings)
    runner = web.AppRunner(build_web_app(service), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    await site.start()
    # Everything loaded so far lives as long as the process: keep it out of the cyclic
    # GC, so that a full collection during a burst of commands does not stall the acks.
    gc.collect()
    gc.freeze()
    log.info("dbops-bot listening on %s:%d (/slack/events, /healthz, /metrics)", host, port)
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()


async def connect_socket(service: Service, app_token: str) -> AsyncSocketModeHandler:
    """Open the Socket Mode connection for a started service (`apps.connections.open`
    goes through the service's Web API client, so SLACK_API_URL applies)."""
    handler = AsyncSocketModeHandler(service.slack.app, app_token)
    await handler.connect_async()  # type: ignore[no-untyped-call]
    return handler


async def serve_socket(settings: Settings, port: int | None = None, host: str = "0.0.0.0") -> None:
    """Socket Mode, plus `/healthz` and `/metrics` on PORT: Slack needs no inbound port,
    but the container's HEALTHCHECK and Prometheus do."""
    settings.require("slack_bot_token", "slack_app_token", "database_url")
    assert settings.slack_app_token is not None
    service = Service(settings)
    await service.start()
    probes = web.Application()
    add_probe_routes(probes, service)
    runner = web.AppRunner(probes, access_log=None)
    handler: AsyncSocketModeHandler | None = None
    try:
        await runner.setup()
        await web.TCPSite(runner, host, port or settings.port).start()
        handler = await connect_socket(service, settings.slack_app_token)
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
        await service.stop()
