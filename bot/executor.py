"""Runs one approved remedy in one guarded transaction on the admin DSN.

Statement and lock timeouts are set for the transaction; any exception rolls the whole
remedy back (backup copy included), and the user sees the database's own error. Rows
are backed up into schema `dbops_backup`, in tables named after the approval.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from bot.gateway import APPLICATION_NAME, _first_line, _normalise_scheme
from commands.base import Row
from commands.remedy import Outcome, Plan, Query, Remedy, RemedyAbort

log = logging.getLogger(__name__)

BACKUP_SCHEMA = "dbops_backup"


class Aborted(Exception):
    """Raised inside the transaction so that it rolls back; carries the outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.summary)
        self.outcome = outcome


def backup_name(approval_id: str, name: str) -> str:
    """`<approval>_<name>` made a safe identifier (it is quoted as well)."""
    return re.sub(r"[^a-z0-9_]", "_", f"{approval_id}_{name}".lower())[:63]


class _TxWriter:
    def __init__(self, conn: psycopg.AsyncConnection[Any], approval_id: str) -> None:
        self._conn = conn
        self.approval_id = approval_id
        self._schema_ready = False

    async def fetch(
        self, query: Query, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[Row]:
        async with self._conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params or None)
            return await cur.fetchall() if cur.description is not None else []

    async def execute(self, query: Query, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        async with self._conn.cursor() as cur:
            await cur.execute(query, params or None)
            return cur.rowcount

    async def backup_table(self, name: str) -> sql.Identifier:
        if not self._schema_ready:
            await self._conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(BACKUP_SCHEMA))
            )
            self._schema_ready = True
        return sql.Identifier(BACKUP_SCHEMA, backup_name(self.approval_id, name))


class Executor:
    def __init__(
        self, dsn: str, *, statement_timeout_ms: int = 60_000, lock_timeout_ms: int = 2_000
    ) -> None:
        self._dsn = _normalise_scheme(dsn)
        self.statement_timeout_ms = statement_timeout_ms
        self.lock_timeout_ms = lock_timeout_ms

    @property
    def limits(self) -> str:
        return (
            f"one transaction; statement_timeout {self.statement_timeout_ms} ms, "
            f"lock_timeout {self.lock_timeout_ms} ms"
        )

    async def apply(
        self, remedy: Remedy, plan: Plan, approval_id: str
    ) -> tuple[Literal["done", "failed", "aborted"], Outcome]:
        """Returns the final state (done | aborted | failed) and the outcome."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, application_name=APPLICATION_NAME, connect_timeout=5
            )
        except psycopg.Error as exc:
            return "failed", Outcome(
                ok=False, summary="could not connect to the database", error=_first_line(exc)
            )
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('statement_timeout', %s, true),"
                    " set_config('lock_timeout', %s, true)",
                    (str(self.statement_timeout_ms), str(self.lock_timeout_ms)),
                )
                try:
                    outcome = await remedy.apply(_TxWriter(conn, approval_id), plan)
                except RemedyAbort as exc:
                    raise Aborted(Outcome(ok=False, summary=str(exc), error=str(exc))) from exc
                if not outcome.ok:
                    raise Aborted(outcome)
            return "done", outcome
        except Aborted as exc:
            return "aborted", exc.outcome
        except psycopg.errors.LockNotAvailable as exc:
            holders = await self._lock_holders(plan)
            return "failed", Outcome(
                ok=False,
                summary=f"gave up waiting for a lock after {self.lock_timeout_ms} ms; "
                "rolled back, nothing was changed"
                + (
                    "; held by "
                    + ", ".join(f"pid {h['pid']} ({h['app'] or h['user']})" for h in holders)
                    if holders
                    else ""
                ),
                error=_first_line(exc),
                rows=holders,
                offers=[f"terminate {h['pid']}" for h in holders],
            )
        except psycopg.Error as exc:
            error = _first_line(exc)
            diag = getattr(exc, "diag", None)
            sqlstate = getattr(diag, "sqlstate", None) if diag is not None else None
            log.warning("remedy %s (%s) failed: %s", remedy.name, approval_id, error)
            return "failed", Outcome(
                ok=False,
                summary=f"the database refused: {error}; rolled back, nothing was changed",
                error=f"{sqlstate}: {error}" if sqlstate else error,
            )
        finally:
            await conn.close()

    async def _lock_holders(self, plan: Plan) -> list[Row]:
        """Who holds the locks the remedy waited for: `plan.data["relations"]`."""
        relations = [str(r) for r in plan.data.get("relations", [])]
        modes = [str(m) for m in plan.data.get("conflicting_modes", [])]
        if not relations:
            return []
        try:
            async with await psycopg.AsyncConnection.connect(
                self._dsn, application_name=APPLICATION_NAME, connect_timeout=5, autocommit=True
            ) as conn:
                async with conn.cursor(row_factory=dict_row) as cur:
                    await cur.execute(_LOCK_HOLDERS_SQL, (relations, modes, modes))
                    return await cur.fetchall()
        except psycopg.Error:
            log.exception("could not list lock holders")
            return []


_LOCK_HOLDERS_SQL = """
SELECT DISTINCT ON (a.pid) a.pid, a.usename::text AS "user", a.application_name AS app, a.state,
       extract(epoch FROM now() - a.xact_start)::float AS xact_s, l.mode,
       c.relname AS relation, left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120) AS query
FROM pg_locks l
JOIN pg_class c ON c.oid = l.relation
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND c.relname = ANY(%s) AND a.pid <> pg_backend_pid()
  AND (cardinality(%s::text[]) = 0 OR l.mode = ANY(%s::text[]))
ORDER BY a.pid
"""
