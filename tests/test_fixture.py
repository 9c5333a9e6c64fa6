"""The fixture schema keeps production's rules, and every injected fault is real.

The bot is tested against this fixture, so a rule the fixture fails to enforce
or a fault that only looks right would make those tests prove nothing. Each
check here therefore asks the server itself: SQLSTATEs, pg_stat_activity,
pg_locks, pg_matviews, pg_trigger.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg import errors

from commands.fixture import APPLICATION_NAME, FaultInjector, build_fixture, count_rows
from commands.fixture.seed import TABLES, VIEWS

DsnFactory = Callable[[str], str]

RLS_TABLES = {
    "users",
    "submissions",
    "points_ledger",
    "submission_attachments",
    "kajabi_events",
    "audit_log",
}


async def fetch(dsn: str, query: LiteralString, params: tuple[Any, ...] = ()) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params or None)
        return await cur.fetchall()


async def fetch_one(dsn: str, query: LiteralString, params: tuple[Any, ...] = ()) -> Any:
    rows = await fetch(dsn, query, params)
    assert len(rows) == 1, rows
    return rows[0][0] if len(rows[0]) == 1 else rows[0]


def _fresh_dsn(factory: DsnFactory) -> str:
    return factory(f"fixture_{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def leaps(pg_dsn_factory: DsnFactory) -> str:
    """A small seeded LEAPS database of its own, so one test's faults never leak."""
    dsn = _fresh_dsn(pg_dsn_factory)
    await build_fixture(dsn, users=60, seed=7)
    return dsn


@pytest.fixture
async def injector(leaps: str) -> AsyncIterator[FaultInjector]:
    async with FaultInjector(leaps) as inj:
        yield inj


async def _participant(dsn: str) -> str:
    return str(
        await fetch_one(
            dsn,
            "SELECT id FROM users WHERE role = 'PARTICIPANT' ORDER BY id LIMIT 1",
        )
    )


async def _insert_amplify(dsn: str, user_id: str, peers: int, students: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO submissions (id, user_id, activity_code, payload, updated_at)"
            " VALUES (%s, %s, 'AMPLIFY', %s, now() AT TIME ZONE 'UTC')",
            (
                f"test_{uuid.uuid4().hex[:12]}",
                user_id,
                json.dumps({"peers_trained": peers, "students_trained": students}),
            ),
        )


# ---------------------------------------------------------------- the build


async def test_build_returns_counts_that_match_the_database(pg_dsn_factory: DsnFactory) -> None:
    dsn = _fresh_dsn(pg_dsn_factory)
    counts = await build_fixture(dsn, users=200, seed=0)

    assert set(counts) == {*TABLES, *VIEWS}
    assert counts["users"] == 200
    assert counts["activities"] == 5
    assert counts["_prisma_migrations"] == 5
    for table in ("submissions", "submission_attachments", "points_ledger", "kajabi_events"):
        assert counts[table] > 0, table
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        assert await count_rows(conn) == counts

    by_activity = dict(
        await fetch(dsn, "SELECT activity_code, count(*) FROM submissions GROUP BY 1")
    )
    assert set(by_activity) == {"LEARN", "EXPLORE", "AMPLIFY", "PRESENT", "SHINE"}
    roles = dict(await fetch(dsn, "SELECT role::text, count(*) FROM users GROUP BY 1"))
    assert roles["REVIEWER"] >= 2 and roles["ADMIN"] >= 1
    assert await fetch_one(dsn, "SELECT count(*) FROM users WHERE email <> lower(email)") > 0


async def test_build_is_deterministic_for_a_seed(pg_dsn_factory: DsnFactory) -> None:
    first, second = _fresh_dsn(pg_dsn_factory), _fresh_dsn(pg_dsn_factory)
    await build_fixture(first, users=30, seed=3)
    await build_fixture(second, users=30, seed=3)
    query: LiteralString = (
        "SELECT s.id, s.user_id, s.status::text, s.payload::text"
        " FROM submissions AS s ORDER BY s.id"
    )
    assert await fetch(first, query) == await fetch(second, query)


