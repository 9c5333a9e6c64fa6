"""The data repairs against a real PostgreSQL 15: each fault injected with a known count is
planned exactly, repaired through the executor, backed up row for row, and a second run
changes nothing; a trigger of the database that refuses the change leaves every table as
it was and no backup behind."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from bot.approvals.executor import Executor
from bot.gateway import TargetGateway
from bot.router import RunContext
from commands.base import BACKUP_SCHEMA, LeapsIdentity, Status, UsageError
from commands.fixture.faults import FaultInjector
from commands.integrity import integrity
from commands.keyranges import WHOLE, key_ranges
from commands.remedies.base import REMEDIES, Plan, Remedy, backup_name
from commands.remedies.learn import DEDUPE_LEARN, LearnData
from commands.remedies.ledger import (
    DEDUPE_EVENTS,
    RECONCILE_POINTS,
    RECONCILE_SOURCE,
    survey_due,
)
from commands.remedies.orphans import CLEANUP_ORPHANS
from commands.remedies.rowsets import SAMPLE
from tests.conftest import FAST_THRESHOLDS

Rows = list[tuple[Any, ...]]
GONE_USER = "gone-user"


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn)
    yield RunContext(gateway, FAST_THRESHOLDS)
    await gateway.close()


# --- helpers --------------------------------------------------------------------------


async def run(
    dsn: str, query: LiteralString | sql.Composed, params: tuple[Any, ...] | None = None
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(query, params)


async def fetch(
    dsn: str, query: LiteralString | sql.Composed, params: tuple[Any, ...] | None = None
) -> Rows:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


async def table(dsn: str, name: str) -> Rows:
    return await fetch(dsn, sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(name)))


async def tables(dsn: str, *names: str) -> dict[str, Rows]:
    return {n: await table(dsn, n) for n in names}


def backup_ident(approval: str, name: str) -> sql.Identifier:
    return sql.Identifier(BACKUP_SCHEMA, backup_name(approval, name))


async def backup(dsn: str, approval: str, name: str) -> Rows:
    return await fetch(
        dsn, sql.SQL("SELECT * FROM {} ORDER BY id").format(backup_ident(approval, name))
    )


async def backup_tables(dsn: str) -> list[str]:
    rows = await fetch(
        dsn,
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s ORDER BY 1",
        (BACKUP_SCHEMA,),
    )
    return [str(r[0]) for r in rows]


async def plan_of(remedy: Remedy, ctx: RunContext, args: list[str] | None = None) -> Plan:
    return await remedy.plan(ctx, args or [])


async def refuse(dsn: str, name: str, event: LiteralString) -> None:
    """A trigger of the database that refuses every `event` on table `name`."""
    await run(
        dsn,
        sql.SQL(
            "CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'changes to % are frozen for the audit', TG_TABLE_NAME"
            " USING ERRCODE = '42501'; END $$;"
            " CREATE TRIGGER refuse_change BEFORE {} ON {}"
            " FOR EACH ROW EXECUTE FUNCTION refuse_change();"
        ).format(sql.SQL(event), sql.Identifier(name)),
    )


async def leaps_user(dsn: str, role: str) -> LeapsIdentity:
    """A LEAPS user of `role` to act as, as an approver's own account would be."""
    rows = await fetch(
        dsn, 'SELECT id FROM users WHERE role = %s::"Role" ORDER BY id LIMIT 1', (role,)
    )
    return LeapsIdentity(str(rows[0][0]), role, "a test approver's account")


async def assert_refused(
    dsn: str,
    remedy: Remedy,
    plan: Plan,
    approval: str,
    names: tuple[str, ...],
    table_name: str,
    identity: LeapsIdentity | None = None,
) -> None:
    before = await tables(dsn, *names)
    state, outcome = await Executor(dsn).apply(remedy, plan, approval, identity)
    assert state == "failed", outcome
    assert f"changes to {table_name} are frozen for the audit" in outcome.summary
    assert f"[trigger refuse_change on {table_name} (refuse_change())]" in outcome.summary
    assert outcome.error is not None and outcome.error.startswith("42501")
    assert await tables(dsn, *names) == before
    assert await backup_tables(dsn) == []


async def assert_rerun_changes_nothing(
    dsn: str, ctx: RunContext, remedy: Remedy, names: tuple[str, ...], args: list[str] | None = None
) -> None:
    before = await tables(dsn, *names)
    again = await plan_of(remedy, ctx, args)
    assert again.count == 0 and again.needs_approval is False
    assert "nothing to do" in again.summary
    state, outcome = await Executor(dsn).apply(remedy, again, "apv-rerun")
    assert state == "done", outcome
    assert outcome.affected == 0
    assert await tables(dsn, *names) == before
    assert not [t for t in await backup_tables(dsn) if t.startswith("apv_rerun")]


