"""Runs one approved remedy in one guarded transaction on the admin DSN.

Statement and lock timeouts are set for the transaction; any exception rolls the whole
remedy back (backup copy included), and the user sees the database's own error. Rows
are backed up into schema `dbops_backup`, in tables named after the approval.

A statement PostgreSQL refuses inside a transaction block (CREATE / DROP INDEX
CONCURRENTLY) goes through `Writer.run_outside_transaction`: its own autocommit session
with the same limits and identity, while the guarded transaction stays open around it.
Such a step commits by itself; a remedy whose step failed cleans up and raises
`OutsideStepFailed`, and the approval ends failed with the remedy's own account.

The transaction holds an advisory lock named after the approval for as long as it runs,
so another process can tell a remedy still running (its backend alive, even when the
bot process that started it is gone) from one whose transaction has ended.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from bot.gateway import first_line, normalise_scheme
from bot.settings import Settings
from commands.audit_trail import AuditRecorder, audit_trail
from commands.base import APPLICATION_NAME, BACKUP_SCHEMA, LeapsIdentity, Reader, Row, shown_queries
from commands.guards import (
    USER_ID_SETTING,
    USER_ROLE_SETTING,
    mask_personal,
    name_refusal,
    triggers_calling_out,
)
from commands.remedies.base import (
    Outcome,
    OutsideStepFailed,
    Plan,
    Preflight,
    Query,
    Remedy,
    RemedyAbort,
    backup_name,
)
from commands.rowdiff import TEXT_FORM_SQL

log = logging.getLogger(__name__)

# The end of an execution: "unknown" when the connection was lost during COMMIT, so
# nobody can say whether it committed; the engine asks the remedy's verification.
ApplyState = Literal["done", "failed", "aborted", "unknown"]
UNKNOWN_COMMIT = "unknown: the connection was lost during COMMIT"
PREFLIGHT_PREFIX = "preflight-"


class Aborted(Exception):
    """Raised inside the transaction so that it rolls back; carries the outcome."""

    def __init__(self, outcome: Outcome, state: Literal["failed", "aborted"] = "aborted") -> None:
        super().__init__(outcome.summary)
        self.outcome = outcome
        self.state: Literal["failed", "aborted"] = state


def execution_lock_key(approval_id: str) -> int:
    """The advisory lock key of an approval's remedy transaction (a signed 64-bit int)."""
    digest = hashlib.sha256(f"dbops-remedy:{approval_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def remedy_running(db: Reader, approval_id: str) -> bool:
    """True while the remedy transaction of `approval_id` is open on the target.

    Trying the lock in the caller's own (read-only) transaction takes it only until that
    transaction ends, so asking never gets in a later execution's way.
    """
    rows = await db.fetch(
        "SELECT pg_try_advisory_xact_lock(%s) AS free", (execution_lock_key(approval_id),)
    )
    return not bool(rows[0]["free"])


def _identity_settings(
    identity: LeapsIdentity, audit: AuditRecorder, *, local: bool
) -> tuple[str, tuple[str, ...]]:
    """The statement that makes a session act as `identity`, as the application does:
    `app.user_role` always; `app.user_id` only where the live audit trigger can write its
    row (else it stays unset, the trigger skips, and the bot writes the row: rule 11)."""
    scope = "true" if local else "false"
    if audit.by_bot:
        return f"SELECT set_config(%s, %s, {scope})", (USER_ROLE_SETTING, identity.role)
    return (
        f"SELECT set_config(%s, %s, {scope}), set_config(%s, %s, {scope})",
        (USER_ID_SETTING, identity.user_id, USER_ROLE_SETTING, identity.role),
    )


async def _limits(
    conn: psycopg.AsyncConnection[Any],
    statement_timeout_ms: int,
    lock_timeout_ms: int,
    lock_key: int | None = None,
) -> None:
    """The first statements of every remedy transaction: READ WRITE (a database-wide
    freeze, `freeze-writes`, makes the bot's own role start read only, and the bot must
    still repair), its timeouts, and the advisory lock named after the approval when given
    (held until the transaction ends)."""
    await conn.execute("SET TRANSACTION READ WRITE")
    lock = ", pg_advisory_xact_lock(%s)" if lock_key is not None else ""
    params = (str(statement_timeout_ms), str(lock_timeout_ms))
    await conn.execute(
        "SELECT set_config('statement_timeout', %s, true),"
        f" set_config('lock_timeout', %s, true){lock}",
        params if lock_key is None else (*params, lock_key),
    )


async def _act_as(
    conn: psycopg.AsyncConnection[Any],
    identity: LeapsIdentity | None,
    recorder: AuditRecorder,
    role: str | None = None,
) -> None:
    """Who the transaction acts as (rule 8); without an identity, `role` alone (if any)
    as app.user_role."""
    if identity is not None:
        await conn.execute(*_identity_settings(identity, recorder, local=True))
    elif role:
        await conn.execute("SELECT set_config(%s, %s, true)", (USER_ROLE_SETTING, role))


async def _begin(
    conn: psycopg.AsyncConnection[Any],
    approval_id: str,
    identity: LeapsIdentity | None,
    statement_timeout_ms: int,
    lock_timeout_ms: int,
    *,
    role: str | None = None,
) -> AuditRecorder:
    """The first statements of a remedy's transaction, approved or tried: its limits and
    lock (`_limits`), and who it acts as. Rule 11: where the live audit trigger refuses
    writes made with app.user_id, it acts without it and the returned recorder writes the
    audit rows."""
    await _limits(conn, statement_timeout_ms, lock_timeout_ms, execution_lock_key(approval_id))
    recorder = AuditRecorder(await audit_trail(_TxWriter(conn, approval_id)), identity)
    await _act_as(conn, identity, recorder, role)
    return recorder


@dataclass(frozen=True)
class _Session:
    """How a session of the remedy connects and what it sets: the outside-transaction
    steps get the same limits as the guarded transaction."""

    dsn: str
    statement_timeout_ms: int
    lock_timeout_ms: int


class _TxWriter:
    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        approval_id: str,
        identity: LeapsIdentity | None = None,
        session: _Session | None = None,
        audit: AuditRecorder | None = None,
        *,
        recovery_dsn: str | None = None,
        actor_id: str = "bot",
    ) -> None:
        self._conn = conn
        self.approval_id = approval_id
        self.actor_id = actor_id
        self.identity = identity
        self._session = session
        self._schema_ready = False
        self.audit = audit or AuditRecorder.off()
        self._recovery_dsn = recovery_dsn
        self._session_locked = False

    async def commit(self) -> None:
        """End this batch's transaction and begin the next with the limits and identity
        `_begin` set. The approval's lock is taken for the session too before the first
        commit, so `remedy_running` and the sweeper see it running until the end."""
        if self._session is None:
            raise RuntimeError("this writer has no session to begin a next batch with")
        if not self._session_locked:
            await self._conn.execute(
                "SELECT pg_advisory_lock(%s)", (execution_lock_key(self.approval_id),)
            )
            self._session_locked = True
        await self._conn.execute("COMMIT")
        await self._conn.execute("BEGIN")
        s = self._session
        await _limits(self._conn, s.statement_timeout_ms, s.lock_timeout_ms)
        await _act_as(self._conn, self.identity, self.audit)

    async def copy_from_source(
        self, query: Query, params: Sequence[Any], target: sql.Composable
    ) -> int:
        if not self._recovery_dsn:
            raise RemedyAbort("no recovery copy is configured (RECOVERY_DATABASE_URL)")
        await self._conn.execute(TEXT_FORM_SQL)
        timeout = self._session.statement_timeout_ms if self._session else 60_000
        async with await psycopg.AsyncConnection.connect(
            self._recovery_dsn, application_name=APPLICATION_NAME, connect_timeout=5
        ) as source:
            await source.set_read_only(True)
            async with source.transaction():
                await source.execute(TEXT_FORM_SQL)
                await source.execute(
                    "SELECT set_config('statement_timeout', %s, true)", (str(timeout),)
                )
                async with source.cursor() as out_cur, self._conn.cursor() as in_cur:
                    copy_out = sql.SQL("COPY ({}) TO STDOUT").format(query)
                    copy_in = sql.SQL("COPY {} FROM STDIN").format(target)
                    async with out_cur.copy(copy_out, params) as out:
                        async with in_cur.copy(copy_in) as into:
                            async for chunk in out:
                                await into.write(chunk)
                    return in_cur.rowcount

    async def run_outside_transaction(
        self, query: Query, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> None:
        if self._session is None:
            raise RuntimeError("this writer has no session to run a step outside a transaction")
        s = self._session
        # The last parameterised query's unnamed portal keeps its snapshot (and so this
        # transaction's xmin) until another portal replaces it; CREATE INDEX CONCURRENTLY
        # waits for every older snapshot, ours included, until the lock timeout. A
        # simple-protocol statement drops that portal and its snapshot with it.
        await self._conn.execute("SELECT 1", prepare=False)
        async with await psycopg.AsyncConnection.connect(
            s.dsn, application_name=APPLICATION_NAME, connect_timeout=5, autocommit=True
        ) as conn:
            await conn.execute(
                "SELECT set_config('statement_timeout', %s, false),"
                " set_config('lock_timeout', %s, false)",
                (str(s.statement_timeout_ms), str(s.lock_timeout_ms)),
            )
            if self.identity is not None:
                await conn.execute(*_identity_settings(self.identity, self.audit, local=False))
            await conn.execute(query, params or None)

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
        self,
        dsn: str,
        *,
        statement_timeout_ms: int = 60_000,
        lock_timeout_ms: int = 2_000,
        show_query_literals: bool = False,
        preflight_statement_timeout_ms: int = 5_000,
        preflight_lock_timeout_ms: int = 1_000,
        recovery_dsn: str | None = None,
    ) -> None:
        self._dsn = normalise_scheme(dsn)
        # RECOVERY_DATABASE_URL: where `Writer.copy_from_source` reads (restore-from-copy).
        self._recovery_dsn = normalise_scheme(recovery_dsn) if recovery_dsn else None
        self.show_query_literals = show_query_literals
        self.statement_timeout_ms = statement_timeout_ms
        self.lock_timeout_ms = lock_timeout_ms
        # The preflight is a short unapproved write on production: the diagnostics'
        # per-check statement timeout and short lock timeout, never a remedy's.
        self.preflight_statement_timeout_ms = preflight_statement_timeout_ms
        self.preflight_lock_timeout_ms = preflight_lock_timeout_ms

    @property
    def dsn(self) -> str:
        """The admin DSN remedies run on (a runbook holds its lease on a session of it)."""
        return self._dsn

    @property
    def timeouts(self) -> str:
        return (
            f"statement_timeout {self.statement_timeout_ms} ms, "
            f"lock_timeout {self.lock_timeout_ms} ms"
        )

    @property
    def limits(self) -> str:
        return f"one transaction; {self.timeouts}"

    def limits_for(self, plan: Plan) -> str:
        """What an approval shows: the remedy's own account of how it runs (`Plan.limits`,
        e.g. a build outside any transaction) in place of "one transaction", and the
        timeouts, which hold on every session the executor opens."""
        return f"{plan.limits}; {self.timeouts}" if plan.limits else self.limits

    async def apply(
        self,
        remedy: Remedy,
        plan: Plan,
        approval_id: str,
        identity: LeapsIdentity | None = None,
        actor_id: str = "bot",
    ) -> tuple[ApplyState, Outcome]:
        """Returns the final state (done | aborted | failed | unknown) and the outcome.
        `actor_id` is who set it going (the last approver, or "bot"), for remedies that
        record it (`Writer.actor_id`).

        `identity` is who the remedy acts as in LEAPS: set as `app.user_id` and
        `app.user_role` for this transaction only, as the application does, and named in
        the outcome. Never a trigger disabled: a guard's refusal rolls back and is shown.
        "unknown": the connection was lost during COMMIT; the caller decides it with the
        remedy's verification, never by guessing.
        """
        state, outcome = await self._apply(remedy, plan, approval_id, identity, actor_id)
        acted = f"acted as {identity.describe()}" if identity else "acted as no LEAPS user"
        return state, outcome.model_copy(update={"summary": f"{outcome.summary} ({acted})"})

    async def _apply(
        self,
        remedy: Remedy,
        plan: Plan,
        approval_id: str,
        identity: LeapsIdentity | None,
        actor_id: str,
    ) -> tuple[ApplyState, Outcome]:
        committing = False
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, application_name=APPLICATION_NAME, connect_timeout=5
            )
        except psycopg.Error as exc:
            return "failed", Outcome(
                ok=False, summary="could not connect to the database", error=first_line(exc)
            )
        try:
            async with conn.transaction():
                recorder = await _begin(
                    conn, approval_id, identity, self.statement_timeout_ms, self.lock_timeout_ms
                )
                try:
                    session = _Session(self._dsn, self.statement_timeout_ms, self.lock_timeout_ms)
                    writer = _TxWriter(
                        conn,
                        approval_id,
                        identity,
                        session,
                        recorder,
                        recovery_dsn=self._recovery_dsn,
                        actor_id=actor_id,
                    )
                    outcome = await remedy.apply(writer, plan)
                except OutsideStepFailed as exc:
                    raise Aborted(exc.outcome.model_copy(update={"ok": False}), "failed") from exc
                except RemedyAbort as exc:
                    raise Aborted(Outcome(ok=False, summary=str(exc), error=str(exc))) from exc
                if not outcome.ok:
                    raise Aborted(outcome)
                if recorder.written:
                    outcome = outcome.model_copy(
                        update={
                            "summary": f"{outcome.summary}; {recorder.written} audit_log rows "
                            "written by the bot (the live audit trigger refuses writes made "
                            "with app.user_id)"
                        }
                    )
                committing = True  # leaving the block commits (deferred triggers run now)
            return "done", outcome
        except Aborted as exc:
            return exc.state, exc.outcome
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
                error=first_line(exc),
                rows=holders,
                offers=[f"terminate {h['pid']}" for h in holders],
            )
        except psycopg.Error as exc:
            error = first_line(exc)
            diag = getattr(exc, "diag", None)
            sqlstate = getattr(diag, "sqlstate", None) if diag is not None else None
            if committing and _connection_lost(conn, sqlstate):
                log.warning(
                    "remedy %s (%s): connection lost during COMMIT: %s",
                    remedy.name,
                    approval_id,
                    error,
                )
                return "unknown", Outcome(
                    ok=False,
                    summary=UNKNOWN_COMMIT,
                    error=f"{sqlstate}: {error}" if sqlstate else error,
                )
            guard = await _guard_of(conn, diag)
            log.warning("remedy %s (%s) failed: %s (%s)", remedy.name, approval_id, error, guard)
            return "failed", Outcome(
                ok=False,
                summary=f"the database refused: {error}"
                + (f" [{guard}]" if guard else "")
                + "; rolled back, nothing was changed",
                error=f"{sqlstate}: {error}" if sqlstate else error,
            )
        finally:
            await conn.close()

    async def preflight(
        self,
        remedy: Remedy,
        plan: Plan,
        identity: LeapsIdentity | None,
        *,
        max_rows: int,
        role: str | None = None,
    ) -> Preflight:
        """Try the remedy's apply now, before anyone approves it, and roll it back
        whatever happened (DESIGN.md rule 10): what the database says of the change.

        A plan bigger than `max_rows` is tried on `remedy.sample(plan, max_rows)` when the
        remedy has a sampler. The try runs as `_apply` does (audit path, writer, backup
        tables and advisory lock under a throwaway approval id), with the diagnostics'
        short lock and statement timeouts: it never waits for a lock. `identity` is who
        it acts as (`app.user_role` its role); with None, only `app.user_role` = `role`
        is set. Never raises for the database's answer.
        """
        tried = plan
        if remedy.sample is not None and plan.count > max_rows:
            tried = remedy.sample(plan, max_rows)
        user_role = identity.role if identity else role
        who = (
            f"app.user_role {user_role}, reviewer {identity.user_id} ({identity.via})"
            if identity
            else f"app.user_role {user_role or 'not set'}, no LEAPS account"
        )
        base = Preflight(status="inconclusive", planned=plan.count, tried=tried.count, identity=who)
        approval_id = f"{PREFLIGHT_PREFIX}{uuid.uuid4().hex}"
        started = time.perf_counter()

        def ms() -> float:
            return (time.perf_counter() - started) * 1000

        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, application_name=APPLICATION_NAME, connect_timeout=5
            )
        except psycopg.Error as exc:
            return base.model_copy(
                update={"reason": f"could not connect: {mask_personal(first_line(exc))}"}
            )
        affected = 0
        outcome: Outcome | None = None
        callouts: list[str] = []
        try:
            async with conn.transaction():
                recorder = await _begin(
                    conn,
                    approval_id,
                    identity,
                    self.preflight_statement_timeout_ms,
                    self.preflight_lock_timeout_ms,
                    role=user_role,
                )
                writer = _TriedWriter(
                    conn, approval_id, identity, None, recorder, recovery_dsn=self._recovery_dsn
                )
                outcome = await remedy.apply(writer, tried)
                affected = outcome.affected
                # Before the rollback: what a rollback cannot take back.
                callouts = await triggers_calling_out(writer)
                raise psycopg.Rollback()
        except OutsideStepFailed as exc:
            return base.model_copy(update={"reason": exc.outcome.summary, "ms": ms()})
        except RemedyAbort as exc:
            return base.model_copy(update={"reason": str(exc), "ms": ms()})
        except psycopg.errors.LockNotAvailable:
            holders = await self._lock_holders(plan)
            held = (
                " (held by "
                + ", ".join(f"pid {h['pid']} ({h['app'] or h['user']})" for h in holders)
                + ")"
                if holders
                else ""
            )
            reason = (
                f"a lock was held{held}; the try gave up after its "
                f"{self.preflight_lock_timeout_ms} ms lock_timeout rather than wait"
            )
            return base.model_copy(update={"reason": reason, "ms": ms()})
        except psycopg.errors.QueryCanceled:
            reason = (
                f"the try ran past its {self.preflight_statement_timeout_ms} ms statement_timeout"
            )
            return base.model_copy(update={"reason": reason, "ms": ms()})
        except psycopg.Error as exc:
            diag = getattr(exc, "diag", None)
            sqlstate = getattr(diag, "sqlstate", None) if diag is not None else None
            error = mask_personal(first_line(exc))
            if _not_an_answer(conn, sqlstate):
                reason = f"the try could not finish: {error}"
                return base.model_copy(update={"reason": reason, "ms": ms()})
            detail = getattr(diag, "message_detail", None) if diag is not None else None
            if detail:
                error = f"{error} ({mask_personal(first_line(detail))})"
            guard = await _guard_of(conn, diag)
            return base.model_copy(
                update={
                    "status": "refused",
                    "guard": guard,
                    "error": f"{sqlstate}: {error}" if sqlstate else error,
                    "ms": ms(),
                }
            )
        finally:
            await conn.close()
        elapsed = ms()
        if callouts:
            reason = (
                "a trigger on a table it changed calls out of the database, which a "
                "rollback cannot take back: " + "; ".join(callouts)
            )
            return base.model_copy(update={"reason": reason, "affected": affected, "ms": elapsed})
        if outcome is None or not outcome.ok:
            said = outcome.summary if outcome is not None else "no outcome"
            return base.model_copy(
                update={
                    "reason": f"the remedy's own check failed: {mask_personal(said)}",
                    "affected": affected,
                    "ms": elapsed,
                }
            )
        return base.model_copy(update={"status": "accepted", "affected": affected, "ms": elapsed})

    async def _lock_holders(self, plan: Plan) -> list[Row]:
        """Who holds or queues for the locks the remedy waited for (`plan.locks`)."""
        if not plan.locks.relations:
            return []
        relations, modes = plan.locks.relations, plan.locks.modes
        try:
            async with await psycopg.AsyncConnection.connect(
                self._dsn, application_name=APPLICATION_NAME, connect_timeout=5, autocommit=True
            ) as conn:
                async with conn.cursor(row_factory=dict_row) as cur:
                    await cur.execute(_LOCK_HOLDERS_SQL, {"relations": relations, "modes": modes})
                    rows = shown_queries(await cur.fetchall(), self.show_query_literals)
        except psycopg.Error:
            log.exception("could not list lock holders")
            return []
        # A queued request blocks too; whoever it waits for is where the chain starts.
        listed = {int(r["pid"]) for r in rows}
        roots = sorted({int(p) for r in rows if not r["granted"] for p in r["blocked_by"]} - listed)
        if roots:
            rows += await self._sessions(roots)
        return rows

    async def _sessions(self, pids: list[int]) -> list[Row]:
        try:
            async with await psycopg.AsyncConnection.connect(
                self._dsn, application_name=APPLICATION_NAME, connect_timeout=5, autocommit=True
            ) as conn:
                async with conn.cursor(row_factory=dict_row) as cur:
                    await cur.execute(_SESSIONS_SQL, (pids,))
                    return shown_queries(await cur.fetchall(), self.show_query_literals)
        except psycopg.Error:
            log.exception("could not list lock holders")
            return []


