"""Ask the database first (DESIGN.md rule 10): a row-writing remedy is tried at plan time
in a transaction that is rolled back, before any approval exists.

Over the real Slack path (signed requests into the running bot, the fake Slack Web API)
and a real PostgreSQL target: an accepted try shows in the plan with its rows and time; a
trigger the fixture does not know refuses it, and then no approval row and no thread
exist, only a private note to the requester naming the trigger; a held lock makes it
inconclusive and the approval opens saying why; nothing survives the try (rows, backup
tables, NOTIFY); a big plan is tried on a sample; a REVIEWER's request is tried as the
ADMIN role. A connection lost during COMMIT is decided by the remedy's verification.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from bot.approvals.executor import Executor
from commands.base import BACKUP_SCHEMA, Context, LeapsIdentity, Reader
from commands.fixture.faults import FaultInjector
from commands.guards import calls_out, mask_personal
from commands.remedies.base import (
    REMEDIES,
    Execution,
    LockScope,
    Outcome,
    Plan,
    PlanStep,
    Remedy,
    Verification,
    Writer,
    check_count,
    check_drift,
)
from tests.conftest import RunningBot, bot_settings, make_audit_variant, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import message_text, press, request, settle

REQUESTER, ADMIN = "U0REQ", "U0ADMIN"
ROLES = {REQUESTER: "REVIEWER", ADMIN: "ADMIN"}
CHANNEL = "C0INCIDENT"
MARK = -555_555  # delta_points of the ledger rows the test remedy zeroes (no seed row has it)
NAME = "zero-marked"

# --- a row-writing remedy of these tests only: zero the marked ledger rows -------------

_MARKED = "SELECT id FROM points_ledger WHERE delta_points = %s ORDER BY id"


async def _plan(ctx: Context, args: list[str]) -> Plan:
    rows = await ctx.gateway.read(lambda db: db.fetch(_MARKED, (MARK,)))
    ids = [str(r["id"]) for r in rows]
    return Plan(
        remedy=NAME,
        args=args,
        title="Zero the marked ledger rows",
        summary=f"set delta_points to 0 on {len(ids)} marked ledger rows",
        steps=[
            PlanStep(
                sql="UPDATE points_ledger SET delta_points = 0 WHERE id = ANY(%s)",
                params=[ids],
            )
        ],
        count=len(ids),
        backup="the rows, into dbops_backup",
        locks=LockScope(relations=["points_ledger"]),
        data={"ids": ids},
    )


def _sample(plan: Plan, n: int) -> Plan:
    ids = list(plan.data["ids"])[:n]
    return plan.model_copy(update={"count": len(ids), "data": {"ids": ids}})


async def _apply(writer: Writer, plan: Plan) -> Outcome:
    ids = list(plan.data["ids"])
    now = await writer.fetch(
        "SELECT id FROM points_ledger WHERE id = ANY(%s) AND delta_points = %s", (ids, MARK)
    )
    check_drift(plan, len(now), "marked rows")
    backup = await writer.backup_table("points_ledger")
    await writer.execute(
        sql.SQL("CREATE TABLE {} AS SELECT * FROM points_ledger WHERE id = ANY(%s)").format(backup),
        (ids,),
    )
    await writer.audit.before(writer, "points_ledger", ids)
    changed = await writer.execute(
        "UPDATE points_ledger SET delta_points = 0 WHERE id = ANY(%s) AND delta_points = %s",
        (ids, MARK),
    )
    await writer.audit.after(writer, "points_ledger", "UPDATE", ids)
    check_count(plan, changed, "marked rows")
    return Outcome(ok=True, summary=f"zeroed {changed}", affected=changed, backed_up=changed)


async def _verify(db: Reader, plan: Plan, run: Execution) -> Verification:
    rows = await db.fetch(
        "SELECT count(*) AS n FROM points_ledger WHERE id = ANY(%s) AND delta_points = %s",
        (list(plan.data["ids"]), MARK),
    )
    left = int(rows[0]["n"])
    return Verification(landed=left == 0, found=f"{left} of {plan.count} rows still marked")


ZERO_MARKED = Remedy(
    name=NAME,
    usage="/db zero-marked",
    summary="(test) zero the marked ledger rows",
    plan=_plan,
    apply=_apply,
    verify=_verify,
    approver_role="ADMIN",
    approvers=1,
    preflight=True,
    sample=_sample,
)


@pytest.fixture
def zero_marked() -> Iterator[Remedy]:
    """The test remedy, registered for the bot's router for one test."""
    REMEDIES[NAME] = ZERO_MARKED
    try:
        yield ZERO_MARKED
    finally:
        del REMEDIES[NAME]


