"""The bot's own state: approvals, their decisions, the audit trail and the refresh log.

Never the target database: the bot must keep its memory while LEAPS is sick. One process needs
nothing but a SQLite file; replicas share PostgreSQL. Every method is one short transaction and
returns frozen dataclasses, so callers never hold a session across an `await` on Slack.

The exactly-once rule of the design lives in `StateStore.claim`: a single conditional
`UPDATE ... WHERE state='pending' ... RETURNING`, which the database serialises for us (a row
lock on PostgreSQL, the write lock taken by `BEGIN IMMEDIATE` on SQLite).
"""

from __future__ import annotations

import ast
import asyncio
import functools
import logging
import re
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, cast

from sqlalchemy import Connection, column, distinct, event, func, or_, select, table, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool
from sqlalchemy.sql.dml import ReturningInsert, ReturningUpdate

from bot.state.models import (
    APPROVAL_STATES,
    DECISIONS,
    ORIGINS,
    REFRESH_MODES,
    VERSION_TABLE,
    ApprovalRow,
    ApprovalState,
    AuditRow,
    DecisionKind,
    DecisionRow,
    KnownRoleRow,
    Origin,
    RefreshLogRow,
    RefreshMode,
    RoleChangeRow,
)

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

FinishState = Literal["done", "failed", "aborted"]
# recorded: counted now; duplicate: this user already decided (the first decision stands);
# closed: the approval is no longer pending, nothing was recorded.
DecisionStatus = Literal["recorded", "duplicate", "closed"]

TERMINAL_STATES: frozenset[ApprovalState] = frozenset(
    {"done", "failed", "rejected", "expired", "aborted", "cancelled"}
)
DEFAULT_STATE_PATH = Path("dbops-state.sqlite3")
MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
# Long enough to ride out another process's migration or a burst of clicks; a lock held longer
# than this is a bug worth an error.
SQLITE_BUSY_TIMEOUT_MS = 15_000
# pg_advisory_xact_lock key serialising `alembic upgrade` across replicas ("dbops" in ASCII).
MIGRATION_LOCK_KEY = 0x64626F7073
_SQLITE_BEGIN = "dbops_sqlite_begin"
_ASYNC_DRIVERS = frozenset({"psycopg", "psycopg_async", "asyncpg", "aiosqlite"})


class StateStoreError(Exception):
    """Base of the state store's own errors."""


class NotFound(StateStoreError, LookupError):
    """No approval (or refresh log entry) with that id."""


class InvalidTransition(StateStoreError):
    """A state change the approval rules forbid, e.g. finishing what is not executing."""


# -- values handed to callers ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Approval:
    id: str
    remedy: str
    args: tuple[str, ...]
    requester_id: str
    requester_name: str
    channel_id: str
    thread_ts: str | None
    message_ts: str | None
    plan: Mapping[str, Any]
    plan_hash: str
    needed_approvals: int
    approver_role: str
    state: ApprovalState
    created_at: datetime
    expires_at: datetime
    updated_at: datetime
    claimed_by: str | None
    outcome: Mapping[str, Any] | None
    version: int
    origin: Origin = "slack"

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def is_expired(self, now: datetime | None = None) -> bool:
        """Past its deadline (whether or not `expire_if_due` has recorded that yet)."""
        return self.expires_at <= _utc(now)


@dataclass(frozen=True, slots=True)
class Decision:
    approval_id: str
    user_id: str
    user_name: str
    role: str
    decision: DecisionKind
    decided_at: datetime


@dataclass(frozen=True, slots=True)
class DecisionResult:
    """What a button press changed, and everything needed to tell the clicker."""

    status: DecisionStatus
    approval: Approval
    approvers: tuple[Decision, ...]
    rejecters: tuple[Decision, ...]

    @property
    def state(self) -> ApprovalState:
        return self.approval.state

    @property
    def duplicate(self) -> bool:
        return self.status == "duplicate"

    @property
    def enough_approvals(self) -> bool:
        return len(self.approvers) >= self.approval.needed_approvals


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor_id: str
    action: str
    approval_id: str | None
    channel_id: str | None
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RefreshEntry:
    id: int
    view: str
    mode: RefreshMode
    started_at: datetime
    finished_at: datetime | None
    rows: int | None
    error: str | None
    approval_id: str | None
    actor_id: str

    @property
    def ok(self) -> bool:
        return self.finished_at is not None and self.error is None

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class KnownRole:
    """The last role resolved for a Slack user: where it came from and when."""

    user_id: str
    role: str
    source: str
    detail: str | None
    resolved_at: datetime
    email: str | None = None  # the Slack e-mail its LEAPS role was read by (lower case)


