"""The data repairs on both audit trails (LEAPS_SCHEMA.md, Audit), and their samples.

On the fixture's trail the live trigger writes LEAPS's audit rows (app.user_id set); on
production's it would refuse every such write, so the bot acts without app.user_id and
writes the rows itself (DESIGN.md rule 11). Either way each repair succeeds with
app.user_role set, and audit_log gets the same rows: one per changed row of an audited
table, with the acting user, the action, the target and the old and new row images
(compared here with the backup copy and the rows as they are now).

A plan bigger than the preflight's limit is tried on `remedy.sample(plan, n)`: tried
through the executor and rolled back, it changes n rows and leaves nothing behind;
applied, exactly its n rows (the first by id of each part); and the whole plan, applied
to an identical copy, still changes all of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import pytest_asyncio
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from bot.approvals.executor import Executor
from bot.embedded_pg import EmbeddedPostgres
from bot.gateway import TargetGateway
from bot.router import RunContext
from commands.base import LeapsIdentity
from commands.fixture.faults import FaultInjector
from commands.remedies.base import Outcome, Plan, Remedy, RemedyAbort, Writer
from commands.remedies.learn import DEDUPE_LEARN
from commands.remedies.ledger import DEDUPE_EVENTS, RECONCILE_POINTS, RECONCILE_SOURCE
from commands.remedies.orphans import CLEANUP_ORPHANS, orphan_shares
from commands.remedies.rowsets import fair_shares
from tests.conftest import FAST_THRESHOLDS, make_audit_variant
from tests.test_repairs import (
    backup_ident,
    backup_tables,
    fetch,
    leaps_user,
    orphan_submissions_with_attachments,
    table,
)

Rows = list[tuple[Any, ...]]
Audit = tuple[str, str, str, str | None, Any, Any]


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn)
    yield RunContext(gateway, FAST_THRESHOLDS)
    await gateway.close()


# --- LEAPS's audit rows, as written and as expected -----------------------------------


async def audit_ids(dsn: str) -> set[str]:
    return {str(r[0]) for r in await fetch(dsn, "SELECT id FROM audit_log")}


async def audit_since(dsn: str, seen: set[str]) -> list[Audit]:
    """The audit rows written after `seen`: action, actor, target, role, old, new."""
    rows = await fetch(
        dsn,
        "SELECT id, action, actor_id, target_id, meta ->> 'user_role', meta -> 'old_values',"
        " meta -> 'new_values', meta ->> 'operation', meta ->> 'table' FROM audit_log",
    )
    new = [r for r in rows if str(r[0]) not in seen]
    for r in new:  # the trigger's own meta labels, on either path
        assert (f"{r[7]}_{r[8]}") == r[1], r
    return sorted(((r[1], r[2], r[3], r[4], r[5], r[6]) for r in new), key=_by_target)


def _by_target(row: Audit) -> tuple[str, str]:
    return row[0], row[2]


async def images(dsn: str, rel: sql.Composable, ids: list[str]) -> dict[str, Any]:
    """Whole rows as jsonb, as the audit trigger's to_jsonb(OLD / NEW) has them."""
    query = sql.SQL("SELECT t.id, to_jsonb(t) FROM {} AS t WHERE t.id = ANY(%s)").format(rel)
    return {str(r[0]): r[1] for r in await fetch(dsn, query, (ids,))}


async def expected_audit(
    dsn: str,
    who: LeapsIdentity,
    name: str,
    op: str,
    ids: list[str],
    backup: sql.Identifier | None = None,
) -> list[Audit]:
    """One audit row per changed row: the old image from the backup copy, the new one
    from the table as it is now."""
    old = await images(dsn, backup, ids) if backup is not None else {}
    new = await images(dsn, sql.Identifier(name), ids) if op != "DELETE" else {}
    rows = [(f"{op}_{name}", who.user_id, i, who.role, old.get(i), new.get(i)) for i in ids]
    assert all(r[4] is not None for r in rows) or op == "INSERT"
    assert all(r[5] is not None for r in rows) or op == "DELETE"
    return sorted(rows, key=_by_target)