# --- helpers ---------------------------------------------------------------------------


async def run(dsn: str, query: LiteralString, params: tuple[Any, ...] = ()) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def mark_rows(dsn: str, n: int) -> list[str]:
    rows = await run(
        dsn,
        "UPDATE points_ledger SET delta_points = %s"
        " WHERE id IN (SELECT id FROM points_ledger ORDER BY id LIMIT %s) RETURNING id",
        (MARK, n),
    )
    return sorted(str(r[0]) for r in rows)


async def ledger(dsn: str) -> list[Any]:
    return await run(dsn, "SELECT * FROM points_ledger ORDER BY id")


async def backup_tables(dsn: str) -> list[Any]:
    return await run(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = %s", (BACKUP_SCHEMA,))


def approvals_in_store(bot: RunningBot) -> int:
    url = bot.service.settings.state_database_url or ""
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        return int(db.execute("SELECT count(*) FROM dbops_approvals").fetchone()[0])


async def leaps_user(dsn: str, role: str) -> tuple[str, str]:
    (row,) = await run(
        dsn,
        'SELECT id, email FROM users WHERE role = %s::"Role" ORDER BY created_at, id LIMIT 1',
        (role,),
    )
    return str(row[0]), str(row[1])


class Listener:
    """LISTEN refresh_analytics on a connection of its own; `heard()` ends with a sentinel
    NOTIFY sent after everything else, so every earlier delivered notification is in."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> Listener:
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        await self.conn.execute("LISTEN refresh_analytics")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def heard(self) -> list[str]:
        assert self.conn is not None
        await run(self.dsn, "SELECT pg_notify('refresh_analytics', 'sentinel')")
        payloads: list[str] = []
        async for note in self.conn.notifies(timeout=30):
            if note.payload == "sentinel":
                return payloads
            payloads.append(note.payload)
        raise AssertionError("the sentinel notification never arrived")


@pytest_asyncio.fixture(loop_scope="session")
async def pbot(
    leaps_dsn: str, fake_slack: FakeSlack, zero_marked: Remedy
) -> AsyncIterator[RunningBot]:
    settings = bot_settings(
        leaps_dsn, fake_slack, role_map=ROLES, diagnostics_role="REVIEWER", lock_timeout_ms=200
    )
    async with running_bot(settings, fake_slack) as bot:
        yield bot


# --- the Slack path --------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fixture", "production"])
async def test_an_accepted_try_shows_in_the_plan_and_leaves_nothing_behind(
    leaps_dsn: str, fake_slack: FakeSlack, zero_marked: Remedy, variant: str
) -> None:
    """On both audit trails the database accepts the change (production's: the bot path,
    app.user_id not set), the plan says so with rows and time and which path the audit
    rows take; the try left no row changed, no backup table and no delivered NOTIFY."""
    await make_audit_variant(leaps_dsn, variant)
    await mark_rows(leaps_dsn, 4)
    before = await ledger(leaps_dsn)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES, diagnostics_role="REVIEWER")
    async with Listener(leaps_dsn) as listener, running_bot(settings, fake_slack) as bot:
        plan = await request(bot, NAME)
        text = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "the database accepted it: 4 rows changed, 4 rows tried, rolled back" in text
        assert " ms" in text.split("rolled back", 1)[1]
        path = "written by the bot" if variant == "production" else "written by the live audit"
        assert "audit: audit rows: " + path in text
        assert approvals_in_store(bot) == 1
        assert await listener.heard() == []
    assert await ledger(leaps_dsn) == before
    assert await backup_tables(leaps_dsn) == []
    # the try's audit_log rows went with it
    assert await run(
        leaps_dsn, "SELECT count(*) FROM audit_log WHERE meta::text LIKE %s", ("%-555555%",)
    ) == [(0,)]


async def test_a_trigger_the_fixture_does_not_know_refuses_and_no_approval_opens(
    leaps_dsn: str, pbot: RunningBot
) -> None:
    await mark_rows(leaps_dsn, 3)
    await run(
        leaps_dsn,
        """
        CREATE FUNCTION freeze_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE EXCEPTION 'the ledger is frozen by ops.lead@leaps.example'
            USING ERRCODE = 'P0001';
        END $$;
        CREATE TRIGGER trg_freeze_ledger BEFORE UPDATE OR DELETE ON points_ledger
          FOR EACH ROW EXECUTE FUNCTION freeze_ledger();
        """,
    )
    before = await ledger(leaps_dsn)
    resp = await pbot.slash(NAME, channel=CHANNEL, user=REQUESTER)
    assert resp.status == 200
    told = await pbot.fake.wait_for("chat.postEphemeral", timeout=15)
    await settle(pbot)
    note = " ".join(str(c.params.get("text", "")) for c in told)
    assert "no approval was opened" in note and "refused it by trigger trg_freeze_ledger" in note
    assert "freeze_ledger()" in note and "the ledger is frozen by" in note
    assert "ops.lead@leaps.example" not in note  # personal data masked
    assert all(c.params.get("user") == REQUESTER for c in told)
    assert approvals_in_store(pbot) == 0
    assert pbot.fake.calls_to("chat.postMessage") == []  # no parent, no thread
    assert pbot.service.store is not None
    audited = [e for e in await pbot.service.store.audit_trail(limit=50)]
    (refused,) = [e for e in audited if e.action == "approval.refused_by_database"]
    assert "trg_freeze_ledger" in str(refused.detail["guard"])
    assert "approval.requested" not in [e.action for e in audited]
    assert await ledger(leaps_dsn) == before
    assert await backup_tables(leaps_dsn) == []


async def test_a_held_lock_is_inconclusive_and_the_approval_says_why(
    leaps_dsn: str, pbot: RunningBot
) -> None:
    await mark_rows(leaps_dsn, 2)
    async with await psycopg.AsyncConnection.connect(leaps_dsn) as holder:
        await holder.execute("LOCK TABLE points_ledger IN SHARE MODE")
        pid = holder.info.backend_pid
        plan = await request(pbot, NAME)
        text = message_text(pbot.fake, CHANNEL, str(plan.response["ts"]))
        await holder.rollback()
    assert "inconclusive: a lock was held" in text
    assert f"pid {pid}" in text
    assert "200 ms lock_timeout rather than wait" in text
    assert approvals_in_store(pbot) == 1
    assert await backup_tables(leaps_dsn) == []


async def test_a_plan_bigger_than_the_limit_is_tried_on_a_sample(
    leaps_dsn: str, fake_slack: FakeSlack, zero_marked: Remedy
) -> None:
    await mark_rows(leaps_dsn, 7)
    before = await ledger(leaps_dsn)
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES, preflight_max_rows=3)
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, NAME)
        text = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
    assert "accepted it: 3 rows changed, 3 rows tried (of 7 planned)" in text
    assert "rows/objects counted now: *7*" in text
    assert await ledger(leaps_dsn) == before


async def test_a_reviewer_requests_what_an_admin_approves(
    leaps_dsn: str, fake_slack: FakeSlack, zero_marked: Remedy
) -> None:
    """A guard that lets only ADMIN change the ledger: the try acts with the approver
    role, so a REVIEWER's request is accepted; without a staff account of their own the
    try names a LEAPS account holding ADMIN, picked read-only; with one, theirs."""
    await mark_rows(leaps_dsn, 2)
    await run(
        leaps_dsn,
        """
        CREATE FUNCTION admins_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF current_setting('app.user_role', true) IS DISTINCT FROM 'ADMIN' THEN
            RAISE EXCEPTION 'only an ADMIN may change the ledger';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER trg_admins_only BEFORE UPDATE ON points_ledger
          FOR EACH ROW EXECUTE FUNCTION admins_only();
        """,
    )
    admin_id, _ = await leaps_user(leaps_dsn, "ADMIN")
    reviewer_id, reviewer_email = await leaps_user(leaps_dsn, "REVIEWER")
    fake_slack.add_user("U0REQ2", email=reviewer_email)
    roles = ROLES | {"U0REQ2": "REVIEWER"}
    settings = bot_settings(leaps_dsn, fake_slack, role_map=roles, diagnostics_role="REVIEWER")
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, NAME)  # U0REQ: no Slack e-mail, so no LEAPS account
        picked = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        fake_slack.reset()  # so that the next plan posted is the one waited for
        plan2 = await request(bot, NAME, user="U0REQ2")
        own = message_text(fake_slack, CHANNEL, str(plan2.response["ts"]))
    assert "the database accepted it: 2 rows changed" in picked
    assert f"app.user_role ADMIN, reviewer {admin_id} (picked read-only as one LEAPS" in picked
    assert "holding ADMIN" in picked
    assert "the database accepted it: 2 rows changed" in own
    assert f"app.user_role ADMIN, reviewer {reviewer_id} (the requester" in own
    assert "own LEAPS account, a REVIEWER" in own


async def test_a_remedy_never_tried_says_why_and_what_it_checked(
    pbot: RunningBot, faults: FaultInjector
) -> None:
    await faults.unpopulated_view("leaderboard_totals")
    plan = await request(pbot, "refresh-views leaderboard_totals")
    text = message_text(pbot.fake, CHANNEL, str(plan.response["ts"]))
    assert "not tried before approval: a trial REFRESH would take the view" in text
    assert "The plan checked instead each view" in text
    assert "tried before approval: the database" not in text


async def test_a_connection_lost_during_commit_is_decided_by_verification(
    leaps_dsn: str, pbot: RunningBot
) -> None:
    """A deferred constraint trigger sleeps at COMMIT; the test ends that backend while it
    sleeps. Nobody can say whether it committed: the outcome is "unknown", decided by the
    remedy's verification (which finds the rows still marked), never "nothing changed"."""
    await mark_rows(leaps_dsn, 1)
    await run(
        leaps_dsn,
        """
        CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(50); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER trg_slow_commit AFTER UPDATE ON points_ledger
          DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
        """,
    )
    plan = await request(pbot, NAME)  # the try never commits, so it never sleeps
    assert "the database accepted it" in message_text(pbot.fake, CHANNEL, str(plan.response["ts"]))
    await press(pbot, plan, ADMIN)
    for _ in range(400):
        sleeping = await run(
            leaps_dsn,
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'dbops-bot'"
            " AND wait_event = 'PgSleep'",
        )
        if sleeping:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the commit never reached the deferred trigger")
    await run(leaps_dsn, "SELECT pg_terminate_backend(%s)", (sleeping[0][0],))
    await settle(pbot)
    final = message_text(pbot.fake, CHANNEL, str(plan.response["ts"]))
    assert "unknown: the connection was lost during COMMIT; verification found 1 of 1" in final
    assert "nothing was changed" not in final
    assert pbot.service.store is not None
    audit = await pbot.service.store.audit_trail(limit=50)
    assert [e.action for e in audit if e.action.startswith("remedy.")] == ["remedy.failed"]


async def test_recover_dry_run_never_reaches_the_preflight(
    leaps_dsn: str, fake_slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sequence advanced by a trigger on users INSERT survives a rollback: `/db recover`
    preflights recover-users (the sequence moves), `--dry-run` never does."""
    monkeypatch.setitem(
        REMEDIES, "recover-users", replace(REMEDIES["recover-users"], preflight=True)
    )
    async with FaultInjector(leaps_dsn) as injector:
        await injector.data_loss(pct=5, accounts=2)
    await run(
        leaps_dsn,
        """
        CREATE SEQUENCE dbops_test_probe;
        CREATE FUNCTION probe_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM nextval('dbops_test_probe'); RETURN NEW; END $$;
        CREATE TRIGGER trg_probe_insert BEFORE INSERT ON users
          FOR EACH ROW EXECUTE FUNCTION probe_insert();
        """,
    )
    probe = "SELECT last_value, is_called FROM dbops_test_probe"
    settings = bot_settings(
        leaps_dsn, fake_slack, baseline_interval_s=3600, role_map={"U0ALICE": "REVIEWER"}
    )
    async with running_bot(settings, fake_slack) as bot:
        for text in ("recover --dry-run", "recover"):
            fake_slack.reset()
            resp = await bot.slash(text, channel=CHANNEL, user="U0ALICE")
            assert resp.status == 200
            await bot.fake.wait_for("chat.postEphemeral", timeout=20)
            await settle(bot)
            if text == "recover --dry-run":
                assert await run(leaps_dsn, probe) == [(1, False)]  # never advanced
        assert bot.service.store is not None
        audit = await bot.service.store.audit_trail(limit=100)
    assert (await run(leaps_dsn, probe))[0][1] is True  # the real request tried it
    tried = [
        e.detail.get("remedy")
        for e in audit
        if e.action in ("approval.requested", "approval.refused_by_database")
    ]
    assert tried == ["recover-users"]


# --- the executor on its own -----------------------------------------------------------


async def test_a_trigger_calling_out_makes_the_try_inconclusive(leaps_dsn: str) -> None:
    """The database accepts the change, but a trigger on a table it changed calls out of
    the database (dblink): a rollback cannot take that back, so it is inconclusive."""
    ids = await mark_rows(leaps_dsn, 2)
    await run(
        leaps_dsn,
        """
        CREATE FUNCTION tell_partner() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          -- only in production: the fixture has no dblink
          IF current_setting('app.partner', true) = 'on' THEN
            PERFORM dblink_exec('partner', 'NOTIFY ledger_changed');
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER trg_tell_partner AFTER UPDATE ON points_ledger
          FOR EACH ROW EXECUTE FUNCTION tell_partner();
        """,
    )
    plan = Plan(remedy=NAME, args=[], title="t", summary="t", steps=[], count=2, data={"ids": ids})
    admin_id, _ = await leaps_user(leaps_dsn, "ADMIN")
    tried = await Executor(leaps_dsn).preflight(
        ZERO_MARKED, plan, LeapsIdentity(admin_id, "ADMIN", "test"), max_rows=1000
    )
    assert tried.status == "inconclusive", tried
    assert "trg_tell_partner on points_ledger (tell_partner() calls dblink_exec)" in tried.reason
    assert tried.affected == 2


async def test_drift_makes_the_try_inconclusive(leaps_dsn: str) -> None:
    ids = await mark_rows(leaps_dsn, 2)
    plan = Plan(remedy=NAME, args=[], title="t", summary="t", steps=[], count=3, data={"ids": ids})
    tried = await Executor(leaps_dsn).preflight(
        ZERO_MARKED, plan, None, max_rows=1000, role="ADMIN"
    )
    assert tried.status == "inconclusive" and tried.reason.startswith("drift:")
    assert "app.user_role ADMIN, no LEAPS account" == tried.identity


def test_personal_data_is_masked_in_database_messages() -> None:
    said = (
        'duplicate key value violates unique constraint "users_email_key" '
        "(Key (email)=(Ana.Lima@school.example) already exists.)"
    )
    assert mask_personal(said) == (
        'duplicate key value violates unique constraint "users_email_key" '
        "(Key (email)=('…') already exists.)"
    )
    assert mask_personal("Failing row contains (u1, ana, ana@x.org, null).") == (
        "Failing row contains ('…')."
    )
    assert calls_out("RAISE EXCEPTION 'must be http(s)'; -- http(x)") is None
    assert calls_out("PERFORM net.http_post(url := 'https://x')") == "net.http_post"