async def test_schema_matches_the_documented_production_facts(leaps: str) -> None:
    points = dict(await fetch(leaps, "SELECT code, default_points FROM activities"))
    assert points == {"LEARN": 20, "EXPLORE": 50, "AMPLIFY": 2, "PRESENT": 20, "SHINE": 0}

    labels = await fetch(
        leaps,
        "SELECT e.enumlabel FROM pg_enum AS e JOIN pg_type AS t ON t.oid = e.enumtypid"
        " WHERE t.typname = 'LedgerSource' ORDER BY e.enumsortorder",
    )
    assert [r[0] for r in labels] == ["MANUAL", "WEBHOOK", "FORM"]

    rls = await fetch(
        leaps,
        "SELECT relname FROM pg_class"
        " WHERE relrowsecurity AND relnamespace = 'public'::regnamespace",
    )
    assert {r[0] for r in rls} == RLS_TABLES

    # Every view must be refreshable CONCURRENTLY: a unique index without WHERE.
    unique_views = await fetch(
        leaps,
        "SELECT DISTINCT c.relname FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indrelid"
        " WHERE c.relkind = 'm' AND i.indisunique AND i.indpred IS NULL",
    )
    assert {r[0] for r in unique_views} == set(VIEWS)
    assert await fetch_one(leaps, "SELECT bool_and(ispopulated) FROM pg_matviews") is True

    cascading = await fetch_one(
        leaps,
        "SELECT count(*) FROM pg_constraint"
        " WHERE contype = 'f' AND confdeltype = 'c' AND connamespace = 'public'::regnamespace",
    )
    assert cascading >= 10

    # The leaderboard agrees with the live ledger right after the build.
    drift = await fetch_one(
        leaps,
        "SELECT count(*) FROM leaderboard_totals AS l"
        " JOIN (SELECT user_id, sum(delta_points) AS s FROM points_ledger GROUP BY 1) AS p"
        " USING (user_id) WHERE l.total_points <> p.s",
    )
    assert drift == 0


async def test_status_change_is_audited(leaps: str) -> None:
    """As the application approves: reviewer named, session settings set per transaction."""
    sub_id = await fetch_one(
        leaps, "SELECT id FROM submissions WHERE status = 'PENDING' ORDER BY id LIMIT 1"
    )
    reviewer = await fetch_one(
        leaps, "SELECT id FROM users WHERE role = 'REVIEWER' ORDER BY id LIMIT 1"
    )
    async with await psycopg.AsyncConnection.connect(leaps) as conn, conn.transaction():
        await conn.execute("SELECT set_config('app.user_id', %s, true)", (reviewer,))
        await conn.execute("SELECT set_config('app.user_role', 'REVIEWER', true)")
        await conn.execute(
            "UPDATE submissions SET status = 'APPROVED', reviewer_id = %s WHERE id = %s",
            (reviewer, sub_id),
        )
    actor, action, meta = await fetch_one(
        leaps,
        "SELECT actor_id, action, meta FROM audit_log WHERE target_id = %s"
        " AND meta -> 'new_values' ->> 'status' = 'APPROVED'",
        (sub_id,),
    )
    assert (actor, action) == (reviewer, "UPDATE_submissions")
    assert meta["old_values"]["status"] == "PENDING"
    assert meta["user_role"] == "REVIEWER"


# ---------------------------------------------------------- business rules


async def test_quota_trigger_refuses_over_quota_amplify(leaps: str) -> None:
    user_id = await _participant(leaps)
    with pytest.raises(errors.CheckViolation) as peers:
        await _insert_amplify(leaps, user_id, peers=51, students=0)
    assert peers.value.sqlstate == "23514"
    assert re.search(
        r"Peer training limit exceeded \(7-day total \d+ \+ new 51 > 50\)", str(peers.value)
    )

    with pytest.raises(errors.CheckViolation) as students:
        await _insert_amplify(leaps, user_id, peers=0, students=201)
    assert students.value.sqlstate == "23514"
    assert re.search(
        r"Student training limit exceeded \(7-day total \d+ \+ new 201 > 200\)",
        str(students.value),
    )


