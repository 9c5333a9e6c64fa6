"""set-role, the webhook repairs and migration-resolve on both audit variants (the
fixture's trigger, and production's, which refuses every write made with app.user_id so
the bot writes LEAPS's audit rows itself), and their samplers: a sampled plan changes
exactly its n rows, checked against the unchanged database, and the unsampled plan all."""

from __future__ import annotations

from typing import Any, LiteralString

from psycopg import sql

from bot.approvals.executor import Executor
from bot.router import RunContext
from commands.base import BACKUP_SCHEMA, LeapsIdentity
from commands.fixture.faults import DEFAULT_MIGRATION, FaultInjector
from commands.remedies.base import Plan, Remedy, backup_name
from commands.remedies.migrations import MIGRATION_RESOLVE
from commands.remedies.roles import SET_ROLE
from commands.remedies.webhooks import (
    DEDUPE_WEBHOOKS_REMEDY,
    REMATCH_EMAILS_REMEDY,
    REPROCESS_WEBHOOKS,
)
from tests.conftest import make_audit_variant
from tests.test_webhooks import fetch

Rows = list[tuple[Any, ...]]


async def staff(dsn: str, role: str = "ADMIN") -> LeapsIdentity:
    rows = await fetch(
        dsn, 'SELECT id FROM users WHERE role = %s::"Role" ORDER BY id LIMIT 1', (role,)
    )
    return LeapsIdentity(str(rows[0][0]), role, "a test approver's account")


async def participants(dsn: str, n: int) -> list[tuple[str, str]]:
    """(id, handle) of n participants, by id."""
    rows = await fetch(
        dsn,
        "SELECT id, handle FROM users WHERE role = 'PARTICIPANT' AND email IS NOT NULL"
        " ORDER BY id LIMIT %s",
        (n,),
    )
    return [(str(r[0]), str(r[1])) for r in rows]


async def audit_count(dsn: str) -> int:
    return int((await fetch(dsn, "SELECT count(*) FROM audit_log"))[0][0])


async def audit_rows(dsn: str, action: str, targets: list[str]) -> Rows:
    """(actor, target, operation, user_role, old image, new image) of `action` on targets."""
    return await fetch(
        dsn,
        "SELECT actor_id, target_id, meta->>'operation', meta->>'user_role',"
        " meta->'old_values', meta->'new_values', id IS NOT NULL FROM audit_log"
        " WHERE action = %s AND target_id = ANY(%s) ORDER BY target_id",
        (action, targets),
    )


async def run(dsn: str, remedy: Remedy, plan: Plan, approval: str, who: Any = None) -> Any:
    state, outcome = await Executor(dsn).apply(remedy, plan, approval, who)
    assert state == "done", outcome
    return outcome


def sampled(remedy: Remedy, plan: Plan, n: int) -> Plan:
    assert remedy.preflight and remedy.sample is not None
    assert remedy.sample(plan, plan.count) is plan  # small enough: tried whole, unchanged
    cut = remedy.sample(plan, n)
    assert cut.count == n and cut.fingerprint() != plan.fingerprint()
    assert plan.count > n  # the original is left as it was
    return cut


# --- both audit variants ------------------------------------------------------------------


async def test_set_role_writes_its_audit_rows_on_either_path(
    ctx: RunContext, leaps_dsn: str, audit_variant: str
) -> None:
    await make_audit_variant(leaps_dsn, audit_variant)
    users = await participants(leaps_dsn, 2)
    admin = await staff(leaps_dsn)
    before = await audit_count(leaps_dsn)
    plan = await SET_ROLE.plan(ctx, [*(h for _i, h in users), "REVIEWER"])
    assert plan.count == 2
    outcome = await run(leaps_dsn, SET_ROLE, plan, f"apv-sr-{audit_variant}", admin)
    assert ("written by the bot" in outcome.summary) == (audit_variant == "production")
    ids = [i for i, _h in users]
    rows = await audit_rows(leaps_dsn, "UPDATE_users", ids)
    assert await audit_count(leaps_dsn) == before + 2
    assert [(r[0], r[1], r[2], r[3], r[6]) for r in rows] == [
        (admin.user_id, i, "UPDATE", "ADMIN", True) for i in sorted(ids)
    ]
    for row in rows:
        old, new = row[4], row[5]
        assert (old["id"], old["role"], new["id"], new["role"]) == (
            row[1],
            "PARTICIPANT",
            row[1],
            "REVIEWER",
        )
    roles = await fetch(leaps_dsn, "SELECT role::text FROM users WHERE id = ANY(%s)", (ids,))
    assert roles == [("REVIEWER",), ("REVIEWER",)]


