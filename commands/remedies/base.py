"""Remedies: a read-only `plan()` that says exactly what will happen, and an `apply()`.

`apply()` runs inside one guarded transaction the bot opens on the admin DSN (statement
and lock timeouts set, rolled back on any exception). The contract every remedy keeps:

1. recount first and call `check_drift()` (the approval bound the plan's count);
2. copy rows it deletes or overwrites into `writer.backup_table(...)` before changing them;
3. call `check_count()` with the change's own row count, so a different count rolls back;
4. return an `Outcome` with a verification query's rows.

And every remedy says how to tell, read-only and afterwards, whether its change landed
(`verify`): when the process running it died, that decides `done` or `failed`.

What the bot's machinery needs from a plan is a typed field of `Plan` (`locks` for the
lock holders it names when the lock timeout strikes); `data` is the remedy's own, read
only by its `apply()` and hooks (each remedy keeps a pydantic model for it). The engine
calls `started()` before and `finished()` after every execution, for every remedy
alike, so a remedy that keeps a record (the refresh journal) needs no special case.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

from psycopg import sql
from pydantic import BaseModel, Field

from commands.audit_trail import AuditRecorder
from commands.base import Context, LeapsIdentity, Reader, Row

Query = str | sql.SQL | sql.Composed
M = TypeVar("M", bound=BaseModel)


class PlanStep(BaseModel):
    sql: str
    params: list[Any] = Field(default_factory=list)
    note: str | None = None


class LockScope(BaseModel):
    """The relations a remedy locks and the lock modes that would make it wait: when the
    lock timeout strikes, the executor names the sessions holding or queueing those."""

    relations: list[str] = Field(default_factory=list)  # empty: it takes no table lock
    modes: list[str] = Field(default_factory=list)  # empty: any mode


class Preflight(BaseModel):
    """The apply tried at plan time in a transaction that was rolled back.

    `accepted`: the database took it (`affected` of the `tried` rows); `refused`: a
    trigger or constraint refused it (`guard`, `error` with personal data masked), and no
    approval opens; `inconclusive`: the try hit a lock or statement timeout, or a trigger
    on the way calls out of the database, so the approval opens and says why.
    """

    status: Literal["accepted", "refused", "inconclusive"]
    planned: int  # rows the plan counted
    tried: int  # rows the try covered (a sample when the plan is bigger than the limit)
    affected: int = 0
    ms: float = 0.0
    identity: str = ""  # who the try acted as, e.g. "app.user_role ADMIN, reviewer u_12 (...)"
    guard: str | None = None  # the trigger or constraint that refused
    error: str | None = None  # the database's message, personal data masked
    reason: str = ""  # inconclusive: why

    def describe(self) -> str:
        of = f" (of {self.planned} planned)" if self.tried != self.planned else ""
        if self.status == "accepted":
            return (
                f"the database accepted it: {self.affected} rows changed, {self.tried} rows "
                f"tried{of}, rolled back, {self.ms:.0f} ms"
            )
        if self.status == "refused":
            by = f" by {self.guard}" if self.guard else ""
            return f"the database refused it{by}: {self.error or 'no message'} (rolled back)"
        return f"inconclusive: {self.reason}; tried {self.tried} rows{of}, rolled back"


class RunbookStep(BaseModel):
    """One step of a recovery runbook as its approval binds it (DESIGN.md rule 5's one
    exception): the remedy by name, its arguments, the rows its dry run estimated and the
    bound it may not exceed when it is re-planned at its turn. `estimate` None: a read-only
    step (the verification); `bound` None: not bound yet (the engine binds it with
    RUNBOOK_TOLERANCE_PCT when the runbook is requested)."""

    number: int  # 1-based, in the whole runbook (so `--from-step N` names the same step)
    remedy: str
    args: list[str] = Field(default_factory=list)
    summary: str = ""
    estimate: int | None = None
    bound: int | None = None
    # What the bound adds for rows earlier steps of this runbook may bring (see runbook.py)
    follows: list[int] = Field(default_factory=list)
    # The dry run's own plan-level approver needs (None: its remedy's)
    approver_role: str | None = None
    approvers: int | None = None

    @property
    def command(self) -> str:
        return " ".join(["/db", self.remedy, *self.args])


class Plan(BaseModel):
    remedy: str
    args: list[str]
    title: str
    summary: str
    steps: list[PlanStep]
    targets: list[Row] = Field(default_factory=list)
    count: int
    tolerance: int = 0
    backup: str | None = None
    warnings: list[str] = Field(default_factory=list)
    limits: str = ""
    needs_approval: bool = True
    locks: LockScope = Field(default_factory=LockScope)
    # A higher approver role this plan needs than its remedy's (set-role granting ADMIN
    # needs a SUPERADMIN); the engine asks for the higher of the two. None: the remedy's.
    approver_role: str | None = None
    # More approvers this plan needs than its remedy's policy (a runbook: the most of any
    # of its steps); the engine asks for the higher of the two. None: the remedy's.
    approvers: int | None = None
    # A recovery runbook's ordered steps and their bounds (`Remedy.runbook`); None else.
    runbook: list[RunbookStep] | None = None
    data: dict[str, Any] = Field(default_factory=dict)  # the remedy's own; see `private`
    # Who writes LEAPS's audit rows for this change and why (the live trigger, or the bot
    # where the trigger refuses writes made with app.user_id); None: the plan writes no
    # audited rows or was made before the field existed.
    audit: str | None = None
    # What the database said when the apply was tried and rolled back before approval
    # (DESIGN.md rule 10); None: not tried (see `Remedy.not_tried`) or an older plan.
    preflight: Preflight | None = None

    def fingerprint(self) -> str:
        """What an approval binds: the whole plan (SQL, parameters, counted rows, targets,
        locks, the remedy's data), as JSON, so the stored copy hashes the same."""
        dumped = self.model_dump(mode="json")
        for key in ("approver_role", "approvers", "runbook", "audit", "preflight"):
            if dumped[key] is None:  # as plans hashed before the field existed
                del dumped[key]
        blob = json.dumps(dumped, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def private(self, model: type[M]) -> M:
        """The remedy's own data, validated as the model its planner stored."""
        return model.model_validate(self.data)


class Outcome(BaseModel):
    ok: bool
    summary: str
    affected: int = 0
    backed_up: int = 0
    backup_table: str | None = None
    rows: list[Row] = Field(default_factory=list)
    error: str | None = None
    offers: list[str] = Field(default_factory=list)  # follow-up commands, e.g. "terminate 42"


class OutsideStepFailed(Exception):
    """A step run outside the transaction failed after it may have changed the database;
    the remedy has cleaned up what it could and its outcome says what is left. The
    executor rolls back the guarded transaction and reports the outcome as failed."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.summary)
        self.outcome = outcome


class RemedyAbort(Exception):
    """The plan no longer holds; nothing was changed. The message is shown as is."""


class DriftError(RemedyAbort):
    def __init__(self, what: str, planned: int, now: int, tolerance: int) -> None:
        super().__init__(
            f"drift: the plan counted {planned} {what}, now there are {now} "
            f"(tolerance {tolerance}); nothing was changed, request it again"
        )


class RowCountError(RemedyAbort):
    def __init__(self, what: str, planned: int, affected: int) -> None:
        super().__init__(
            f"row count: the plan said {planned} {what}, the change touched {affected}; "
            "rolled back, nothing was changed"
        )


def check_drift(plan: Plan, now: int, what: str = "rows") -> None:
    if abs(now - plan.count) > plan.tolerance:
        raise DriftError(what, plan.count, now, plan.tolerance)


def check_count(plan: Plan, affected: int, what: str = "rows") -> None:
    if affected != plan.count:
        raise RowCountError(what, plan.count, affected)


class Writer(Protocol):
    """The admin connection inside the guarded transaction of one approved remedy."""

    approval_id: str
    # Who set it going: the last approver's Slack id, or "bot" (a restart, a preflight).
    actor_id: str
    # Who the transaction acts as in LEAPS (app.user_id / app.user_role are set to it),
    # or None when nobody could be named; a status change names it as reviewer.
    identity: LeapsIdentity | None
    # Writes LEAPS's audit rows where the live audit trigger cannot (it refuses writes
    # made with app.user_id, so the transaction does not set it): call `before(table,
    # ids)` ahead of an UPDATE or DELETE and `after(table, op, ids)` after every change
    # of an audited table; where the trigger works both do nothing.
    audit: AuditRecorder

    async def fetch(
        self, query: Query, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[Row]: ...

    async def execute(self, query: Query, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        """Run a statement; return its row count."""
        ...

    async def backup_table(self, name: str) -> sql.Identifier:
        """`dbops_backup."<approval>_<name>"`, the schema created if missing."""
        ...

    async def run_outside_transaction(
        self, query: Query, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> None:
        """Run one statement that PostgreSQL refuses inside a transaction block (CREATE
        or DROP INDEX CONCURRENTLY) on its own autocommit session of the admin DSN, with
        the same timeouts, application_name and identity. It commits on its own: the
        guarded transaction's rollback cannot undo it, so a remedy that uses it cleans up
        after a failure itself and raises `OutsideStepFailed`. The guarded transaction
        must hold no lock on the table meanwhile (read the catalog only), or the
        statement waits for it until the lock timeout.
        """
        ...

    async def commit(self) -> None:
        """End this batch's transaction and begin the next with the same settings,
        identity and limits (a remedy applied in batches, one transaction each). The
        approval's advisory lock stays held across batches. A preflight never commits:
        there it does nothing, and the whole try is rolled back."""
        ...

    async def copy_from_source(
        self, query: Query, params: Sequence[Any], target: sql.Composable
    ) -> int:
        """Stream the rows of `query` run on the recovery copy (RECOVERY_DATABASE_URL,
        read only) into the table `target` of this transaction, COPY to COPY, both sides
        in the same text form (`commands.rowdiff.TEXT_FORM_SQL`); the rows copied."""
        ...


def backup_name(approval_id: str, name: str) -> str:
    """`<approval>_<name>` made a safe identifier (it is quoted as well): the table in
    BACKUP_SCHEMA where an approval's copy of `name` rows is kept."""
    return re.sub(r"[^a-z0-9_]", "_", f"{approval_id}_{name}".lower())[:63]


@dataclass(frozen=True)
class Execution:
    """One approved run of a plan, as the hooks and the verification see it."""

    approval_id: str
    actor_id: str  # who set it going: the last approver, the requester, or "bot"
    claimed_at: datetime | None = None  # when it moved to executing


class Verification(BaseModel):
    """Whether an execution's change is in the database, and what was looked at."""

    landed: bool
    found: str  # "the 3 planned sessions are gone", "no backup table ..."


Planner = Callable[[Context, list[str]], Awaitable[Plan]]
# A plan cut down to at most n of its rows, whose apply changes exactly those (count =
# the rows kept): how a change bigger than PREFLIGHT_MAX_ROWS is tried before approval.
Sampler = Callable[[Plan, int], Plan]
Applier = Callable[[Writer, Plan], Awaitable[Outcome]]


def sample_first(
    plan: Plan,
    n: int,
    model: type[M],
    lists: tuple[str, ...] = ("ids",),
    *,
    id_field: str = "ids",
    target_key: str = "id",
) -> Plan:
    """A `Sampler` for a remedy whose apply changes exactly the rows its data lists: the
    plan cut down to its first n. Each of `lists` (parallel lists of the remedy's data, in
    plan order; the first one counts the rows) keeps its first n, the targets those whose
    `target_key` is among the kept data's `id_field`. A plan of n rows or fewer is kept."""
    if plan.count <= n:
        return plan
    data = plan.private(model)
    kept = data.model_copy(update={name: getattr(data, name)[:n] for name in lists})
    ids = {str(i) for i in getattr(kept, id_field)}
    return plan.model_copy(
        update={
            "count": len(getattr(kept, lists[0])),
            "targets": [t for t in plan.targets if str(t.get(target_key)) in ids],
            "data": kept.model_dump(mode="json"),
        },
        deep=True,
    )


def nothing_planned(plan: Plan) -> Verification | None:
    """A plan with nothing to change has landed whatever happened."""
    if plan.count == 0:
        return Verification(landed=True, found="the plan had nothing to change")
    return None


Verifier = Callable[[Reader, Plan, Execution], Awaitable[Verification]]
StartedHook = Callable[[Context, Plan, Execution], Awaitable[None]]
FinishedHook = Callable[[Context, Plan, Execution, Outcome], Awaitable[None]]


async def no_start(ctx: Context, plan: Plan, run: Execution) -> None:
    """Most remedies keep no record of their own beyond the audit trail."""


async def no_finish(ctx: Context, plan: Plan, run: Execution, outcome: Outcome) -> None:
    """Most remedies keep no record of their own beyond the audit trail."""


@dataclass(frozen=True)
class Remedy:
    name: str
    usage: str
    summary: str
    plan: Planner
    apply: Applier
    # Read-only, after the fact (another process, the transaction long over): did the
    # change land? Decides an approval whose process died while executing it.
    verify: Verifier
    role: str = "REVIEWER"  # to request it
    approver_role: str = "ADMIN"
    approvers: int = 1
    destroys_data: bool = False
    # Called by the engine around `apply()`, outside its transaction; a hook's failure is
    # logged and never changes the outcome.
    started: StartedHook = no_start
    finished: FinishedHook = no_finish
    # Rule 10: a remedy whose apply is one transaction of DML on LEAPS rows is tried at
    # plan time and rolled back (`preflight`), on `sample(plan, n)` when it is bigger
    # than the limit (None: always tried whole). The others say what they checked
    # instead, in `not_tried`, shown in the plan.
    preflight: bool = False
    sample: Sampler | None = None
    not_tried: str = ""
    # A recovery runbook: the engine runs its plan's steps (`Plan.runbook`) one by one
    # (bot/approvals/runbook.py) instead of `apply()` in one transaction.
    runbook: bool = False


REMEDIES: dict[str, Remedy] = {}


def add_remedy(remedy: Remedy) -> Remedy:
    if remedy.name in REMEDIES:
        raise ValueError(f"remedy {remedy.name!r} registered twice")
    REMEDIES[remedy.name] = remedy
    return remedy