async def test_quota_counts_the_last_seven_days(leaps: str) -> None:
    user_id = await _participant(leaps)
    await fetch(leaps, "DELETE FROM submissions WHERE user_id = %s RETURNING id", (user_id,))
    await _insert_amplify(leaps, user_id, peers=30, students=0)
    with pytest.raises(errors.CheckViolation, match=r"7-day total 30 \+ new 21 > 50"):
        await _insert_amplify(leaps, user_id, peers=21, students=0)
    await _insert_amplify(leaps, user_id, peers=20, students=0)


async def test_second_live_learn_is_refused(leaps: str) -> None:
    # A PENDING one: with an APPROVED one the single-attempt trigger refuses first.
    user_id = await fetch_one(
        leaps,
        "SELECT user_id FROM submissions WHERE activity_code = 'LEARN'"
        " AND status = 'PENDING' ORDER BY id LIMIT 1",
    )
    payload = '{"course_name": "AI Foundations for Educators"}'
    async with await psycopg.AsyncConnection.connect(leaps, autocommit=True) as conn:
        with pytest.raises(errors.UniqueViolation) as refused:
            await conn.execute(
                "INSERT INTO submissions (id, user_id, activity_code, status, payload,"
                " updated_at) VALUES ('second-learn', %s, 'LEARN', 'PENDING', %s,"
                " now() AT TIME ZONE 'UTC')",
                (user_id, payload),
            )
        assert refused.value.sqlstate == "23505"
        assert refused.value.diag.constraint_name == "submissions_one_live_learn_per_user"
        # A rejected one is history, not a second live LEARN.
        await conn.execute(
            "INSERT INTO submissions (id, user_id, activity_code, status, payload,"
            " updated_at) VALUES ('rejected-learn', %s, 'LEARN', 'REJECTED', %s,"
            " now() AT TIME ZONE 'UTC')",
            (user_id, payload),
        )


async def test_webhook_award_is_idempotent(leaps: str) -> None:
    event_id = await fetch_one(
        leaps,
        "SELECT external_event_id FROM points_ledger"
        " WHERE external_event_id IS NOT NULL ORDER BY id LIMIT 1",
    )
    async with await psycopg.AsyncConnection.connect(leaps, autocommit=True) as conn:
        with pytest.raises(errors.UniqueViolation):
            await conn.execute(
                "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
                " external_event_id, event_time)"
                " SELECT 'replay', user_id, activity_code, source, delta_points,"
                " external_event_id, event_time FROM points_ledger"
                " WHERE external_event_id = %s",
                (event_id,),
            )
        with pytest.raises(errors.InvalidTextRepresentation):
            await conn.execute("SELECT 'RECONCILIATION'::\"LedgerSource\"")


# ------------------------------------------------------------------ faults


async def test_idle_in_transaction_is_visible(leaps: str, injector: FaultInjector) -> None:
    pid = await injector.idle_in_transaction()
    state, app, xact = await fetch_one(
        leaps,
        "SELECT state, application_name, xact_start IS NOT NULL"
        " FROM pg_stat_activity WHERE pid = %s",
        (pid,),
    )
    assert (state, app, xact) == ("idle in transaction", APPLICATION_NAME, True)


async def test_blocking_chain_is_a_real_lock_queue(leaps: str, injector: FaultInjector) -> None:
    holder, blocked, second = await injector.blocking_chain()
    rows = await fetch(
        leaps,
        "SELECT pid, state, wait_event_type, pg_blocking_pids(pid)"
        " FROM pg_stat_activity WHERE pid = ANY(%s)",
        ([holder, blocked, second],),
    )
    by_pid = {r[0]: r[1:] for r in rows}
    assert by_pid[holder][0] == "idle in transaction"
    assert by_pid[blocked][:2] == ("active", "Lock")
    assert by_pid[second][:2] == ("active", "Lock")
    assert by_pid[blocked][2] == [holder]
    assert blocked in by_pid[second][2]
    waiting_for = await fetch(
        leaps,
        "SELECT pid, mode FROM pg_locks WHERE NOT granted AND relation = 'users'::regclass",
    )
    assert sorted(waiting_for) == sorted(
        [(blocked, "AccessExclusiveLock"), (second, "AccessShareLock")]
    )


