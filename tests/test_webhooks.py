"""`/db webhooks` and its remedies against a real PostgreSQL 15 with the fixture's guards:
each fault found and counted, each remedy before and after (backup, exact count, a
second run changing nothing), a failing event reported while the others go ahead, and
the approvals over signed Slack requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from bot.approvals.executor import Executor
from bot.gateway import TargetGateway
from bot.router import RunContext
from commands import webhooks as wh
from commands.base import (
    BACKUP_SCHEMA,
    Finding,
    LeapsIdentity,
    Reader,
    Report,
    Row,
    Status,
    UsageError,
)
from commands.fixture.faults import FaultInjector
from commands.integrity import DUPLICATE_EVENTS, integrity
from commands.remedies.base import REMEDIES, Execution, backup_name
from commands.remedies.webhooks import (
    DEDUPE_WEBHOOKS_REMEDY,
    REMATCH_EMAILS_REMEDY,
    REPROCESS_WEBHOOKS,
)
from tests.conftest import FAST_THRESHOLDS, RunningBot, bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import CHANNEL, message_text, press, request, settle

Rows = list[tuple[Any, ...]]
REQUESTER, ADMIN, ADMIN2 = "U0REQ", "U0ADMIN", "U0ADMIN2"
ROLES = {REQUESTER: "REVIEWER", ADMIN: "ADMIN", ADMIN2: "ADMIN"}


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn)
    yield RunContext(gateway, FAST_THRESHOLDS)
    await gateway.close()


async def fetch(dsn: str, query: LiteralString | sql.Composed, params: Any = None) -> Rows:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def events(dsn: str, ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """id -> (processed, user_match) of the given events."""
    rows = await fetch(
        dsn,
        "SELECT id, processed_at IS NOT NULL, user_match FROM kajabi_events WHERE id = ANY(%s)",
        (ids,),
    )
    return {str(r[0]): (r[1], r[2]) for r in rows}


async def user_of_email(dsn: str, event_ids: list[str]) -> dict[str, str]:
    """event id -> the user whose e-mail is the event's, ignoring case."""
    rows = await fetch(
        dsn,
        "SELECT e.id, u.id FROM kajabi_events e JOIN users u ON lower(u.email) = lower(e.email)"
        " WHERE e.id = ANY(%s)",
        (event_ids,),
    )
    return {str(r[0]): str(r[1]) for r in rows}


async def staff(dsn: str, role: str = "ADMIN") -> LeapsIdentity:
    rows = await fetch(
        dsn, 'SELECT id FROM users WHERE role = %s::"Role" ORDER BY id LIMIT 1', (role,)
    )
    return LeapsIdentity(str(rows[0][0]), role, "a test approver's account")


async def report(ctx: RunContext) -> tuple[Report, dict[str, Finding]]:
    rep = await wh.webhooks(ctx, [])
    return rep, {f.check: f for f in rep.findings}


async def webhook_awards(dsn: str) -> Rows:
    return await fetch(
        dsn,
        "SELECT id, user_id, activity_code, source::text, delta_points, external_source,"
        " external_event_id, event_time, meta FROM points_ledger"
        " WHERE meta ->> 'reason' = 'dbops-bot reprocess-webhooks' ORDER BY id",
    )


# --- the command ----------------------------------------------------------------------


async def test_healthy_fixture_reports_no_problem(ctx: RunContext) -> None:
    rep, by = await report(ctx)
    assert rep.worst is Status.OK, rep
    assert set(by) == {wh.UNPROCESSED, wh.ALERT, wh.EMAILS, wh.DUPLICATES, DUPLICATE_EVENTS}
    # The seed's people who never signed up are unmatched, well under the alert.
    assert "(alert above 50)" in by[wh.ALERT].summary
    assert "payload.email (0)" in by[wh.EMAILS].summary  # the guide's key is in no event
    for remedy in (REMATCH_EMAILS_REMEDY, REPROCESS_WEBHOOKS, DEDUPE_WEBHOOKS_REMEDY):
        plan = await remedy.plan(ctx, [])
        assert plan.count == 0 and not plan.needs_approval and "nothing to do" in plan.summary