def assert_path(plan: Plan, outcome_summary: str, variant: str, written: int) -> None:
    """The plan said which path the audit rows take; the outcome says who wrote them."""
    assert plan.audit is not None
    if variant == "production":
        assert "written by the bot" in plan.audit and "fix-audit-id" in plan.audit
        assert f"{written} audit_log rows written by the bot" in outcome_summary
    else:
        assert "written by the live audit trigger" in plan.audit
        assert "written by the bot" not in outcome_summary


# --- every repair audited on either path ----------------------------------------------


async def test_dedupe_learn_is_audited_on_either_path(
    ctx: RunContext, leaps_dsn: str, audit_variant: str
) -> None:
    async with FaultInjector(leaps_dsn) as faults:
        await faults.duplicate_learn(5)
    await make_audit_variant(leaps_dsn, audit_variant)
    plan = await DEDUPE_LEARN.plan(ctx, [])
    assert plan.count == 5
    who = await leaps_user(leaps_dsn, "REVIEWER")
    seen = await audit_ids(leaps_dsn)
    state, outcome = await Executor(leaps_dsn).apply(DEDUPE_LEARN, plan, "apv-aud-learn", who)
    assert state == "done", outcome
    assert outcome.affected == 5
    rejected = sorted(str(t["id"]) for t in plan.targets)
    written = await audit_since(leaps_dsn, seen)
    assert written == await expected_audit(
        leaps_dsn,
        who,
        "submissions",
        "UPDATE",
        rejected,
        backup_ident("apv-aud-learn", "submissions"),
    )
    assert {(r[4]["status"], r[5]["status"], r[5]["reviewer_id"]) for r in written} == {
        ("PENDING", "REJECTED", who.user_id)
    }
    assert_path(plan, outcome.summary, audit_variant, 5)


async def test_dedupe_ledger_events_is_audited_on_either_path(
    ctx: RunContext, leaps_dsn: str, audit_variant: str
) -> None:
    async with FaultInjector(leaps_dsn) as faults:
        await faults.duplicate_external_events(4)
    await make_audit_variant(leaps_dsn, audit_variant)
    plan = await DEDUPE_EVENTS.plan(ctx, [])
    assert plan.count == 4
    who = await leaps_user(leaps_dsn, "ADMIN")
    seen = await audit_ids(leaps_dsn)
    state, outcome = await Executor(leaps_dsn).apply(DEDUPE_EVENTS, plan, "apv-aud-events", who)
    assert state == "done", outcome
    deleted = sorted(str(t["id"]) for t in plan.targets)
    written = await audit_since(leaps_dsn, seen)
    assert len(written) == 4
    assert written == await expected_audit(
        leaps_dsn,
        who,
        "points_ledger",
        "DELETE",
        deleted,
        backup_ident("apv-aud-events", "points_ledger"),
    )
    assert_path(plan, outcome.summary, audit_variant, 4)


async def test_reconcile_points_is_audited_on_either_path(
    ctx: RunContext, leaps_dsn: str, audit_variant: str
) -> None:
    async with FaultInjector(leaps_dsn) as faults:
        await faults.missing_awards(3)
    await make_audit_variant(leaps_dsn, audit_variant)
    plan = await RECONCILE_POINTS.plan(ctx, [])
    assert plan.count >= 3
    who = await leaps_user(leaps_dsn, "ADMIN")
    seen = await audit_ids(leaps_dsn)
    state, outcome = await Executor(leaps_dsn).apply(RECONCILE_POINTS, plan, "apv-aud-rec", who)
    assert state == "done", outcome
    inserted = [
        str(r[0])
        for r in await fetch(
            leaps_dsn,
            "SELECT id FROM points_ledger WHERE external_source = %s",
            (RECONCILE_SOURCE,),
        )
    ]
    assert len(inserted) == plan.count
    written = await audit_since(leaps_dsn, seen)
    assert written == await expected_audit(leaps_dsn, who, "points_ledger", "INSERT", inserted)
    assert_path(plan, outcome.summary, audit_variant, plan.count)


