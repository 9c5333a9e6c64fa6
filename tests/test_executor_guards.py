"""The executor's guarantees on a data-changing remedy: drift abort, row-count abort and a
refusing trigger all leave the target exactly as it was; success leaves backup + rest
equal to the original rows."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from bot.approvals.executor import Executor
from commands.base import BACKUP_SCHEMA, Context, Reader
from commands.remedies.base import (
    Execution,
    Outcome,
    Plan,
    PlanStep,
    Remedy,
    Verification,
    Writer,
    backup_name,
    check_count,
    check_drift,
)
from commands.remedies.rowsets import backups_hold

MARK = -777_777  # the delta_points of the rows this remedy removes (no seed row has it)

_SELECT = "SELECT id FROM points_ledger WHERE delta_points = %s ORDER BY id"


async def _plan(ctx: Context, args: list[str]) -> Plan:
    raise NotImplementedError  # plans are built directly in these tests


async def _apply(writer: Writer, plan: Plan) -> Outcome:
    now = await writer.fetch(_SELECT, (MARK,))
    check_drift(plan, len(now), "ledger rows")
    backup = await writer.backup_table("points_ledger")
    await writer.execute(
        sql.SQL("CREATE TABLE {} AS SELECT * FROM points_ledger WHERE delta_points = %s").format(
            backup
        ),
        (MARK,),
    )
    deleted = await writer.execute("DELETE FROM points_ledger WHERE delta_points = %s", (MARK,))
    check_count(plan, deleted, "ledger rows")
    left = await writer.fetch(
        "SELECT count(*) AS n FROM points_ledger WHERE delta_points = %s", (MARK,)
    )
    return Outcome(
        ok=left[0]["n"] == 0,
        summary=f"deleted {deleted}",
        affected=deleted,
        backed_up=deleted,
        backup_table=str(backup.as_string()),
    )


async def _verify(db: Reader, plan: Plan, run: Execution) -> Verification:
    return await backups_hold(db, run.approval_id, {"points_ledger": plan.count})


DELETE_MARKED = Remedy(
    name="delete-marked",
    usage="(test)",
    summary="delete ledger rows with the test mark",
    plan=_plan,
    apply=_apply,
    verify=_verify,
    destroys_data=True,
)


async def snapshot(dsn: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT * FROM points_ledger ORDER BY id")
        return await cur.fetchall()


async def mark_rows(dsn: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE points_ledger SET delta_points = %s"
            " WHERE id IN (SELECT id FROM points_ledger ORDER BY id LIMIT %s)",
            (MARK, n),
        )


def plan_for(count: int) -> Plan:
    return Plan(
        remedy="delete-marked",
        args=[],
        title="delete marked rows",
        summary="test",
        steps=[PlanStep(sql="DELETE FROM points_ledger WHERE delta_points = %s", params=[MARK])],
        count=count,
    )


async def backup_exists(dsn: str, approval_id: str) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL",
            (f'"{BACKUP_SCHEMA}"."{backup_name(approval_id, "points_ledger")}"',),
        )
        row = await cur.fetchone()
        return bool(row and row[0])


async def test_success_backup_plus_remaining_equals_original(leaps_dsn: str) -> None:
    await mark_rows(leaps_dsn, 5)
    before = await snapshot(leaps_dsn)
    state, outcome = await Executor(leaps_dsn).apply(DELETE_MARKED, plan_for(5), "apv-ok1")
    assert state == "done", outcome
    assert outcome.affected == 5 and outcome.backed_up == 5
    after = await snapshot(leaps_dsn)
    async with await psycopg.AsyncConnection.connect(leaps_dsn) as conn:
        table = sql.Identifier(BACKUP_SCHEMA, backup_name("apv-ok1", "points_ledger"))
        cur = await conn.execute(sql.SQL("SELECT * FROM {} ORDER BY id").format(table))
        backup = await cur.fetchall()
    assert sorted(after + backup) == sorted(before)
    assert len(backup) == 5


async def test_drift_aborts_and_leaves_the_table_unchanged(leaps_dsn: str) -> None:
    await mark_rows(leaps_dsn, 5)
    plan = plan_for(4)  # counted before one more row matched
    before = await snapshot(leaps_dsn)
    state, outcome = await Executor(leaps_dsn).apply(DELETE_MARKED, plan, "apv-drift1")
    assert state == "aborted"
    assert "drift" in outcome.summary and "4" in outcome.summary and "5" in outcome.summary
    assert await snapshot(leaps_dsn) == before
    assert not await backup_exists(leaps_dsn, "apv-drift1")


async def test_row_count_mismatch_rolls_back_everything(leaps_dsn: str) -> None:
    """A trigger of the database silently skips one delete: the count differs, so the
    backup copy and every delete are rolled back."""
    await mark_rows(leaps_dsn, 5)
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute(
            """
            CREATE FUNCTION keep_one() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF OLD.id = (SELECT min(id) FROM points_ledger WHERE delta_points = -777777) THEN
                RETURN NULL;
              END IF;
              RETURN OLD;
            END $$;
            CREATE TRIGGER keep_one BEFORE DELETE ON points_ledger
              FOR EACH ROW EXECUTE FUNCTION keep_one();
            """
        )
    before = await snapshot(leaps_dsn)
    state, outcome = await Executor(leaps_dsn).apply(DELETE_MARKED, plan_for(5), "apv-count1")
    assert state == "aborted"
    assert "row count" in outcome.summary and "touched 4" in outcome.summary
    assert await snapshot(leaps_dsn) == before
    assert not await backup_exists(leaps_dsn, "apv-count1")


async def test_refusing_trigger_shows_the_database_error_and_changes_nothing(
    leaps_dsn: str,
) -> None:
    await mark_rows(leaps_dsn, 3)
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute(
            """
            CREATE FUNCTION no_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'ledger rows are append-only' USING ERRCODE = '42501'; END $$;
            CREATE TRIGGER no_deletes BEFORE DELETE ON points_ledger
              FOR EACH ROW EXECUTE FUNCTION no_deletes();
            """
        )
    before = await snapshot(leaps_dsn)
    state, outcome = await Executor(leaps_dsn).apply(DELETE_MARKED, plan_for(3), "apv-refused1")
    assert state == "failed"
    assert "ledger rows are append-only" in outcome.summary
    assert outcome.error is not None and outcome.error.startswith("42501")
    assert await snapshot(leaps_dsn) == before
    assert not await backup_exists(leaps_dsn, "apv-refused1")