async def test_unpopulated_view(leaps: str, injector: FaultInjector) -> None:
    await injector.unpopulated_view()
    assert (
        await fetch_one(
            leaps,
            "SELECT ispopulated FROM pg_matviews WHERE matviewname = 'leaderboard_totals'",
        )
        is False
    )
    with pytest.raises(errors.ObjectNotInPrerequisiteState):
        await fetch(leaps, "SELECT count(*) FROM leaderboard_totals")
    with pytest.raises(psycopg.Error, match="not populated"):
        await fetch(leaps, "SELECT refresh_all_analytics()")


async def test_failed_migration(leaps: str, injector: FaultInjector) -> None:
    await injector.failed_migration()
    rows = await fetch(
        leaps,
        "SELECT migration_name, logs FROM _prisma_migrations"
        " WHERE finished_at IS NULL AND rolled_back_at IS NULL",
    )
    assert len(rows) == 1
    name, logs = rows[0]
    assert name == "20251101000000_add_region_index"
    assert "ERROR" in logs


async def test_disabled_quota_trigger_lets_over_quota_through(
    leaps: str, injector: FaultInjector
) -> None:
    await injector.disable_quota_trigger()
    assert (
        await fetch_one(
            leaps,
            "SELECT tgenabled FROM pg_trigger"
            " WHERE tgname = 'trg_check_amplify_quota' AND tgrelid = 'submissions'::regclass",
        )
        == "D"
    )
    # Each payload within its CHECK (peers <= 50), together over the 7-day quota.
    user_id = await _participant(leaps)
    await _insert_amplify(leaps, user_id, peers=40, students=0)
    await _insert_amplify(leaps, user_id, peers=40, students=0)


async def test_view_without_unique_index_cannot_refresh_concurrently(
    leaps: str, injector: FaultInjector
) -> None:
    await injector.drop_view_unique_index()
    assert (
        await fetch_one(
            leaps,
            "SELECT count(*) FROM pg_index"
            " WHERE indrelid = 'time_series_metrics'::regclass AND indisunique",
        )
        == 0
    )
    with pytest.raises(errors.ObjectNotInPrerequisiteState):
        await fetch(leaps, "REFRESH MATERIALIZED VIEW CONCURRENTLY time_series_metrics")


async def test_demo_faults_then_close_leaves_no_sessions(leaps: str) -> None:
    injector = FaultInjector(leaps)
    done = await injector.inject_demo_faults()
    chain = done["blocking_chain"]
    assert isinstance(chain, dict)
    pids = [done["idle_in_transaction_pid"], chain["holder"], chain["blocked"]]
    sessions = await fetch_one(
        leaps,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = %s AND state = 'idle in transaction' AND pid = ANY(%s)",
        (APPLICATION_NAME, pids),
    )
    assert sessions == 2  # the idle one and the holder; the blocked one is active
    assert await fetch_one(
        leaps, "SELECT NOT ispopulated FROM pg_matviews WHERE matviewname = 'leaderboard_totals'"
    )

    await injector.close()
    left = await fetch_one(
        leaps,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
        (APPLICATION_NAME,),
    )
    assert left == 0
    await injector.close()  # a second close is harmless
    # With the chain gone the table is readable again, at once.
    assert await fetch_one(leaps, "SELECT count(*) FROM users") == 60