# --- fault injection: FaultInjector, plus one case it does not make --------------------


async def drop_constraint(dsn: str, name: str, constraint: str) -> None:
    await run(
        dsn,
        sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
            sql.Identifier(name), sql.Identifier(constraint)
        ),
    )


async def orphan_submissions_with_attachments(dsn: str, n: int) -> list[str]:
    """n existing submissions that have attachments lose their user (the submissions'
    foreign key dropped first; the attachments' one still cascades)."""
    await drop_constraint(dsn, "submissions", "submissions_user_id_fkey")
    rows = await fetch(
        dsn,
        "UPDATE submissions SET user_id = %s || id WHERE id IN (SELECT s.id FROM submissions s"
        " WHERE EXISTS (SELECT 1 FROM submission_attachments sa"
        " WHERE sa.submission_id = s.id) ORDER BY s.id LIMIT %s) RETURNING id",
        (GONE_USER, n),
    )
    assert len(rows) == n
    return sorted(str(r[0]) for r in rows)


# --- registration ---------------------------------------------------------------------


def test_remedies_are_registered_with_their_approvals() -> None:
    for remedy in (CLEANUP_ORPHANS, DEDUPE_LEARN, DEDUPE_EVENTS):
        assert REMEDIES[remedy.name] is remedy
        assert remedy.destroys_data and remedy.approvers == 2
        assert remedy.approver_role == "ADMIN"
    assert REMEDIES["reconcile-points"] is RECONCILE_POINTS
    assert not RECONCILE_POINTS.destroys_data and RECONCILE_POINTS.approvers == 1
    assert RECONCILE_POINTS.approver_role == "ADMIN"


async def test_healthy_fixture_needs_no_repair(ctx: RunContext) -> None:
    for remedy in (CLEANUP_ORPHANS, DEDUPE_LEARN, RECONCILE_POINTS, DEDUPE_EVENTS):
        plan = await plan_of(remedy, ctx)
        assert plan.count == 0, (remedy.name, plan.summary)
        assert plan.needs_approval is False
        assert plan.backup is None


async def test_cleanup_orphans_rejects_unknown_tables(ctx: RunContext) -> None:
    with pytest.raises(UsageError, match="takes one of"):
        await plan_of(CLEANUP_ORPHANS, ctx, ["users"])


# --- cleanup-orphans ------------------------------------------------------------------

ORPHAN_TABLES = ("submissions", "points_ledger", "submission_attachments")


