"""The recovery steps as remedies on their own: recover-users, rematch-kajabi and
recover-learn on both audit variants (the fixture's trigger and production's, where the
bot writes the audit rows), their samplers, and the rules of least privilege and of
never undoing a reviewer (issue 13, part 3). Losses come from `FaultInjector.data_loss`."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg.rows import dict_row

from bot.messages.render import approval_message
from bot.router import RunContext
from bot.state import StateStore
from bot.state.baselines import StoreBaselines
from commands.base import Row, UsageError
from commands.fixture.faults import FaultInjector
from commands.recover import recover
from commands.remedies.base import Plan
from commands.remedies.recovery import (
    INCLUDE_DELETED,
    KEEP_ROLES,
    LEARN_ID_PREFIX,
    RECOVER_LEARN,
    RECOVER_USERS,
    REMATCH_KAJABI,
    LearnRecoveryData,
    RecoverUsersData,
    RematchData,
    deleted_on_purpose,
)
from tests.conftest import make_audit_variant
from tests.test_recover import admin, execute, run_step

_ids = itertools.count()


async def rows(dsn: str, query: LiteralString, params: tuple[Any, ...] = ()) -> list[Row]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.cursor(row_factory=dict_row).execute(query, params)
        return await cur.fetchall()


async def scalar(dsn: str, query: LiteralString, params: tuple[Any, ...] = ()) -> Any:
    got = await rows(dsn, query, params)
    return next(iter(got[0].values())) if got else None


async def present(dsn: str, ids: list[str]) -> set[str]:
    found = await rows(dsn, "SELECT id FROM users WHERE id = ANY(%s)", (ids,))
    return {str(r["id"]) for r in found}


def target(plan: Plan, user: str) -> Row:
    return next(t for t in plan.targets if t["id"] == user)


async def set_image(dsn: str, user: str, key: str, value: Any) -> None:
    """Change a key of the user's INSERT audit image (what the data loss left behind)."""
    await execute(
        dsn,
        "UPDATE audit_log SET meta = jsonb_set(meta, ARRAY['new_values', %s], to_jsonb(%s::text))"
        " WHERE action = 'INSERT_users' AND target_id = %s",
        (key, value, user),
    )


# --- both audit variants ------------------------------------------------------------


async def test_recover_users_audits_each_insert_on_either_path(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector, audit_variant: str
) -> None:
    loss = await faults.data_loss(pct=10, accounts=3)
    await make_audit_variant(leaps_dsn, audit_variant)
    who = await admin(leaps_dsn)
    plan = await RECOVER_USERS.plan(ctx, [])
    assert plan.count == 3 and RECOVER_USERS.preflight
    assert plan.audit is not None
    assert ("written by the bot" in plan.audit) == (audit_variant == "production")
    state, outcome = await run_step(leaps_dsn, RECOVER_USERS, plan, who)
    assert state == "done", outcome
    assert outcome.affected == 3 and await present(leaps_dsn, loss.accounts) == set(loss.accounts)
    audited = await rows(
        leaps_dsn,
        "SELECT a.target_id, a.meta, to_jsonb(u) AS now FROM audit_log AS a"
        " JOIN users AS u ON u.id = a.target_id"
        " WHERE a.action = 'INSERT_users' AND a.actor_id = %s ORDER BY a.target_id",
        (who.user_id,),
    )
    assert [r["target_id"] for r in audited] == sorted(loss.accounts)
    for r in audited:
        meta = r["meta"]
        assert meta["operation"] == "INSERT" and meta["table"] == "users"
        assert meta["user_role"] == "ADMIN" and "old_values" not in meta
        assert meta["new_values"] == r["now"]
        assert meta["new_values"]["role"] == "PARTICIPANT"


