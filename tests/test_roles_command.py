"""`/db roles` and `set-role` on the guarded fixture: the role picture with real faults
(a drifted enum value, one or no SUPERADMIN, mis-cased duplicate e-mails, accounts a
broken sync left), one user looked up by handle, e-mail and Slack mention, and role
changes approved over the Slack path, passing or refused by production's role guard."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio

from bot.approvals.executor import Executor
from bot.gateway import TargetGateway
from bot.router import Answer, Dispatcher, RunContext
from commands.base import Finding, LeapsIdentity, Report, Status, Thresholds, UsageError
from commands.fixture.faults import FaultInjector
from commands.remedies.base import Execution, Plan, Verification
from commands.remedies.roles import SET_ROLE
from commands.roles import column_finding, identity_for_email, role_for_email
from tests.conftest import RunningBot, bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import CHANNEL, message_text, press, request, settle
from tests.test_health_e2e import section_texts
from tests.test_roles import answer_to

REQUESTER, ADMIN, SUPER, REVIEWER = "U0REQ", "U0ADMIN", "U0SUPER", "U0REVIEW"
ROLE_MAP = {REQUESTER: "ADMIN", ADMIN: "ADMIN", SUPER: "SUPERADMIN", REVIEWER: "REVIEWER"}


@pytest_asyncio.fixture(loop_scope="session")
async def dispatcher(leaps_dsn: str) -> AsyncIterator[Dispatcher]:
    gateway = TargetGateway(leaps_dsn)
    await gateway.open()
    try:
        yield Dispatcher(RunContext(gateway, Thresholds()), coalesce_s=0.0)
    finally:
        await gateway.close()


async def fetch(
    dsn: str, query: LiteralString, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def user_of(dsn: str, role: str) -> tuple[str, str, str]:
    """(id, handle, e-mail) of the first LEAPS user of `role`."""
    (row,) = await fetch(
        dsn,
        'SELECT id, handle, email FROM users WHERE role = %s::"Role" ORDER BY id LIMIT 1',
        (role,),
    )
    return str(row[0]), str(row[1]), str(row[2])


async def role_of(dsn: str, user_id: str) -> str:
    (row,) = await fetch(dsn, "SELECT role::text FROM users WHERE id = %s", (user_id,))
    return str(row[0])


async def report_of(d: Dispatcher, text: str) -> Report:
    result = await d.run(text)
    assert isinstance(result, Report), result
    return result


def finding(report: Report, check: str) -> Finding:
    (found,) = [f for f in report.findings if f.check == check]
    return found


# --- /db roles --------------------------------------------------------------------------


async def test_distribution_and_the_single_superadmin_of_the_fixture(
    leaps_dsn: str, dispatcher: Dispatcher
) -> None:
    counted = dict(await fetch(leaps_dsn, "SELECT role::text, count(*)::int FROM users GROUP BY 1"))
    report = await report_of(dispatcher, "roles")
    dist = finding(report, "role distribution")
    assert {r["role"]: r["users"] for r in dist.rows} == counted
    assert f"{sum(counted.values())} users" in dist.summary
    assert finding(report, "invalid roles").status is Status.OK
    assert finding(report, "role column").status is Status.OK
    guard = finding(report, "role guard")
    assert guard.status is Status.OK and "trg_validate_role_change" in guard.summary
    supers = finding(report, "superadmins")  # the seed has exactly one
    assert counted["SUPERADMIN"] == 1 and supers.status is Status.WARN
    assert "one SUPERADMIN" in supers.summary


async def test_superadmin_count_none_is_crit_two_is_ok(
    dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    await faults.superadmins(2)
    assert finding(await report_of(dispatcher, "roles"), "superadmins").status is Status.OK
    await faults.superadmins(0)
    report = await report_of(dispatcher, "roles")
    assert finding(report, "superadmins").status is Status.CRIT
    assert report.worst is Status.CRIT


async def test_invalid_role_is_found_and_ranked_lowest(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    user = await faults.invalid_role("MODERATOR")
    report = await report_of(dispatcher, "roles")
    invalid = finding(report, "invalid roles")
    assert invalid.status is Status.CRIT
    assert [r["id"] for r in invalid.rows] == [user] and invalid.rows[0]["role"] == "MODERATOR"
    column = finding(report, "role column")
    assert column.status is Status.WARN and "MODERATOR added" in column.summary
    dist = {r["role"]: r["users"] for r in finding(report, "role distribution").rows}
    assert dist["MODERATOR"] == 1
    # The label sorts after SUPERADMIN in the enum; the bot still ranks it lowest when one
    # Slack e-mail matches a MODERATOR account and another.
    ((original, duplicate),) = await faults.mis_cased_emails(1, role="MODERATOR")
    ((email,),) = await fetch(leaps_dsn, "SELECT email FROM users WHERE id = %s", (original,))
    gateway = dispatcher.ctx.gateway
    identity = await gateway.read(lambda db: identity_for_email(email.swapcase(), db))
    assert identity is not None and (identity.user_id, identity.role) == (original, "PARTICIPANT")
    assert await gateway.read(lambda db: role_for_email(email, db)) == "PARTICIPANT"
    ranked = await fetch(
        leaps_dsn,
        "SELECT id FROM users WHERE lower(email) = lower(%s) ORDER BY role DESC LIMIT 1",
        (email,),
    )
    assert ranked == [(duplicate,)]  # what ordering by the enum itself would have picked


def test_a_role_column_that_drifted_to_text_is_reported() -> None:
    """The fixture's views depend on users.role, so its type cannot be altered there; the
    live type the survey reads decides the finding."""
    text = column_finding({"type": "text", "kind": "b", "not_null": False, "labels": []})
    assert text.status is Status.WARN
    assert "users.role is text (not an enum)" in text.summary and "NULL allowed" in text.summary
    enum = column_finding(
        {"type": '"Role"', "kind": "e", "not_null": True, "labels": ["PARTICIPANT", "ADMIN"]}
    )
    assert enum.status is Status.WARN and "REVIEWER, SUPERADMIN missing" in enum.summary
    assert column_finding(None).status is Status.CRIT


async def test_sync_problems_mis_cased_emails_and_blank_accounts(
    dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    before = await report_of(dispatcher, "roles")
    assert finding(before, "e-mail case duplicates").status is Status.OK
    assert finding(before, "users without e-mail").status is Status.OK
    assert finding(before, "users without handle").status is Status.OK
    (pair,) = await faults.mis_cased_emails(1, role="ADMIN")
    blank = await faults.unsynced_accounts()
    report = await report_of(dispatcher, "roles")
    dupes = finding(report, "e-mail case duplicates")
    assert dupes.status is Status.CRIT  # the two accounts hold different roles
    assert dupes.rows[0]["accounts"] == 2 and "(ADMIN)" in dupes.rows[0]["users"]
    no_email = finding(report, "users without e-mail")
    assert no_email.status is Status.WARN and [r["id"] for r in no_email.rows] == [blank["email"]]
    no_handle = finding(report, "users without handle")
    assert [r["id"] for r in no_handle.rows] == [blank["handle"]]
    # the duplicate is what a lookup by that e-mail shows as well
    (original,) = [r for r in dupes.rows]
    one = await report_of(dispatcher, f"roles {original['email']}")
    user = finding(one, "user")
    assert user.status is Status.WARN and {r["id"] for r in user.rows} == set(pair)


async def shared_emails(dsn: str) -> dict[str, int]:
    """Every e-mail several accounts share once trimmed and lower-cased, counted here by
    the plain GROUP BY the survey avoids."""
    rows = await fetch(
        dsn,
        "SELECT lower(btrim(email)), count(*)::int FROM users WHERE btrim(email) <> ''"
        " GROUP BY 1 HAVING count(*) > 1",
    )
    return {str(r[0]): int(r[1]) for r in rows}


async def test_case_duplicates_with_and_without_the_unique_index(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    """Groups with no address in lower case, an address with spaces, a mis-cased twin:
    found through the unique index on users.email; once it is gone, an exact repeat too.
    An address of spaces only is a missing one."""
    await faults.mis_cased_emails(1, role="ADMIN")
    accounts = [
        ("cd1", "Mixed.Case@Example.org", "REVIEWER"),
        ("cd2", "MIXED.case@example.ORG", "PARTICIPANT"),
        ("cd3", "mixed.CASE@EXAMPLE.org", "PARTICIPANT"),
        ("cd4", " spaced@example.org", "PARTICIPANT"),
        ("cd5", "spaced@example.org", "PARTICIPANT"),
        ("cd8", "   ", "PARTICIPANT"),  # blank: no e-mail, and shared with nobody
    ]

    async def add(rows: list[tuple[str, str, str]]) -> None:
        async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
            await conn.execute("SET session_replication_role = replica")  # past the e-mail trigger
            for user_id, email, role in rows:
                await conn.execute(
                    "INSERT INTO users (id, handle, name, email, role)"
                    ' VALUES (%s, %s, %s, %s, %s::"Role")',
                    (user_id, f"h_{user_id}", "Shared", email, role),
                )

    await add(accounts)
    for unique in (True, False):
        expected = await shared_emails(leaps_dsn)
        report = await report_of(dispatcher, "roles")
        assert [r["id"] for r in finding(report, "users without e-mail").rows] == ["cd8"]
        dupes = finding(report, "e-mail case duplicates")
        assert dupes.status is Status.CRIT, unique  # REVIEWER and PARTICIPANT share one
        assert f"{len(expected)} e-mails belong to several users" in dupes.summary
        assert {r["email"]: r["accounts"] for r in dupes.rows} == expected
        assert dupes.rows[0] == {
            "email": "mixed.case@example.org",
            "accounts": 3,
            "users": "h_cd1 (REVIEWER), h_cd2 (PARTICIPANT), h_cd3 (PARTICIPANT)",
        }
        if unique:
            async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as c:
                await c.execute("ALTER TABLE users DROP CONSTRAINT users_email_key")
            await add([(f"cd{i}", "twice@example.org", "PARTICIPANT") for i in (6, 7)])
    assert (await shared_emails(leaps_dsn))["twice@example.org"] == 2


async def test_lookup_by_handle_and_email_any_case(leaps_dsn: str, dispatcher: Dispatcher) -> None:
    user_id, handle, email = await user_of(leaps_dsn, "REVIEWER")
    for arg in (handle, f"@{handle}", email.swapcase(), f"<mailto:{email}|{email}>"):
        user = finding(await report_of(dispatcher, f"roles {arg}"), "user")
        assert user.status is Status.OK, arg
        assert [r["id"] for r in user.rows] == [user_id]
        assert f"`{handle}`" in user.summary and "is REVIEWER" in user.summary
    missing = finding(await report_of(dispatcher, f"roles {handle}zzz"), "user")
    assert missing.status is Status.WARN and missing.rows[0]["handle"] == handle


async def test_lookup_by_slack_mention_end_to_end(bot: RunningBot, leaps_dsn: str) -> None:
    _id, handle, email = await user_of(leaps_dsn, "ADMIN")
    bot.fake.add_user("U0CAROL", email=email.upper(), name="carol")
    resp = await bot.slash("roles <@U0CAROL|carol>")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    text = "\n".join(section_texts(call))
    assert f"`{handle}`" in text and "is ADMIN" in text
    assert any(c.params.get("user") == "U0CAROL" for c in bot.fake.calls_to("users.info"))


async def test_overview_end_to_end(bot: RunningBot) -> None:
    resp = await bot.slash("roles")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    text = "\n".join(section_texts(call))
    assert "role distribution" in text and "superadmins" in text


# --- set-role over the Slack path -------------------------------------------------------


async def slack_bot_for_roles(dsn: str, fake: FakeSlack, **overrides: Any) -> tuple[str, str, str]:
    """Slack profiles of the test approvers matched to LEAPS accounts by e-mail:
    ADMIN -> a LEAPS ADMIN, SUPER -> the LEAPS SUPERADMIN. Returns their LEAPS ids and
    the id of the participant to change."""
    admin_id, _h, admin_email = await user_of(dsn, "ADMIN")
    super_id, _h2, super_email = await user_of(dsn, "SUPERADMIN")
    participant_id, _h3, _e = await user_of(dsn, "PARTICIPANT")
    fake.add_user(ADMIN, email=admin_email)
    fake.add_user(SUPER, email=super_email.swapcase())
    fake.add_user(REQUESTER, email="requester@elsewhere.example")
    return admin_id, super_id, participant_id


async def verify_executed(bot: RunningBot, approval_id: str | None = None) -> Verification:
    """set-role's verification of the plan the bot executed, as the sweeper would run it
    for an approval whose process died (`approval_id` another approval's, to see it tell
    them apart)."""
    store = bot.service.store
    assert store is not None
    (done,) = [e for e in await store.audit_trail(limit=50) if e.action == "remedy.executed"]
    assert done.approval_id is not None
    approval = await store.get_approval(done.approval_id)
    assert approval is not None
    stored = Plan.model_validate(approval.plan)
    run = Execution(approval_id or approval.id, ADMIN)
    return await bot.service.ctx.gateway.read(lambda db: SET_ROLE.verify(db, stored, run))


async def backup_rows(dsn: str) -> list[tuple[Any, ...]]:
    tables = await fetch(
        dsn,
        "SELECT table_name::text FROM information_schema.tables"
        " WHERE table_schema = 'dbops_backup' ORDER BY 1",
    )
    rows: list[tuple[Any, ...]] = []
    for (name,) in tables:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                psycopg.sql.SQL("SELECT id, role::text FROM {}").format(
                    psycopg.sql.Identifier("dbops_backup", name)
                )
            )
            rows += await cur.fetchall()
    return rows


async def test_set_role_before_and_after_as_the_admin_approver(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    admin_id, _super, target = await slack_bot_for_roles(leaps_dsn, fake_slack)
    ((email,),) = await fetch(leaps_dsn, "SELECT email FROM users WHERE id = %s", (target,))
    fake_slack.add_user("U0PART", email=email.upper())  # named by a mention
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLE_MAP)
    assert await role_of(leaps_dsn, target) == "PARTICIPANT"
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, "set-role <@U0PART|part> reviewer")
        assert plan.params["blocks"] and target in json.dumps(plan.params)
        plan_text = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "trg_validate_role_change" in plan_text
        assert re.search(r"approver\(s\) with role \W*ADMIN\b", plan_text)
        await press(bot, plan, ADMIN)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "is now REVIEWER" in final and f"acted as LEAPS user {admin_id} (ADMIN" in final
        # the verification that decides an execution whose process died says so too
        landed = await verify_executed(bot)
        assert landed.landed and "is REVIEWER" in landed.found
        other = await verify_executed(bot, approval_id="never-ran")
        assert not other.landed
    assert await role_of(leaps_dsn, target) == "REVIEWER"
    assert await backup_rows(leaps_dsn) == [(target, "PARTICIPANT")]
    audited = await fetch(
        leaps_dsn,
        "SELECT actor_id, meta ->> 'user_role', meta -> 'old_values' ->> 'role',"
        " meta -> 'new_values' ->> 'role' FROM audit_log"
        " WHERE action = 'UPDATE_users' AND target_id = %s",
        (target,),
    )
    assert audited == [(admin_id, "ADMIN", "PARTICIPANT", "REVIEWER")]


async def test_granting_admin_refuses_an_admin_approver_and_takes_a_superadmin(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    _admin, super_id, target = await slack_bot_for_roles(leaps_dsn, fake_slack)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLE_MAP)
    async with running_bot(settings, fake_slack) as bot:
        (handle,) = (await fetch(leaps_dsn, "SELECT handle FROM users WHERE id = %s", (target,)))[0]
        plan = await request(bot, f"set-role {handle} ADMIN")
        ts = str(plan.response["ts"])
        plan_text = message_text(fake_slack, CHANNEL, ts)
        assert re.search(r"approver\(s\) with role \W*SUPERADMIN\b", plan_text)
        assert "granting ADMIN needs a SUPERADMIN approver" in plan_text
        await press(bot, plan, ADMIN)
        await settle(bot)
        told = await answer_to(fake_slack, ADMIN)
        refusal = json.dumps(told.params)
        assert "needs the role SUPERADMIN, yours is ADMIN" in refusal
        assert await role_of(leaps_dsn, target) == "PARTICIPANT"  # nothing changed
        assert bot.service.store is not None
        approvals = await bot.service.store.audit_trail(limit=50)
        assert any(e.action == "approval.refused" for e in approvals)
        await press(bot, plan, SUPER)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, ts)
        assert "is now ADMIN" in final and f"acted as LEAPS user {super_id} (SUPERADMIN" in final
    assert await role_of(leaps_dsn, target) == "ADMIN"
    (audited,) = await fetch(
        leaps_dsn,
        "SELECT actor_id, meta ->> 'user_role' FROM audit_log"
        " WHERE action = 'UPDATE_users' AND target_id = %s",
        (target,),
    )
    assert audited == (super_id, "SUPERADMIN")


async def test_demoting_the_last_superadmin_is_refused_in_the_plan(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    await slack_bot_for_roles(leaps_dsn, fake_slack)
    super_id, handle, _e = await user_of(leaps_dsn, "SUPERADMIN")
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLE_MAP)
    async with running_bot(settings, fake_slack) as bot:
        resp = await bot.slash(f"set-role {handle} ADMIN", channel=CHANNEL, user=REQUESTER)
        assert resp.status == 200
        told = json.dumps((await answer_to(fake_slack, REQUESTER)).params)
        assert "last SUPERADMIN" in told
        assert not [c for c in fake_slack.calls_to("chat.postMessage") if c.params.get("thread_ts")]
        assert bot.service.store is not None
        trail = await bot.service.store.audit_trail(limit=50)
        assert not any(e.action == "approval.requested" for e in trail)
    assert await role_of(leaps_dsn, super_id) == "SUPERADMIN"


async def test_the_guard_refuses_the_last_superadmin_anyway_and_nothing_changes(
    leaps_dsn: str, fake_slack: FakeSlack, faults: FaultInjector
) -> None:
    """Two SUPERADMINs when planned; one is demoted (past the guards) before approval, so
    the plan's own check no longer holds and production's trigger is what refuses."""
    await slack_bot_for_roles(leaps_dsn, fake_slack)
    first, _second = await faults.superadmins(2)  # the oldest is the one kept below
    ((handle, email),) = await fetch(
        leaps_dsn, "SELECT handle, email FROM users WHERE id = %s", (first,)
    )
    fake_slack.add_user(SUPER, email=email)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLE_MAP)
    before = await fetch(leaps_dsn, "SELECT * FROM users ORDER BY id")
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, f"set-role {handle} ADMIN")
        assert await faults.superadmins(1) == [first]
        await press(bot, plan, SUPER)  # the first SUPERADMIN demoting themselves
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "Cannot remove the last SUPERADMIN user" in final
        assert "trg_validate_role_change" in final
    after = await fetch(leaps_dsn, "SELECT * FROM users ORDER BY id")
    assert await role_of(leaps_dsn, first) == "SUPERADMIN"
    assert len(after) == len(before) and await backup_rows(leaps_dsn) == []


async def test_an_admin_grant_never_acts_as_the_service_identity(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    _admin, _super, target = await slack_bot_for_roles(leaps_dsn, fake_slack)
    service_id, _h, _e = await user_of(leaps_dsn, "ADMIN")
    fake_slack.add_user(SUPER, email="no.account@elsewhere.example")  # no LEAPS account
    settings = bot_settings(
        leaps_dsn,
        fake_slack,
        role_map=ROLE_MAP,
        remedy_service_user_id=service_id,
        remedy_service_role="SUPERADMIN",
    )
    (handle,) = (await fetch(leaps_dsn, "SELECT handle FROM users WHERE id = %s", (target,)))[0]
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, f"set-role {handle} SUPERADMIN")
        await press(bot, plan, SUPER)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "refused to act as the service identity" in final
    assert await role_of(leaps_dsn, target) == "PARTICIPANT"
    assert await backup_rows(leaps_dsn) == []


async def test_a_reviewer_cannot_request_set_role(leaps_dsn: str, fake_slack: FakeSlack) -> None:
    await slack_bot_for_roles(leaps_dsn, fake_slack)
    _id, handle, _e = await user_of(leaps_dsn, "PARTICIPANT")
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLE_MAP)
    async with running_bot(settings, fake_slack) as bot:
        await bot.slash(f"set-role {handle} REVIEWER", channel=CHANNEL, user=REVIEWER)
        told = json.dumps((await answer_to(fake_slack, REVIEWER)).params)
        assert "You need the role ADMIN" in told
        assert not [c for c in fake_slack.calls_to("chat.postMessage") if c.params.get("thread_ts")]


async def test_set_role_refuses_an_e_mail_shared_by_two_accounts(
    dispatcher: Dispatcher, faults: FaultInjector, leaps_dsn: str
) -> None:
    ((original, duplicate),) = await faults.mis_cased_emails(1)
    ((email, handle),) = await fetch(
        leaps_dsn, "SELECT email, handle FROM users WHERE id = %s", (original,)
    )
    with pytest.raises(UsageError, match="2 LEAPS users match"):
        await SET_ROLE.plan(dispatcher.ctx, [email, "REVIEWER"])
    plan = await SET_ROLE.plan(dispatcher.ctx, [handle, "REVIEWER"])  # a handle is exact
    assert plan.count == 1 and plan.targets[0]["id"] == original and plan.approver_role is None
    assert duplicate != original
    with pytest.raises(UsageError, match="not a role"):
        await SET_ROLE.plan(dispatcher.ctx, [handle, "MODERATOR"])
    with pytest.raises(UsageError, match="NUL"):
        await SET_ROLE.plan(dispatcher.ctx, [handle + "\x00", "REVIEWER"])
    refused = await dispatcher.run("roles a\x00b")
    assert isinstance(refused, Answer) and refused.outcome == "usage" and "NUL" in refused.text


async def test_set_role_repairs_an_invalid_role_through_the_executor(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    """The repair `/db roles` points to for a drifted value: an ADMIN acting, as the
    executor sets it for the transaction; the guard is present and lets it through."""
    user = await faults.invalid_role("MODERATOR")
    admin_id, _h, _e = await user_of(leaps_dsn, "ADMIN")
    ((handle,),) = await fetch(leaps_dsn, "SELECT handle FROM users WHERE id = %s", (user,))
    plan = await SET_ROLE.plan(dispatcher.ctx, [handle, "PARTICIPANT"])
    assert plan.count == 1 and plan.approver_role is None
    assert plan.targets[0]["role"] == "MODERATOR"
    acting = LeapsIdentity(admin_id, "ADMIN", "test")
    state, outcome = await Executor(leaps_dsn).apply(SET_ROLE, plan, "roles-test-1", acting)
    assert (state, outcome.affected, outcome.backed_up) == ("done", 1, 1), outcome
    assert await role_of(leaps_dsn, user) == "PARTICIPANT"
    report = await report_of(dispatcher, "roles")
    assert finding(report, "invalid roles").status is Status.OK
    again = await Executor(leaps_dsn).apply(SET_ROLE, plan, "roles-test-2", acting)
    assert again[0] == "aborted" and "drift" in again[1].summary  # the plan no longer holds


def test_a_plan_without_its_own_approver_role_hashes_as_before_the_field() -> None:
    """Approvals pending across the upgrades that added `Plan.approver_role`, `approvers`,
    `runbook`, `audit` and `preflight` still match."""
    plan = Plan(remedy="kill-idle", args=[], title="t", summary="s", steps=[], count=1)
    dumped = plan.model_dump(mode="json")
    for key in ("approver_role", "approvers", "runbook", "audit", "preflight"):
        del dumped[key]
    before = hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()
    assert plan.fingerprint() == before
    raised = plan.model_copy(update={"approver_role": "SUPERADMIN"})
    assert raised.fingerprint() != before  # the approval binds the role it asked for


async def test_a_null_role_is_invalid_and_set_role_gives_one(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    user = await faults.null_role()
    report = await report_of(dispatcher, "roles")
    invalid = finding(report, "invalid roles")
    assert invalid.status is Status.CRIT and invalid.rows[0]["id"] == user
    assert invalid.rows[0]["role"] is None and "NULL" in invalid.summary
    assert "NULL allowed" in finding(report, "role column").summary
    ((handle,),) = await fetch(leaps_dsn, "SELECT handle FROM users WHERE id = %s", (user,))
    one = finding(await report_of(dispatcher, f"roles {handle}"), "user")
    assert one.status is Status.CRIT and "without a role" in one.summary
    plan = await SET_ROLE.plan(dispatcher.ctx, [handle, "PARTICIPANT"])
    assert plan.count == 1 and "from no role to PARTICIPANT" in plan.summary
    admin_id, _h, _e = await user_of(leaps_dsn, "ADMIN")
    state, outcome = await Executor(leaps_dsn).apply(
        SET_ROLE, plan, "roles-null-1", LeapsIdentity(admin_id, "ADMIN", "test")
    )
    assert state == "done", outcome
    assert await role_of(leaps_dsn, user) == "PARTICIPANT"