_LOCK_HOLDERS_SQL = """
WITH targets AS (
  SELECT c.oid, c.relname::text AS relname, %(modes)s::text[] AS modes
  FROM pg_class c WHERE c.relname = ANY(%(relations)s)
  UNION
  -- what the relations read (a view's base tables): only an ACCESS EXCLUSIVE lock,
  -- granted or queued, stops a reader there
  SELECT DISTINCT d.refobjid, dc.relname::text, ARRAY['AccessExclusiveLock']
  FROM pg_class c
  JOIN pg_rewrite r ON r.ev_class = c.oid
  JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
   AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> c.oid
  JOIN pg_class dc ON dc.oid = d.refobjid AND dc.relkind IN ('r', 'm', 'p')
  WHERE c.relname = ANY(%(relations)s)
)
SELECT DISTINCT ON (a.pid) a.pid, a.usename::text AS "user", a.application_name AS app,
       a.state, l.mode, l.granted, t.relname AS relation,
       pg_blocking_pids(a.pid) AS blocked_by,
       extract(epoch FROM now() - a.xact_start)::float AS xact_s,
       left(regexp_replace(a.query, '\\s+', ' ', 'g'), 120) AS query
FROM targets t
JOIN pg_locks l ON l.relation = t.oid
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE a.pid <> pg_backend_pid()
  AND (cardinality(t.modes) = 0 OR l.mode = ANY(t.modes))
ORDER BY a.pid
"""

