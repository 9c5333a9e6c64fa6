"""A real point-in-time recovery (issue 15, part 2): an archiving embedded PostgreSQL holds the
LEAPS fixture; a `pg_basebackup` is taken, rows are written, the point is marked
(`pg_create_restore_point`), then production is damaged as in an incident (users deleted
with their submissions and ledger rows, rows changed, rows added); the WAL is switched and
archived, and a second cluster is restored from the backup to the mark and promoted.

The restored copy must hold exactly the marked state, and `restore-from-copy` (part B, run
once it exists) must bring every lost row back into production, list every changed row
and keep every new one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from bot.approvals.executor import Executor
from bot.embedded_pg import EmbeddedPostgres, RestorePoint
from bot.gateway import TargetGateway
from bot.router import RunContext
from commands import rowdiff
from commands.fixture.faults import FaultInjector
from commands.fixture.seed import build_fixture
from commands.remedies.base import REMEDIES
from tests import leakcheck
from tests.conftest import FAST_THRESHOLDS, TEST_SERVER_SETTINGS
from tests.test_recover import admin

DB = "leaps_pitr"
MARK = "before-the-damage"
LATE_USER = "u_pitr_late"  # signed up after the base backup, before the mark; deleted after
NEW_USER = "u_pitr_new"  # signed up after the mark: new since
RENAMED = "Renamed before the mark"

# table -> primary key (as text) -> the whole row (to_jsonb, as text)
Snapshot = dict[str, dict[str, str]]
Key = tuple[str, str]

_PRIMARY_KEYS = """
SELECT c.relname, a.attname
  FROM pg_index AS i
  JOIN pg_class AS c ON c.oid = i.indrelid
  JOIN pg_namespace AS n ON n.oid = c.relnamespace
  JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
 WHERE i.indisprimary AND i.indnatts = 1 AND n.nspname = 'public' AND c.relkind = 'r'
 ORDER BY c.relname
"""


async def snapshot(dsn: str) -> Snapshot:
    """Every row of every public table, by primary key, in one repeatable-read snapshot."""
    out: Snapshot = {}
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        async with conn.transaction():
            cur = await conn.execute(_PRIMARY_KEYS)
            for table, pk in await cur.fetchall():
                rows = await conn.execute(
                    sql.SQL("SELECT {}::text, to_jsonb(t)::text FROM {} AS t").format(
                        sql.Identifier(pk), sql.Identifier(table)
                    )
                )
                out[str(table)] = {str(k): str(v) for k, v in await rows.fetchall()}
    return out


def keys(snap: Snapshot) -> set[Key]:
    return {(t, k) for t, rows in snap.items() for k in rows}


def row(snap: Snapshot, key: Key) -> str | None:
    return snap.get(key[0], {}).get(key[1])


async def execute(dsn: str, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """The statements in one transaction, as the application (no `app.user_id`)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for query, params in statements:
            await conn.execute(query.encode(), params)


def signup(user: str) -> list[tuple[str, tuple[Any, ...]]]:
    """A user, one pending EXPLORE submission and one MANUAL ledger row."""
    return [
        (
            "INSERT INTO users (id, handle, name, email) VALUES (%s, %s, %s, %s)",
            (user, user.replace("_", "-"), f"Signup {user}", f"{user}@example.org"),
        ),
        (
            "INSERT INTO submissions (id, user_id, activity_code, status, payload, updated_at)"
            " VALUES (%s, %s, 'EXPLORE', 'PENDING', %s, now() AT TIME ZONE 'UTC')",
            (
                f"s_{user}",
                user,
                '{"reflection": "Tried it.", "evidence_url": "https://evidence.example/x"}',
            ),
        ),
        (
            "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
            " event_time) VALUES (%s, %s, 'EXPLORE', 'MANUAL', 5, now())",
            (f"l_{user}", user),
        ),
    ]


