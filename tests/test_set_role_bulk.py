"""`set-role` for a list of users (the guide's bulk promotion): one plan naming every user
with their change, one approval, every row backed up, exactly the planned rows changed
and all read back, on the guarded fixture and over the Slack path. The rules of one
user hold for each: the last SUPERADMIN is never demoted (nor all of them at once), an
ADMIN grant needs a SUPERADMIN approver, an e-mail shared by two accounts is refused
naming them; and a list is all or nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import psycopg
import pytest
import pytest_asyncio

from bot.approvals.executor import Executor
from bot.gateway import TargetGateway
from bot.messages import render
from bot.router import Dispatcher, RunContext
from commands.base import LeapsIdentity, Thresholds, UsageError
from commands.fixture.faults import FaultInjector
from commands.remedies.roles import MAX_USERS, SET_ROLE, SetRoleData, parse_args
from tests.conftest import bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import CHANNEL, message_text, press, request, settle
from tests.test_roles import answer_to
from tests.test_roles_command import (
    ADMIN,
    REQUESTER,
    ROLE_MAP,
    SUPER,
    backup_rows,
    fetch,
    role_of,
    slack_bot_for_roles,
    user_of,
    verify_executed,
)


@pytest_asyncio.fixture(loop_scope="session")
async def dispatcher(leaps_dsn: str) -> AsyncIterator[Dispatcher]:
    gateway = TargetGateway(leaps_dsn)
    await gateway.open()
    try:
        yield Dispatcher(RunContext(gateway, Thresholds()), coalesce_s=0.0)
    finally:
        await gateway.close()


async def users_of(dsn: str, role: str, n: int) -> list[tuple[str, str, str]]:
    """(id, handle, e-mail) of the first `n` LEAPS users of `role`, by id."""
    rows = await fetch(
        dsn,
        'SELECT id, handle, email FROM users WHERE role = %s::"Role" ORDER BY id LIMIT %s',
        (role, n),
    )
    assert len(rows) == n
    return [(str(a), str(b), str(c)) for a, b, c in rows]


async def roles_of(dsn: str, ids: list[str]) -> dict[str, str]:
    rows = await fetch(dsn, "SELECT id, role::text FROM users WHERE id = ANY(%s)", (ids,))
    return {str(i): str(r) for i, r in rows}


# --- the plan ------------------------------------------------------------------------------


def test_users_by_spaces_commas_or_both_and_the_limit() -> None:
    assert parse_args(["a", "b", "reviewer"]) == (["a", "b"], "REVIEWER")
    assert parse_args(["a,b,", "c", "ADMIN"]) == (["a", "b", "c"], "ADMIN")
    assert parse_args(["a", ",", "b", "ADMIN"]) == (["a", "b"], "ADMIN")
    with pytest.raises(UsageError, match=r"not a role.*the role comes last"):
        parse_args(["REVIEWER", "a", "b"])
    assert len(parse_args([f"u{i}" for i in range(MAX_USERS)] + ["ADMIN"])[0]) == MAX_USERS
    with pytest.raises(UsageError, match=rf"{MAX_USERS + 1} users named.*at most {MAX_USERS}"):
        parse_args([",".join(f"u{i}" for i in range(MAX_USERS + 1)), "ADMIN"])


async def test_one_plan_lists_every_user_with_from_and_to(
    leaps_dsn: str, dispatcher: Dispatcher
) -> None:
    (a, b, c) = await users_of(leaps_dsn, "PARTICIPANT", 3)
    (r,) = await users_of(leaps_dsn, "REVIEWER", 1)
    args = [f"{a[1]},{b[2].swapcase()}", c[1], r[1], a[1], "reviewer"]
    plan = await SET_ROLE.plan(dispatcher.ctx, args)
    assert plan.count == 3 and plan.approver_role is None  # no staff role involved
    assert [t["id"] for t in plan.targets] == [a[0], b[0], c[0], r[0]]
    assert [t["change"] for t in plan.targets] == ["PARTICIPANT → REVIEWER"] * 3 + [
        "REVIEWER → REVIEWER"
    ]
    assert plan.summary == (
        f"set the role of 3 of 4 users to REVIEWER (PARTICIPANT → REVIEWER: `{a[1]}`, "
        f"`{b[1]}`, `{c[1]}`); already REVIEWER: `{r[1]}`"
    )
    assert f"named more than once, changed once: `{a[1]}`" in plan.warnings
    assert plan.steps[0].params == [[a[0], b[0], c[0]]]  # the already-REVIEWER is not locked
    data = plan.private(SetRoleData)
    assert [u.user_id for u in data.users] == [a[0], b[0], c[0]]
    nothing = await SET_ROLE.plan(dispatcher.ctx, [r[1], "REVIEWER"])
    assert nothing.count == 0 and not nothing.needs_approval


async def test_fifty_users_fit_one_approval_message_uncut(
    leaps_dsn: str, dispatcher: Dispatcher
) -> None:
    """The limit is what an approval message can show whole: every handle, every step."""
    users = await users_of(leaps_dsn, "PARTICIPANT", MAX_USERS)
    plan = await SET_ROLE.plan(dispatcher.ctx, [",".join(u[1] for u in users), "REVIEWER"])
    assert plan.count == MAX_USERS
    message = render.approval_message(
        approval_id="apv-0123456789ab",
        plan=plan,
        state="pending",
        requester_id=REQUESTER,
        needed=1,
        approver_role="ADMIN",
        approved_by=[],
        expires_at=datetime.now(UTC),
        outcome=None,
        limits="statement_timeout 30s, lock_timeout 5s",
        button_value="v",
    )
    sections = [b["text"]["text"] for b in message.blocks_json() if b["type"] == "section"]
    assert not [t for t in sections if "more characters)" in t]  # nothing was cut
    shown = "\n".join(sections)
    assert all(f"`{u[1]}`" in shown for u in users)
    assert "UPDATE users" in shown and "verification: all REVIEWER" in shown


async def test_a_list_is_refused_whole_naming_every_user_that_cannot_be(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    ((original, duplicate),) = await faults.mis_cased_emails(1)
    ((email,),) = await fetch(leaps_dsn, "SELECT email FROM users WHERE id = %s", (original,))
    handles = dict(
        await fetch(
            leaps_dsn, "SELECT id, handle FROM users WHERE id = ANY(%s)", ([original, duplicate],)
        )
    )
    (a,) = await users_of(leaps_dsn, "PARTICIPANT", 1)
    with pytest.raises(UsageError) as refused:
        await SET_ROLE.plan(dispatcher.ctx, [a[1], email, "nobody-like-this-zz", "REVIEWER"])
    text = str(refused.value)
    assert text.startswith("2 of the 3 users named cannot be changed, so nothing is planned")
    assert "2 LEAPS users match" in text
    assert "no LEAPS user with handle `nobody-like-this-zz`" in text
    assert f"`{handles[original]}`" in text and f"`{handles[duplicate]}`" in text
    assert await role_of(leaps_dsn, a[0]) == "PARTICIPANT"


async def test_every_superadmin_at_once_is_refused_one_of_two_needs_a_superadmin(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    first, second = await faults.superadmins(2)
    both = [first, second]
    handles = dict(
        await fetch(leaps_dsn, "SELECT id, handle FROM users WHERE id = ANY(%s)", (both,))
    )
    (p,) = await users_of(leaps_dsn, "PARTICIPANT", 1)
    with pytest.raises(UsageError, match="every SUPERADMIN left") as refused:
        await SET_ROLE.plan(dispatcher.ctx, [handles[first], handles[second], p[1], "ADMIN"])
    assert f"`{handles[first]}`, `{handles[second]}` are" in str(refused.value)
    plan = await SET_ROLE.plan(dispatcher.ctx, [handles[second], p[1], "REVIEWER"])
    assert plan.count == 2 and plan.approver_role == "SUPERADMIN"
    assert f"changing a SUPERADMIN (`{handles[second]}`) needs a SUPERADMIN approver" in (
        plan.warnings
    )


def test_a_single_user_plan_stored_before_lists_still_reads() -> None:
    """An approval pending across the upgrade holds the one-user data."""
    old = {
        "user_id": "u1",
        "handle": "h1",
        "old_role": "PARTICIPANT",
        "new_role": "REVIEWER",
        "superadmin_needed": False,
        "service": None,
    }
    data = SetRoleData.model_validate(old)
    assert [(u.user_id, u.handle, u.old_role) for u in data.users] == [("u1", "h1", "PARTICIPANT")]
    assert data.new_role == "REVIEWER" and data.demoted == []


# --- through the executor: drift, all or nothing ---------------------------------------------


async def test_one_user_changed_meanwhile_aborts_the_whole_list(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    users = await users_of(leaps_dsn, "PARTICIPANT", 3)
    ids = [u[0] for u in users]
    plan = await SET_ROLE.plan(dispatcher.ctx, [u[1] for u in users] + ["REVIEWER"])
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as admin:
        # another admin, through the application and its guard, promotes one of them
        await admin.execute("SELECT set_config('app.user_role', 'ADMIN', false)")
        await admin.execute("UPDATE users SET role = 'ADMIN' WHERE id = %s", (ids[1],))
    admin_id, _h, _e = await user_of(leaps_dsn, "ADMIN")
    state, outcome = await Executor(leaps_dsn).apply(
        SET_ROLE, plan, "bulk-drift-1", LeapsIdentity(admin_id, "ADMIN", "test")
    )
    assert state == "aborted" and "drift" in outcome.summary, outcome
    assert await roles_of(leaps_dsn, ids) == {
        ids[0]: "PARTICIPANT",
        ids[1]: "ADMIN",
        ids[2]: "PARTICIPANT",
    }
    assert await backup_rows(leaps_dsn) == []


# --- over the Slack path, with production's guard present ------------------------------------


async def test_bulk_promotion_before_and_after_with_one_approval(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    admin_id, _super, _p = await slack_bot_for_roles(leaps_dsn, fake_slack)
    users = await users_of(leaps_dsn, "PARTICIPANT", 4)
    ids = [u[0] for u in users]
    fake_slack.add_user("U0PART", email=users[0][2].upper())  # the first named by a mention
    named = ["<@U0PART|part>", f"{users[1][1]},{users[2][2]}", users[3][1]]
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLE_MAP)
    assert set((await roles_of(leaps_dsn, ids)).values()) == {"PARTICIPANT"}
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, f"set-role {' '.join(named)} reviewer")
        ts = str(plan.response["ts"])
        plan_text = message_text(fake_slack, CHANNEL, ts)
        assert "Set the LEAPS role of 4 users" in plan_text
        for _id, handle, _email in users:  # every user, in the summary and the targets
            assert f"`{handle}`" in plan_text
        arrow = json.dumps("PARTICIPANT → REVIEWER")[1:-1]  # as the blocks' JSON holds it
        assert plan_text.count(arrow) >= 5  # the summary and the 4 target rows
        assert "trg_validate_role_change" in plan_text
        await press(bot, plan, ADMIN)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, ts)
        assert "4 users are now REVIEWER" in final
        assert f"acted as LEAPS user {admin_id} (ADMIN" in final
        landed = await verify_executed(bot)
        assert landed.landed and "holds 4 of the 4 planned rows" in landed.found
    assert set((await roles_of(leaps_dsn, ids)).values()) == {"REVIEWER"}
    assert sorted(await backup_rows(leaps_dsn)) == sorted((i, "PARTICIPANT") for i in ids)
    audited = await fetch(
        leaps_dsn,
        "SELECT target_id, actor_id, meta -> 'new_values' ->> 'role' FROM audit_log"
        " WHERE action = 'UPDATE_users' AND target_id = ANY(%s) ORDER BY target_id",
        (ids,),
    )
    assert audited == [(i, admin_id, "REVIEWER") for i in sorted(ids)]


async def test_a_list_granting_admin_needs_a_superadmin_approver(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    _admin, super_id, _p = await slack_bot_for_roles(leaps_dsn, fake_slack)
    users = await users_of(leaps_dsn, "REVIEWER", 2)
    ids = [u[0] for u in users]
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLE_MAP)
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, f"set-role {users[0][1]}, {users[1][1]} ADMIN")
        ts = str(plan.response["ts"])
        assert "granting ADMIN needs a SUPERADMIN approver" in message_text(fake_slack, CHANNEL, ts)
        await press(bot, plan, ADMIN)
        await settle(bot)
        refusal = json.dumps((await answer_to(fake_slack, ADMIN)).params)
        assert "needs the role SUPERADMIN, yours is ADMIN" in refusal
        assert set((await roles_of(leaps_dsn, ids)).values()) == {"REVIEWER"}
        await press(bot, plan, SUPER)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, ts)
        assert "2 users are now ADMIN" in final
        assert f"acted as LEAPS user {super_id} (SUPERADMIN" in final
    assert set((await roles_of(leaps_dsn, ids)).values()) == {"ADMIN"}


async def test_the_guard_refuses_the_list_and_no_user_changes(
    leaps_dsn: str, fake_slack: FakeSlack, faults: FaultInjector
) -> None:
    """A SUPERADMIN demoted with two participants promoted, planned while two SUPERADMINs
    existed; the other is demoted (past the guards) before approval, so production's
    trigger refuses the demotion, and the transaction takes the promotions back with it."""
    await slack_bot_for_roles(leaps_dsn, fake_slack)
    first, second = await faults.superadmins(2)
    ((handle, email),) = await fetch(
        leaps_dsn, "SELECT handle, email FROM users WHERE id = %s", (first,)
    )
    fake_slack.add_user(SUPER, email=email)
    participants = await users_of(leaps_dsn, "PARTICIPANT", 2)
    ids = [first] + [p[0] for p in participants]
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLE_MAP)
    async with running_bot(settings, fake_slack) as bot:
        named = " ".join([participants[0][1], handle, participants[1][1]])
        plan = await request(bot, f"set-role {named} REVIEWER", user=REQUESTER)
        assert await faults.superadmins(1) == [first]
        assert second != first
        await press(bot, plan, SUPER)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "Cannot remove the last SUPERADMIN user" in final
    assert await roles_of(leaps_dsn, ids) == {
        first: "SUPERADMIN",
        participants[0][0]: "PARTICIPANT",
        participants[1][0]: "PARTICIPANT",
    }
    assert await backup_rows(leaps_dsn) == []
