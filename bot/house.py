"""The composition root: every service of the bot built once, in dependency order, from
`Settings` and a `Frontend`, and torn down in reverse.

Slack (`bot.slack.server`), the console (`bot.console.console`, `python -m bot run`) and the
demo (`bot.console.demo_incident`) each build their bot here; they differ only in their
`Frontend`: how approvals and incidents speak (Slack messages or printed lines), the
incidents' clock, the Slack client the roles read profiles and groups through, and whether
the bot serves (timers: the sweeper, SLA ticks, the watchdog's schedule, baselines).

Nothing is handed into a built service afterwards and no part is `None`; what a mode lacks
is an explicit null object: a one-off run without STATE_DATABASE_URL gets a state store
that keeps nothing (in memory: no state file is created), WATCHDOG_INTERVAL_S=0 an "off"
watchdog. Hooks between services are passed as they are built: the incident service gets
its communications (the summary on resolve, template posts retried every tick) from
`IncidentComms`, which builds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from bot.access.roles import RoleResolver, refusal
from bot.approvals.engine import ApprovalEngine, refresh_history
from bot.approvals.executor import executor_from_settings
from bot.approvals.runbook import runbook_status
from bot.clock import Clock
from bot.gateway import TargetGateway, gateway_from_settings, normalise_scheme
from bot.incidents.comms import IncidentComms, Publisher
from bot.incidents.leader import leadership_for
from bot.incidents.service import IncidentHooks, IncidentService, IncidentSlack
from bot.incidents.watchdog import OffWatchdog, Watchdog
from bot.messages.notify import Notifier
from bot.router import Dispatcher, RunContext
from bot.settings import Settings
from bot.state import IncidentStore, StateStore, open_store
from bot.state.baselines import StoreBaselines
from bot.state.watchdog import WatchdogStore
from bot.tasks import TaskTracker
from commands.recover import BaselineConditions, take_baseline
from commands.remedies.freeze import freeze_state

if TYPE_CHECKING:  # the Slack stack loads where Slack is served, not for a console run
    from slack_sdk.web.async_client import AsyncWebClient


log = logging.getLogger(__name__)


def bot_roles(settings: Settings) -> tuple[str, ...]:
    """The database roles the bot logs in as: the users of DATABASE_URL, ADMIN_DATABASE_URL
    and STATE_DATABASE_URL when that is PostgreSQL (user names only, never passwords). A
    URL that names no user logs in as libpq's default; the freeze's plan adds its own
    connection's `current_user` for that."""
    found: list[str] = []
    for url in (settings.database_url, settings.admin_database_url):
        if not url:
            continue
        try:
            user = conninfo_to_dict(normalise_scheme(url)).get("user")
        except psycopg.ProgrammingError:
            log.warning("cannot read the user name of a database URL")
            continue
        if user:
            found.append(str(user))
    if settings.state_database_url:
        try:
            state = make_url(settings.state_database_url)
        except ArgumentError:
            log.warning("cannot read the user name of STATE_DATABASE_URL")
        else:
            if state.get_backend_name() == "postgresql" and state.username:
                found.append(state.username)
    return tuple(dict.fromkeys(found))


# The state store of a one-off run without STATE_DATABASE_URL: SQLite in memory, gone with
# the process (no state file is created).
KEEPS_NOTHING = "sqlite://"


@dataclass(frozen=True)
class Frontend:
    """What differs between Slack, the console and the demo."""

    notifier: Notifier  # approvals: the request, the plan, its updates
    publisher: Publisher  # incident templates and summaries
    incident_slack: IncidentSlack  # incident headers, reminders, the watchdog's posts
    clock: Clock  # the incidents' and the watchdog's time (approvals keep system time)
    # Slack profiles and user groups for roles and `/db quota @user`; None: ROLE_MAP only.
    slack_client: AsyncWebClient | None = None
    # A serving bot: the target's pool opened at start, approvals recovered, the sweeper,
    # SLA ticks, the watchdog's schedule and the baselines run on timers.
    serves: bool = False