@dataclass
class Scenario:
    prod: EmbeddedPostgres
    copy: EmbeddedPostgres
    backup: Path
    mark: RestorePoint
    marked: Snapshot  # production at the mark
    damaged: Snapshot  # production after the damage
    renamed: str  # a user renamed after the backup, before the mark, and again after it

    @property
    def prod_dsn(self) -> str:
        return self.prod.dsn(DB)

    @property
    def copy_dsn(self) -> str:
        return self.copy.dsn(DB)

    def lost(self) -> set[Key]:
        return keys(self.marked) - keys(self.damaged)

    def new(self) -> set[Key]:
        return keys(self.damaged) - keys(self.marked)

    def changed(self) -> set[Key]:
        both = keys(self.marked) & keys(self.damaged)
        return {k for k in both if row(self.marked, k) != row(self.damaged, k)}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def scenario() -> AsyncIterator[Scenario]:
    prod = EmbeddedPostgres(settings=TEST_SERVER_SETTINGS, archive=True)
    leakcheck.secret(prod.password, "the PITR test PostgreSQL password")
    prod.start()
    copy: EmbeddedPostgres | None = None
    try:
        dsn = prod.create_database(DB)
        await build_fixture(dsn, users=40)
        backup = prod.base_backup()

        # Written after the backup and before the mark: only the archived WAL holds them.
        # A reviewer: data_loss takes participants only, so this one is changed, not lost.
        renamed = str(
            (await one(dsn, "SELECT id FROM users WHERE role = 'REVIEWER' ORDER BY id"))[0]
        )
        await execute(
            dsn,
            *signup(LATE_USER),
            ("UPDATE users SET name = %s WHERE id = %s", (RENAMED, renamed)),
        )
        mark = prod.create_restore_point(MARK)
        marked = await snapshot(dsn)

        # The incident: users lose their submissions and ledger rows, two their account
        # (FaultInjector.data_loss; their Kajabi events are left unmatched: changed rows),
        # the late sign-up is deleted with its rows, a few rows change, new ones arrive.
        async with FaultInjector(dsn) as faults:
            loss = await faults.data_loss(pct=10, accounts=2, unmatched=2)
        survivors = [
            str(r[0])
            for r in await many(
                dsn,
                "SELECT id FROM users WHERE NOT id = ANY(%s) AND id <> %s"
                " AND role = 'PARTICIPANT' ORDER BY id LIMIT 2",
                (loss.users, renamed),
            )
        ]
        await execute(
            dsn,
            ("DELETE FROM users WHERE id = %s", (LATE_USER,)),
            (
                "UPDATE users SET name = 'Changed after the mark' WHERE id = ANY(%s)",
                ([*survivors, renamed],),
            ),
            (
                "UPDATE submissions SET visibility = CASE visibility WHEN 'PUBLIC'"
                " THEN 'PRIVATE'::\"Visibility\" ELSE 'PUBLIC' END WHERE id IN ("
                " SELECT id FROM submissions WHERE user_id = ANY(%s) ORDER BY id LIMIT 2)",
                (survivors,),
            ),
            *signup(NEW_USER),
        )
        damaged = await snapshot(dsn)
        prod.switch_wal()
        copy = prod.restore(backup, target_name=mark.name)
        yield Scenario(prod, copy, backup, mark, marked, damaged, renamed)
    finally:
        if copy is not None:
            copy.stop()
        prod.stop()


async def many(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query.encode(), params)
        return await cur.fetchall()


