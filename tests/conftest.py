"""Real parts for every test: a PostgreSQL the tests start, a fake Slack Web API, the bot.

The PostgreSQL server is the embedded one the demo uses (system binaries, root
privileges dropped). The LEAPS fixture is built once into a template database;
a test that changes data gets its own copy (`CREATE DATABASE … TEMPLATE`).
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from bot.embedded_pg import EmbeddedPostgres
from bot.gateway import TargetGateway
from bot.house import House
from bot.router import RunContext
from bot.settings import Settings
from bot.slack.app import SlackFrontend
from bot.slack.server import build_web_app, slack_bot
from bot.state import StateStore, open_store
from bot.state.baselines import StoreBaselines
from commands.base import Thresholds
from commands.fixture.faults import FaultInjector
from commands.fixture.seed import build_fixture
from tests.fakeslack import FakeSlack
from tests.slackreq import SIGNING_SECRET, signed_headers, slash_body

TEMPLATE_DB = "leaps_template"
# Faults a few seconds old count as old, so tests need not wait minutes.
FAST_THRESHOLDS = Thresholds(
    idle_in_tx_warn_s=0.5, idle_in_tx_crit_s=1.0, blocked_crit_s=1.0, idle_session_warn_s=3600.0
)
_names = itertools.count()
pytest_plugins = ["tests.leakcheck"]

# `make test` runs the suite in pytest-xdist workers. Each worker is its own process with its
# own PostgreSQL server (the session fixture `pg`: roles, role settings, session kills and
# statistics are cluster-wide, so tests sharing a server would not be isolated) and its own
# temporary directory for what the bot writes in-process (tests count the export files there).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if WORKER:
    tempfile.tempdir = tempfile.mkdtemp(prefix=f"dbops-tests-{WORKER}-")
    os.chmod(tempfile.tempdir, 0o755)  # tests run bots as other users with files in there


# The files holding the longest tests (processes started, servers failed over, timers run
# out) go first: pytest-xdist hands tests out in collection order, and a long test dealt
# last keeps the whole run waiting on one worker while the others idle.
SLOW_FIRST = (
    "test_demo_keep.py",
    "test_multiprocess.py",
    "test_leaks.py",
    "test_incident_comms.py",
    "test_incidents.py",
    "test_watchdog.py",
    "test_faults.py",
    "test_cli.py",
    "test_deploy.py",
    "test_exactly_once.py",
    "test_authz_matrix.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the same order on every worker, as xdist requires


def pytest_collection_finish(session: pytest.Session) -> None:
    """What is imported by now (the bot, its libraries, the test modules) lives as long as
    the session: out of the cyclic GC's reach, as the bot does after start-up
    (bot/slack/server.py), so the full collections the tests cause do not walk it again and
    again. Objects the tests create are collected as before."""
    gc.collect()
    gc.freeze()


def pytest_unconfigure(config: pytest.Config) -> None:
    if WORKER and tempfile.tempdir is not None:
        shutil.rmtree(tempfile.tempdir, ignore_errors=True)


# Each test gets its own copy of the fixture database, a few hundred per server: autovacuum
# would visit every one of them, again and again, for most of the server's CPU. No test
# relies on it (the checks that read vacuum statistics get their rows from the test).
TEST_SERVER_SETTINGS = {"autovacuum": "off"}


def memory_dir() -> Path | None:
    """Where the test servers keep their data: in memory (/dev/shm) when there is room. Each
    test's database is a file copy of the fixture; on disk, the kernel wrote every copy back
    (gigabytes a run, and most of the run-to-run spread in system time). None: the default."""
    shm = Path("/dev/shm")
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return None
    return shm if shm.is_dir() and os.access(shm, os.W_OK) and free > 4 * 2**30 else None


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres]:
    from tests import leakcheck  # the plugin (pytest_plugins): imported by pytest first

    server = EmbeddedPostgres(base_dir=memory_dir(), settings=TEST_SERVER_SETTINGS)
    leakcheck.secret(server.password, "the test PostgreSQL password")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_dsn_factory(pg: EmbeddedPostgres) -> Callable[[str], str]:
    """A DSN for a new, empty database with a unique name derived from the one asked."""

    def make(name: str) -> str:
        return pg.create_database(f"{name}_{next(_names)}")

    return make


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def leaps_template(pg: EmbeddedPostgres) -> str:
    dsn = pg.create_database(TEMPLATE_DB)
    await build_fixture(dsn, users=200)
    return TEMPLATE_DB


@pytest.fixture
def leaps_dsn(pg: EmbeddedPostgres, leaps_template: str) -> Iterator[str]:
    """A fresh copy of the LEAPS fixture for one test, dropped after it (the servers keep
    their data in memory)."""
    name = f"leaps_{next(_names)}"
    yield pg.create_database(name, template=leaps_template)
    pg.drop_database(name)


@pytest_asyncio.fixture(loop_scope="session")
async def faults(leaps_dsn: str) -> AsyncIterator[FaultInjector]:
    async with FaultInjector(leaps_dsn) as injector:
        yield injector


@pytest_asyncio.fixture(loop_scope="session")
async def fake_slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake


STATE_DIR = Path(tempfile.mkdtemp(prefix="dbops-test-state-"))
STATE_TEMPLATE = STATE_DIR / "template.sqlite3"


@pytest_asyncio.fixture(scope="session", loop_scope="session", autouse=True)
async def state_template() -> None:
    """A state store migrated once per session. Each bot's own state file starts as a copy
    (`fresh_state_url`), where Alembic finds the schema at head, instead of replaying every
    migration for every bot (the migrations have their own tests)."""
    store = await open_store(f"sqlite:///{STATE_TEMPLATE}")
    await store.close()
    assert not STATE_TEMPLATE.with_name(f"{STATE_TEMPLATE.name}-wal").exists()


def fresh_state_url() -> str:
    """A new SQLite state file of its own, as migrated as the template (if built yet)."""
    path = STATE_DIR / f"state-{next(_names)}.sqlite3"
    if STATE_TEMPLATE.exists():
        shutil.copyfile(STATE_TEMPLATE, path)
    return f"sqlite:///{path}"


# Every command needs its own role (REVIEWER for the diagnostics), whatever DIAGNOSTICS_ROLE
# says: the users the tests send commands as are REVIEWERs by default (a burst uses U0000…).
TEST_REVIEWERS = {"U0ALICE": "REVIEWER", "U0SOCKET": "REVIEWER"} | {
    f"U{i:04d}": "REVIEWER" for i in range(100)
}


def bot_settings(database_url: str, fake: FakeSlack, **overrides: Any) -> Settings:
    """Settings of a bot under test: its own SQLite state file, roles from the map only
    (tests that need Slack-profile roles add users to the fake), TEST_REVIEWERS by default."""
    values: dict[str, Any] = {
        "state_database_url": fresh_state_url(),
        "diagnostics_role": "PARTICIPANT",
        "role_map": TEST_REVIEWERS,
        "slack_bot_token": "xoxb-test-token",
        "slack_signing_secret": SIGNING_SECRET,
        "slack_api_url": fake.api_url,
        "database_url": database_url,
        "thresholds": FAST_THRESHOLDS,
        "connect_timeout_s": 2.0,
        "baseline_interval_s": 0,  # tests that want /db recover's baselines turn it on
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class RunningBot:
    url: str
    service: House  # every part of the bot (`bot.house`)
    slack: SlackFrontend  # its Bolt listeners
    fake: FakeSlack
    http: aiohttp.ClientSession

    async def slash(
        self, text: str, *, channel: str = "C0GENERAL", user: str = "U0ALICE", **kw: Any
    ) -> aiohttp.ClientResponse:
        body = slash_body(
            text, channel=channel, user=user, response_url=self.fake.response_url(user)
        )
        headers = signed_headers(body, **kw)
        resp = await self.http.post(f"{self.url}/slack/events", data=body, headers=headers)
        await resp.read()
        return resp


BotFactory = Callable[..., Awaitable[RunningBot]]


@asynccontextmanager
async def running_bot(settings: Settings, fake: FakeSlack) -> AsyncIterator[RunningBot]:
    async with slack_bot(settings) as built:
        runner = web.AppRunner(build_web_app(built), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            async with aiohttp.ClientSession() as http:
                yield RunningBot(f"http://127.0.0.1:{port}", built.house, built.slack, fake, http)
        finally:
            await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def bot(leaps_dsn: str, fake_slack: FakeSlack) -> AsyncIterator[RunningBot]:
    async with running_bot(bot_settings(leaps_dsn, fake_slack), fake_slack) as running:
        yield running


# The audit trail in both forms (LEAPS_SCHEMA.md, Audit): the fixture's function supplies
# the id itself; production's inserts without one over a column with no default, so every
# write made with app.user_id set is refused. Row-writing remedies are tested on both.
AUDIT_VARIANTS = ("fixture", "production")


@pytest.fixture(params=AUDIT_VARIANTS)
def audit_variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def make_audit_variant(dsn: str, variant: str) -> None:
    """Give the LEAPS copy at `dsn` the audit trail `variant` ("fixture": as built)."""
    if variant == "production":
        async with FaultInjector(dsn) as injector:
            await injector.production_audit_trail()


# A state store of the test's own, and the run context of the recovery tests on it (their
# baselines live there): test_recover, test_recover_figures, test_recovery_remedies.
@pytest_asyncio.fixture(loop_scope="session")
async def store() -> AsyncIterator[StateStore]:
    opened = await open_store(fresh_state_url())  # a copy of the migrated template
    yield opened
    await opened.close()


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str, store: StateStore) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn)
    yield RunContext(gateway, FAST_THRESHOLDS, baselines=StoreBaselines(store))
    await gateway.close()
