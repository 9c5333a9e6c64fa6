"""LEAPS's audit trail read from the catalog, and the bot writing it where the live
trigger refuses writes made with app.user_id (production's variant), on both variants."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from bot.approvals.executor import Executor
from commands.audit_trail import audit_trail
from commands.base import Context, LeapsIdentity, Reader
from commands.remedies.base import Execution, Outcome, Plan, Remedy, Verification, Writer
from tests.conftest import make_audit_variant


async def _plan(ctx: Context, args: list[str]) -> Plan:
    raise NotImplementedError  # built directly below


async def _apply(writer: Writer, plan: Plan) -> Outcome:
    ids = [str(t["id"]) for t in plan.targets]
    await writer.audit.before(writer, "users", ids)
    n = await writer.execute("UPDATE users SET role = 'REVIEWER' WHERE id = ANY(%s)", (ids,))
    await writer.audit.after(writer, "users", "UPDATE", ids)
    return Outcome(ok=n == len(ids), summary=f"changed {n}", affected=n)


async def _verify(db: Reader, plan: Plan, run: Execution) -> Verification:
    return Verification(landed=True, found="-")


PROMOTE = Remedy(
    name="test-promote", usage="", summary="", plan=_plan, apply=_apply, verify=_verify
)


async def _one(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
        return row[0] if row else None


async def _all(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall()


class _Db:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def fetch(self, query: Any, params: Any = ()) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params or None)
            return await cur.fetchall()


async def test_the_catalog_tells_the_variants_apart(leaps_dsn: str, audit_variant: str) -> None:
    await make_audit_variant(leaps_dsn, audit_variant)
    async with await psycopg.AsyncConnection.connect(leaps_dsn) as conn:
        trail = await audit_trail(_Db(conn))
    assert trail.functions == ("audit_trigger_func",)
    assert {t.table for t in trail.triggers} == {"users", "points_ledger", "submissions"}
    users = trail.audited("users", "UPDATE")
    assert users is not None and users.columns == ("role",)
    if audit_variant == "production":
        assert trail.path == "bot" and trail.refuses_user_writes
        assert "refuses every write" in (trail.defect() or "")
    else:
        assert trail.path == "trigger" and trail.defect() is None


async def test_production_refuses_an_audited_write_made_with_a_user_id(leaps_dsn: str) -> None:
    await make_audit_variant(leaps_dsn, "production")
    admin = await _one(leaps_dsn, "SELECT id FROM users WHERE role = 'ADMIN' LIMIT 1")
    async with await psycopg.AsyncConnection.connect(leaps_dsn) as conn:
        await conn.execute("SELECT set_config('app.user_id', %s, false)", (admin,))
        await conn.execute("SELECT set_config('app.user_role', 'ADMIN', false)")
        with pytest.raises(psycopg.errors.NotNullViolation, match="audit_log"):
            await conn.execute(
                "UPDATE users SET role = 'REVIEWER' WHERE role = 'PARTICIPANT' AND id IN "
                "(SELECT id FROM users WHERE role = 'PARTICIPANT' LIMIT 1)"
            )


async def test_a_remedy_is_audited_on_either_path(leaps_dsn: str, audit_variant: str) -> None:
    await make_audit_variant(leaps_dsn, audit_variant)
    admin = await _one(leaps_dsn, "SELECT id FROM users WHERE role = 'ADMIN' LIMIT 1")
    targets = [
        r[0]
        for r in await _all(
            leaps_dsn, "SELECT id FROM users WHERE role = 'PARTICIPANT' ORDER BY id LIMIT 2"
        )
    ]
    before = await _one(leaps_dsn, "SELECT count(*) FROM audit_log")
    plan = Plan(
        remedy="test-promote",
        args=[],
        title="t",
        summary="t",
        steps=[],
        targets=[{"id": t} for t in targets],
        count=2,
    )
    identity = LeapsIdentity(str(admin), "ADMIN", via="test")
    state, outcome = await Executor(leaps_dsn).apply(PROMOTE, plan, "apv-audit", identity)
    assert state == "done", outcome
    rows = await _all(
        leaps_dsn,
        "SELECT actor_id, action, target_id, meta->'old_values'->>'role',"
        " meta->'new_values'->>'role', meta->>'user_role', id IS NOT NULL FROM audit_log"
        " ORDER BY created_at DESC, target_id LIMIT 2",
    )
    assert await _one(leaps_dsn, "SELECT count(*) FROM audit_log") == before + 2
    assert sorted(rows) == sorted(
        (str(admin), "UPDATE_users", t, "PARTICIPANT", "REVIEWER", "ADMIN", True) for t in targets
    )
    written_by_bot = "written by the bot" in outcome.summary
    assert written_by_bot == (audit_variant == "production")