async def test_cleanup_all_orphans_backs_up_every_deleted_row(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    subs = await faults.orphan_submissions(3)
    subs += await faults.orphan_submissions(2, parent="activity")
    ledger = await faults.orphan_ledger_rows(4)
    ledger += await faults.orphan_ledger_rows(1, parent="activity")
    atts = await faults.orphan_attachments(5)
    plan = await plan_of(CLEANUP_ORPHANS, ctx, ["all"])
    assert plan.count == 15 and plan.needs_approval
    assert plan.data["counts"] == {
        "attachments": 5,
        "child_attachments": 0,
        "submissions": 5,
        "points_ledger": 5,
    }
    assert {str(t["id"]) for t in plan.targets} == set(subs + ledger + atts)
    assert plan.backup is not None and "dbops_backup" in plan.backup
    assert all("NOT EXISTS" in s.sql for s in plan.steps if s.note and "locks" in s.note)

    before = await tables(leaps_dsn, *ORPHAN_TABLES)
    state, outcome = await Executor(leaps_dsn).apply(CLEANUP_ORPHANS, plan, "apv-orphans1")
    assert state == "done", outcome
    assert outcome.affected == 15 and outcome.backed_up == 15
    after = await tables(leaps_dsn, *ORPHAN_TABLES)
    deleted = {"submissions": subs, "points_ledger": ledger, "submission_attachments": atts}
    for name in ORPHAN_TABLES:
        saved = await backup(leaps_dsn, "apv-orphans1", name)
        assert sorted(after[name] + saved) == before[name]
        assert sorted(str(r[0]) for r in saved) == sorted(deleted[name])

    report = await integrity(ctx, [])
    orphan_findings = [f for f in report.findings if f.check.startswith("orphans:")]
    assert orphan_findings and all(f.status == Status.OK for f in orphan_findings)
    await assert_rerun_changes_nothing(leaps_dsn, ctx, CLEANUP_ORPHANS, ORPHAN_TABLES, ["all"])


async def test_cleanup_orphaned_submissions_takes_their_attachments_along(
    ctx: RunContext, leaps_dsn: str
) -> None:
    """The attachments' foreign key still cascades: the attachments of the deleted
    submissions are counted, backed up and deleted explicitly, not lost to the cascade."""
    subs = await orphan_submissions_with_attachments(leaps_dsn, 4)
    children = await fetch(
        leaps_dsn,
        "SELECT id FROM submission_attachments WHERE submission_id = ANY(%s) ORDER BY id",
        (subs,),
    )
    assert children
    plan = await plan_of(CLEANUP_ORPHANS, ctx, ["submissions"])
    assert plan.data["counts"] == {"child_attachments": len(children), "submissions": 4}
    assert plan.count == 4 + len(children)
    assert any("attachments" in w for w in plan.warnings)

    before = await tables(leaps_dsn, *ORPHAN_TABLES)
    state, outcome = await Executor(leaps_dsn).apply(CLEANUP_ORPHANS, plan, "apv-orphans2")
    assert state == "done", outcome
    after = await tables(leaps_dsn, *ORPHAN_TABLES)
    assert after["points_ledger"] == before["points_ledger"]
    for name in ("submissions", "submission_attachments"):
        saved = await backup(leaps_dsn, "apv-orphans2", name)
        assert sorted(after[name] + saved) == before[name]
    saved_children = await backup(leaps_dsn, "apv-orphans2", "submission_attachments")
    assert [r[0] for r in saved_children] == [r[0] for r in children]

    await assert_rerun_changes_nothing(
        leaps_dsn, ctx, CLEANUP_ORPHANS, ORPHAN_TABLES, ["submissions"]
    )


async def test_cleanup_orphans_refuses_a_cascade_the_backup_would_miss(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.orphan_ledger_rows(2)
    await run(
        leaps_dsn,
        "CREATE TABLE ledger_notes (id text PRIMARY KEY,"
        " ledger_id text REFERENCES points_ledger (id) ON DELETE CASCADE)",
    )
    with pytest.raises(UsageError, match="ledger_notes"):
        await plan_of(CLEANUP_ORPHANS, ctx, ["points_ledger"])


async def test_cleanup_orphans_refused_by_a_trigger_changes_nothing(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.orphan_submissions(2)
    await faults.orphan_ledger_rows(2)
    plan = await plan_of(CLEANUP_ORPHANS, ctx, [])
    assert plan.count == 4
    await refuse(leaps_dsn, "points_ledger", "DELETE")
    await assert_refused(
        leaps_dsn, CLEANUP_ORPHANS, plan, "apv-orphans3", ORPHAN_TABLES, "points_ledger"
    )


async def test_cleanup_orphans_drift_aborts(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.orphan_ledger_rows(2)
    plan = await plan_of(CLEANUP_ORPHANS, ctx, ["ledger"])
    assert plan.count == 2
    await faults.orphan_ledger_rows(1)
    before = await tables(leaps_dsn, *ORPHAN_TABLES)
    state, outcome = await Executor(leaps_dsn).apply(CLEANUP_ORPHANS, plan, "apv-orphans4")
    assert state == "aborted" and "drift" in outcome.summary
    assert await tables(leaps_dsn, *ORPHAN_TABLES) == before
    assert await backup_tables(leaps_dsn) == []


# --- dedupe-learn ---------------------------------------------------------------------


async def submission_columns(dsn: str) -> dict[str, int]:
    cols = await fetch(
        dsn,
        "SELECT attname::text FROM pg_attribute WHERE attrelid = 'submissions'::regclass"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    return {str(c[0]): i for i, c in enumerate(cols)}


async def test_dedupe_learn_keeps_the_approved_one_else_the_latest(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    """Production's guards: APPROVED is final, so where a user's original LEARN is
    APPROVED the newer PENDING one goes; where both are PENDING the latest stays. The
    rejections name the acting reviewer, and production's audit trigger records them."""
    newer = await faults.duplicate_learn(8)
    before = await table(leaps_dsn, "submissions")
    col = await submission_columns(leaps_dsn)
    users = {r[col["user_id"]] for r in before if str(r[0]) in newer}
    originals = {
        r[col["user_id"]]: r
        for r in before
        if r[col["user_id"]] in users
        and r[col["activity_code"]] == "LEARN"
        and r[col["status"]] in ("PENDING", "APPROVED")
        and str(r[0]) not in newer
    }
    newer_of = {r[col["user_id"]]: str(r[0]) for r in before if str(r[0]) in newer}
    approved = {u for u, r in originals.items() if r[col["status"]] == "APPROVED"}
    assert approved and approved != users  # both cases are exercised
    rejected = sorted(newer_of[u] if u in approved else str(originals[u][0]) for u in users)
    kept = sorted(str(originals[u][0]) if u in approved else newer_of[u] for u in users)

    plan = await plan_of(DEDUPE_LEARN, ctx)
    assert plan.count == 8 and plan.needs_approval
    assert sorted(str(t["id"]) for t in plan.targets) == rejected
    assert sorted(str(t["kept_submission"]) for t in plan.targets) == kept
    assert all(t["status"] == "PENDING" for t in plan.targets)

    reviewer = await leaps_user(leaps_dsn, "REVIEWER")
    state, outcome = await Executor(leaps_dsn).apply(DEDUPE_LEARN, plan, "apv-learn1", reviewer)
    assert state == "done", outcome
    assert outcome.affected == 8 and outcome.backed_up == 8
    assert f"acted as LEAPS user {reviewer.user_id} (REVIEWER" in outcome.summary
    after = await table(leaps_dsn, "submissions")
    assert len(after) == len(before)  # nothing deleted

    changed = {col[c] for c in ("status", "review_note", "updated_at", "reviewer_id")}
    saved = await backup(leaps_dsn, "apv-learn1", "submissions")
    assert saved == [r for r in before if str(r[0]) in rejected]
    now = {str(r[0]): r for r in after}
    for old in saved:
        new = now[str(old[0])]
        assert [v for i, v in enumerate(new) if i not in changed] == [
            v for i, v in enumerate(old) if i not in changed
        ]
        assert (new[col["status"]], new[col["reviewer_id"]]) == ("REJECTED", reviewer.user_id)
        note = str(new[col["review_note"]])
        assert "Duplicate LEARN" in note and "apv-learn1" in note
        assert new[col["updated_at"]] >= max(old[col["updated_at"]], old[col["created_at"]])
    assert [r for r in after if str(r[0]) not in rejected] == [
        r for r in before if str(r[0]) not in rejected
    ]
    audited = await fetch(
        leaps_dsn,
        "SELECT target_id, actor_id, meta -> 'new_values' ->> 'status',"
        " meta ->> 'user_role' FROM audit_log WHERE action = 'UPDATE_submissions'"
        " ORDER BY target_id",
    )
    assert audited == [(i, reviewer.user_id, "REJECTED", "REVIEWER") for i in rejected]
    report = await integrity(ctx, [])
    (learn,) = [f for f in report.findings if f.check == "duplicate LEARN submissions"]
    assert learn.status == Status.OK, learn.summary

    await assert_rerun_changes_nothing(leaps_dsn, ctx, DEDUPE_LEARN, ("submissions",))


async def test_dedupe_learn_leaves_two_approved_to_a_person(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    twice = await faults.duplicate_approved_learn(2)
    pending = await faults.duplicate_learn(3)
    both = await fetch(
        leaps_dsn, "SELECT DISTINCT user_id FROM submissions WHERE id = ANY(%s)", (twice,)
    )
    humans = sorted(str(r[0]) for r in both)
    plan = await plan_of(DEDUPE_LEARN, ctx)
    assert plan.count == 3
    assert plan.private(LearnData).needs_decision == humans
    decisions = [w for w in plan.warnings if w.startswith("needs a human decision")]
    assert len(decisions) == 2 and all("2 APPROVED LEARN" in w for w in decisions)
    assert "2 users with several APPROVED LEARN rows need a human" in plan.summary

    before = await fetch(
        leaps_dsn, "SELECT * FROM submissions WHERE user_id = ANY(%s) ORDER BY id", (humans,)
    )
    state, outcome = await Executor(leaps_dsn).apply(
        DEDUPE_LEARN, plan, "apv-learn3", await leaps_user(leaps_dsn, "ADMIN")
    )
    assert state == "done", outcome
    assert outcome.affected == 3 and "2 users left for a human decision" in outcome.summary
    after = await fetch(
        leaps_dsn, "SELECT * FROM submissions WHERE user_id = ANY(%s) ORDER BY id", (humans,)
    )
    assert after == before
    statuses = await fetch(
        leaps_dsn, "SELECT DISTINCT status::text FROM submissions WHERE id = ANY(%s)", (pending,)
    )
    assert statuses  # the plain duplicates were decided either way
    again = await plan_of(DEDUPE_LEARN, ctx)
    assert again.count == 0 and len(again.private(LearnData).needs_decision) == 2


async def test_dedupe_learn_leaves_a_repeated_certificate_to_a_person(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    """A duplicate whose certificateHash is another user's approved one: production's
    certificate trigger refuses any change to it, so the plan holds it back and says
    why, and the rest of the repair goes through."""
    await faults.duplicate_learn(3)
    first = await plan_of(DEDUPE_LEARN, ctx)
    held = first.targets[0]
    (other,) = await fetch(
        leaps_dsn,
        "SELECT id FROM submissions WHERE activity_code = 'LEARN' AND status = 'APPROVED'"
        " AND user_id <> %s ORDER BY id LIMIT 1",
        (held["user_id"],),
    )
    stamp = '{"certificateHash": "sha256:0f1e2d"}'
    stamp_sql: LiteralString = "UPDATE submissions SET payload = payload || %s WHERE id = %s"
    await run(leaps_dsn, stamp_sql, (stamp, other[0]))
    async with await psycopg.AsyncConnection.connect(leaps_dsn) as conn, conn.transaction():
        # Damage from before the trigger existed: written past it, as the owner.
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(stamp_sql, (stamp, held["id"]))
    admin = await leaps_user(leaps_dsn, "ADMIN")
    with pytest.raises(psycopg.errors.UniqueViolation, match="Certificate hash already exists"):
        async with await psycopg.AsyncConnection.connect(leaps_dsn) as conn, conn.transaction():
            await conn.execute("SELECT set_config('app.user_role', 'ADMIN', true)")
            await conn.execute(
                "UPDATE submissions SET status = 'REJECTED', reviewer_id = %s WHERE id = %s",
                (admin.user_id, held["id"]),
            )

    plan = await plan_of(DEDUPE_LEARN, ctx)
    assert plan.count == 2 and held["id"] not in {t["id"] for t in plan.targets}
    (note,) = [w for w in plan.warnings if "repeats the certificateHash" in w]
    assert str(held["id"]) in note and "trg_check_certificate_hash" in note
    assert plan.private(LearnData).certificate_guards == ["trg_check_certificate_hash"]
    state, outcome = await Executor(leaps_dsn).apply(DEDUPE_LEARN, plan, "apv-learn6", admin)
    assert state == "done" and outcome.affected == 2, outcome
    (status,) = await fetch(
        leaps_dsn, "SELECT status::text FROM submissions WHERE id = %s", (held["id"],)
    )
    assert status == ("PENDING",)


async def test_dedupe_learn_refused_by_the_status_guard_names_it(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    """An approver whose LEAPS account is a participant: production's transition guard
    refuses, the outcome names it, everything rolls back."""
    await faults.duplicate_learn(3)
    plan = await plan_of(DEDUPE_LEARN, ctx)
    names = ("submissions", "audit_log")
    before = await tables(leaps_dsn, *names)
    participant = await leaps_user(leaps_dsn, "PARTICIPANT")
    state, outcome = await Executor(leaps_dsn).apply(DEDUPE_LEARN, plan, "apv-learn4", participant)
    assert state == "failed", outcome
    assert "Insufficient permissions to change submission status" in outcome.summary
    assert "trigger trg_validate_status_transition on submissions" in outcome.summary
    assert outcome.error is not None and outcome.error.startswith("42501")
    assert await tables(leaps_dsn, *names) == before
    assert await backup_tables(leaps_dsn) == []


async def test_dedupe_learn_without_anyone_to_act_as_changes_nothing(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.duplicate_learn(2)
    plan = await plan_of(DEDUPE_LEARN, ctx)
    before = await table(leaps_dsn, "submissions")
    state, outcome = await Executor(leaps_dsn).apply(DEDUPE_LEARN, plan, "apv-learn5")
    assert state == "aborted", outcome
    assert "nobody to act as" in outcome.summary and "acted as no LEAPS user" in outcome.summary
    assert await table(leaps_dsn, "submissions") == before
    assert await backup_tables(leaps_dsn) == []


async def test_dedupe_learn_plan_says_before_approval_when_the_guard_will_refuse(
    leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.duplicate_learn(2)
    gateway = TargetGateway(leaps_dsn)
    try:
        bare = await plan_of(DEDUPE_LEARN, RunContext(gateway, FAST_THRESHOLDS))
        refusal = [w for w in bare.warnings if "refuses this UPDATE" in w]
        assert refusal and "trg_validate_status_transition" in refusal[0]
        assert "app.user_role" in refusal[0] and "nobody (no REMEDY_SERVICE_USER_ID)" in str(
            bare.warnings
        )
        guards = next(w for w in bare.warnings if w.startswith("the UPDATE will meet"))
        assert (
            "audit_submission_status_changes" in guards and "trg_check_certificate_hash" in guards
        )

        admin = await leaps_user(leaps_dsn, "ADMIN")
        service = LeapsIdentity(admin.user_id, "ADMIN", "service identity REMEDY_SERVICE_USER_ID")
        served = await plan_of(
            DEDUPE_LEARN, RunContext(gateway, FAST_THRESHOLDS, service_identity=service)
        )
        assert not [w for w in served.warnings if "refuses" in w]
        assert any(service.describe() in w for w in served.warnings)
        ghost = LeapsIdentity("no-such-user", "ADMIN", "service identity")
        haunted = await plan_of(
            DEDUPE_LEARN, RunContext(gateway, FAST_THRESHOLDS, service_identity=ghost)
        )
        assert "the service identity no-such-user is not a LEAPS user" in haunted.warnings
    finally:
        await gateway.close()


async def test_dedupe_learn_refused_by_a_trigger_changes_nothing(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.duplicate_learn(3)
    plan = await plan_of(DEDUPE_LEARN, ctx)
    assert plan.count == 3
    await refuse(leaps_dsn, "submissions", "UPDATE")
    await assert_refused(
        leaps_dsn,
        DEDUPE_LEARN,
        plan,
        "apv-learn2",
        ("submissions", "audit_log"),
        "submissions",
        await leaps_user(leaps_dsn, "ADMIN"),
    )


# --- dedupe-ledger-events -------------------------------------------------------------


async def test_dedupe_ledger_events_keeps_the_first_row(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    events = await faults.duplicate_external_events(5)
    plan = await plan_of(DEDUPE_EVENTS, ctx)
    assert plan.count == 5 and plan.needs_approval
    assert sorted(str(t["external_event_id"]) for t in plan.targets) == sorted(events)

    before = await table(leaps_dsn, "points_ledger")
    state, outcome = await Executor(leaps_dsn).apply(DEDUPE_EVENTS, plan, "apv-events1")
    assert state == "done", outcome
    assert outcome.affected == 5 and outcome.backed_up == 5
    after = await table(leaps_dsn, "points_ledger")
    saved = await backup(leaps_dsn, "apv-events1", "points_ledger")
    assert sorted(after + saved) == before
    # the replays (same created_at, later id) went; each event keeps its first row
    assert all(str(r[0]).startswith("dup_") for r in saved)
    kept = await fetch(
        leaps_dsn,
        "SELECT external_event_id, count(*) FROM points_ledger"
        " WHERE external_event_id = ANY(%s) GROUP BY 1",
        (events,),
    )
    assert sorted(kept) == sorted((e, 1) for e in events)
    report = await integrity(ctx, [])
    (dups,) = [f for f in report.findings if f.check == "duplicate external_event_id"]
    assert dups.status == Status.OK, dups.summary

    await assert_rerun_changes_nothing(leaps_dsn, ctx, DEDUPE_EVENTS, ("points_ledger",))


async def test_dedupe_ledger_events_refused_by_a_trigger_changes_nothing(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.duplicate_external_events(2)
    plan = await plan_of(DEDUPE_EVENTS, ctx)
    assert plan.count == 2
    await refuse(leaps_dsn, "points_ledger", "DELETE")
    await assert_refused(
        leaps_dsn, DEDUPE_EVENTS, plan, "apv-events2", ("points_ledger",), "points_ledger"
    )


# --- reconcile-points -----------------------------------------------------------------

_PAIR_SUMS = """
SELECT l.user_id, l.activity_code, sum(l.delta_points)::int
FROM points_ledger l JOIN unnest(%s::text[], %s::text[]) AS p(u, a)
  ON l.user_id = p.u AND l.activity_code = p.a
GROUP BY 1, 2 ORDER BY 1, 2
"""


async def pair_sums(dsn: str, pairs: list[tuple[str, str]]) -> Rows:
    return await fetch(dsn, _PAIR_SUMS, ([u for u, _ in pairs], [a for _, a in pairs]))


async def test_reconcile_points_inserts_each_missing_award_once(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    healthy = await table(leaps_dsn, "points_ledger")
    pairs = await faults.missing_awards(6)
    sums_before_fault = pair_sums_of(healthy, pairs)
    assert await pair_sums(leaps_dsn, pairs) == []
    approved = await fetch(
        leaps_dsn,
        "SELECT s.id FROM submissions s JOIN unnest(%s::text[], %s::text[]) AS p(u, a)"
        " ON s.user_id = p.u AND s.activity_code = p.a WHERE s.status = 'APPROVED'",
        ([u for u, _ in pairs], [a for _, a in pairs]),
    )
    plan = await plan_of(RECONCILE_POINTS, ctx)
    assert plan.data["pairs"] == 6
    assert plan.count == len(approved) >= 6
    assert plan.backup is None and plan.needs_approval
    assert plan.data["source"] == "FORM"
    assert plan.data["keys"] == ["peers_trained", "students_trained"]

    before = await table(leaps_dsn, "points_ledger")
    state, outcome = await Executor(leaps_dsn).apply(RECONCILE_POINTS, plan, "apv-reconcile1")
    assert state == "done", outcome
    assert outcome.affected == plan.count
    after = await table(leaps_dsn, "points_ledger")
    before_ids = {r[0] for r in before}
    assert [r for r in after if r[0] in before_ids] == before  # nothing overwritten
    assert await pair_sums(leaps_dsn, pairs) == sums_before_fault
    inserted = await fetch(
        leaps_dsn,
        "SELECT l.source::text, l.external_source, l.external_event_id,"
        " l.meta ->> 'submission_id', l.id FROM points_ledger l WHERE l.id <> ALL(%s)",
        (sorted(before_ids),),
    )
    assert sorted(str(r[3]) for r in inserted) == sorted(str(r[0]) for r in approved)
    enum = await fetch(leaps_dsn, """SELECT unnest(enum_range(NULL::"LedgerSource"))::text""")
    for source, ext_source, ext_id, sub_id, row_id in inserted:
        assert source in {str(e[0]) for e in enum} and source == "FORM"
        assert ext_source == RECONCILE_SOURCE
        assert ext_id == f"reconcile:{sub_id}" and row_id == f"reconcile_{sub_id}"
    assert await backup_tables(leaps_dsn) == []
    report = await integrity(ctx, [])
    points = [f for f in report.findings if f.check.startswith("points:")]
    assert points and all(f.status == Status.OK for f in points), [f.summary for f in points]

    await assert_rerun_changes_nothing(leaps_dsn, ctx, RECONCILE_POINTS, ("points_ledger",))


def pair_sums_of(rows: Rows, pairs: list[tuple[str, str]]) -> Rows:
    """The per-pair ledger sums of a snapshot (columns: id, user_id, activity_code,
    source, delta_points, ...)."""
    wanted = set(pairs)
    sums: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (str(r[1]), str(r[2]))
        if key in wanted:
            sums[key] = sums.get(key, 0) + int(r[4])
    return sorted((u, a, n) for (u, a), n in sums.items())


async def test_reconcile_points_refused_by_a_trigger_changes_nothing(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.missing_awards(2)
    plan = await plan_of(RECONCILE_POINTS, ctx)
    assert plan.count >= 2
    await refuse(leaps_dsn, "points_ledger", "INSERT")
    await assert_refused(
        leaps_dsn, RECONCILE_POINTS, plan, "apv-reconcile2", ("points_ledger",), "points_ledger"
    )


async def test_reconcile_points_never_invents_a_source(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.missing_awards(1)
    await run(leaps_dsn, """ALTER TYPE "LedgerSource" RENAME VALUE 'FORM' TO 'FORM_OLD'""")
    await run(leaps_dsn, """ALTER TYPE "LedgerSource" RENAME VALUE 'MANUAL' TO 'HAND'""")
    with pytest.raises(UsageError, match="will not invent one"):
        await plan_of(RECONCILE_POINTS, ctx)


async def test_reconcile_points_falls_back_to_manual(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.missing_awards(1)
    await run(leaps_dsn, """ALTER TYPE "LedgerSource" RENAME VALUE 'FORM' TO 'FORM_OLD'""")
    plan = await plan_of(RECONCILE_POINTS, ctx)
    assert plan.data["source"] == "MANUAL" and plan.count >= 1
    state, outcome = await Executor(leaps_dsn).apply(RECONCILE_POINTS, plan, "apv-reconcile3")
    assert state == "done", outcome
    rows = await fetch(
        leaps_dsn,
        "SELECT DISTINCT source::text FROM points_ledger WHERE external_source = %s",
        (RECONCILE_SOURCE,),
    )
    assert rows == [("MANUAL",)]


async def test_reconcile_points_counted_by_ranges_of_users_as_in_one(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    """The plan's survey split into ranges of user ids (as at scale, each range one bounded
    statement) gives the totals and the sample of one range over every user, whatever the
    split; an award an earlier reconcile made (found by its own row id) is not due again."""
    await faults.missing_awards(SAMPLE + 4)
    keys = ("peers_trained", "students_trained")
    ids = [str(r[0]) for r in await fetch(leaps_dsn, "SELECT id FROM users ORDER BY id")]
    whole, sample = await survey_due(ctx, keys, [WHOLE])
    assert whole["pairs"] == SAMPLE + 4 and whole["n"] >= SAMPLE + 4
    assert [r["submission_id"] for r in sample] == sorted(str(r["submission_id"]) for r in sample)
    assert len(sample) == SAMPLE
    for bounds in ([ids[0]], [ids[len(ids) // 2]], [ids[3], ids[len(ids) // 3], ids[-3]]):
        pieces = key_ranges(bounds, nulls=True)
        assert await survey_due(ctx, keys, pieces) == (whole, sample), bounds
    # an award already made for the first due submission, under another activity code
    first = sample[0]
    await run(
        leaps_dsn,
        "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
        " event_time) VALUES ('reconcile_' || %s, %s, 'SHINE', 'MANUAL', 1, now())",
        (first["submission_id"], first["user_id"]),
    )
    again, _ = await survey_due(ctx, keys, key_ranges([ids[len(ids) // 2]], nulls=False))
    assert again["n"] == whole["n"] - 1


async def test_reconcile_points_reads_the_live_quota_keys(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.camelcase_quota_function()
    plan = await plan_of(RECONCILE_POINTS, ctx)
    assert plan.data["keys"] == ["peersTrained", "studentsTrained"]
    assert any("peersTrained" in str(s.params) for s in plan.steps)


# --- every repair as the application would make it ----------------------------------


async def ledger_audit(dsn: str, action: str) -> Rows:
    return await fetch(
        dsn,
        "SELECT target_id, actor_id, meta ->> 'user_role' FROM audit_log"
        " WHERE action = %s ORDER BY target_id",
        (action,),
    )


async def test_repairs_act_as_the_identity_through_every_guard(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    """With all of production's triggers present and app.user_id / app.user_role set, each
    repair succeeds, its ledger changes are audited under the acting identity, the
    analytics listeners hear of them, and the attachment cleanup trigger takes nothing
    the backup lacks."""
    admin = await leaps_user(leaps_dsn, "ADMIN")
    await faults.missing_awards(2)
    replayed = await faults.duplicate_external_events(2)
    await drop_constraint(
        leaps_dsn, "submission_attachments", "submission_attachments_submission_id_fkey"
    )
    orphans = await orphan_submissions_with_attachments(leaps_dsn, 2)
    lost = await faults.orphan_ledger_rows(2)

    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as listener:
        await listener.execute("LISTEN refresh_analytics")

        plan = await plan_of(RECONCILE_POINTS, ctx)
        assert any("audit_points_changes" in w for w in plan.warnings)
        state, outcome = await Executor(leaps_dsn).apply(RECONCILE_POINTS, plan, "apv-g1", admin)
        assert state == "done", outcome
        inserted = await fetch(
            leaps_dsn,
            "SELECT id FROM points_ledger WHERE external_source = %s ORDER BY id",
            (RECONCILE_SOURCE,),
        )
        assert len(inserted) == plan.count
        assert await ledger_audit(leaps_dsn, "INSERT_points_ledger") == [
            (str(r[0]), admin.user_id, "ADMIN") for r in inserted
        ]

        plan = await plan_of(DEDUPE_EVENTS, ctx)
        state, outcome = await Executor(leaps_dsn).apply(DEDUPE_EVENTS, plan, "apv-g2", admin)
        assert state == "done", outcome
        gone = [str(r[0]) for r in await backup(leaps_dsn, "apv-g2", "points_ledger")]
        assert len(gone) == len(replayed) == 2

        attachments = await fetch(
            leaps_dsn,
            "SELECT id FROM submission_attachments WHERE submission_id = ANY(%s) ORDER BY id",
            (orphans,),
        )
        plan = await plan_of(CLEANUP_ORPHANS, ctx, ["all"])
        assert plan.count == 2 + len(attachments) + 2
        state, outcome = await Executor(leaps_dsn).apply(CLEANUP_ORPHANS, plan, "apv-g3", admin)
        assert state == "done", outcome
        assert outcome.affected == plan.count
        saved = await backup(leaps_dsn, "apv-g3", "submission_attachments")
        assert [r[0] for r in saved] == [r[0] for r in attachments]
        assert sorted(str(r[0]) for r in await backup(leaps_dsn, "apv-g3", "submissions")) == (
            orphans
        )
        deleted = await ledger_audit(leaps_dsn, "DELETE_points_ledger")
        assert deleted == sorted((i, admin.user_id, "ADMIN") for i in [*gone, *lost])

        heard = [n.payload async for n in listener.notifies(timeout=1.0)]
    ledger_notes = [json.loads(p) for p in heard if '"points_ledger"' in p]
    assert len(ledger_notes) == len(inserted) + len(gone) + len(lost)
