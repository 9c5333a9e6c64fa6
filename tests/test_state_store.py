"""The bot's own state store, on a SQLite file and on a real PostgreSQL.

The approval rules are only as good as the store's exactly-once claim, so the races here run
for real: many coroutines on two engines, and two separate processes, on the same database.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from bot.state import (
    Approval,
    DecisionResult,
    InvalidTransition,
    NotFound,
    StateStore,
    make_engine,
    make_state_url,
    open_store,
)
from bot.state.models import VERSION_TABLE, Base
from bot.state.store import alembic_config
from tests import leakcheck

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TABLES = {
    "dbops_approvals",
    "dbops_approval_decisions",
    "dbops_audit",
    "dbops_refresh_log",
    "dbops_known_roles",
    "dbops_baselines",
}
TABLES |= {"dbops_incidents", "dbops_incident_events", "dbops_incident_reminders"}
TABLES |= {"dbops_health_seen"}
TABLES |= {"dbops_watchdog_checks"}
TABLES |= {"dbops_role_changes"}

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite3'}"
    factory: Callable[[str], str] = request.getfixturevalue("pg_dsn_factory")
    return factory("state")


@pytest_asyncio.fixture(loop_scope="session")
async def store(state_url: str) -> AsyncIterator[StateStore]:
    async with await open_store(state_url) as opened:
        yield opened


async def new_approval(store: StateStore, **overrides: Any) -> Approval:
    values: dict[str, Any] = {
        "remedy": "quota.reset",
        "args": ["@alice", "--force"],
        "requester_id": "U0REQ",
        "requester_name": "requester",
        "channel_id": "C0INC",
        "plan": {"sql": "UPDATE users SET quota = %(q)s WHERE id = %(id)s", "rows": 1},
        "plan_hash": "sha256:abc",
        "needed_approvals": 1,
        "approver_role": "admin",
        "ttl_s": 900.0,
    }
    values.update(overrides)
    return await store.create_approval(**values)


async def approve(
    store: StateStore, approval_id: str, user: str, *, now: datetime | None = None
) -> DecisionResult:
    return await store.record_decision(
        approval_id, user_id=user, user_name=user.lower(), role="admin", decision="approve", now=now
    )


# -- URLs and engines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, "sqlite+aiosqlite:///dbops-state.sqlite3"),
        ("", "sqlite+aiosqlite:///dbops-state.sqlite3"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite:////var/lib/bot/x.db", "sqlite+aiosqlite:////var/lib/bot/x.db"),
        (
            "postgresql://u:p@h:5432/db?sslmode=require",
            "postgresql+psycopg://u:p@h:5432/db?sslmode=require",
        ),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://h/db", "postgresql+psycopg://h/db"),
        ("sqlite+aiosqlite:///y.db", "sqlite+aiosqlite:///y.db"),
    ],
)
def test_make_state_url(given: str | None, expected: str) -> None:
    assert make_state_url(given, Path("dbops-state.sqlite3")) == expected


def test_make_state_url_default_path() -> None:
    assert (
        make_state_url(None, Path("/srv/bot/state.db")) == "sqlite+aiosqlite:////srv/bot/state.db"
    )


@pytest.mark.parametrize("url", ["postgresql+psycopg2://h/db", "mysql://h/db", "host=h dbname=db"])
def test_make_engine_refuses_what_it_cannot_serve(url: str) -> None:
    with pytest.raises(ValueError, match="STATE_DATABASE_URL"):
        make_engine(url)


# -- migrations -------------------------------------------------------------------------------


def _schema_report(conn: Connection) -> tuple[set[str], str | None, list[Any]]:
    tables = set(inspect(conn).get_table_names())
    version = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one_or_none()  # noqa: S608
    context = MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
    )
    return tables, version, compare_metadata(context, Base.metadata)


async def test_migrations_apply_concurrently_and_reopen(state_url: str) -> None:
    # Two replicas starting together on an empty database, then a restart.
    first, second = await asyncio.gather(open_store(state_url), open_store(state_url))
    third = await open_store(state_url)
    try:
        async with third.engine.connect() as conn:
            tables, version, drift = await conn.run_sync(_schema_report)
            if conn.dialect.name == "sqlite":
                mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
                assert mode == "wal"
        assert tables == TABLES | {VERSION_TABLE}
        assert version == HEAD
        assert drift == [], "models and migrations disagree"
        made = await new_approval(first)
        assert await second.get_approval(made.id) == await third.get_approval(made.id) == made
    finally:
        for opened in (first, second, third):
            await opened.close()


async def test_migrations_of_two_databases_in_one_process(state_url: str, tmp_path: Path) -> None:
    # Alembic keeps its migration context in a module global: two upgrades interleaved on one
    # event loop must not run on each other's connection.
    others = [f"sqlite:///{tmp_path / f'other-{i}.sqlite3'}" for i in range(3)]
    opened = await asyncio.wait_for(
        asyncio.gather(*(open_store(url) for url in [state_url, *others])), 60
    )
    try:
        for each in opened:
            async with each.engine.connect() as conn:
                tables, version, _ = await conn.run_sync(_schema_report)
            assert tables == TABLES | {VERSION_TABLE} and version == HEAD
    finally:
        for each in opened:
            await each.close()


# -- approvals --------------------------------------------------------------------------------


async def test_create_decide_claim_finish(store: StateStore) -> None:
    made = await new_approval(store, needed_approvals=2)
    assert made.id.startswith("apv-") and len(made.id) == 16
    assert made.state == "pending" and made.version == 1 and made.args == ("@alice", "--force")
    assert made.expires_at - made.created_at == timedelta(seconds=900)
    assert await store.get_approval(made.id) == made
    assert await store.get_approval("apv-000000000000") is None

    await store.set_messages(made.id, thread_ts="1700000000.000100", message_ts="1700000000.000200")
    posted = await store.get_approval(made.id)
    assert posted is not None and posted.message_ts == "1700000000.000200"
    with pytest.raises(NotFound):
        await store.set_messages("apv-missing", thread_ts=None, message_ts=None)

    first = await approve(store, made.id, "U0ANN")
    assert first.status == "recorded" and first.state == "pending" and not first.enough_approvals
    assert await store.claim(made.id, claimer="proc-1") is None  # one approver of two

    second = await approve(store, made.id, "U0BOB")
    assert second.enough_approvals
    assert [d.user_id for d in second.approvers] == ["U0ANN", "U0BOB"] and second.rejecters == ()

    claimed = await store.claim(made.id, claimer="proc-1")
    assert claimed is not None
    assert (claimed.state, claimed.claimed_by, claimed.version) == ("executing", "proc-1", 2)
    assert await store.claim(made.id, claimer="proc-2") is None

    late = await approve(store, made.id, "U0CAT")
    assert late.status == "closed" and late.state == "executing" and len(late.approvers) == 2

    with pytest.raises(InvalidTransition):
        await store.finish(made.id, state="done", outcome={}, claimer="proc-2")
    await store.finish(made.id, state="done", outcome={"rows": 1}, claimer="proc-1")
    done = await store.get_approval(made.id)
    assert done is not None and done.state == "done" and done.outcome == {"rows": 1}
    assert done.is_terminal
    with pytest.raises(InvalidTransition):
        await store.finish(made.id, state="failed", outcome={})
    with pytest.raises(NotFound):
        await store.finish("apv-missing", state="done", outcome={})
    with pytest.raises(NotFound):
        await approve(store, "apv-missing", "U0ANN")


async def test_finish_only_from_executing(store: StateStore) -> None:
    made = await new_approval(store)
    with pytest.raises(InvalidTransition, match="is pending"):
        await store.finish(made.id, state="aborted", outcome={"why": "drift"})


async def test_fifty_concurrent_claims_on_two_engines_execute_once(state_url: str) -> None:
    one, two = await open_store(state_url), await open_store(state_url)
    try:
        made = await new_approval(one)
        await approve(two, made.id, "U0ANN")
        claims = [(one if i % 2 else two).claim(made.id, claimer=f"proc-{i}") for i in range(50)]
        results = await asyncio.gather(*claims)
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        final = await one.get_approval(made.id)
        assert final is not None and final.state == "executing"
        assert final.claimed_by == winners[0].claimed_by and final.version == 2
    finally:
        await one.close()
        await two.close()


async def test_racing_approvers_claim_once(state_url: str) -> None:
    # Every approver records a decision and immediately tries to claim, as a click does.
    one, two = await open_store(state_url), await open_store(state_url)
    try:
        made = await new_approval(one, needed_approvals=2)

        async def click(i: int) -> tuple[str, Approval | None]:
            store = one if i % 2 else two
            decided = await approve(store, made.id, f"U{i:03d}")
            return decided.status, await store.claim(made.id, claimer=f"proc-{i}")

        results = await asyncio.gather(*(click(i) for i in range(12)))
        assert sum(claimed is not None for _, claimed in results) == 1
        # Clicks after the claim are told the approval is closed, and are not counted.
        recorded = sum(status == "recorded" for status, _ in results)
        assert recorded >= 2
        assert recorded + sum(status == "closed" for status, _ in results) == 12
        assert len(await one.decisions(made.id)) == recorded
    finally:
        await one.close()
        await two.close()


_CLAIMER = textwrap.dedent(
    """
    import asyncio, sys
    from bot.state import open_store

    async def main(url, approval_id, name):
        store = await open_store(url)
        try:
            results = await asyncio.gather(
                *(store.claim(approval_id, claimer=f"{name}-{i}") for i in range(25))
            )
        finally:
            await store.close()
        print(sum(r is not None for r in results))

    asyncio.run(main(*sys.argv[1:]))
    """
)


ROOT = Path(__file__).resolve().parent.parent


async def test_claims_from_two_processes_execute_once(store: StateStore, state_url: str) -> None:
    made = await new_approval(store)
    await approve(store, made.id, "U0ANN")
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CLAIMER,
            state_url,
            made.id,
            name,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for name in ("left", "right")
    ]
    outputs = [await proc.communicate() for proc in procs]
    for out, err in outputs:
        leakcheck.collect("output of a state store claimer process", out + err)
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    assert sum(int(out) for out, _ in outputs) == 1
    final = await store.get_approval(made.id)
    assert final is not None and final.state == "executing"


async def test_self_reject_ends_the_approval(store: StateStore) -> None:
    made = await new_approval(store)
    rejected = await store.record_decision(
        made.id, user_id="U0REQ", user_name="requester", role="viewer", decision="reject"
    )
    assert rejected.status == "recorded" and rejected.state == "rejected"
    assert [d.user_id for d in rejected.rejecters] == ["U0REQ"]
    later = await approve(store, made.id, "U0ANN")
    assert later.status == "closed" and later.state == "rejected" and later.approvers == ()
    assert await store.claim(made.id, claimer="proc-1") is None
    assert not await store.expire_if_due(made.id, now=T0 + timedelta(days=365))


async def test_expired_approvals_cannot_be_claimed(store: StateStore) -> None:
    made = await new_approval(store, ttl_s=60, now=T0)
    await approve(store, made.id, "U0ANN", now=T0 + timedelta(seconds=10))
    assert made.is_expired(T0 + timedelta(seconds=60)) and not made.is_expired(T0)
    assert await store.claim(made.id, claimer="proc-1", now=T0 + timedelta(seconds=61)) is None
    assert not await store.expire_if_due(made.id, now=T0 + timedelta(seconds=30))
    assert await store.expire_if_due(made.id, now=T0 + timedelta(seconds=61))
    assert not await store.expire_if_due(made.id, now=T0 + timedelta(seconds=62))
    expired = await store.get_approval(made.id)
    assert expired is not None and expired.state == "expired" and expired.version == 2
    # Even a clock that says otherwise cannot bring it back.
    assert await store.claim(made.id, claimer="proc-1", now=T0) is None


async def test_expire_due_expires_only_the_overdue(store: StateStore) -> None:
    short = await new_approval(store, ttl_s=10, now=T0)
    long = await new_approval(store, ttl_s=1000, now=T0)
    assert await store.expire_due(now=T0 + timedelta(seconds=20)) == [short.id]
    assert await store.expire_due(now=T0 + timedelta(seconds=20)) == []
    still = await store.get_approval(long.id)
    assert still is not None and still.state == "pending"


async def test_a_duplicate_decision_counts_once(store: StateStore) -> None:
    made = await new_approval(store, needed_approvals=2)
    assert (await approve(store, made.id, "U0ANN")).status == "recorded"
    again = await approve(store, made.id, "U0ANN")
    assert again.duplicate and len(again.approvers) == 1
    turned = await store.record_decision(
        made.id, user_id="U0ANN", user_name="ann", role="admin", decision="reject"
    )
    assert turned.duplicate and turned.state == "pending" and turned.rejecters == ()
    assert await store.claim(made.id, claimer="proc-1") is None
    await approve(store, made.id, "U0BOB")
    assert await store.claim(made.id, claimer="proc-1") is not None


async def test_restart_finds_approved_but_unclaimed_and_reports_stuck(store: StateStore) -> None:
    ready = await new_approval(store, now=T0, ttl_s=3600)
    waiting = await new_approval(store, now=T0, ttl_s=3600, needed_approvals=2)
    lapsed = await new_approval(store, now=T0, ttl_s=60)
    for approval in (ready, waiting, lapsed):
        await approve(store, approval.id, "U0ANN", now=T0)
    later = T0 + timedelta(seconds=120)
    assert [a.id for a in await store.pending_for_restart(now=later)] == [ready.id]

    claimed = await store.claim(ready.id, claimer="proc-dead", now=later)
    assert claimed is not None
    assert await store.pending_for_restart(now=later) == []
    assert await store.stuck_executing(60, now=later + timedelta(seconds=10)) == []
    stuck = await store.stuck_executing(60, now=later + timedelta(seconds=61))
    assert [a.id for a in stuck] == [ready.id] and stuck[0].claimed_by == "proc-dead"


async def test_timestamps_are_aware_utc(store: StateStore) -> None:
    paris = timezone(timedelta(hours=2))
    made = await new_approval(store, now=datetime(2025, 3, 1, 14, 0, tzinfo=paris))
    stored = await store.get_approval(made.id)
    assert stored is not None
    assert stored.created_at == T0 and stored.created_at.tzinfo == UTC
    assert stored.expires_at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="naive"):
        await new_approval(store, now=datetime(2025, 3, 1, 12, 0))
    with pytest.raises(ValueError, match="needed_approvals"):
        await new_approval(store, needed_approvals=-1)
    # no approval needed: claimable at once, still exactly once
    free = await new_approval(store, needed_approvals=0)
    assert await store.claim(free.id, claimer="p1", now=T0) is not None
    assert await store.claim(free.id, claimer="p2", now=T0) is None


# -- audit and refresh log --------------------------------------------------------------------


async def test_audit_trail_keeps_order(store: StateStore) -> None:
    made = await new_approval(store)
    actions = ["approval.requested", "approval.approved", "approval.claimed", "remedy.executed"]
    for i, action in enumerate(actions):
        await store.audit(
            action,
            actor_id=f"U{i}",
            approval_id=made.id,
            channel_id="C0INC",
            detail={"step": i, "rows": [1, 2]},
        )
        await store.audit("refresh.run", actor_id="U9", channel_id="C0OTHER", detail={"i": i})

    trail = await store.audit_trail(made.id)
    assert [e.action for e in trail] == actions
    assert [e.detail["step"] for e in trail] == [0, 1, 2, 3]
    assert all(e.at.tzinfo == UTC and e.approval_id == made.id for e in trail)
    assert [e.action for e in await store.audit_trail(made.id, limit=2)] == actions[2:]
    everything = await store.audit_trail()
    assert len(everything) == 8 and [e.id for e in everything] == sorted(e.id for e in everything)
    assert len(await store.audit_trail(channel_id="C0OTHER")) == 4


async def test_refresh_log_round_trip(store: StateStore) -> None:
    assert await store.last_refreshes() == {}
    old = await store.refresh_started("mv_usage", "concurrently", "U0ANN", now=T0)
    await store.refresh_finished(old, rows=10, error=None, now=T0 + timedelta(seconds=3))
    made = await new_approval(store)
    new = await store.refresh_started("mv_usage", "plain", "U0BOB", made.id, now=T0 + timedelta(1))
    await store.refresh_finished(new, rows=None, error="lock timeout", now=T0 + timedelta(1, 5))
    running = await store.refresh_started("mv_quota", "concurrently", "U0ANN")

    latest = await store.last_refreshes()
    assert set(latest) == {"mv_usage", "mv_quota"}
    usage = latest["mv_usage"]
    assert (usage.id, usage.mode, usage.error, usage.approval_id) == (
        new,
        "plain",
        "lock timeout",
        made.id,
    )
    assert not usage.ok and usage.duration_s == 5.0
    assert usage.finished_at == T0 + timedelta(days=1, seconds=5)
    quota = latest["mv_quota"]
    assert quota.id == running and quota.finished_at is None and quota.duration_s is None
    with pytest.raises(NotFound):
        await store.refresh_finished(10_000_000, rows=1, error=None)


async def test_a_stuck_approval_is_taken_over_once_and_finished_by_the_taker(
    store: StateStore, state_url: str
) -> None:
    made = await new_approval(store)
    await approve(store, made.id, "U0ANN")
    claimed = await store.claim(made.id, claimer="proc-dead")
    assert claimed is not None
    async with await open_store(state_url) as other:
        takes = await asyncio.gather(
            store.take_over(claimed, claimer="sweeper:a"),
            other.take_over(claimed, claimer="sweeper:b"),
        )
    winners = [t for t in takes if t is not None]
    assert len(winners) == 1 and winners[0].claimed_by in ("sweeper:a", "sweeper:b")
    assert winners[0].updated_at == claimed.updated_at  # still dates the original claim
    with pytest.raises(InvalidTransition):  # the dead process's late finish loses
        await store.finish(made.id, state="done", outcome={}, claimer="proc-dead")
    await store.finish(made.id, state="failed", outcome={}, claimer=winners[0].claimed_by)
    assert await store.take_over(claimed, claimer="sweeper:c") is None


async def test_a_sweep_leaves_a_taken_over_approval_to_its_taker_until_the_lease_ends(
    store: StateStore,
) -> None:
    made = await new_approval(store)
    await approve(store, made.id, "U0ANN")
    claimed = await store.claim(made.id, claimer="proc-dead")
    assert claimed is not None
    later = claimed.updated_at + timedelta(seconds=120)
    (stuck,) = await store.stuck_executing(60, now=later, sweep_lease_s=40)
    taken = await store.take_over(stuck, claimer="sweeper:a", now=later)
    assert taken is not None
    # a second sweep while the first still verifies: nothing for it to take
    soon = later + timedelta(seconds=5)
    assert await store.stuck_executing(60, now=soon, sweep_lease_s=40) == []
    # the taker died too: after its lease the row is stuck again, and taken once more
    (again,) = await store.stuck_executing(60, now=later + timedelta(seconds=41), sweep_lease_s=40)
    assert await store.take_over(again, claimer="sweeper:b", now=soon) is not None


async def test_cancel_ends_only_a_pending_approval(store: StateStore) -> None:
    made = await new_approval(store)
    assert await store.cancel(made.id, outcome={"summary": "not posted"})
    assert not await store.cancel(made.id, outcome={})
    cancelled = await store.get_approval(made.id)
    assert cancelled is not None and cancelled.state == "cancelled" and cancelled.is_terminal
    assert await store.claim(made.id, claimer="proc") is None
