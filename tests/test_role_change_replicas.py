"""A role change takes effect now: after `set-role` through one replica, every replica's
next resolve of the changed person answers with the new LEAPS role without waiting for
ROLE_CACHE_TTL_S, and the kept (last known) role is the new one; the outcome says when
ROLE_MAP or a Slack user group still decides the person's role over LEAPS. Two
RoleResolvers on one state store are two replicas: each has its own cache."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from bot.access.roles import RoleResolver
from bot.approvals.executor import Executor
from bot.gateway import TargetGateway
from bot.router import RunContext
from bot.slack.app import make_web_client
from bot.state import StateStore, open_store
from commands.base import LeapsIdentity
from commands.remedies.base import Execution, Outcome, Plan
from commands.remedies.roles import SET_ROLE
from tests.conftest import FAST_THRESHOLDS, bot_settings
from tests.fakeslack import FakeSlack

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
HOUR = 3600.0  # a TTL no test waits for


async def users_of(dsn: str, role: str, n: int) -> list[tuple[str, str, str]]:
    """(id, handle, e-mail) of n LEAPS users of `role`, by id."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            'SELECT id, handle, email FROM users WHERE role = %s::"Role" AND email IS NOT NULL'
            " ORDER BY id LIMIT %s",
            (role, n),
        )
        return [(str(r[0]), str(r[1]), str(r[2])) for r in await cur.fetchall()]


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(leaps_dsn: str) -> AsyncIterator[TargetGateway]:
    opened = TargetGateway(leaps_dsn, connect_timeout_s=2.0)
    yield opened
    await opened.close()


@pytest_asyncio.fixture(loop_scope="session")
async def shared_store(pg_dsn_factory: Callable[[str], str]) -> AsyncIterator[StateStore]:
    """STATE_DATABASE_URL as replicas share it: PostgreSQL."""
    async with await open_store(pg_dsn_factory("replicas")) as store:
        yield store


async def set_role_through(
    resolver: RoleResolver, gateway: TargetGateway, dsn: str, args: list[str], approval: str
) -> tuple[Plan, Outcome]:
    """set-role executed on the replica of `resolver`, with its `finished` hook called as
    the approval engine calls it (after the apply, before the outcome is posted)."""
    ctx = RunContext(gateway, FAST_THRESHOLDS, role_changed=resolver.leaps_role_changed)
    plan = await SET_ROLE.plan(ctx, args)
    ((admin, _h, _e),) = await users_of(dsn, "ADMIN", 1)
    acting = LeapsIdentity(admin, "ADMIN", "a test approver's account")
    state, outcome = await Executor(dsn).apply(SET_ROLE, plan, approval, acting)
    assert state == "done", outcome
    await SET_ROLE.finished(ctx, plan, Execution(approval, "U0APPROVER"), outcome)
    return plan, outcome


async def test_a_set_role_on_one_replica_replaces_the_role_on_the_other_at_once(
    leaps_dsn: str, fake_slack: FakeSlack, gateway: TargetGateway, shared_store: StateStore
) -> None:
    ((_pid, handle, email),) = await users_of(leaps_dsn, "PARTICIPANT", 1)
    fake_slack.add_user("U0PART", email=email.upper())  # Slack keeps its own casing
    settings = bot_settings(leaps_dsn, fake_slack)
    one = RoleResolver({}, make_web_client(settings), gateway, HOUR, store=shared_store)
    two = RoleResolver({}, make_web_client(settings), gateway, HOUR, store=shared_store)
    assert (await one.resolve("U0PART")).role == "PARTICIPANT"
    assert (await two.resolve("U0PART")).role == "PARTICIPANT"
    asked = len(fake_slack.calls_to("users.info"))
    assert (await two.resolve("U0PART")).role == "PARTICIPANT"  # from its cache
    assert len(fake_slack.calls_to("users.info")) == asked

    _plan, outcome = await set_role_through(
        one, gateway, leaps_dsn, [handle, "REVIEWER"], "apv-replicas"
    )
    assert "in the bot" not in outcome.summary  # nothing but LEAPS decides their role
    kept = await shared_store.known_role("U0PART")  # replaced by the hook, before any resolve
    assert kept is not None and (kept.role, kept.source) == ("REVIEWER", "leaps")

    resolved = await two.resolve("U0PART")  # the other replica, well within its TTL
    assert (resolved.role, resolved.source, resolved.stale) == ("REVIEWER", "leaps", False)
    assert (await one.resolve("U0PART")).role == "REVIEWER"
    # Once looked up anew, the other replica answers from its cache again.
    asked = len(fake_slack.calls_to("users.info"))
    assert (await two.resolve("U0PART")).role == "REVIEWER"
    assert len(fake_slack.calls_to("users.info")) == asked