async def test_cleanup_orphans_is_audited_on_either_path(
    ctx: RunContext, leaps_dsn: str, audit_variant: str
) -> None:
    """Deleted ledger rows are audited; deleted submissions and attachments are not (the
    submissions trigger watches UPDATE OF status, reviewer_id only), on either path."""
    subs = await orphan_submissions_with_attachments(leaps_dsn, 2)
    async with FaultInjector(leaps_dsn) as faults:
        ledger = await faults.orphan_ledger_rows(3)
        await faults.orphan_attachments(2)
    await make_audit_variant(leaps_dsn, audit_variant)
    plan = await CLEANUP_ORPHANS.plan(ctx, ["all"])
    children = plan.data["counts"]["child_attachments"]
    assert children and plan.count == 2 + children + 3 + 2
    who = await leaps_user(leaps_dsn, "ADMIN")
    seen = await audit_ids(leaps_dsn)
    state, outcome = await Executor(leaps_dsn).apply(CLEANUP_ORPHANS, plan, "apv-aud-orph", who)
    assert state == "done", outcome
    assert outcome.affected == plan.count
    assert not await fetch(leaps_dsn, "SELECT 1 FROM submissions WHERE id = ANY(%s)", (subs,))
    written = await audit_since(leaps_dsn, seen)
    assert written == await expected_audit(
        leaps_dsn,
        who,
        "points_ledger",
        "DELETE",
        sorted(ledger),
        backup_ident("apv-aud-orph", "points_ledger"),
    )
    assert_path(plan, outcome.summary, audit_variant, 3)


# --- samples: exactly n rows, the whole plan still all of them ---------------------------


def test_fair_shares_try_every_part_within_the_limit() -> None:
    assert fair_shares({"a": 10, "b": 1, "c": 10}, 7) == {"a": 3, "b": 1, "c": 3}
    assert fair_shares({"a": 2, "b": 0}, 5) == {"a": 2, "b": 0}
    assert sum(fair_shares({"a": 100, "b": 100, "c": 100}, 1000).values()) == 300
    assert sum(fair_shares({"a": 100, "b": 100, "c": 100}, 100).values()) == 100
    assert fair_shares({"a": 5}, 0) == {"a": 0}


def test_orphan_shares_keep_submissions_with_all_their_attachments() -> None:
    counts = {"attachments": 3, "child_attachments": 4, "submissions": 2, "points_ledger": 5}
    fits = orphan_shares(counts, 8)
    assert fits["child_attachments"] == 4 and fits["submissions"] >= 1
    assert sum(fits.values()) == 8
    tight = orphan_shares(counts, 4)
    assert tight["submissions"] == 0 and sum(tight.values()) == 4
    assert orphan_shares({"submissions": 6, "child_attachments": 0}, 4) == {
        "submissions": 4,
        "child_attachments": 0,
    }


async def in_order(dsn: str, ids: list[str]) -> list[str]:
    """`ids` in the database's own ORDER BY id (its collation, not Python's)."""
    rows = await fetch(dsn, "SELECT i FROM unnest(%s::text[]) AS t(i) ORDER BY i", (ids,))
    return [str(r[0]) for r in rows]


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


async def twin_of(pg: EmbeddedPostgres, dsn: str) -> str:
    """An identical copy of the database at `dsn` (nobody may be connected to it)."""
    return pg.create_database(f"{dbname(dsn)}_twin", template=dbname(dsn))


async def snapshot(dsn: str, names: tuple[str, ...]) -> dict[str, dict[str, tuple[Any, ...]]]:
    return {n: {str(r[0]): r for r in await table(dsn, n)} for n in names}


def changed_ids(
    before: dict[str, dict[str, tuple[Any, ...]]], after: dict[str, dict[str, tuple[Any, ...]]]
) -> dict[str, list[str]]:
    """Per table, the ids of rows deleted, inserted or changed."""
    out: dict[str, list[str]] = {}
    for name, rows in before.items():
        now = after[name]
        ids = {i for i in rows.keys() | now.keys() if rows.get(i) != now.get(i)}
        out[name] = sorted(ids)
    return out


class _RolledBack(RemedyAbort):
    """Raised after the remedy's apply, so the executor rolls its transaction back."""