# -- engines and migrations -----------------------------------------------------------------


def make_state_url(url: str | None, default_path: Path = DEFAULT_STATE_PATH) -> str:
    """The SQLAlchemy async URL for `STATE_DATABASE_URL` (None or empty: a local SQLite file)."""
    url = (url or "").strip()
    if not url:
        return f"sqlite+aiosqlite:///{default_path}"
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("STATE_DATABASE_URL must be a URL such as postgresql://host/db")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    if scheme == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    return url


def make_engine(url: str | None, *, default_path: Path = DEFAULT_STATE_PATH) -> AsyncEngine:
    """An async engine on the state database, set up so that several processes can share it."""
    sa_url = make_url(make_state_url(url, default_path))
    backend = sa_url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(f"STATE_DATABASE_URL: {backend} is not supported (sqlite or postgresql)")
    if sa_url.get_driver_name() not in _ASYNC_DRIVERS:
        raise ValueError(
            f"STATE_DATABASE_URL: driver {sa_url.drivername} is not async "
            "(use postgresql+psycopg:// or sqlite+aiosqlite://, or a plain URL)"
        )
    if backend == "postgresql":
        return create_async_engine(sa_url, pool_pre_ping=True)
    memory = sa_url.database in (None, "", ":memory:")
    engine = create_async_engine(sa_url, poolclass=StaticPool if memory else None)
    _sqlite_hooks(engine)
    return engine