async def test_rematch_and_recover_learn_apply_on_either_path(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector, audit_variant: str
) -> None:
    loss = await faults.data_loss(pct=10, unmatched=2, kajabi_only=True)
    await make_audit_variant(leaps_dsn, audit_variant)
    who = await admin(leaps_dsn)
    audit_rows = int(await scalar(leaps_dsn, "SELECT count(*) FROM audit_log"))

    plan = await REMATCH_KAJABI.plan(ctx, [])
    assert plan.count == 2 and REMATCH_KAJABI.preflight
    state, outcome = await run_step(leaps_dsn, REMATCH_KAJABI, plan, who)
    assert state == "done" and outcome.affected == 2, outcome

    plan = await RECOVER_LEARN.plan(ctx, [])
    assert plan.count > 0 and RECOVER_LEARN.preflight
    assert set(plan.private(LearnRecoveryData).users) <= set(loss.users)
    state, outcome = await run_step(leaps_dsn, RECOVER_LEARN, plan, who)
    assert state == "done" and outcome.affected == plan.count, outcome
    assert (
        await scalar(
            leaps_dsn,
            "SELECT count(*) FROM submissions WHERE id LIKE %s AND status = 'APPROVED'"
            " AND reviewer_id = %s",
            (LEARN_ID_PREFIX + "%", who.user_id),
        )
        == plan.count
    )
    # Neither a Kajabi event's update nor a submission's INSERT is audited in LEAPS: the
    # bot writes no rows the trigger would not have, on either path.
    assert int(await scalar(leaps_dsn, "SELECT count(*) FROM audit_log")) == audit_rows


# --- samplers -----------------------------------------------------------------------