async def test_the_outcome_says_when_role_map_or_a_group_still_wins(
    leaps_dsn: str, fake_slack: FakeSlack, gateway: TargetGateway, shared_store: StateStore
) -> None:
    (mapped, grouped, plain) = await users_of(leaps_dsn, "PARTICIPANT", 3)
    fake_slack.add_user("U0MAPPED", email=mapped[2])
    fake_slack.add_user("U0GROUPED", email=grouped[2])
    fake_slack.add_user("U0PLAIN", email=plain[2])
    fake_slack.set_usergroup("S0ONCALL", ["U0GROUPED"])
    settings = bot_settings(leaps_dsn, fake_slack)
    resolver = RoleResolver(
        {"U0MAPPED": "ADMIN"},
        make_web_client(settings),
        gateway,
        HOUR,
        role_groups={"S0ONCALL": "ADMIN"},
        store=shared_store,
    )
    handles = [mapped[1], grouped[1], plain[1]]
    _plan, outcome = await set_role_through(
        resolver, gateway, leaps_dsn, [*handles, "REVIEWER"], "apv-wins"
    )
    assert (
        f"`{mapped[1]}`: ROLE_MAP gives Slack user U0MAPPED the role ADMIN, which still "
        "wins over the new LEAPS role REVIEWER in the bot"
    ) in outcome.summary
    assert (
        f"`{grouped[1]}`: the Slack user group S0ONCALL gives Slack user U0GROUPED the role "
        "ADMIN, which still wins over the new LEAPS role REVIEWER in the bot"
    ) in outcome.summary
    assert f"`{plain[1]}`:" not in outcome.summary
    assert (await resolver.resolve("U0MAPPED")).role == "ADMIN"
    assert (await resolver.resolve("U0GROUPED")).role == "ADMIN"
    assert (await resolver.resolve("U0PLAIN")).role == "REVIEWER"


async def test_a_failed_set_role_changes_no_role_in_the_bot(
    leaps_dsn: str, fake_slack: FakeSlack, gateway: TargetGateway, shared_store: StateStore
) -> None:
    ((_pid, handle, email),) = await users_of(leaps_dsn, "PARTICIPANT", 1)
    fake_slack.add_user("U0PART", email=email)
    settings = bot_settings(leaps_dsn, fake_slack)
    resolver = RoleResolver({}, make_web_client(settings), gateway, HOUR, store=shared_store)
    assert (await resolver.resolve("U0PART")).role == "PARTICIPANT"
    ctx = RunContext(gateway, FAST_THRESHOLDS, role_changed=resolver.leaps_role_changed)
    plan = await SET_ROLE.plan(ctx, [handle, "REVIEWER"])
    failed = Outcome(ok=False, summary="the database refused: …")
    await SET_ROLE.finished(ctx, plan, Execution("apv-refused", "U0APPROVER"), failed)
    assert failed.summary == "the database refused: …"
    assert await shared_store.role_change_version(email) == 0
    kept = await shared_store.known_role("U0PART")
    assert kept is not None and kept.role == "PARTICIPANT"


# --- the state store, on SQLite and PostgreSQL --------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite3'}"
    factory: Callable[[str], str] = request.getfixturevalue("pg_dsn_factory")
    return factory("role_changes")


async def test_a_change_bumps_the_version_and_replaces_only_roles_read_from_leaps(
    state_url: str,
) -> None:
    async with await open_store(state_url) as store:
        mail = "Ada@Example.org"
        await store.remember_role("U0ADA", role="PARTICIPANT", source="leaps", email=mail, at=T0)
        await store.remember_role("U0ADA2", role="PARTICIPANT", source="default", email=mail)
        await store.remember_role("U0GRP", role="ADMIN", source="group", detail="S0ONCALL")
        await store.remember_role("U0OTHER", role="PARTICIPANT", source="leaps", email="b@x.org")
        assert await store.role_change_version("ada@example.org") == 0
        version, known = await store.leaps_role_changed(" ADA@example.org", "REVIEWER", at=T0)
        assert version == 1 and await store.role_change_version(mail) == 1
        assert [(k.user_id, k.role, k.source, k.email) for k in known] == [
            ("U0ADA", "REVIEWER", "leaps", "ada@example.org"),
            ("U0ADA2", "REVIEWER", "leaps", "ada@example.org"),
        ]
        group = await store.known_role("U0GRP")
        assert group is not None and (group.role, group.email) == ("ADMIN", None)
        other = await store.known_role("U0OTHER")
        assert other is not None and other.role == "PARTICIPANT"
        second, _ = await store.leaps_role_changed(mail, "ADMIN")
        assert second == 2


async def test_a_role_read_before_the_change_does_not_overwrite_it(state_url: str) -> None:
    """A replica read the old role from LEAPS just before the change committed: it saw
    version 0, so keeping what it read is refused, and the change's row stays."""
    async with await open_store(state_url) as store:
        mail = "ada@example.org"
        seen = await store.role_change_version(mail)
        await store.remember_role("U0ADA", role="PARTICIPANT", source="leaps", email=mail)
        await store.leaps_role_changed(mail, "REVIEWER")
        kept_old = await store.remember_role(
            "U0ADA", role="PARTICIPANT", source="leaps", email=mail, seen_version=seen
        )
        assert kept_old is False
        row = await store.known_role("U0ADA")
        assert row is not None and row.role == "REVIEWER"
        now = await store.role_change_version(mail)
        assert await store.remember_role(
            "U0ADA", role="REVIEWER", source="leaps", email=mail, seen_version=now
        )