async def test_data_integrity_faults(leaps: str, injector: FaultInjector) -> None:
    orphans = await injector.orphaned_rows()
    missing_user = await fetch_one(
        leaps,
        "SELECT count(*) FROM points_ledger AS l"
        " WHERE NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = l.user_id)",
    )
    assert missing_user == 1
    assert await fetch_one(
        leaps,
        "SELECT count(*) FROM submission_attachments WHERE id = %s",
        (orphans["submission_attachments"],),
    )

    event_id = await injector.duplicate_external_event()
    assert (
        await fetch_one(
            leaps, "SELECT count(*) FROM points_ledger WHERE external_event_id = %s", (event_id,)
        )
        == 2
    )

    user_id = await injector.stale_views(points=500)
    live, shown = await fetch_one(
        leaps,
        "SELECT (SELECT sum(delta_points) FROM points_ledger WHERE user_id = %s),"
        " (SELECT total_points FROM leaderboard_totals WHERE user_id = %s)",
        (user_id, user_id),
    )
    assert live != shown

    await injector.camelcase_quota_function()
    source = await fetch_one(
        leaps, "SELECT prosrc FROM pg_proc WHERE proname = %s", ("check_amplify_quota",)
    )
    assert "peersTrained" in source and "peers_trained" not in source


async def test_data_loss_picks_by_hash_and_kajabi_only_by_processed_event(
    leaps: str, injector: FaultInjector
) -> None:
    """The victims are the participants with submissions in the order of md5(id), the
    first n; with `kajabi_only`, only those with a processed event matched to them. The
    first such participant loses its event's processing, so only the second call takes it."""
    candidates = [
        str(r[0])
        for r in await fetch(
            leaps,
            "SELECT u.id FROM users u WHERE u.role = 'PARTICIPANT'"
            " AND u.id IN (SELECT user_id FROM submissions)",
        )
    ]
    ordered = sorted(candidates, key=lambda u: hashlib.md5(u.encode()).hexdigest())
    unprocessed = ordered[1]
    await fetch(
        leaps,
        "UPDATE kajabi_events SET processed_at = NULL WHERE user_match = %s RETURNING id",
        (unprocessed,),
    )
    matched = {
        str(r[0])
        for r in await fetch(
            leaps,
            "SELECT user_match FROM kajabi_events"
            " WHERE processed_at IS NOT NULL AND user_match IS NOT NULL",
        )
    }
    total = int(await fetch_one(leaps, "SELECT count(*) FROM users"))
    pct = 100.0 * 3 / total  # three users each time
    assert unprocessed not in matched and ordered[0] in matched

    first = await injector.data_loss(pct=pct, accounts=1, unmatched=1, kajabi_only=True)
    assert first.users == [u for u in ordered if u in matched][:3]
    assert unprocessed not in first.users and first.accounts == first.users[:1]
    (gone,) = first.unmatched_events
    assert await fetch_one(
        leaps, "SELECT user_match, email = upper(email) FROM kajabi_events WHERE id = %s", (gone,)
    ) == ("NO_USER_FOUND", True)

    second = await injector.data_loss(pct=pct)
    assert second.users == [u for u in ordered if u not in first.users][:3]
    assert unprocessed in second.users
    assert (
        await fetch_one(
            leaps,
            "SELECT count(*) FROM submissions WHERE user_id = ANY(%s)",
            (first.users + second.users,),
        )
        == 0
    )


async def test_fault_sql_quotes_identifiers(leaps: str, injector: FaultInjector) -> None:
    """A hostile view name is an identifier, never SQL."""
    with pytest.raises(errors.UndefinedTable):
        await injector.unpopulated_view("leaderboard_totals; DROP TABLE users; --")
    assert await fetch_one(leaps, "SELECT to_regclass('users') IS NOT NULL")


async def test_close_after_the_blocker_was_terminated(leaps: str) -> None:
    """The bot's remedy kills the holder; the injector must still clean up after it."""
    injector = FaultInjector(leaps)
    holder, blocked, second = await injector.blocking_chain()
    assert await fetch_one(leaps, "SELECT pg_terminate_backend(%s)", (holder,)) is True
    await injector.close()
    left = await fetch_one(
        leaps,
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
        ([holder, blocked, second],),
    )
    assert left == 0