async def test_reprocess_writes_the_awards_audit_rows_on_either_path(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector, audit_variant: str
) -> None:
    await make_audit_variant(leaps_dsn, audit_variant)
    events = await faults.unprocessed_webhook_events(3)
    admin = await staff(leaps_dsn)
    before = await audit_count(leaps_dsn)
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert plan.count == 3
    outcome = await run(leaps_dsn, REPROCESS_WEBHOOKS, plan, f"apv-rp-{audit_variant}", admin)
    assert outcome.affected == 3
    ledger = [f"reprocess_{e}" for e in events]
    rows = await audit_rows(leaps_dsn, "INSERT_points_ledger", ledger)
    assert await audit_count(leaps_dsn) == before + 3
    assert [(r[0], r[1], r[2], r[3], r[4], r[6]) for r in rows] == [
        (admin.user_id, lid, "INSERT", "ADMIN", None, True) for lid in sorted(ledger)
    ]
    for row in rows:
        new = row[5]
        assert (new["id"], new["activity_code"], new["delta_points"]) == (row[1], "LEARN", 20)
        assert new["meta"]["acting_user"] == admin.user_id


async def test_dedupe_webhooks_succeeds_on_either_path_and_audits_nothing(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector, audit_variant: str
) -> None:
    await make_audit_variant(leaps_dsn, audit_variant)
    await faults.duplicate_webhook_payloads(2, copies=1)
    before = await audit_count(leaps_dsn)
    plan = await DEDUPE_WEBHOOKS_REMEDY.plan(ctx, [])
    assert plan.count == 2 and plan.data.get("sample") is None  # not a sample
    outcome = await run(leaps_dsn, DEDUPE_WEBHOOKS_REMEDY, plan, "apv-ddw", await staff(leaps_dsn))
    assert outcome.affected == 2
    assert await audit_count(leaps_dsn) == before  # kajabi_events is not audited


async def test_rematch_emails_succeeds_on_either_path_and_audits_nothing(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector, audit_variant: str
) -> None:
    await make_audit_variant(leaps_dsn, audit_variant)
    await faults.miscased_unmatched_events(2)
    before = await audit_count(leaps_dsn)
    plan = await REMATCH_EMAILS_REMEDY.plan(ctx, [])
    assert plan.count == 2
    outcome = await run(leaps_dsn, REMATCH_EMAILS_REMEDY, plan, "apv-rme", await staff(leaps_dsn))
    assert outcome.affected == 2
    assert await audit_count(leaps_dsn) == before


async def test_migration_resolve_succeeds_on_either_path_and_audits_nothing(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector, audit_variant: str
) -> None:
    await make_audit_variant(leaps_dsn, audit_variant)
    await faults.failed_migration()
    before = await audit_count(leaps_dsn)
    plan = await MIGRATION_RESOLVE.plan(ctx, [DEFAULT_MIGRATION, "--applied"])
    outcome = await run(leaps_dsn, MIGRATION_RESOLVE, plan, "apv-mr", await staff(leaps_dsn))
    assert outcome.affected == 1
    assert await audit_count(leaps_dsn) == before


# --- samplers: exactly n rows -------------------------------------------------------------


async def test_a_sampled_set_role_changes_exactly_its_users(
    ctx: RunContext, leaps_dsn: str
) -> None:
    await make_audit_variant(leaps_dsn, "production")
    users = await participants(leaps_dsn, 3)
    admin = await staff(leaps_dsn)
    plan = await SET_ROLE.plan(ctx, [*(h for _i, h in users), "REVIEWER"])
    cut = sampled(SET_ROLE, plan, 2)
    assert [t["id"] for t in cut.targets] == [i for i, _h in users[:2]]
    outcome = await run(leaps_dsn, SET_ROLE, cut, "apv-sr-cut", admin)
    assert outcome.affected == 2
    ids = [i for i, _h in users]
    query: LiteralString = "SELECT id, role::text FROM users WHERE id = ANY(%s)"
    roles: dict[str, str] = dict(await fetch(leaps_dsn, query, (ids,)))
    assert roles == {ids[0]: "REVIEWER", ids[1]: "REVIEWER", ids[2]: "PARTICIPANT"}
    assert len(await audit_rows(leaps_dsn, "UPDATE_users", ids)) == 2
    rest = await SET_ROLE.plan(ctx, [*(h for _i, h in users), "REVIEWER"])
    assert rest.count == 1
    assert (await run(leaps_dsn, SET_ROLE, rest, "apv-sr-rest", admin)).affected == 1


