"""Roles: ROLE_MAP, then Slack user groups, then LEAPS `users.role` through the Slack profile
e-mail (case-insensitive, cached), unknown users the lowest role; the last role resolved kept
in the state store, counting for diagnostics (never for requesting or approving) while the
target cannot answer; every command's own role enforced."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bot.access.roles import RoleResolver
from bot.embedded_pg import EmbeddedPostgres
from bot.gateway import TargetGateway
from bot.slack.app import make_web_client
from bot.state import open_store
from commands.base import REGISTRY, Command, Context, Finding, Report, Status
from tests.conftest import STATE_DIR, bot_settings, running_bot
from tests.fakeslack import Call, FakeSlack
from tests.test_approvals import CHANNEL, Victims, button_value, press, request, settle
from tests.test_health_e2e import crit_checks

ADMIN_ONLY = "admin-probe"


async def leaps_email(dsn: str, role: str) -> str:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            'SELECT email FROM users WHERE role = %s::"Role" ORDER BY id LIMIT 1', (role,)
        )
        row = await cur.fetchone()
        assert row is not None, f"the fixture has no {role}"
        return str(row[0])


async def answer_to(fake: FakeSlack, user: str) -> Call:
    """What `user` was told: a report (chat.postEphemeral) or a refusal (response_url)."""

    def mine(call: Call) -> bool:
        if call.method == "chat.postEphemeral":
            return call.params.get("user") == user
        return call.method == "response_url" and call.path.endswith("/" + user)

    for _ in range(300):
        found = [c for c in fake.calls if mine(c)]
        if found:
            return found[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{user} was told nothing")


async def leaps_email_other(dsn: str, role: str, but_not: str) -> str:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            'SELECT email FROM users WHERE role = %s::"Role" AND email <> %s ORDER BY id LIMIT 1',
            (role, but_not),
        )
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])


async def answer_to_url(fake: FakeSlack, user: str) -> Call:
    (call, *_) = await fake.wait_for(
        "response_url", timeout=15, predicate=lambda c: c.path.endswith("/" + user)
    )
    return call


def told(call: Call) -> str:
    return str(call.params.get("text", ""))


@pytest.fixture
def admin_only_command() -> Iterator[str]:
    """A diagnostic that needs ADMIN, registered for one test only."""

    async def diagnose(ctx: Context, args: list[str]) -> Report:
        finding = Finding(check="admin probe", status=Status.OK, summary="only admins see this")
        return Report(title="Admin probe", target=ctx.gateway.target, findings=[finding])

    REGISTRY[ADMIN_ONLY] = Command(ADMIN_ONLY, f"/db {ADMIN_ONLY}", "test", "ADMIN", diagnose)
    try:
        yield ADMIN_ONLY
    finally:
        del REGISTRY[ADMIN_ONLY]


async def test_roles_from_slack_email_map_and_default(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    reviewer_email = await leaps_email(leaps_dsn, "REVIEWER")
    fake_slack.add_user("U0MAILREV", email=reviewer_email.upper())  # case must not matter
    fake_slack.add_user("U0STRANGER", email="nobody@example.org")
    settings = bot_settings(
        leaps_dsn, fake_slack, diagnostics_role="REVIEWER", role_map={"U0MAPPED": "ADMIN"}
    )
    async with running_bot(settings, fake_slack) as bot:
        roles = bot.service.roles
        assert await roles.role_of("U0MAILREV") == "REVIEWER"
        assert await roles.role_of("U0MAILREV") == "REVIEWER"
        assert len(fake_slack.calls_to("users.info")) == 1  # cached
        assert await roles.role_of("U0STRANGER") == "PARTICIPANT"
        assert await roles.role_of("U0GHOST") == "PARTICIPANT"  # users.info: user_not_found
        assert await roles.role_of("U0MAPPED") == "ADMIN"
        assert not [c for c in fake_slack.calls_to("users.info") if c.params["user"] == "U0MAPPED"]
        assert (await roles.resolve("U0MAILREV")).source == "leaps"
        assert (await roles.resolve("U0STRANGER")).source == "default"

        await bot.slash("health", user="U0MAILREV")
        await fake_slack.wait_for("chat.postEphemeral", timeout=15)
        await bot.slash("health", user="U0STRANGER")
        refused = told(await answer_to(fake_slack, "U0STRANGER"))
        assert "You need the role REVIEWER" in refused
        assert "yours is PARTICIPANT" in refused
        assert "no LEAPS user has your Slack e-mail" in refused

        # every lookup that answered is kept, with where it came from and when
        store = bot.service.store
        assert store is not None
        kept = await store.known_role("U0MAILREV")
        assert kept is not None and (kept.role, kept.source) == ("REVIEWER", "leaps")
        assert datetime.now(UTC) - kept.resolved_at < timedelta(minutes=1)
        stranger = await store.known_role("U0STRANGER")
        assert stranger is not None
        assert (stranger.role, stranger.source) == ("PARTICIPANT", "default")


async def test_user_groups_give_the_highest_role_and_every_command_role_is_enforced(
    leaps_dsn: str, fake_slack: FakeSlack, admin_only_command: str
) -> None:
    admin_email = await leaps_email(leaps_dsn, "ADMIN")
    fake_slack.set_usergroup("S0ONCALL", ["U0GRP"])
    fake_slack.set_usergroup("S0REVIEW", ["U0GRP", "U0REV", "U0LEAPSADMIN"])
    # a LEAPS ADMIN who is also in a REVIEWER group: the group comes first
    fake_slack.add_user("U0LEAPSADMIN", email=admin_email)
    settings = bot_settings(
        leaps_dsn,
        fake_slack,
        diagnostics_role="REVIEWER",
        role_map={"U0MAPADMIN": "ADMIN", "U0MAPREV": "REVIEWER"},
        role_groups={"S0ONCALL": "admin", "S0REVIEW": "REVIEWER"},
    )
    async with running_bot(settings, fake_slack) as bot:
        for user in ("U0GRP", "U0REV", "U0LEAPSADMIN", "U0MAPADMIN", "U0MAPREV"):
            await bot.slash(admin_only_command, user=user)
        admitted = {"U0GRP", "U0MAPADMIN"}
        for user in admitted:
            report = await answer_to(fake_slack, user)
            assert report.method == "chat.postEphemeral", told(report)
            assert "only admins see this" in str(report.params["blocks"])
        refusals = {u: told(await answer_to(fake_slack, u)) for u in ("U0REV", "U0LEAPSADMIN")}
        refusals["U0MAPREV"] = told(await answer_to(fake_slack, "U0MAPREV"))
        for user, text in refusals.items():
            assert "You need the role ADMIN for this; yours is REVIEWER" in text, (user, text)
        assert "from the Slack user group S0REVIEW" in refusals["U0REV"]
        assert "from ROLE_MAP" in refusals["U0MAPREV"]
        # health needs only REVIEWER: the group member of S0REVIEW gets it
        await bot.slash("health", user="U0REV")
        await fake_slack.wait_for(
            "chat.postEphemeral", timeout=15, predicate=lambda c: c.params["user"] == "U0REV"
        )
        # one usergroups.users.list per group for every user and command within the TTL
        listed = [c.params["usergroup"] for c in fake_slack.calls_to("usergroups.users.list")]
        assert sorted(listed) == ["S0ONCALL", "S0REVIEW"]
        assert bot.service.store is not None
        kept = await bot.service.store.known_role("U0GRP")
        assert kept is not None
        assert (kept.role, kept.source, kept.detail) == ("ADMIN", "group", "S0ONCALL")


def _dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


@asynccontextmanager
async def target_down(dsn: str) -> AsyncIterator[None]:
    """The target refuses every connection (as during an outage), restored afterwards."""
    name = sql.Identifier(_dbname(dsn))
    admin_dsn = make_conninfo(dsn, dbname="postgres")
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (_dbname(dsn),),
        )
        try:
            yield
        finally:
            await admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))


async def test_during_an_outage_known_people_diagnose_but_never_approve(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    admin_email = await leaps_email(leaps_dsn, "ADMIN")
    other_admin = await leaps_email_other(leaps_dsn, "ADMIN", admin_email)
    fake_slack.add_user("U0OPS", email=admin_email)
    fake_slack.add_user("U0NEW", email=other_admin)
    fake_slack.add_user("U0OLD", email=other_admin)
    state = f"sqlite:///{STATE_DIR}/outage-{_dbname(leaps_dsn)}.sqlite3"
    settings = bot_settings(
        leaps_dsn,
        fake_slack,
        state_database_url=state,
        diagnostics_role="REVIEWER",
        role_map={"U0REQ": "REVIEWER"},
    )
    victims = Victims(leaps_dsn)
    try:
        # Before the outage: U0OPS is an ADMIN by LEAPS, and a kill-idle waits for approval.
        async with running_bot(settings, fake_slack) as bot:
            assert await bot.service.roles.role_of("U0OPS") == "ADMIN"
            await victims.open(1)
            await asyncio.sleep(0.3)
            plan = await request(bot, "kill-idle 0", user="U0REQ")
            approval_id = button_value(plan).split(".")[0]
        fake_slack.reset()

        async with target_down(leaps_dsn), running_bot(settings, fake_slack) as bot:
            store = bot.service.store
            assert store is not None
            long_ago = datetime.now(UTC) - timedelta(seconds=settings.role_stale_max_s + 60)
            await store.remember_role("U0OLD", role="ADMIN", source="leaps", at=long_ago)

            # the known person is answered, and told nothing about roles
            await bot.slash("health", user="U0OPS")
            report = await answer_to(fake_slack, "U0OPS")
            assert report.method == "chat.postEphemeral", told(report)
            assert crit_checks(report) == {"reachability"}
            assert not [c for c in fake_slack.calls_to("response_url") if "U0OPS" in c.path]
            resolved = await bot.service.roles.resolve("U0OPS")
            assert resolved.stale and resolved.role == "ADMIN" and resolved.source == "leaps"

            # ... but the same stale ADMIN cannot approve
            await press(bot, plan, "U0OPS")
            await settle(bot)
            approval = await store.get_approval(approval_id)
            assert approval is not None and approval.state == "pending"
            clicked = [told(c) for c in fake_slack.calls_to("chat.postEphemeral")]
            stale = "needs the role ADMIN, checked now; yours is ADMIN, the last known role from"
            assert any(stale in t and "the LEAPS database" in t for t in clicked), clicked
            trail = await store.audit_trail(approval_id)
            refused = [e for e in trail if e.action == "approval.refused"]
            assert refused and refused[-1].detail["role"] == "PARTICIPANT"

            # ... nor request a remedy
            await bot.slash("kill-idle 0", channel=CHANNEL, user="U0OPS")
            asked = told(await answer_to_url(fake_slack, "U0OPS"))
            assert "You need the role REVIEWER, checked now" in asked
            assert "the last known role from" in asked
            assert "the LEAPS database did not answer" in asked

            # a never-seen person, and one last seen too long ago, are refused clearly
            for user in ("U0NEW", "U0OLD"):
                await bot.slash("health", user=user)
                text = told(await answer_to(fake_slack, user))
                assert "You need the role REVIEWER for this; yours is PARTICIPANT" in text, text
                assert "the LEAPS database did not answer" in text
                assert "no role of yours is known from the last 24 h" in text
            await settle(bot)
        # a role that could not be checked is never written back over the last known one
        async with await open_store(state) as reopened:
            kept = await reopened.known_role("U0OPS")
            assert kept is not None and (kept.role, kept.source) == ("ADMIN", "leaps")
            assert await reopened.known_role("U0NEW") is None
    finally:
        await victims.close()


async def test_slack_failing_falls_back_to_the_last_known_role(
    leaps_dsn: str, fake_slack: FakeSlack, tmp_path: Path
) -> None:
    fake_slack.set_usergroup("S0ONCALL", ["U0GRP"])
    settings = bot_settings(leaps_dsn, fake_slack, role_groups={"S0ONCALL": "ADMIN"})
    gateway = TargetGateway(leaps_dsn, connect_timeout_s=2.0)
    async with await open_store(f"sqlite:///{tmp_path}/roles.sqlite3") as store:
        fresh = RoleResolver(
            {}, make_web_client(settings), gateway, role_groups=settings.role_groups, store=store
        )
        assert (await fresh.resolve("U0GRP")).role == "ADMIN"
        # a new process while Slack answers 500 to everything (the SDK retries twice)
        fake_slack.fail_next("usergroups.users.list", status=500, times=3)
        later = RoleResolver(
            {}, make_web_client(settings), gateway, role_groups=settings.role_groups, store=store
        )
        stale = await later.resolve("U0GRP")
        assert (stale.role, stale.source, stale.stale) == ("ADMIN", "group", True)
        assert await later.role_of("U0GRP", purpose="diagnose") == "ADMIN"
        assert await later.role_of("U0GRP", purpose="approve") == "PARTICIPANT"
        assert "Slack did not list the user group S0ONCALL" in stale.describe()
    await gateway.close()


async def test_roles_work_without_a_state_store_and_when_it_is_gone(
    leaps_dsn: str,
    fake_slack: FakeSlack,
    pg: EmbeddedPostgres,
    pg_dsn_factory: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    reviewer_email = await leaps_email(leaps_dsn, "REVIEWER")
    fake_slack.add_user("U0REV", email=reviewer_email)
    settings = bot_settings(leaps_dsn, fake_slack)
    gateway = TargetGateway(leaps_dsn, connect_timeout_s=2.0)
    client = make_web_client(settings)
    try:
        alone = RoleResolver({"U0MAP": "ADMIN"}, client, gateway)  # the console before open
        assert await alone.role_of("U0REV") == "REVIEWER"
        assert await alone.role_of("U0MAP") == "ADMIN"

        state_dsn = pg_dsn_factory("roles_state")
        store = await open_store(state_dsn)
        try:
            resolver = RoleResolver({}, client, gateway, ttl_s=0, store=store)
            assert await resolver.role_of("U0REV") == "REVIEWER"
            assert (await store.known_role("U0REV")) is not None
            pg.drop_database(_dbname(state_dsn))
            with caplog.at_level(logging.WARNING, logger="bot.access.roles"):
                resolved = await resolver.resolve("U0REV")
            assert (resolved.role, resolved.stale) == ("REVIEWER", False)
            assert any("could not keep the role" in r.getMessage() for r in caplog.records)
        finally:
            await store.close()
    finally:
        await gateway.close()


async def test_console_requests_need_a_role_checked_now(
    leaps_dsn: str, fake_slack: FakeSlack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console knows only ROLE_MAP: a remembered Slack role never requests from it."""
    from bot.console.console import request_from_console

    state = f"sqlite:///{tmp_path}/console.sqlite3"
    async with await open_store(state) as store:
        await store.remember_role("U0SLACKADMIN", role="ADMIN", source="leaps")
    settings = bot_settings(leaps_dsn, fake_slack, state_database_url=state)
    assert await request_from_console(settings, "kill-idle 0", "U0SLACKADMIN") == 2
    refused = capsys.readouterr().err
    assert "You need the role REVIEWER, checked now" in refused
    assert "the console knows only ROLE_MAP" in refused