async def test_unprocessed_events_are_counted_with_their_age(
    ctx: RunContext, faults: FaultInjector
) -> None:
    ids = await faults.unprocessed_webhook_events(5, old=2)
    _rep, by = await report(ctx)
    found = by[wh.UNPROCESSED]
    assert found.status is Status.WARN
    assert found.summary.startswith("5 events not processed yet, the oldest received 2h00m ago")
    assert "; 2 of them over 1h00m ago" in found.summary
    assert [r["id"] for r in found.rows] == ids  # oldest first
    assert found.hint is not None and "/db reprocess-webhooks" in found.hint


async def test_young_unprocessed_events_are_not_stuck(
    ctx: RunContext, faults: FaultInjector
) -> None:
    await faults.unprocessed_webhook_events(3)
    _rep, by = await report(ctx)
    assert by[wh.UNPROCESSED].status is Status.OK
    assert "; 0 of them over 1h00m ago" in by[wh.UNPROCESSED].summary


async def test_alert_above_fifty_events_waiting_unmatched_over_fifteen_minutes(
    ctx: RunContext, faults: FaultInjector
) -> None:
    _rep, by = await report(ctx)
    base = int(by[wh.ALERT].summary.split()[0])  # the seed's NO_USER_FOUND events
    await faults.unmatched_webhook_backlog(60, minutes=5)  # too young to count
    _rep, by = await report(ctx)
    assert by[wh.ALERT].status is Status.OK
    assert by[wh.ALERT].summary.startswith(f"{base} events")
    await faults.unmatched_webhook_backlog(50 - base, minutes=20)
    _rep, by = await report(ctx)
    assert by[wh.ALERT].status is Status.OK  # exactly 50: not more than 50
    await faults.unmatched_webhook_backlog(1, minutes=20)
    _rep, by = await report(ctx)
    alert = by[wh.ALERT]
    assert alert.status is Status.CRIT
    assert alert.summary.startswith(
        f"51 events unmatched for over 15m00s (alert above 50): "
        f"{51 - base} not processed, {base} NO_USER_FOUND"
    )


async def test_events_naming_users_who_are_gone_wait_unmatched(
    ctx: RunContext, leaps_dsn: str
) -> None:
    """Processed events whose user no longer exists join the alert's count, in
    `/db webhooks` and in the alert alone (as `/db health` runs it) alike."""
    _rep, by = await report(ctx)
    base = int(by[wh.ALERT].summary.split()[0])
    await fetch(
        leaps_dsn,
        "UPDATE kajabi_events SET user_match = 'gone_' || id WHERE id IN (SELECT id"
        " FROM kajabi_events WHERE processed_at IS NOT NULL AND user_match <> %s"
        " AND received_at < (now() AT TIME ZONE 'UTC') - interval '1 hour' ORDER BY id LIMIT 2)",
        ("NO_USER_FOUND",),
    )
    _rep, by = await report(ctx)
    alert = by[wh.ALERT]
    assert alert.summary.startswith(f"{base + 2} events unmatched")
    assert alert.summary.endswith(", 2 processed with no user or one who no longer exists")
    alone = await ctx.gateway.run_check(wh.ALERT, partial(wh.check_alert, ctx.thresholds))
    assert alone == alert


async def test_miscased_and_ambiguous_emails(ctx: RunContext, faults: FaultInjector) -> None:
    ids = await faults.miscased_unmatched_events(3)
    twin_event, _users = await faults.ambiguous_unmatched_event()
    _rep, by = await report(ctx)
    found = by[wh.EMAILS]
    assert found.status is Status.WARN
    assert found.summary.startswith(
        "4 NO_USER_FOUND events match a user when case is ignored: 3 exactly one user, 1 several"
    )
    assert "email column (" in found.summary
    assert {r["id"] for r in found.rows} == {*ids, twin_event}
    shown = {r["id"]: r for r in found.rows}
    assert shown[ids[0]]["webhook_email"] == str(shown[ids[0]]["user_email"]).lower()

    # The pass lists these few NO_USER_FOUND events, which the survey reads by id; with
    # more of them it reads every event instead: the same finding either way.
    async def both(db: Reader) -> Finding:
        row = await wh._events(ctx.thresholds, db)
        assert set(row["nuf_ids"]) >= {*ids, twin_event}
        by_scan = await wh.emails_finding(ctx.thresholds, {**row, "nuf_ids": None}, db)
        assert by_scan == await wh.emails_finding(ctx.thresholds, row, db)
        return by_scan

    assert await ctx.gateway.run_check(wh.EMAILS, both) == found