async def test_a_sampled_reprocess_processes_exactly_the_oldest_events(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    events = await faults.unprocessed_webhook_events(4, old=2)  # oldest first
    admin = await staff(leaps_dsn)
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert plan.data["ids"] == events
    cut = sampled(REPROCESS_WEBHOOKS, plan, 3)
    assert cut.data["ids"] == events[:3] and cut.data["tags"] == plan.data["tags"]
    outcome = await run(leaps_dsn, REPROCESS_WEBHOOKS, cut, "apv-rp-cut", admin)
    assert outcome.affected == 3
    done = await fetch(
        leaps_dsn,
        "SELECT id FROM kajabi_events WHERE id = ANY(%s) AND processed_at IS NOT NULL ORDER BY id",
        (events,),
    )
    assert [r[0] for r in done] == sorted(events[:3])
    paid = await fetch(
        leaps_dsn, "SELECT meta->>'kajabi_event' FROM points_ledger WHERE id LIKE 'reprocess_%'"
    )
    assert sorted(r[0] for r in paid) == sorted(events[:3])
    rest = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert rest.data["ids"] == events[3:]
    assert (await run(leaps_dsn, REPROCESS_WEBHOOKS, rest, "apv-rp-rest", admin)).affected == 1


async def test_a_sampled_dedupe_deletes_the_first_duplicates_and_holds_the_whole_count(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    originals = await faults.duplicate_webhook_payloads(2, copies=2)
    plan = await DEDUPE_WEBHOOKS_REMEDY.plan(ctx, [])
    assert plan.count == 4
    copies = sorted(f"{o}_again{k}" for o in originals for k in (1, 2))
    cut = sampled(DEDUPE_WEBHOOKS_REMEDY, plan, 3)
    assert cut.data == {"counts": plan.data["counts"], "sample": {"duplicates": 3}}
    outcome = await run(leaps_dsn, DEDUPE_WEBHOOKS_REMEDY, cut, "apv-dd-cut")
    assert (outcome.affected, outcome.backed_up) == (3, 3)
    left = await fetch(
        leaps_dsn, "SELECT id FROM kajabi_events WHERE id = ANY(%s) ORDER BY id", (copies,)
    )
    assert [r[0] for r in left] == copies[3:]
    backup = sql.Identifier(BACKUP_SCHEMA, backup_name("apv-dd-cut", "kajabi_events"))
    kept = await fetch(leaps_dsn, sql.SQL("SELECT id FROM {} ORDER BY id").format(backup))
    assert [r[0] for r in kept] == copies[:3]
    # The sample still holds the whole database to the plan: one more duplicate is drift.
    rest = await DEDUPE_WEBHOOKS_REMEDY.plan(ctx, [])
    assert rest.count == 1 and DEDUPE_WEBHOOKS_REMEDY.sample is not None
    await faults.duplicate_webhook_payloads(1)
    big = await DEDUPE_WEBHOOKS_REMEDY.plan(ctx, [])
    small = DEDUPE_WEBHOOKS_REMEDY.sample(big, 1)
    await faults.duplicate_webhook_payloads(1)
    state, drifted = await Executor(leaps_dsn).apply(DEDUPE_WEBHOOKS_REMEDY, small, "apv-dd-x")
    assert state == "aborted" and "drift" in drifted.summary
    everything = await DEDUPE_WEBHOOKS_REMEDY.plan(ctx, [])
    done = await run(leaps_dsn, DEDUPE_WEBHOOKS_REMEDY, everything, "apv-dd-all")
    assert done.affected == everything.count == 3
    assert (await DEDUPE_WEBHOOKS_REMEDY.plan(ctx, [])).count == 0


async def test_a_sampled_rematch_links_exactly_its_events(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    events = sorted(await faults.miscased_unmatched_events(3))
    plan = await REMATCH_EMAILS_REMEDY.plan(ctx, [])
    cut = sampled(REMATCH_EMAILS_REMEDY, plan, 2)
    assert cut.data["ids"] == events[:2] and cut.data["users"] == plan.data["users"][:2]
    outcome = await run(leaps_dsn, REMATCH_EMAILS_REMEDY, cut, "apv-rm-cut")
    assert outcome.affected == 2
    marks: dict[str, str] = dict(
        await fetch(
            leaps_dsn, "SELECT id, user_match FROM kajabi_events WHERE id = ANY(%s)", (events,)
        )
    )
    assert [marks[e] != "NO_USER_FOUND" for e in events] == [True, True, False]
    rest = await REMATCH_EMAILS_REMEDY.plan(ctx, [])
    assert rest.data["ids"] == events[2:]
    assert (await run(leaps_dsn, REMATCH_EMAILS_REMEDY, rest, "apv-rm-rest")).affected == 1


async def test_a_sampled_migration_resolve_marks_exactly_its_attempts(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.failed_migration()
    await faults.failed_migration()  # a second attempt that died as well
    plan = await MIGRATION_RESOLVE.plan(ctx, [DEFAULT_MIGRATION, "--rolled-back"])
    assert plan.count == 2
    cut = sampled(MIGRATION_RESOLVE, plan, 1)
    outcome = await run(leaps_dsn, MIGRATION_RESOLVE, cut, "apv-mr-cut")
    assert outcome.affected == 1
    states: dict[str, bool] = dict(
        await fetch(
            leaps_dsn,
            "SELECT id, rolled_back_at IS NOT NULL FROM _prisma_migrations"
            " WHERE migration_name = %s",
            (DEFAULT_MIGRATION,),
        )
    )
    assert states == {cut.data["ids"][0]: True, plan.data["ids"][1]: False}
    rest = await MIGRATION_RESOLVE.plan(ctx, [DEFAULT_MIGRATION, "--rolled-back"])
    assert rest.count == 1
    assert (await run(leaps_dsn, MIGRATION_RESOLVE, rest, "apv-mr-rest")).affected == 1