async def tried(dsn: str, remedy: Remedy, plan: Plan, who: LeapsIdentity) -> Outcome:
    """The remedy's apply run through the executor in a transaction that is then rolled
    back (as the preflight tries it): its outcome."""
    seen: list[Outcome] = []

    async def apply_then_roll_back(writer: Writer, p: Plan) -> Outcome:
        seen.append(await remedy.apply(writer, p))
        raise _RolledBack("tried, rolled back")

    trial = replace(remedy, apply=apply_then_roll_back)
    state, outcome = await Executor(dsn).apply(trial, plan, "apv-try", who)
    assert state == "aborted" and "tried, rolled back" in outcome.summary, outcome
    (done,) = seen
    return done


async def sample_and_whole(
    pg: EmbeddedPostgres,
    dsn: str,
    remedy: Remedy,
    args: list[str],
    n: int,
    who: LeapsIdentity,
    names: tuple[str, ...],
) -> tuple[Plan, Plan, dict[str, list[str]], dict[str, list[str]]]:
    """The plan and its sample of n; the sample applied to `dsn`, the whole plan to an
    identical twin: the ids each changed, per table."""
    twin = await twin_of(pg, dsn)
    gateway = TargetGateway(dsn)
    try:
        plan = await remedy.plan(RunContext(gateway, FAST_THRESHOLDS), args)
    finally:
        await gateway.close()
    assert remedy.preflight and remedy.sample is not None
    assert plan.count > n
    sampled = remedy.sample(plan, n)
    assert sampled.count == n and sampled.fingerprint() != plan.fingerprint()
    assert remedy.sample(plan, plan.count) == plan  # small enough: tried whole

    untouched = await snapshot(dsn, (*names, "audit_log"))
    trial = await tried(dsn, remedy, sampled, who)
    assert trial.ok and trial.affected == n, trial
    assert await snapshot(dsn, (*names, "audit_log")) == untouched
    assert await backup_tables(dsn) == []

    before = await snapshot(dsn, names)
    state, outcome = await Executor(dsn).apply(remedy, sampled, "apv-sample", who)
    assert state == "done", outcome
    assert outcome.affected == n
    part = changed_ids(before, await snapshot(dsn, names))

    before = await snapshot(twin, names)
    state, outcome = await Executor(twin).apply(remedy, plan, "apv-whole", who)
    assert state == "done", outcome
    assert outcome.affected == plan.count
    whole = changed_ids(before, await snapshot(twin, names))
    return plan, sampled, part, whole


async def test_dedupe_learn_sample_rejects_exactly_its_rows(
    pg: EmbeddedPostgres, leaps_dsn: str
) -> None:
    async with FaultInjector(leaps_dsn) as faults:
        await faults.duplicate_learn(7)
    who = await leaps_user(leaps_dsn, "ADMIN")
    plan, _sampled, part, whole = await sample_and_whole(
        pg, leaps_dsn, DEDUPE_LEARN, [], 3, who, ("submissions",)
    )
    rejected = await in_order(leaps_dsn, [str(t["id"]) for t in plan.targets])
    assert len(rejected) == 7
    assert part["submissions"] == sorted(rejected[:3])
    assert whole["submissions"] == sorted(rejected)
    statuses = await fetch(
        leaps_dsn, "SELECT status::text FROM submissions WHERE id = ANY(%s)", (rejected[3:],)
    )
    assert statuses == [("PENDING",)] * 4  # the rest of the plan untouched


async def test_dedupe_ledger_events_sample_deletes_exactly_its_rows(
    pg: EmbeddedPostgres, leaps_dsn: str
) -> None:
    async with FaultInjector(leaps_dsn) as faults:
        await faults.duplicate_external_events(6)
    who = await leaps_user(leaps_dsn, "ADMIN")
    plan, _sampled, part, whole = await sample_and_whole(
        pg, leaps_dsn, DEDUPE_EVENTS, [], 2, who, ("points_ledger",)
    )
    replays = await in_order(leaps_dsn, [str(t["id"]) for t in plan.targets])
    assert part["points_ledger"] == sorted(replays[:2])
    assert whole["points_ledger"] == sorted(replays)
    saved = await fetch(
        leaps_dsn,
        sql.SQL("SELECT id FROM {} ORDER BY id").format(
            backup_ident("apv-sample", "points_ledger")
        ),
    )
    assert [str(r[0]) for r in saved] == replays[:2]  # in the database's order