async def test_duplicate_payloads_counted_by_groups_and_extra_rows(
    ctx: RunContext, faults: FaultInjector
) -> None:
    # No payload thrice: the copies are read by the ctid the sort gave, as they are by
    # their hash (every payload hashed again) once one comes three times.
    await faults.duplicate_webhook_payloads(1)
    _rep, by = await report(ctx)
    twice = by[wh.DUPLICATES]
    assert twice.summary == "1 payload received more than once (1 extra row)"

    async def by_hash(db: Reader) -> list[Row]:
        hashes = [int(r["h"]) for r in await db.fetch(wh._REPEATED_HASHES_SQL)]
        rows = await db.fetch(wh._DUPLICATES_SQL, {"hashes": hashes, "sample": 10})
        return [{k: v for k, v in r.items() if k not in ("groups", "extra")} for r in rows]

    assert twice.rows == await ctx.gateway.read(by_hash) != []
    await faults.duplicate_webhook_payloads(2, copies=2)
    _rep, by = await report(ctx)
    found = by[wh.DUPLICATES]
    assert found.status is Status.WARN
    assert found.summary == "3 payloads received more than once (5 extra rows)"
    assert sorted(int(r["copies"]) for r in found.rows) == [2, 3, 3]


async def test_duplicate_external_event_ids_is_integritys_finding(
    ctx: RunContext, faults: FaultInjector
) -> None:
    await faults.duplicate_external_events(2)
    _rep, by = await report(ctx)
    ours = by[DUPLICATE_EVENTS]
    theirs = next(f for f in (await integrity(ctx, [])).findings if f.check == DUPLICATE_EVENTS)
    assert ours.status is Status.CRIT
    assert ours == theirs


# --- rematch-emails -------------------------------------------------------------------