class House:
    """Every service of one bot, built in dependency order (see `build_house`)."""

    def __init__(
        self,
        settings: Settings,
        frontend: Frontend,
        gateway: TargetGateway,
        store: StateStore,
        recovery_copy: TargetGateway | None = None,
    ) -> None:
        self.settings = settings
        self.frontend = frontend
        self.clock = frontend.clock
        self.gateway = gateway
        self.store = store
        self.tracker = TaskTracker()
        self.roles = RoleResolver(
            settings.role_map,
            frontend.slack_client,
            gateway,
            settings.role_cache_ttl_s,
            role_groups=settings.role_groups,
            stale_max_s=settings.role_stale_max_s,
            store=store,  # resolved roles are kept for outages
        )
        self.executor = executor_from_settings(settings)
        # The incident store joins every audited approval step in a channel with an active
        # incident to its timeline.
        incident_store = IncidentStore.attach(store, frontend.clock)
        self.ctx = RunContext(
            gateway,
            settings.thresholds,
            allow_superuser_kill=settings.allow_superuser_kill,
            refresh_log=partial(refresh_history, store),
            service_identity=settings.service_identity,
            baselines=StoreBaselines(store, settings.baseline_keep_days),
            # `/db quota @user` reads the profile e-mail (not on the console: no Slack)
            slack_email=self.roles.email_of if frontend.slack_client is not None else None,
            role_changed=self.roles.leaps_role_changed,  # set-role takes effect everywhere
            app_roles=tuple(settings.app_roles),
            recovery_copy=recovery_copy,  # RECOVERY_DATABASE_URL, read only
            bot_roles=bot_roles(settings),  # a freeze never sets them read only
            runbook_status=partial(runbook_status, store),  # `/db recover --status`
            incident_detection=incident_store.first_detection,  # restore-from-copy --until
        )
        self.dispatcher = Dispatcher(self.ctx, coalesce_s=settings.coalesce_s)
        self.engine = ApprovalEngine(
            settings, store, self.ctx, self.executor, frontend.notifier, self.roles
        )
        self.comms = IncidentComms(
            partial(self._incident_service, incident_store),
            frontend.publisher,
            settings.template_dir,
            self._may_post,
        )
        self.incidents: IncidentService = self.comms.incidents
        self.watchdog: Watchdog | OffWatchdog = self._watchdog()
        self._timers: list[asyncio.Task[None]] = []

    def _incident_service(self, store: IncidentStore, hooks: IncidentHooks) -> IncidentService:
        return IncidentService(
            store,
            self.frontend.incident_slack,
            self.settings.sla,
            oncall_groups=list(self.settings.role_groups),
            hooks=hooks,
            # while writes are frozen the commander is reminded every FREEZE_REMIND_S
            freeze=partial(self.gateway.read, partial(freeze_state, self.ctx.app_roles)),
            freeze_remind_s=self.settings.freeze_remind_s,
        )

    def _watchdog(self) -> Watchdog | OffWatchdog:
        """Health on a schedule on every replica; only the one holding the leader lock
        ticks (and takes the baselines)."""
        settings = self.settings
        if settings.watchdog_interval_s <= 0:
            return OffWatchdog()
        if self.frontend.serves and not settings.ops_channel:
            log.warning("OPS_CHANNEL is not set: the watchdog checks health but posts nothing")
        return Watchdog(
            self.dispatcher,
            WatchdogStore(self.store),
            self.frontend.incident_slack,
            ops_channel=settings.ops_channel or None,
            incidents=self.incidents,
            opens_incident=settings.watchdog_opens_incident,
            severity=settings.watchdog_incident_severity,
            clock=self.clock,
            baseline=self._baseline_hook(),
            baseline_interval_s=settings.baseline_interval_s,
            leadership=leadership_for(settings.state_database_url),
            interval_s=settings.watchdog_interval_s,
        )

    def _baseline_hook(self) -> Callable[[], Awaitable[object]] | None:
        """The hourly baseline snapshot `/db recover` compares against, taken by the
        watchdog's leader (BASELINE_INTERVAL_S; 0: never)."""
        if self.settings.baseline_interval_s <= 0:
            return None

        async def tracked() -> None:
            # a tracked task: shutdown drains it like any other work
            await self.tracker.spawn(self.take_baseline(), name="take baseline")

        return tracked

    # -- serving ------------------------------------------------------------------------------

    def start_timers(self) -> None:
        """A serving bot's background work: approvals left behind, the sweeper, the SLA
        ticks, the watchdog, and the baselines when no watchdog takes them."""
        settings = self.settings
        self.tracker.spawn(self.engine.recover(), name="recover approvals")
        loop = asyncio.get_running_loop()
        self._timers.append(
            loop.create_task(self._sweep_every(settings.sweep_interval_s), name="sweep timer")
        )
        self._timers.append(
            loop.create_task(self._incident_ticks(settings.incident_tick_s), name="incident timer")
        )
        self._timers.append(loop.create_task(self.watchdog.run(), name="watchdog"))
        if isinstance(self.watchdog, OffWatchdog) and settings.baseline_interval_s > 0:
            # no watchdog to take the baselines: every replica takes its own
            self._timers.append(
                loop.create_task(
                    self._baseline_every(settings.baseline_interval_s), name="baseline timer"
                )
            )

    async def stop_timers(self) -> None:
        """The timers cancelled (the watchdog's `finally` gives the leader lock back), then
        the work they started drained."""
        timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        for timer in timers:
            with contextlib.suppress(asyncio.CancelledError):
                await timer
        await self.tracker.drain()

    async def _sweep_every(self, interval_s: float) -> None:
        """A sweep at start-up and every `interval_s`, each a tracked task (a failed one is
        logged by the tracker and never stops the next)."""
        while True:
            self.tracker.spawn(self.engine.sweep(), name="sweep executing approvals")
            await asyncio.sleep(interval_s)

    async def _incident_ticks(self, interval_s: float) -> None:
        """SLA reminders and header clocks, every `interval_s` (each tick a tracked task).

        A tick still running when the next is due is not doubled: under a slow state store
        or Slack, ticks would otherwise pile up behind each other."""
        running: asyncio.Task[Any] | None = None
        while True:
            await asyncio.sleep(interval_s)
            if running is None or running.done():
                running = self.tracker.spawn(self.incidents.tick(), name="incident tick")

    async def _baseline_every(self, interval_s: float) -> None:
        """A baseline at start-up and every `interval_s`, each a tracked task."""
        while True:
            self.tracker.spawn(self.take_baseline(), name="take baseline")
            await asyncio.sleep(interval_s)

    # -- what several frontends ask ------------------------------------------------------------

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
        return await self.incidents.baseline_conditions(self.settings.baseline_quiet_s)


@asynccontextmanager
async def build_house(
    settings: Settings, frontend: Frontend, *, keeps_state: bool = True
) -> AsyncIterator[House]:
    """The bot, built in order (target gateway, state store, roles, executor, approval
    engine, incidents and their comms, watchdog), serving while the block runs when the
    frontend serves, and torn down in reverse. `keeps_state=False` (a one-off run): without
    STATE_DATABASE_URL the state store keeps nothing, so no state file is created."""
    settings.require("database_url")
    async with AsyncExitStack() as stack:
        gateway = gateway_from_settings(settings)
        stack.push_async_callback(gateway.close)
        if frontend.serves:
            await gateway.open()
        recovery_copy = None
        if settings.recovery_database_url:  # opened on first use: it may not exist yet
            recovery_copy = gateway_from_settings(settings, settings.recovery_database_url)
            stack.push_async_callback(recovery_copy.close)
        url = settings.state_database_url
        store = await open_store(url if url or keeps_state else KEEPS_NOTHING)
        stack.push_async_callback(store.close)
        house = House(settings, frontend, gateway, store, recovery_copy)
        stack.push_async_callback(house.stop_timers)
        if frontend.serves:
            house.start_timers()
        yield house