def _sqlite_hooks(engine: AsyncEngine) -> None:
    """WAL, a busy timeout and real transactions, so two processes can share one file.

    sqlite3's legacy mode never BEGINs before a SELECT or DDL; we take over (the SQLAlchemy
    recipe) and emit `BEGIN IMMEDIATE` for writers, so the write lock is taken up front and a
    waiting writer sleeps on the busy timeout instead of failing with "database is locked"
    on an upgrade from a stale read snapshot. Readers use a deferred BEGIN and never block.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_MS)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_SQLITE_BEGIN, "IMMEDIATE")
        conn.exec_driver_sql("BEGIN DEFERRED" if mode == "DEFERRED" else "BEGIN IMMEDIATE")


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration in code (there is no alembic.ini to ship or lose).

    `url` is only for running Alembic by hand, e.g. to write the next revision:
    `command.revision(alembic_config(url), "what changed", autogenerate=True, rev_id="0002")`.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", make_state_url(url).replace("%", "%%"))
    return cfg


# `revision = "0009"` and `down_revision = "0008"` (typed or not) in a migration script.
_REVISION_LINE = re.compile(r"^(down_revision|revision)\b[^=\n]*=(.*)$", re.MULTILINE)


@functools.cache
def head_revision() -> str | None:
    """The head of the migration scripts, read from their text without importing Alembic
    (most starts find the store already there); None when the scripts are not one plain
    chain of literal revisions, and Alembic decides."""
    parents: dict[str, tuple[str, ...]] = {}
    for script in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        found: dict[str, object] = {}
        for name, value in _REVISION_LINE.findall(script.read_text(encoding="utf-8")):
            try:
                found.setdefault(name, ast.literal_eval(value.strip()))
            except (ValueError, TypeError, SyntaxError):
                return None
        revision, down = found.get("revision"), found.get("down_revision", ...)
        if not isinstance(revision, str) or revision in parents:
            return None
        if down is None:
            parents[revision] = ()
        elif isinstance(down, str):
            parents[revision] = (down,)
        else:
            return None  # a merge point, or no down_revision line: Alembic knows best
    pointed = {p for ps in parents.values() for p in ps}
    heads = set(parents) - pointed
    if len(heads) != 1 or not pointed <= set(parents):
        return None
    return heads.pop()


async def _at_head(engine: AsyncEngine) -> bool:
    """The database's recorded revision is the scripts' head: nothing to upgrade. A read
    without the migration lock: a migration running elsewhere is not committed yet, so we
    see the old revision and take the locked way."""
    head = head_revision()
    if head is None:
        return False

    def recorded(sync_conn: Connection) -> set[str] | None:
        if not sync_conn.dialect.has_table(sync_conn, VERSION_TABLE):
            return None
        versions = table(VERSION_TABLE, column("version_num"))
        rows = sync_conn.execute(select(versions.c.version_num))
        return {str(v) for v in rows.scalars()}

    async with engine.connect() as conn:
        reader = await conn.execution_options(**{_SQLITE_BEGIN: "DEFERRED"})
        return await reader.run_sync(recorded) == {head}


async def migrate(engine: AsyncEngine) -> None:
    """`alembic upgrade head` on the engine's database, safe with replicas starting together.

    Alembic is imported and run only when the recorded revision is not already the head.
    Lock and DDL share one transaction: on PostgreSQL a transaction-scoped advisory lock makes a
    second replica wait until the first has committed (then it finds nothing to do); on SQLite
    `BEGIN IMMEDIATE` does the same with the file's write lock.
    """
    if await _at_head(engine):
        return
    from alembic import command

    cfg = alembic_config()

    def upgrade(sync_conn: Connection) -> None:
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, "head")

    async with _alembic_lock(), engine.connect() as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        await conn.run_sync(upgrade)


_alembic_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _alembic_lock() -> asyncio.Lock:
    """One upgrade at a time per event loop.

    Alembic keeps the running migration context in a module global (`alembic.context`); two
    upgrades interleaved on one loop (two stores opened together, even on different databases)
    would run each other's DDL on the wrong connection and wait on themselves forever.
    """
    loop = asyncio.get_running_loop()
    lock = _alembic_locks.get(loop)
    if lock is None:
        lock = _alembic_locks[loop] = asyncio.Lock()
    return lock


async def open_store(url: str | None, *, default_path: Path = DEFAULT_STATE_PATH) -> StateStore:
    """The state store with its schema brought up to date (Alembic), ready to use."""
    engine = make_engine(url, default_path=default_path)
    try:
        await migrate(engine)
    except BaseException:
        await engine.dispose()
        raise
    log.debug("state store ready: %s", engine.url.render_as_string(hide_password=True))
    return StateStore(engine)


# -- the store ------------------------------------------------------------------------------


class StateStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Called inside `audit`'s transaction (incidents: the timeline joins it there).
        self.audit_hook: Callable[[AsyncSession, AuditRow], Awaitable[None]] | None = None

    @property
    def engine(self) -> AsyncEngine:
        """For neighbours that need the same database (e.g. a leader advisory lock)."""
        return self._engine

    async def close(self) -> None:
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @asynccontextmanager
    async def _tx(self, *, write: bool = True) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session, session.begin():
            await session.connection(
                execution_options={_SQLITE_BEGIN: "IMMEDIATE" if write else "DEFERRED"}
            )
            yield session

    async def ping(self) -> None:
        """Raise if the state database cannot be reached (for /healthz)."""
        async with self._tx(write=False) as session:
            await session.execute(select(1))

    # -- approvals --------------------------------------------------------------------------

    async def create_approval(
        self,
        *,
        remedy: str,
        args: Sequence[str],
        requester_id: str,
        requester_name: str,
        channel_id: str,
        plan: Mapping[str, Any],
        plan_hash: str,
        needed_approvals: int,
        approver_role: str,
        ttl_s: float,
        origin: Origin = "slack",
        now: datetime | None = None,
    ) -> Approval:
        if needed_approvals < 0:
            # 0: the plan needs no approval (the requester's role suffices); it is still
            # claimed exactly once and audited like any other.
            raise ValueError("needed_approvals must not be negative")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        at = _utc(now)
        row = ApprovalRow(
            id=f"apv-{secrets.token_hex(6)}",
            remedy=remedy,
            args=list(args),
            requester_id=requester_id,
            requester_name=requester_name,
            channel_id=channel_id,
            thread_ts=None,
            message_ts=None,
            plan=dict(plan),
            plan_hash=plan_hash,
            needed_approvals=needed_approvals,
            approver_role=approver_role,
            state="pending",
            created_at=at,
            expires_at=at + timedelta(seconds=ttl_s),
            updated_at=at,
            claimed_by=None,
            outcome=None,
            version=1,
            origin=origin,
        )
        async with self._tx() as session:
            session.add(row)
        return _approval(row)

    async def set_messages(
        self, approval_id: str, *, thread_ts: str | None, message_ts: str | None
    ) -> None:
        """Remember where the plan was posted, so later clicks can update that message."""
        stmt = (
            update(ApprovalRow)
            .where(ApprovalRow.id == approval_id)
            .values(thread_ts=thread_ts, message_ts=message_ts, updated_at=_utc(None))
            .returning(ApprovalRow.id)
            .execution_options(synchronize_session=False)
        )
        async with self._tx() as session:
            if (await session.execute(stmt)).scalar_one_or_none() is None:
                raise NotFound(approval_id)

    async def get_approval(self, approval_id: str) -> Approval | None:
        async with self._tx(write=False) as session:
            row = await session.get(ApprovalRow, approval_id)
            return None if row is None else _approval(row)

    async def decisions(self, approval_id: str) -> list[Decision]:
        """Every decision on the approval, first click first."""
        async with self._tx(write=False) as session:
            return await _decisions(session, approval_id)

    async def record_decision(
        self,
        approval_id: str,
        *,
        user_id: str,
        user_name: str,
        role: str,
        decision: DecisionKind,
        now: datetime | None = None,
    ) -> DecisionResult:
        """Count one person's Approve or Reject, once.

        Authorisation (role, not the requester, not expired) is the caller's: this only
        records. A 'reject' that is recorded ends the approval (pending -> rejected); an
        approval never executes here, that is `claim`'s job. The approval's row is locked
        first, so a claim racing this decision sees it either wholly or not at all.
        """
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, not {decision!r}")
        at = _utc(now)
        async with self._tx() as session:
            lock = select(ApprovalRow.state).where(ApprovalRow.id == approval_id).with_for_update()
            state = (await session.execute(lock)).scalar_one_or_none()
            if state is None:
                raise NotFound(approval_id)
            status: DecisionStatus = "closed"
            if state == "pending":
                values = {
                    "approval_id": approval_id,
                    "user_id": user_id,
                    "user_name": user_name,
                    "role": role,
                    "decision": decision,
                    "decided_at": at,
                }
                inserted = (await session.execute(self._insert_decision(values))).first()
                status = "duplicate" if inserted is None else "recorded"
                if status == "recorded" and decision == "reject":
                    await session.execute(
                        _transition("pending", "rejected", at).where(ApprovalRow.id == approval_id)
                    )
            row = await session.get(ApprovalRow, approval_id, populate_existing=True)
            assert row is not None  # locked above
            everyone = await _decisions(session, approval_id)
        return DecisionResult(
            status=status,
            approval=_approval(row),
            approvers=tuple(d for d in everyone if d.decision == "approve"),
            rejecters=tuple(d for d in everyone if d.decision == "reject"),
        )

    def _insert_decision(self, values: dict[str, Any]) -> ReturningInsert[int]:
        conflict = ["approval_id", "user_id"]
        if self._dialect == "postgresql":
            pg = (
                pg_insert(DecisionRow)
                .values(values)
                .on_conflict_do_nothing(index_elements=conflict)
            )
            return pg.returning(DecisionRow.id)
        lite = (
            sqlite_insert(DecisionRow)
            .values(values)
            .on_conflict_do_nothing(index_elements=conflict)
        )
        return lite.returning(DecisionRow.id)

    async def claim(
        self, approval_id: str, *, claimer: str, now: datetime | None = None
    ) -> Approval | None:
        """pending -> executing, exactly once across processes and restarts.

        One conditional UPDATE: still pending, not expired, and enough distinct approvers.
        Whoever gets the row back executes the remedy; everyone else gets None and should
        read the approval to tell the user who already acted.
        """
        at = _utc(now)
        approvals = (
            select(func.count(distinct(DecisionRow.user_id)))
            .where(DecisionRow.approval_id == approval_id, DecisionRow.decision == "approve")
            .scalar_subquery()
        )
        stmt = (
            update(ApprovalRow)
            .where(
                ApprovalRow.id == approval_id,
                ApprovalRow.state == "pending",
                ApprovalRow.expires_at > at,
                approvals >= ApprovalRow.needed_approvals,
            )
            .values(
                state="executing",
                claimed_by=claimer,
                version=ApprovalRow.version + 1,
                updated_at=at,
            )
            .returning(ApprovalRow)
            .execution_options(synchronize_session=False)
        )
        async with self._tx() as session:
            row = (await session.scalars(stmt)).one_or_none()
            return None if row is None else _approval(row)

    async def expire_if_due(self, approval_id: str, now: datetime | None = None) -> bool:
        """pending -> expired if its deadline has passed; True if this call expired it."""
        at = _utc(now)
        stmt = _transition("pending", "expired", at).where(
            ApprovalRow.id == approval_id, ApprovalRow.expires_at <= at
        )
        async with self._tx() as session:
            return (await session.execute(stmt)).first() is not None

    async def expire_due(self, now: datetime | None = None) -> list[str]:
        """Expire every pending approval past its deadline; the ids this call expired."""
        at = _utc(now)
        stmt = _transition("pending", "expired", at).where(ApprovalRow.expires_at <= at)
        async with self._tx() as session:
            return sorted((await session.scalars(stmt)).all())

    async def finish(
        self,
        approval_id: str,
        *,
        state: FinishState,
        outcome: Mapping[str, Any],
        claimer: str | None = None,
        now: datetime | None = None,
    ) -> None:
        """executing -> done | failed | aborted, with what happened.

        Anything else is a bug in the caller and raises `InvalidTransition` (or `NotFound`);
        with `claimer`, only the process that claimed the approval may finish it.
        """
        if state not in ("done", "failed", "aborted"):
            raise ValueError(f"cannot finish as {state!r}")
        stmt = (
            _transition("executing", state, _utc(now))
            .where(ApprovalRow.id == approval_id)
            .values(outcome=dict(outcome))
        )
        if claimer is not None:
            stmt = stmt.where(ApprovalRow.claimed_by == claimer)
        async with self._tx() as session:
            if (await session.execute(stmt)).first() is not None:
                return
            row = await session.get(ApprovalRow, approval_id)
        if row is None:
            raise NotFound(approval_id)
        raise InvalidTransition(
            f"{approval_id} is {row.state} (claimed by {row.claimed_by}), "
            f"cannot finish as {state}" + (f" by {claimer}" if claimer else "")
        )

    async def cancel(
        self, approval_id: str, *, outcome: Mapping[str, Any], now: datetime | None = None
    ) -> bool:
        """pending -> cancelled (nobody could see it to approve); True if this call did."""
        stmt = (
            _transition("pending", "cancelled", _utc(now))
            .where(ApprovalRow.id == approval_id)
            .values(outcome=dict(outcome))
        )
        async with self._tx() as session:
            return (await session.execute(stmt)).first() is not None

    async def take_over(
        self, approval: Approval, *, claimer: str, now: datetime | None = None
    ) -> Approval | None:
        """Claim an `executing` approval whose process is presumed dead, exactly once.

        Conditional on the version read, so of two processes sweeping at once one gets
        the row and the other None. `updated_at` stays: it dates the original claim;
        `taken_over_at` dates this one, so a later sweep leaves the row to this sweeper
        while it verifies (`stuck_executing`).
        """
        stmt = (
            update(ApprovalRow)
            .where(
                ApprovalRow.id == approval.id,
                ApprovalRow.state == "executing",
                ApprovalRow.version == approval.version,
            )
            .values(claimed_by=claimer, taken_over_at=_utc(now), version=ApprovalRow.version + 1)
            .returning(ApprovalRow)
            .execution_options(synchronize_session=False)
        )
        async with self._tx() as session:
            row = (await session.scalars(stmt)).one_or_none()
            return None if row is None else _approval(row)

    async def renew_lease(
        self, approval_id: str, *, claimer: str, now: datetime | None = None
    ) -> bool:
        """A long execution (a recovery runbook) renews its lease: `taken_over_at` dates
        it, so `stuck_executing` leaves the row alone for a sweep lease, as it leaves one
        a sweeper took. False when the row is no longer this claimer's to run (a sweeper
        took it over, or it ended): the caller must stop."""
        stmt = (
            update(ApprovalRow)
            .where(
                ApprovalRow.id == approval_id,
                ApprovalRow.state == "executing",
                ApprovalRow.claimed_by == claimer,
            )
            .values(taken_over_at=_utc(now))
            .returning(ApprovalRow.id)
            .execution_options(synchronize_session=False)
        )
        async with self._tx() as session:
            return (await session.execute(stmt)).first() is not None

    async def latest_approvals(self, remedy: str, limit: int = 5) -> list[Approval]:
        """The latest approvals of one remedy, newest first."""
        stmt = (
            select(ApprovalRow)
            .where(ApprovalRow.remedy == remedy)
            .order_by(ApprovalRow.created_at.desc(), ApprovalRow.id.desc())
            .limit(limit)
        )
        async with self._tx(write=False) as session:
            return [_approval(row) for row in (await session.scalars(stmt)).all()]

    async def pending_for_restart(self, now: datetime | None = None) -> list[Approval]:
        """Pending, unexpired approvals that already have enough approvers.

        A process died between the last approval and its claim; the caller may `claim` these
        (the claim still guarantees a single execution).
        """
        at = _utc(now)
        approvals = (
            select(func.count(distinct(DecisionRow.user_id)))
            .where(DecisionRow.approval_id == ApprovalRow.id, DecisionRow.decision == "approve")
            .correlate(ApprovalRow)
            .scalar_subquery()
        )
        stmt = (
            select(ApprovalRow)
            .where(
                ApprovalRow.state == "pending",
                ApprovalRow.expires_at > at,
                approvals >= ApprovalRow.needed_approvals,
            )
            .order_by(ApprovalRow.created_at, ApprovalRow.id)
        )
        async with self._tx(write=False) as session:
            return [_approval(row) for row in (await session.scalars(stmt)).all()]

    async def stuck_executing(
        self, older_than_s: float, now: datetime | None = None, *, sweep_lease_s: float = 60.0
    ) -> list[Approval]:
        """Executing for longer than `older_than_s`: never retried, only decided.

        The sweeper (`ApprovalEngine.sweep`) takes them over and lets the remedy's own
        verification decide. One taken over less than `sweep_lease_s` ago belongs to the
        sweeper that took it (it may still be verifying); after that it is stuck again.
        """
        at = _utc(now)
        cutoff = at - timedelta(seconds=older_than_s)
        lease = at - timedelta(seconds=sweep_lease_s)
        stmt = (
            select(ApprovalRow)
            .where(
                ApprovalRow.state == "executing",
                ApprovalRow.updated_at <= cutoff,
                or_(ApprovalRow.taken_over_at.is_(None), ApprovalRow.taken_over_at <= lease),
            )
            .order_by(ApprovalRow.updated_at, ApprovalRow.id)
        )
        async with self._tx(write=False) as session:
            return [_approval(row) for row in (await session.scalars(stmt)).all()]

    # -- audit ------------------------------------------------------------------------------

    async def audit(
        self,
        action: str,
        *,
        actor_id: str,
        approval_id: str | None = None,
        channel_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> None:
        row = AuditRow(
            at=_utc(at),
            actor_id=actor_id,
            action=action,
            approval_id=approval_id,
            channel_id=channel_id,
            detail=dict(detail or {}),
        )
        async with self._tx() as session:
            session.add(row)
            if self.audit_hook is not None:
                await self.audit_hook(session, row)

    async def audit_trail(
        self,
        approval_id: str | None = None,
        limit: int = 100,
        *,
        channel_id: str | None = None,
    ) -> list[AuditEntry]:
        """The latest `limit` entries (optionally of one approval or channel), oldest first."""
        stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if approval_id is not None:
            stmt = stmt.where(AuditRow.approval_id == approval_id)
        if channel_id is not None:
            stmt = stmt.where(AuditRow.channel_id == channel_id)
        async with self._tx(write=False) as session:
            rows = (await session.scalars(stmt)).all()
        return [_audit(row) for row in reversed(rows)]

    # -- materialized view refreshes --------------------------------------------------------

    async def refresh_started(
        self,
        view: str,
        mode: RefreshMode,
        actor_id: str,
        approval_id: str | None = None,
        *,
        now: datetime | None = None,
    ) -> int:
        if mode not in REFRESH_MODES:
            raise ValueError(f"mode must be one of {REFRESH_MODES}, not {mode!r}")
        row = RefreshLogRow(
            view=view,
            mode=mode,
            started_at=_utc(now),
            finished_at=None,
            rows=None,
            error=None,
            approval_id=approval_id,
            actor_id=actor_id,
        )
        async with self._tx() as session:
            session.add(row)
            await session.flush()
            return row.id

    async def refresh_finished(
        self, log_id: int, *, rows: int | None, error: str | None, now: datetime | None = None
    ) -> None:
        stmt = (
            update(RefreshLogRow)
            .where(RefreshLogRow.id == log_id)
            .values(finished_at=_utc(now), rows=rows, error=error)
            .returning(RefreshLogRow.id)
            .execution_options(synchronize_session=False)
        )
        async with self._tx() as session:
            if (await session.execute(stmt)).scalar_one_or_none() is None:
                raise NotFound(f"refresh log entry {log_id}")

    async def refresh_finished_for(
        self,
        approval_id: str,
        view: str,
        *,
        rows: int | None,
        error: str | None,
        now: datetime | None = None,
    ) -> int:
        """Close the open entries of `view` an approval started (whichever process started
        them); returns how many were open."""
        stmt = (
            update(RefreshLogRow)
            .where(
                RefreshLogRow.approval_id == approval_id,
                RefreshLogRow.view == view,
                RefreshLogRow.finished_at.is_(None),
            )
            .values(finished_at=_utc(now), rows=rows, error=error)
            .returning(RefreshLogRow.id)
            .execution_options(synchronize_session=False)
        )
        async with self._tx() as session:
            return len((await session.execute(stmt)).scalars().all())

    async def last_refreshes(self) -> dict[str, RefreshEntry]:
        """The latest refresh of each view (finished or still running)."""
        latest = select(func.max(RefreshLogRow.id)).group_by(RefreshLogRow.view)
        stmt = (
            select(RefreshLogRow).where(RefreshLogRow.id.in_(latest)).order_by(RefreshLogRow.view)
        )
        async with self._tx(write=False) as session:
            rows = (await session.scalars(stmt)).all()
        return {row.view: _refresh(row) for row in rows}

    # -- last known roles -------------------------------------------------------------------

    async def remember_role(
        self,
        user_id: str,
        *,
        role: str,
        source: str,
        detail: str | None = None,
        at: datetime | None = None,
        email: str | None = None,
        seen_version: int | None = None,
    ) -> bool:
        """Keep the role just resolved (one row per user, the latest wins); False when it
        was not kept.

        `email` is the Slack e-mail the LEAPS role was read by, and `seen_version` the
        version of that e-mail's role changes read before the LEAPS lookup: when a
        set-role has bumped it since (`leaps_role_changed`), the role just read may
        predate the change, and the row the change wrote is kept instead.
        """
        key = _email_key(email)
        values = {
            "user_id": user_id,
            "role": role,
            "source": source,
            "detail": detail,
            "resolved_at": _utc(at),
            "email": key,
        }
        changed = {k: v for k, v in values.items() if k != "user_id"}
        stmt = (
            pg_insert(KnownRoleRow)
            .values(values)
            .on_conflict_do_update(index_elements=["user_id"], set_=changed)
            if self._dialect == "postgresql"
            else sqlite_insert(KnownRoleRow)
            .values(values)
            .on_conflict_do_update(index_elements=["user_id"], set_=changed)
        )
        async with self._tx() as session:
            if key is not None and seen_version is not None:
                now = await _change_version(session, key, lock=self._dialect == "postgresql")
                if now != seen_version:
                    return False
            await session.execute(stmt)
        return True

    async def known_role(self, user_id: str) -> KnownRole | None:
        async with self._tx(write=False) as session:
            row = await session.get(KnownRoleRow, user_id)
            if row is None:
                return None
            return _known_role(row)

    async def role_change_version(self, email: str) -> int:
        """How many LEAPS role changes of this e-mail the bot has made (0: none): one
        primary-key read, which every replica's resolver makes before it trusts a role it
        cached by that e-mail."""
        async with self._tx(write=False) as session:
            return await _change_version(session, _email_key(email) or "", lock=False)

    async def leaps_role_changed(
        self, email: str, role: str, at: datetime | None = None
    ) -> tuple[int, list[KnownRole]]:
        """A set-role changed the LEAPS role of the user with this e-mail: bump its change
        version (every replica's cached role read by it is then out of date) and replace
        the kept role of every Slack user whose role came from it. Returns the new
        version and every kept row of that e-mail (a user group's row is left as it is:
        the group still decides)."""
        key = _email_key(email) or ""
        when = _utc(at)
        values = {"email": key, "version": 1, "role": role, "changed_at": when}
        bump = {"version": RoleChangeRow.version + 1, "role": role, "changed_at": when}
        upsert = (
            pg_insert(RoleChangeRow)
            .values(values)
            .on_conflict_do_update(index_elements=["email"], set_=bump)
            if self._dialect == "postgresql"
            else sqlite_insert(RoleChangeRow)
            .values(values)
            .on_conflict_do_update(index_elements=["email"], set_=bump)
        ).returning(RoleChangeRow.version)
        replace = (
            update(KnownRoleRow)
            .where(KnownRoleRow.email == key, KnownRoleRow.source.in_(("leaps", "default")))
            .values(role=role, source="leaps", detail=None, resolved_at=when)
        )
        async with self._tx() as session:
            version = int((await session.execute(upsert)).scalar_one())
            await session.execute(replace)
            rows = (
                await session.scalars(
                    select(KnownRoleRow)
                    .where(KnownRoleRow.email == key)
                    .order_by(KnownRoleRow.user_id)
                )
            ).all()
            return version, [_known_role(r) for r in rows]


# -- helpers --------------------------------------------------------------------------------


def _email_key(email: str | None) -> str | None:
    """E-mails compare ignoring case and surrounding blanks, as the role lookup does."""
    key = (email or "").strip().lower()
    return key or None


async def _change_version(session: AsyncSession, key: str, *, lock: bool) -> int:
    stmt = select(RoleChangeRow.version).where(RoleChangeRow.email == key)
    if lock:  # held until the write that depends on it commits
        stmt = stmt.with_for_update()
    return int((await session.scalar(stmt)) or 0)


def _known_role(row: KnownRoleRow) -> KnownRole:
    return KnownRole(
        user_id=row.user_id,
        role=row.role,
        source=row.source,
        detail=row.detail,
        resolved_at=row.resolved_at,
        email=row.email,
    )


def _utc(value: datetime | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: the state store wants aware UTC")
    return value.astimezone(UTC)


def _transition(
    from_state: ApprovalState, to_state: ApprovalState, at: datetime
) -> ReturningUpdate[str]:
    """UPDATE approvals from one state to another, RETURNING the id; add the rest of WHERE."""
    return (
        update(ApprovalRow)
        .where(ApprovalRow.state == from_state)
        .values(state=to_state, updated_at=at, version=ApprovalRow.version + 1)
        .returning(ApprovalRow.id)
        .execution_options(synchronize_session=False)
    )


async def _decisions(session: AsyncSession, approval_id: str) -> list[Decision]:
    stmt = (
        select(DecisionRow)
        .where(DecisionRow.approval_id == approval_id)
        .order_by(DecisionRow.decided_at, DecisionRow.id)
    )
    return [
        Decision(
            approval_id=row.approval_id,
            user_id=row.user_id,
            user_name=row.user_name,
            role=row.role,
            decision=_decision_kind(row.decision),
            decided_at=row.decided_at,
        )
        for row in (await session.scalars(stmt)).all()
    ]


def _known(value: str, allowed: tuple[str, ...]) -> str:
    # The CHECK constraints keep these honest; a newer schema's value is still worth a clear error.
    if value not in allowed:
        raise StateStoreError(f"unexpected value {value!r} in the state database ({allowed})")
    return value


def _approval_state(value: str) -> ApprovalState:
    return cast(ApprovalState, _known(value, APPROVAL_STATES))


def _decision_kind(value: str) -> DecisionKind:
    return cast(DecisionKind, _known(value, DECISIONS))


def _origin(value: str) -> Origin:
    return cast(Origin, _known(value, ORIGINS))


def _refresh_mode(value: str) -> RefreshMode:
    return cast(RefreshMode, _known(value, REFRESH_MODES))


def _approval(row: ApprovalRow) -> Approval:
    return Approval(
        id=row.id,
        remedy=row.remedy,
        args=tuple(row.args),
        requester_id=row.requester_id,
        requester_name=row.requester_name,
        channel_id=row.channel_id,
        thread_ts=row.thread_ts,
        message_ts=row.message_ts,
        plan=row.plan,
        plan_hash=row.plan_hash,
        needed_approvals=row.needed_approvals,
        approver_role=row.approver_role,
        state=_approval_state(row.state),
        created_at=row.created_at,
        expires_at=row.expires_at,
        updated_at=row.updated_at,
        claimed_by=row.claimed_by,
        outcome=row.outcome,
        version=row.version,
        origin=_origin(row.origin),
    )


def _audit(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=row.at,
        actor_id=row.actor_id,
        action=row.action,
        approval_id=row.approval_id,
        channel_id=row.channel_id,
        detail=row.detail,
    )


def _refresh(row: RefreshLogRow) -> RefreshEntry:
    return RefreshEntry(
        id=row.id,
        view=row.view,
        mode=_refresh_mode(row.mode),
        started_at=row.started_at,
        finished_at=row.finished_at,
        rows=row.rows,
        error=row.error,
        approval_id=row.approval_id,
        actor_id=row.actor_id,
    )