async def one(dsn: str, query: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    return (await many(dsn, query, params))[0]


async def test_the_restored_copy_holds_exactly_the_marked_state(scenario: Scenario) -> None:
    s = scenario
    lost, changed, new = s.lost(), s.changed(), s.new()
    # The incident is what it should be: each kind of damage is there.
    lost_tables = {t for t, _ in lost}
    assert {"users", "submissions", "points_ledger"} <= lost_tables
    assert {("users", LATE_USER), ("submissions", f"s_{LATE_USER}")} <= lost
    assert {"users", "submissions", "kajabi_events"} <= {t for t, _ in changed}
    assert {("users", NEW_USER), ("points_ledger", f"l_{NEW_USER}")} <= new

    # A separate cluster, promoted on a timeline of its own, holding the same system.
    prod_facts = await one(s.prod_dsn, _FACTS)
    copy_facts = await one(s.copy_dsn, _FACTS)
    assert s.copy.port != s.prod.port
    assert s.copy.data_dir != s.prod.data_dir
    assert copy_facts[0] == prod_facts[0]  # the same system identifier: a PITR copy keeps it
    assert (prod_facts[1], copy_facts[1]) == (False, False)  # promoted, read-write
    assert copy_facts[2] > prod_facts[2]  # a new timeline

    restored = await snapshot(s.copy_dsn)
    assert restored == s.marked
    # Said row by row, which is what a restore-from-copy relies on:
    for key in lost | changed:
        assert row(restored, key) == row(s.marked, key), key  # the lost and the changed
    assert not new & keys(restored)  # nothing made after the mark
    assert row(restored, ("users", s.renamed)) is not None
    assert f'"name": "{RENAMED}"' in str(row(restored, ("users", s.renamed)))
    assert ("points_ledger", f"l_{LATE_USER}") in keys(restored)  # replayed from the archive


_FACTS = """
SELECT (SELECT system_identifier FROM pg_control_system()), pg_is_in_recovery(),
       substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)
"""


async def test_a_restore_to_the_mark_s_time_holds_the_same_state(scenario: Scenario) -> None:
    s = scenario
    again = s.prod.restore(s.backup, target_time=s.mark.time)
    try:
        assert await snapshot(again.dsn(DB)) == s.marked
    finally:
        run_dir = again.data_dir.parent
        again.stop()
    assert not run_dir.exists()


async def test_restore_from_copy_brings_back_every_lost_row(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = scenario
    lost, changed, new = s.lost(), s.changed(), s.new()
    identity = await admin(s.prod_dsn)
    gateway, copy = TargetGateway(s.prod_dsn), TargetGateway(s.copy_dsn)
    ctx = RunContext(
        gateway=gateway,
        thresholds=FAST_THRESHOLDS,
        recovery_copy=copy,
        service_identity=identity,
    )
    try:
        remedy = REMEDIES["restore-from-copy"]
        with monkeypatch.context() as small:
            # The fixture's tables are compared key by key at once otherwise: here the
            # restored copy (production's own lineage) is compared by row version, in
            # ranges of a few blocks.
            small.setattr(rowdiff, "SMALL_ROWS", 16)
            small.setattr(rowdiff, "RANGE_ROWS", 64)
            plan = await remedy.plan(ctx, ["--until", s.mark.time.isoformat()])
        (note,) = [w for w in plan.warnings if w.startswith("the diff: ")]
        by_version = note.split(f"{rowdiff.VERSIONS}: ")[1].split(";")[0].split(" (")[0]
        assert {"users", "submissions", "points_ledger"} <= set(by_version.split(", ")), note
        # The plan lists each class per table: its count, and samples of its rows.
        counts = {str(t["table"]): t["counts"] for t in plan.data["tables"]}
        for cls, expected in (("lost", lost), ("changed", changed)):
            for table in {t for t, _ in expected}:
                n = len({k for k in expected if k[0] == table})
                assert counts[table].get(cls) == n, (cls, table, counts[table])
            shown = {(str(t["table"]), str(t["key"])) for t in plan.targets if t["class"] == cls}
            assert shown and shown <= expected, (cls, shown)
        state, outcome = await Executor(s.prod_dsn, recovery_dsn=s.copy_dsn).apply(
            remedy, plan, "pitr-test", identity
        )
        assert state == "done", outcome.summary
    finally:
        await gateway.close()
        await copy.close()
    after = await snapshot(s.prod_dsn)
    for key in lost:
        assert row(after, key) == row(s.marked, key), f"lost row {key} is not back as it was"
    for key in changed:
        assert row(after, key) == row(s.damaged, key), f"production's {key} was not kept"
    for key in new:
        assert row(after, key) == row(s.damaged, key), f"new row {key} was not kept"