async def test_samplers_change_exactly_the_sampled_rows(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    loss = await faults.data_loss(pct=10, accounts=4, unmatched=3, kajabi_only=True)
    who = await admin(leaps_dsn)

    plan = await RECOVER_USERS.plan(ctx, [])
    sample = RECOVER_USERS.sample
    assert plan.count == 4 and sample is not None
    assert sample(plan, 4) is plan and sample(plan, 1000) is plan
    cut = sample(plan, 2)
    kept = cut.private(RecoverUsersData).ids
    assert cut.count == 2 == len(kept) and set(kept) < set(loss.accounts)
    assert {t["id"] for t in cut.targets} == set(kept)
    state, outcome = await run_step(leaps_dsn, RECOVER_USERS, cut, who)
    assert state == "done" and outcome.affected == 2, outcome
    assert await present(leaps_dsn, loss.accounts) == set(kept)
    rest = await RECOVER_USERS.plan(ctx, [])
    assert rest.count == 2
    state, outcome = await run_step(leaps_dsn, RECOVER_USERS, rest, who)
    assert state == "done" and await present(leaps_dsn, loss.accounts) == set(loss.accounts)

    plan = await REMATCH_KAJABI.plan(ctx, [])
    sample = REMATCH_KAJABI.sample
    assert plan.count == 3 and sample is not None and sample(plan, 3) is plan
    cut = sample(plan, 2)
    events = cut.private(RematchData).ids
    assert cut.count == 2 == len(events) and set(events) < set(loss.unmatched_events)
    state, outcome = await run_step(leaps_dsn, REMATCH_KAJABI, cut, who)
    assert state == "done" and outcome.affected == 2, outcome
    matched = await rows(
        leaps_dsn,
        "SELECT id FROM kajabi_events WHERE id = ANY(%s) AND user_match <> 'NO_USER_FOUND'",
        (loss.unmatched_events,),
    )
    assert {r["id"] for r in matched} == set(events)
    state, outcome = await run_step(
        leaps_dsn, REMATCH_KAJABI, await REMATCH_KAJABI.plan(ctx, []), who
    )
    assert state == "done" and outcome.affected == 1, outcome

    plan = await RECOVER_LEARN.plan(ctx, [])
    sample = RECOVER_LEARN.sample
    assert plan.count > 2 and sample is not None and sample(plan, plan.count) is plan
    cut = sample(plan, 2)
    data = cut.private(LearnRecoveryData)
    assert cut.count == 2 == len(data.ids) == len(data.users)
    state, outcome = await run_step(leaps_dsn, RECOVER_LEARN, cut, who)
    assert state == "done" and outcome.affected == 2, outcome
    made = await rows(
        leaps_dsn, "SELECT id, user_id FROM submissions WHERE id LIKE %s", (LEARN_ID_PREFIX + "%",)
    )
    assert {(r["id"], r["user_id"]) for r in made} == {
        (LEARN_ID_PREFIX + i, u) for i, u in zip(data.ids, data.users, strict=True)
    }
    rest = await RECOVER_LEARN.plan(ctx, [])
    assert rest.count == plan.count - 2
    state, outcome = await run_step(leaps_dsn, RECOVER_LEARN, rest, who)
    assert state == "done" and outcome.affected == plan.count - 2, outcome


# --- recover-learn never undoes a reviewer ------------------------------------------


def held_by_status(plan: Plan) -> dict[str, int]:
    """The plan's count of skipped users per status of the LEARN they hold."""
    line = next(w for w in plan.warnings if "whatever its status" in w)
    return {s: int(n) for s, n in re.findall(r"\b([A-Z]+) (\d+)", line.split(": ", 1)[1])}


async def test_recover_learn_skips_users_holding_a_rejected_or_revoked_learn(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.data_loss(pct=10, kajabi_only=True)
    who = await admin(leaps_dsn)
    plan = await RECOVER_LEARN.plan(ctx, [])
    users = plan.private(LearnRecoveryData).users
    assert plan.count >= 3
    held = held_by_status(plan)
    rejected, revoked = users[0], users[1]
    for user, status in ((rejected, "REJECTED"), (revoked, "REVOKED")):
        await execute(
            leaps_dsn,
            "INSERT INTO submissions (id, user_id, activity_code, status, payload, reviewer_id,"
            " updated_at) VALUES (%s, %s, 'LEARN', %s, '{\"course_name\": \"x\"}', %s,"
            " now() AT TIME ZONE 'UTC')",
            (f"decided_{status}", user, status, who.user_id),
        )
    plan = await RECOVER_LEARN.plan(ctx, [])
    assert not {rejected, revoked} & set(plan.private(LearnRecoveryData).users)
    assert plan.count == len(users) - 2
    now = held_by_status(plan)
    assert now["REJECTED"] == held.get("REJECTED", 0) + 1
    assert now["REVOKED"] == held.get("REVOKED", 0) + 1
    state, outcome = await run_step(leaps_dsn, RECOVER_LEARN, plan, who)
    assert state == "done", outcome
    decided = await rows(
        leaps_dsn,
        "SELECT user_id, status::text AS status FROM submissions"
        " WHERE activity_code = 'LEARN' AND user_id = ANY(%s) ORDER BY user_id",
        ([rejected, revoked],),
    )
    assert sorted((r["user_id"], r["status"]) for r in decided) == sorted(
        [(rejected, "REJECTED"), (revoked, "REVOKED")]
    )


# --- recover-users: least privilege, order, deletions ---------------------------------


@pytest.mark.parametrize("keep", [False, True])
async def test_recover_users_restores_participants_unless_keep_roles(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector, keep: bool
) -> None:
    loss = await faults.data_loss(pct=10, accounts=3)
    staff = sorted(loss.accounts)[0]
    args = [KEEP_ROLES] if keep else []
    assert (await RECOVER_USERS.plan(ctx, args)).approver_role is None  # all participants
    await set_image(leaps_dsn, staff, "role", "ADMIN")
    plan = await RECOVER_USERS.plan(ctx, args)
    for user in loss.accounts:
        row = target(plan, user)
        imaged = "ADMIN" if user == staff else "PARTICIPANT"
        assert row["image_role"] == imaged
        assert row["restored_as"] == (imaged if keep else "PARTICIPANT")
    if keep:
        assert plan.approver_role == "SUPERADMIN"
        assert any("so a SUPERADMIN approves" in w for w in plan.warnings), plan.warnings
    else:
        assert plan.approver_role is None
        assert any(
            "every user comes back as PARTICIPANT" in w and KEEP_ROLES in w for w in plan.warnings
        ), plan.warnings
    state, outcome = await run_step(leaps_dsn, RECOVER_USERS, plan, await admin(leaps_dsn))
    assert state == "done", outcome
    roles = await rows(
        leaps_dsn, "SELECT id, role::text AS role FROM users WHERE id = ANY(%s)", (loss.accounts,)
    )
    assert {r["id"]: r["role"] for r in roles} == {
        u: "ADMIN" if keep and u == staff else "PARTICIPANT" for u in loss.accounts
    }


async def test_referrers_are_inserted_before_the_users_who_name_them(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    loss = await faults.data_loss(pct=10, accounts=3)
    referrer, referee = sorted(loss.accounts)[:2]
    # The referrer's image lacks a column (written before it existed): another INSERT,
    # whose columns sort after the referee's.
    await execute(
        leaps_dsn,
        "UPDATE audit_log SET meta = meta #- '{new_values,avatar_url}'"
        " WHERE action = 'INSERT_users' AND target_id = %s",
        (referrer,),
    )
    await set_image(leaps_dsn, referee, "referred_by_user_id", referrer)
    plan = await RECOVER_USERS.plan(ctx, [])
    groups = plan.private(RecoverUsersData).groups
    where = {i: k for k, g in enumerate(groups) for i in g.ids}
    assert "avatar_url" not in groups[where[referrer]].columns
    assert groups[where[referee]].columns < groups[where[referrer]].columns
    assert where[referrer] < where[referee]
    state, outcome = await run_step(leaps_dsn, RECOVER_USERS, plan, await admin(leaps_dsn))
    assert state == "done" and outcome.affected == 3, outcome
    assert (
        await scalar(leaps_dsn, "SELECT referred_by_user_id FROM users WHERE id = %s", (referee,))
        == referrer
    )


@pytest.mark.parametrize("prefix", ["!", "~"])  # sorts before or after any uuid
async def test_audit_rows_with_equal_times_are_ordered_by_what_they_do(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector, prefix: str
) -> None:
    loss = await faults.data_loss(pct=10, accounts=3)
    renamed, deleted, _ = sorted(loss.accounts)
    # In the INSERT's transaction (same time): an update of one, a delete of another.
    await execute(
        leaps_dsn,
        "INSERT INTO audit_log (id, actor_id, action, target_id, meta, created_at)"
        " SELECT %s || id, actor_id, 'UPDATE_users', target_id,"
        " jsonb_set(meta, '{new_values,handle}', '\"renamed_handle\"')"
        " || jsonb_build_object('operation', 'UPDATE', 'old_values', meta -> 'new_values'),"
        " created_at FROM audit_log WHERE action = 'INSERT_users' AND target_id = %s",
        (prefix, renamed),
    )
    await execute(
        leaps_dsn,
        "INSERT INTO audit_log (id, actor_id, action, target_id, meta, created_at)"
        " SELECT %s || id, actor_id, 'DELETE_users', target_id, (meta - 'new_values')"
        " || jsonb_build_object('operation', 'DELETE', 'old_values', meta -> 'new_values'),"
        " created_at FROM audit_log WHERE action = 'INSERT_users' AND target_id = %s",
        (prefix, deleted),
    )
    plan = await RECOVER_USERS.plan(ctx, [])
    assert plan.count == 2 and deleted not in plan.private(RecoverUsersData).ids
    row = target(plan, renamed)
    assert (row["latest"], row["handle"], row["verdict"]) == (
        "UPDATE",
        "renamed_handle",
        "recoverable",
    )
    assert (target(plan, deleted)["latest"], target(plan, deleted)["verdict"]) == (
        "DELETE",
        "deleted",
    )
    assert any(
        "whose latest audit row is a DELETE were deleted on purpose" in w and deleted in w
        for w in plan.warnings
    ), plan.warnings


async def delete_on_purpose(dsn: str, user: str, ago: timedelta) -> None:
    """Delete a user through the application (audited), `ago` before now."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        actor = await (
            await conn.execute("SELECT id FROM users WHERE role = 'SUPERADMIN' ORDER BY id LIMIT 1")
        ).fetchone()
        assert actor is not None
        await conn.execute(
            "SELECT set_config('app.user_id', %s, true),"
            " set_config('app.user_role', 'SUPERADMIN', true)",
            (actor[0],),
        )
        await conn.execute("DELETE FROM users WHERE id = %s", (user,))
        await conn.execute(
            "UPDATE audit_log SET created_at = (now() AT TIME ZONE 'UTC') - %s"
            " WHERE action = 'DELETE_users' AND target_id = %s",
            (ago, user),
        )
        await conn.commit()


async def test_include_deleted_restores_those_deleted_after_the_latest_baseline(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector, store: StateStore
) -> None:
    loss = await faults.data_loss(pct=10, accounts=2)
    before, after = (
        str(r["id"])
        for r in await rows(
            leaps_dsn,
            "SELECT id FROM users WHERE role = 'PARTICIPANT' AND NOT id = ANY(%s)"
            " ORDER BY id LIMIT 2",
            (loss.users,),
        )
    )
    await delete_on_purpose(leaps_dsn, before, timedelta(hours=2))
    await delete_on_purpose(leaps_dsn, after, timedelta(minutes=10))
    with pytest.raises(UsageError, match="no baseline yet"):
        await RECOVER_USERS.plan(ctx, [INCLUDE_DELETED])
    assert await deleted_on_purpose(ctx) == 0

    baseline = datetime.now(UTC) - timedelta(hours=1)
    await StoreBaselines(store).save(ctx.gateway.target, {"users": 1}, now=baseline)
    assert await deleted_on_purpose(ctx) == 1
    report = await recover(ctx, ["--dry-run"])
    named = next(f for f in report.findings if f.check == f"step: recover-users {INCLUDE_DELETED}")
    assert (
        named.hint == f"/db recover-users {INCLUDE_DELETED}" and "1 missing user" in named.summary
    )

    plan = await RECOVER_USERS.plan(ctx, [])
    assert sorted(plan.private(RecoverUsersData).ids) == sorted(loss.accounts)
    listing = next(w for w in plan.warnings if "deleted on purpose" in w)
    assert before in listing and after in listing
    assert f"1 of them were deleted after the {baseline:%Y-%m-%d %H:%M} UTC baseline" in listing
    assert f"`/db recover-users {INCLUDE_DELETED}`" in listing

    plan = await RECOVER_USERS.plan(ctx, [INCLUDE_DELETED])
    assert sorted(plan.private(RecoverUsersData).ids) == sorted([*loss.accounts, after])
    assert target(plan, after)["latest"] == "DELETE"
    state, outcome = await run_step(leaps_dsn, RECOVER_USERS, plan, await admin(leaps_dsn))
    assert state == "done" and outcome.affected == 3, outcome
    assert await present(leaps_dsn, [before, after]) == {after}
    assert (
        await scalar(leaps_dsn, "SELECT role::text FROM users WHERE id = %s", (after,))
        == "PARTICIPANT"
    )
    assert await deleted_on_purpose(ctx) == 0


async def test_the_plan_message_shows_the_insert(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.data_loss(pct=10, accounts=2)
    plan = await RECOVER_USERS.plan(ctx, [])
    message = approval_message(
        approval_id="apv-1",
        plan=plan,
        state="pending",
        requester_id="U0ALICE",
        needed=1,
        approver_role="ADMIN",
        approved_by=[],
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        outcome=None,
        limits="",
        button_value="x",
    )
    shown = [str(b["text"]["text"]) for b in message.blocks_json() if b.get("type") == "section"]
    steps = next(t for t in shown if "INSERT INTO users" in t)
    insert = steps[steps.index("INSERT INTO users") :]
    assert "jsonb_populate_record(NULL::users" in insert and "RETURNING id" in insert
    assert "restored_as" in "".join(shown) and "image_role" in "".join(shown)