async def test_rematch_emails_links_one_match_and_leaves_two(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    ids = await faults.miscased_unmatched_events(3)
    twin_event, _users = await faults.ambiguous_unmatched_event()
    owners = await user_of_email(leaps_dsn, ids)
    plan = await REMATCH_EMAILS_REMEDY.plan(ctx, [])
    assert plan.count == 3 and plan.needs_approval
    assert plan.data["ids"] == sorted(ids)
    assert any("1 event match several users" in w for w in plan.warnings)
    assert any("recover-learn" in w for w in plan.warnings)
    state, outcome = await Executor(leaps_dsn).apply(
        REMATCH_EMAILS_REMEDY, plan, "apv-rematch", await staff(leaps_dsn)
    )
    assert state == "done", outcome
    assert outcome.affected == 3 and outcome.backed_up == 3
    after = await events(leaps_dsn, [*ids, twin_event])
    assert {i: after[i][1] for i in ids} == owners
    assert after[twin_event][1] == "NO_USER_FOUND"
    backup = sql.Identifier(BACKUP_SCHEMA, backup_name("apv-rematch", "kajabi_events"))
    kept = await fetch(
        leaps_dsn, sql.SQL("SELECT id, user_match FROM {} ORDER BY id").format(backup)
    )
    assert kept == [(i, "NO_USER_FOUND") for i in sorted(ids)]

    async def verify(db: Any) -> Any:
        return await REMATCH_EMAILS_REMEDY.verify(db, plan, Execution("apv-rematch", "bot"))

    assert (await ctx.gateway.read(verify)).landed
    again = await REMATCH_EMAILS_REMEDY.plan(ctx, [])
    assert again.count == 0 and "nothing to do" in again.summary


# --- reprocess-webhooks ---------------------------------------------------------------


async def test_reprocess_awards_once_marks_all_and_reports_the_failure(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    fresh = await faults.unprocessed_webhook_events(4, old=2)
    stranger = await faults.unmatched_webhook_backlog(1)
    nomail = await faults.webhook_event_without_email()
    (original,) = await faults.duplicate_webhook_payloads(1)  # a retry of a paid event
    (retry,) = [
        str(r[0])
        for r in await fetch(
            leaps_dsn, "SELECT id FROM kajabi_events WHERE id LIKE %s", (original + "_again%",)
        )
    ]
    owners = await user_of_email(leaps_dsn, fresh)
    admin = await staff(leaps_dsn)
    ledger_before = await fetch(leaps_dsn, "SELECT count(*) FROM points_ledger")

    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    claimed = datetime.now(UTC)
    assert plan.count == 7
    assert plan.summary.startswith(
        "process 7 unprocessed Kajabi events, oldest first, each in a savepoint of its own: "
        "4 LEARNs awarded (20 points each), 1 already paid, 0 of other tags (matched, no "
        "award), 1 NO_USER_FOUND (source WEBHOOK); 1 to be left unprocessed"
    )
    will = {t["id"]: t["will"] for t in plan.targets}
    assert (will[nomail], will[retry], will[stranger[0]]) == ("fail", "already", "no_user")

    state, outcome = await Executor(leaps_dsn).apply(REPROCESS_WEBHOOKS, plan, "apv-re1", admin)
    assert state == "done", outcome
    assert outcome.summary.startswith(
        "processed 6 of 7 planned events: 4 LEARNs awarded (20 points each), 1 already "
        "paid, 0 of other tags (matched, no award), 1 NO_USER_FOUND; 1 left unprocessed"
    )
    assert outcome.affected == 6
    assert outcome.rows[0]["id"] == nomail and "no e-mail" in str(outcome.rows[0]["reason"])

    after = await events(leaps_dsn, [*fresh, *stranger, nomail, retry])
    assert {i: after[i] for i in fresh} == {i: (True, owners[i]) for i in fresh}
    assert after[stranger[0]] == (True, "NO_USER_FOUND")
    assert after[nomail] == (False, None)
    assert after[retry][0] is True and after[retry][1] not in (None, "NO_USER_FOUND")

    awards = await webhook_awards(leaps_dsn)
    assert len(awards) == 4
    kajabi_ids: dict[str, str] = dict(
        await fetch(
            leaps_dsn, "SELECT id, event_id FROM kajabi_events WHERE id = ANY(%s)", (fresh,)
        )
    )
    for row in awards:
        _id, user, activity, source, points, ext_source, ext_id, event_time, meta = row
        event = meta["kajabi_event"]
        assert (user, activity, source, points, ext_source) == (
            owners[event],
            "LEARN",
            "WEBHOOK",
            20,
            "kajabi",
        )
        assert ext_id == kajabi_ids[event] and event_time is not None
        assert meta["approval"] == "apv-re1" and meta["acting_user"] == admin.user_id
    audited = await fetch(
        leaps_dsn,
        "SELECT count(*), min(actor_id) FROM audit_log WHERE action = 'INSERT_points_ledger'",
    )
    assert audited == [(4, admin.user_id)]  # production's audit trigger saw who acted

    async def verify(db: Any) -> Any:
        return await REPROCESS_WEBHOOKS.verify(db, plan, Execution("apv-re1", "bot", claimed))

    assert (await ctx.gateway.read(verify)).landed
    claimed = datetime.now(UTC) + timedelta(minutes=1)  # a claim after the change: not ours
    assert not (await ctx.gateway.read(verify)).landed

    # Run twice: only the failing event is left, and nothing more is paid.
    again = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert again.count == 1 and again.data["ids"] == [nomail]
    state, outcome = await Executor(leaps_dsn).apply(REPROCESS_WEBHOOKS, again, "apv-re2", admin)
    assert state == "done" and outcome.affected == 0
    assert len(await webhook_awards(leaps_dsn)) == 4
    ledger_after = await fetch(leaps_dsn, "SELECT count(*) FROM points_ledger")
    assert ledger_after[0][0] == ledger_before[0][0] + 4


async def test_an_event_paid_before_its_handler_died_is_not_paid_again(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    ids = await faults.unprocessed_webhook_events(2)
    admin = await staff(leaps_dsn)
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    state, _outcome = await Executor(leaps_dsn).apply(REPROCESS_WEBHOOKS, plan, "apv-a", admin)
    assert state == "done"
    # The application awarded, then crashed before marking: the event is unprocessed again.
    await fetch(leaps_dsn, "UPDATE kajabi_events SET processed_at = NULL WHERE id = %s", (ids[0],))
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert plan.count == 1 and ": 0 LEARNs awarded" in plan.summary
    state, outcome = await Executor(leaps_dsn).apply(REPROCESS_WEBHOOKS, plan, "apv-b", admin)
    assert state == "done", outcome
    assert ": 0 LEARNs awarded" in outcome.summary and "1 already paid" in outcome.summary
    assert len(await webhook_awards(leaps_dsn)) == 2
    assert (await events(leaps_dsn, ids))[ids[0]][0] is True


async def test_without_the_unique_index_a_retry_is_still_paid_once(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    """The idempotency index is gone (a damaged database): the award checks the key first."""
    await faults.duplicate_external_events(1)  # drops points_ledger_external_event_id_key
    ids = await faults.unprocessed_webhook_events(1)
    await fetch(
        leaps_dsn,
        "INSERT INTO kajabi_events (id, received_at, payload, event_id, tag_name_raw,"
        " tag_name_norm, email) SELECT id || '_retry', received_at + interval '1 second',"
        " payload || '{\"retry\": 1}', event_id, tag_name_raw, tag_name_norm, email"
        " FROM kajabi_events WHERE id = %s",
        (ids[0],),
    )
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert plan.count == 2 and ": 1 LEARN awarded (20 points each), 1 already paid" in plan.summary
    state, outcome = await Executor(leaps_dsn).apply(REPROCESS_WEBHOOKS, plan, "apv-noidx")
    assert state == "done", outcome
    # The second row of the same Kajabi event finds the key the first one just paid.
    assert ": 1 LEARN awarded (20 points each), 1 already paid" in outcome.summary
    assert "left unprocessed" not in outcome.summary
    assert len(await webhook_awards(leaps_dsn)) == 1
    both = await events(leaps_dsn, [ids[0], ids[0] + "_retry"])
    assert len(both) == 2 and all(processed for processed, _m in both.values())


async def key_rows(dsn: str, key: str) -> int:
    rows = await fetch(
        dsn, "SELECT count(*) FROM points_ledger WHERE external_event_id = %s", (key,)
    )
    return int(rows[0][0])


async def test_without_the_unique_index_and_with_duplicates_plan_and_apply_agree(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    """A damaged ledger (index gone, keys held twice): the once-read set of paid keys
    decides as the per-event probe did, and the run locks the ledger first."""
    twice = await faults.duplicate_external_events(2)  # drops the index; 2 keys held twice
    ids = await faults.unprocessed_webhook_events(3)
    # ids[0] replayed under a key the ledger holds twice; ids[1] retried by Kajabi.
    for source, suffix, event_id in ((ids[0], "_replay", twice[0]), (ids[1], "_retry", None)):
        await fetch(
            leaps_dsn,
            "INSERT INTO kajabi_events (id, received_at, payload, event_id, tag_name_raw,"
            " tag_name_norm, email) SELECT id || %s, received_at + interval '1 second',"
            " payload || '{\"retry\": 1}', coalesce(%s, event_id), tag_name_raw,"
            " tag_name_norm, email FROM kajabi_events WHERE id = %s",
            (suffix, event_id, source),
        )
    tally = ": 3 LEARNs awarded (20 points each), 2 already paid"
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert plan.count == 5 and tally in plan.summary, plan.summary
    assert {t["id"]: t["will"] for t in plan.targets} == {
        ids[0]: "award",
        ids[0] + "_replay": "already",
        ids[1]: "award",
        ids[1] + "_retry": "already",
        ids[2]: "award",
    }
    assert any("locks points_ledger against writes" in w for w in plan.warnings)
    assert plan.steps[0].sql.startswith("LOCK TABLE points_ledger IN SHARE ROW EXCLUSIVE")
    assert "(now: missing)" in str(plan.steps[0].note)
    state, outcome = await Executor(leaps_dsn).apply(
        REPROCESS_WEBHOOKS, plan, "apv-damaged", await staff(leaps_dsn)
    )
    assert state == "done", outcome
    assert tally in outcome.summary and "left unprocessed" not in outcome.summary
    awards = await webhook_awards(leaps_dsn)
    assert sorted(r[8]["kajabi_event"] for r in awards) == sorted([ids[0], ids[1], ids[2]])
    assert len({r[6] for r in awards}) == 3
    assert [await key_rows(leaps_dsn, k) for k in twice] == [2, 2]  # left for dedupe
    done = await events(leaps_dsn, [*ids, ids[0] + "_replay", ids[1] + "_retry"])
    assert len(done) == 5 and all(processed for processed, _m in done.values())


async def test_without_the_unique_index_a_concurrent_award_waits_for_the_ledger_lock(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    """The webhook handler pays a key in an open transaction while the remedy runs: with
    no index to refuse the second row, the remedy's ledger lock makes it wait for the
    handler's commit and then see the key as paid."""
    await faults.duplicate_external_events(1)
    (event,) = await faults.unprocessed_webhook_events(1)
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert ": 1 LEARN awarded" in plan.summary
    (key, user) = (
        await fetch(
            leaps_dsn,
            "SELECT e.event_id, u.id FROM kajabi_events e JOIN users u ON lower(u.email) ="
            " lower(e.email) WHERE e.id = %s",
            (event,),
        )
    )[0]
    async with await psycopg.AsyncConnection.connect(leaps_dsn) as handler:
        await handler.execute(
            "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
            " external_source, external_event_id, event_time) VALUES"
            " ('handler_award', %s, 'LEARN', 'WEBHOOK', 20, 'kajabi', %s, now())",
            (user, key),
        )
        run = asyncio.create_task(
            Executor(leaps_dsn, lock_timeout_ms=20_000).apply(REPROCESS_WEBHOOKS, plan, "apv-race")
        )
        waiting: Rows = []
        for _ in range(200):
            waiting = await fetch(
                leaps_dsn,
                "SELECT l.mode FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE NOT l.granted AND l.relation = 'points_ledger'::regclass"
                " AND a.application_name = 'dbops-bot'",
            )
            if waiting or run.done():
                break
            await asyncio.sleep(0.05)
        assert waiting == [("ShareRowExclusiveLock",)]
        await handler.commit()
    state, outcome = await run
    assert state == "done", outcome
    assert ": 0 LEARNs awarded" in outcome.summary and "1 already paid" in outcome.summary
    assert await key_rows(leaps_dsn, str(key)) == 1
    assert await events(leaps_dsn, [event]) == {event: (True, user)}


async def test_learn_is_not_paid_twice_to_a_user_who_holds_it(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    event, user = await faults.repeated_learn_event()
    (fresh,) = await faults.unprocessed_webhook_events(1)
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert plan.count == 2 and ": 1 LEARN awarded" in plan.summary
    assert "1 to be left unprocessed" in plan.summary
    state, outcome = await Executor(leaps_dsn).apply(
        REPROCESS_WEBHOOKS, plan, "apv-twice", await staff(leaps_dsn)
    )
    assert state == "done", outcome
    assert outcome.rows[0]["id"] == event
    assert str(outcome.rows[0]["reason"]).startswith(f"user {user} already holds 20 LEARN points")
    assert await events(leaps_dsn, [event, fresh]) == {
        event: (False, None),
        fresh: (True, (await user_of_email(leaps_dsn, [fresh]))[fresh]),
    }
    assert [r[8]["kajabi_event"] for r in await webhook_awards(leaps_dsn)] == [fresh]


async def test_other_tags_are_matched_without_award_and_no_known_tag_refuses(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    (newsletter,) = await faults.unprocessed_webhook_events(1, tag="LEAPS Newsletter")
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert "1 of other tags (matched, no award)" in plan.summary
    state, outcome = await Executor(leaps_dsn).apply(REPROCESS_WEBHOOKS, plan, "apv-tag")
    assert state == "done" and "0 LEARNs awarded" in outcome.summary, outcome
    owner = (await user_of_email(leaps_dsn, [newsletter]))[newsletter]
    assert await events(leaps_dsn, [newsletter]) == {newsletter: (True, owner)}
    assert await webhook_awards(leaps_dsn) == []

    await faults.unprocessed_webhook_events(1)
    await fetch(leaps_dsn, "DELETE FROM learn_tag_grants")
    with pytest.raises(UsageError, match="cannot tell which Kajabi events complete LEARN"):
        await REPROCESS_WEBHOOKS.plan(ctx, [])


async def test_a_refused_event_is_rolled_back_alone_and_the_others_go_ahead(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    """A guard of the database refuses marking one event, after its award was inserted
    in the same savepoint: that award is undone with it, the other events are paid."""
    ids = await faults.unprocessed_webhook_events(3)
    victim = ids[1]
    await fetch(
        leaps_dsn,
        sql.SQL(
            "CREATE FUNCTION refuse_event() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.id = {} THEN RAISE EXCEPTION 'event % is under investigation',"
            " NEW.id USING ERRCODE = '42501'; END IF; RETURN NEW; END $$;"
            " CREATE TRIGGER refuse_event BEFORE UPDATE ON kajabi_events"
            " FOR EACH ROW EXECUTE FUNCTION refuse_event();"
        ).format(sql.Literal(victim)),
    )
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    assert plan.count == 3
    state, outcome = await Executor(leaps_dsn).apply(
        REPROCESS_WEBHOOKS, plan, "apv-refuse", await staff(leaps_dsn)
    )
    assert state == "done", outcome
    assert ": 2 LEARNs awarded" in outcome.summary and "1 left unprocessed" in outcome.summary
    failure = outcome.rows[0]
    assert failure["id"] == victim
    assert failure["reason"] == (
        f"the database refused: 42501: event {victim} is under investigation"
    )
    after = await events(leaps_dsn, ids)
    assert [after[i][0] for i in ids] == [True, False, True]
    paid = {r[8]["kajabi_event"] for r in await webhook_awards(leaps_dsn)}
    assert paid == {ids[0], ids[2]}


async def test_reprocess_aborts_when_a_planned_event_was_processed_meanwhile(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    ids = await faults.unprocessed_webhook_events(3)
    plan = await REPROCESS_WEBHOOKS.plan(ctx, [])
    await fetch(
        leaps_dsn,
        "UPDATE kajabi_events SET processed_at = now(), user_match = 'NO_USER_FOUND' WHERE id = %s",
        (ids[0],),
    )
    state, outcome = await Executor(leaps_dsn).apply(REPROCESS_WEBHOOKS, plan, "apv-drift")
    assert state == "aborted" and "drift" in outcome.summary
    assert await webhook_awards(leaps_dsn) == []


# --- dedupe-webhooks ------------------------------------------------------------------


async def test_dedupe_webhooks_keeps_the_earliest_and_backs_up_the_rest(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    originals = await faults.duplicate_webhook_payloads(2, copies=2)
    before = await fetch(leaps_dsn, "SELECT count(*) FROM kajabi_events")
    plan = await DEDUPE_WEBHOOKS_REMEDY.plan(ctx, [])
    assert plan.count == 4 and plan.needs_approval
    assert {t["kept_row"] for t in plan.targets} == set(originals)
    assert not any("learn_tag_grants" in w for w in plan.warnings)  # copies are unnamed
    state, outcome = await Executor(leaps_dsn).apply(DEDUPE_WEBHOOKS_REMEDY, plan, "apv-dd")
    assert state == "done", outcome
    assert outcome.affected == 4 and outcome.backed_up == 4
    after = await fetch(leaps_dsn, "SELECT count(*) FROM kajabi_events")
    assert after[0][0] == before[0][0] - 4
    assert set(await events(leaps_dsn, originals)) == set(originals)
    backup = sql.Identifier(BACKUP_SCHEMA, backup_name("apv-dd", "kajabi_events"))
    copies = await fetch(leaps_dsn, sql.SQL("SELECT id FROM {} ORDER BY id").format(backup))
    assert sorted(str(r[0]) for r in copies) == sorted(
        f"{o}_again{k}" for o in originals for k in (1, 2)
    )
    _rep, by = await report(ctx)
    assert by[wh.DUPLICATES].status is Status.OK
    again = await DEDUPE_WEBHOOKS_REMEDY.plan(ctx, [])
    assert again.count == 0


def test_remedies_are_registered_with_their_approvals() -> None:
    assert REMEDIES["rematch-emails"] is REMATCH_EMAILS_REMEDY
    assert REMEDIES["reprocess-webhooks"] is REPROCESS_WEBHOOKS
    assert REMEDIES["dedupe-webhooks"] is DEDUPE_WEBHOOKS_REMEDY
    assert DEDUPE_WEBHOOKS_REMEDY.destroys_data and DEDUPE_WEBHOOKS_REMEDY.approvers == 2
    for remedy in (REMATCH_EMAILS_REMEDY, REPROCESS_WEBHOOKS):
        assert not remedy.destroys_data and remedy.approvers == 1
        assert remedy.approver_role == "ADMIN"


# --- over Slack -----------------------------------------------------------------------


async def test_webhooks_over_slack(bot: RunningBot, faults: FaultInjector) -> None:
    await faults.unprocessed_webhook_events(3, old=1)
    await faults.duplicate_webhook_payloads(1)
    resp = await bot.slash("webhooks")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=20)
    text = "\n".join(b["text"]["text"] for b in call.params["blocks"] if b.get("type") == "section")
    assert "4 events not processed yet" in text  # the retry is unprocessed too
    assert "1 payload received more than once (1 extra row)" in text
    assert "/db reprocess-webhooks" in text and "/db dedupe-webhooks" in text


async def test_each_remedy_approved_over_slack(
    leaps_dsn: str, fake_slack: FakeSlack, faults: FaultInjector
) -> None:
    fresh = await faults.unprocessed_webhook_events(2, old=2)
    miscased = await faults.miscased_unmatched_events(2)
    await faults.duplicate_webhook_payloads(1, copies=2)
    admin_id = (await staff(leaps_dsn)).user_id
    (admin_email,) = (await fetch(leaps_dsn, "SELECT email FROM users WHERE id = %s", (admin_id,)))[
        0
    ]
    fake_slack.add_user(ADMIN, email=str(admin_email))
    fake_slack.add_user(ADMIN2)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES)
    async with running_bot(settings, fake_slack) as bot:
        for text, approvers, expect in (
            ("rematch-emails", [ADMIN], "re-matched 2 Kajabi events"),
            ("reprocess-webhooks", [ADMIN], "processed 4 of 4 planned events: 2 LEARNs awarded"),
            ("dedupe-webhooks", [ADMIN, ADMIN2], "deleted 2 repeated Kajabi events"),
        ):
            fake_slack.reset()
            plan = await request(bot, text)
            plan_text = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
            if text == "reprocess-webhooks":
                assert "each in a savepoint of its own" in plan_text
                assert "failure does not undo the others" in plan_text
            for approver in approvers:
                await press(bot, plan, approver)
                await settle(bot)
            final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
            assert expect in final, final
            assert f"acted as LEAPS user {admin_id} (ADMIN" in final
    after = await events(leaps_dsn, [*fresh, *miscased])
    assert all(
        processed and match not in (None, "NO_USER_FOUND") for processed, match in after.values()
    )
    assert len(await webhook_awards(leaps_dsn)) == 2