_SESSIONS_SQL = """
SELECT pid, usename::text AS "user", application_name AS app, state, NULL::text AS mode,
       true AS granted, NULL::text AS relation, pg_blocking_pids(pid) AS blocked_by,
       extract(epoch FROM now() - xact_start)::float AS xact_s,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 120) AS query
FROM pg_stat_activity WHERE pid = ANY(%s)
"""


async def _guard_of(conn: psycopg.AsyncConnection[Any], diag: Any) -> str | None:
    """The guard behind a refusal, named from the catalog on the same (rolled back)
    connection; None when the error came from no constraint or trigger."""
    if diag is None or conn.closed:
        return None
    try:
        return await name_refusal(
            _TxWriter(conn, ""),
            constraint=diag.constraint_name,
            table=diag.table_name,
            context=diag.context,
        )
    except psycopg.Error:
        log.exception("could not name the guard of a refusal")
        return None


def _connection_lost(conn: psycopg.AsyncConnection[Any], sqlstate: str | None) -> bool:
    """The server's answer did not arrive: the connection broke or was closed by an
    administrator or a shutdown (57P01-57P03), or a connection exception (08)."""
    if conn.broken or conn.closed or sqlstate is None:
        return True
    return sqlstate.startswith(("08", "57P"))


def _not_an_answer(conn: psycopg.AsyncConnection[Any], sqlstate: str | None) -> bool:
    """An error that says nothing of whether the database accepts the change: a lost
    connection, a deadlock or serialization failure (class 40), resources (53),
    operator intervention (57), a system error (58)."""
    if _connection_lost(conn, sqlstate):
        return True
    return (sqlstate or "")[:2] in ("40", "53", "57", "58")


class _TriedWriter(_TxWriter):
    """The writer of a preflight: a step outside the transaction would commit by itself,
    so the try stops there (inconclusive) instead of running it."""

    async def run_outside_transaction(
        self, query: Query, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> None:
        raise RemedyAbort(
            "the remedy runs a step outside its transaction, which a rollback cannot "
            "undo, so the try stopped before it"
        )

    async def commit(self) -> None:
        """The try is one transaction, rolled back whole: the batches are not committed."""


def executor_from_settings(settings: Settings) -> Executor:
    """Remedies run on ADMIN_DATABASE_URL when set, else on DATABASE_URL."""
    settings.require("database_url")
    return Executor(
        settings.admin_database_url or settings.database_url or "",
        statement_timeout_ms=settings.remedy_statement_timeout_ms,
        lock_timeout_ms=settings.remedy_lock_timeout_ms,
        show_query_literals=settings.thresholds.show_query_literals,
        preflight_statement_timeout_ms=settings.check_timeout_ms,
        preflight_lock_timeout_ms=settings.lock_timeout_ms,
        recovery_dsn=settings.recovery_database_url,
    )