async def test_reconcile_points_sample_inserts_exactly_its_awards(
    pg: EmbeddedPostgres, leaps_dsn: str
) -> None:
    async with FaultInjector(leaps_dsn) as faults:
        await faults.missing_awards(5)
    who = await leaps_user(leaps_dsn, "ADMIN")
    plan, sampled, part, whole = await sample_and_whole(
        pg, leaps_dsn, RECONCILE_POINTS, [], 2, who, ("points_ledger",)
    )
    due = await in_order(leaps_dsn, [str(t["submission_id"]) for t in plan.targets])
    assert len(due) == plan.count
    assert part["points_ledger"] == sorted(f"reconcile_{s}" for s in due[:2])
    assert whole["points_ledger"] == sorted(f"reconcile_{s}" for s in due)
    assert sampled.data["sample"] == 2 and plan.data["sample"] is None


async def test_cleanup_orphans_sample_deletes_exactly_its_rows(
    pg: EmbeddedPostgres, leaps_dsn: str
) -> None:
    """Each part's first rows by id; the orphaned submissions tried only with every
    attachment of theirs, which are backed up and deleted before them."""
    subs = await orphan_submissions_with_attachments(leaps_dsn, 3)
    async with FaultInjector(leaps_dsn) as faults:
        ledger = await faults.orphan_ledger_rows(4)
        strays = await faults.orphan_attachments(3)
    children = [
        str(r[0])
        for r in await fetch(
            leaps_dsn,
            "SELECT id FROM submission_attachments WHERE submission_id = ANY(%s)",
            (subs,),
        )
    ]
    names = ("submissions", "points_ledger", "submission_attachments")
    n = len(children) + 4
    who = await leaps_user(leaps_dsn, "ADMIN")
    _plan, sampled, part, whole = await sample_and_whole(
        pg, leaps_dsn, CLEANUP_ORPHANS, [], n, who, names
    )
    shares = sampled.data["sample"]
    assert shares == sampled.data["counts"] and sum(shares.values()) == n
    assert shares["child_attachments"] == len(children) and shares["submissions"] >= 1
    subs = await in_order(leaps_dsn, subs)
    ledger = await in_order(leaps_dsn, ledger)
    strays = await in_order(leaps_dsn, strays)
    assert part["submissions"] == sorted(subs[: shares["submissions"]])
    assert part["points_ledger"] == sorted(ledger[: shares["points_ledger"]])
    assert part["submission_attachments"] == sorted(strays[: shares["attachments"]] + children)
    assert whole == {
        "submissions": sorted(subs),
        "points_ledger": sorted(ledger),
        "submission_attachments": sorted(strays + children),
    }


async def test_cleanup_orphans_sample_without_room_for_the_attachments(
    pg: EmbeddedPostgres, leaps_dsn: str
) -> None:
    """Too many attachments of orphaned submissions for the sample: some of them are
    tried, no submission is (deleting one would take unsaved attachments along)."""
    subs = await orphan_submissions_with_attachments(leaps_dsn, 2)
    children = [
        str(r[0])
        for r in await fetch(
            leaps_dsn,
            "SELECT id FROM submission_attachments WHERE submission_id = ANY(%s) ORDER BY id",
            (subs,),
        )
    ]
    assert len(children) >= 2
    who = await leaps_user(leaps_dsn, "ADMIN")
    n = len(children) - 1
    plan, sampled, part, _whole = await sample_and_whole(
        pg,
        leaps_dsn,
        CLEANUP_ORPHANS,
        ["submissions"],
        n,
        who,
        ("submissions", "submission_attachments"),
    )
    assert plan.audit is None  # no audit trigger watches these deletes
    assert sampled.data["sample"] == {"child_attachments": n, "submissions": 0}
    assert part == {"submissions": [], "submission_attachments": sorted(children[:n])}


@pytest.mark.parametrize("remedy", [DEDUPE_LEARN, DEDUPE_EVENTS, RECONCILE_POINTS, CLEANUP_ORPHANS])
def test_the_row_writing_repairs_are_preflighted(remedy: Remedy) -> None:
    assert remedy.preflight and remedy.sample is not None and not remedy.not_tried
