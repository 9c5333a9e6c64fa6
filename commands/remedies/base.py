"""Remedies: a read-only `plan()` that says exactly what will happen, and an `apply()`.

`apply()` runs inside one guarded transaction the bot opens on the admin DSN (statement
and lock timeouts set, rolled back on any exception). The contract every remedy keeps:

1. recount first and call `check_drift()` (the approval bound the plan's count);
2. copy rows it deletes or overwrites into `writer.backup_table(...)` before changing them;
3. call `check_count()` with the change's own row count, so a different count rolls back;
4. return an `Outcome` with a verification query's rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from psycopg import sql
from pydantic import BaseModel, Field

from commands.base import Context, Row

Query = str | sql.SQL | sql.Composed
ROLES = ("PARTICIPANT", "REVIEWER", "ADMIN", "SUPERADMIN")


def role_rank(role: str) -> int:
    """Unknown role names rank lowest, like unknown users."""
    return ROLES.index(role) if role in ROLES else 0


class PlanStep(BaseModel):
    sql: str
    params: list[Any] = Field(default_factory=list)
    note: str | None = None


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
    data: dict[str, Any] = Field(default_factory=dict)

    def fingerprint(self) -> str:
        """What an approval binds: the SQL, its parameters, the counted rows and targets."""
        bound = {
            "remedy": self.remedy,
            "args": self.args,
            "steps": [s.model_dump() for s in self.steps],
            "count": self.count,
            "data": self.data,
        }
        blob = json.dumps(bound, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


class Outcome(BaseModel):
    ok: bool
    summary: str
    affected: int = 0
    backed_up: int = 0
    backup_table: str | None = None
    rows: list[Row] = Field(default_factory=list)
    error: str | None = None
    offers: list[str] = Field(default_factory=list)  # follow-up commands, e.g. "terminate 42"


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

    async def fetch(
        self, query: Query, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[Row]: ...

    async def execute(self, query: Query, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        """Run a statement; return its row count."""
        ...

    async def backup_table(self, name: str) -> sql.Identifier:
        """`dbops_backup."<approval>_<name>"`, the schema created if missing."""
        ...


Planner = Callable[[Context, list[str]], Awaitable[Plan]]
Applier = Callable[[Writer, Plan], Awaitable[Outcome]]


@dataclass(frozen=True)
class Remedy:
    name: str
    usage: str
    summary: str
    plan: Planner
    apply: Applier
    role: str = "REVIEWER"  # to request it
    approver_role: str = "ADMIN"
    approvers: int = 1
    destroys_data: bool = False


REMEDIES: dict[str, Remedy] = {}


def add_remedy(remedy: Remedy) -> Remedy:
    if remedy.name in REMEDIES:
        raise ValueError(f"remedy {remedy.name!r} registered twice")
    REMEDIES[remedy.name] = remedy
    return remedy
