"""Runs an approved recovery runbook (`commands/remedies/runbook.py`) step by step.

The approval binds the ordered steps and a row bound for each (DESIGN.md rule 5's one
exception; `bind` sets the bounds from RUNBOOK_TOLERANCE_PCT when it is requested). At its
turn each step is re-planned (earlier steps changed the data), checked against its bound
and against the approval's role and count, tried first where its remedy is (rule 10),
hashed, recorded and posted in the approval's thread, and only then applied through the
executor as the acting identity, in its own transaction under its own id
(`<approval>-s<N>`: its backup tables and its advisory lock), then verified with its
remedy's `verify`: a COMMIT the executor saw is done, and the verification's finding is
reported beside it; a COMMIT whose answer was lost is decided by the verification, as the
engine decides one (rule 9). A step over its bound, refused or failed stops the run
there: a freeze stays, and the thread says what was done, what was not, and the command
that continues.

The lease: the run holds a session-level advisory lock named after the approval on its own
target session for its whole length (the sweeper's `remedy_running` sees it), and renews
its lease in the state store before every step (`StateStore.renew_lease`), so neither side
of the sweeper takes a live runbook for a dead one. After a crash, `verdict` decides the
approval from the step records in the audit trail (`runbook.step_planned`,
`runbook.step_done`, `runbook.stopped`) and the in-flight step's own verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from math import ceil
from typing import Any, Literal, Protocol

import psycopg

from bot.access.roles import RoleResolver
from bot.approvals.executor import Executor, execution_lock_key
from bot.gateway import first_line
from bot.messages import render
from bot.messages.notify import SLACK_FAILURES, Notifier
from bot.router import RunContext
from bot.settings import Settings
from bot.state.store import Approval, AuditEntry, StateStore
from commands.base import APPLICATION_NAME, LeapsIdentity, Row, Status, role_rank
from commands.recover import recover, recovery_verified
from commands.remedies.base import REMEDIES, Execution, Outcome, Plan, Remedy, RunbookStep
from commands.remedies.runbook import RUNBOOK_NAME, VERIFY, continue_command, step_rows

log = logging.getLogger(__name__)

PLANNED = "runbook.step_planned"  # the step's plan, hashed, before it runs (not in timelines)
DONE = "runbook.step_done"
STOPPED = "runbook.stopped"


class Policy(Protocol):
    @property
    def approver_role(self) -> str: ...

    @property
    def approvers(self) -> int: ...


class Engine(Protocol):
    """What a runbook uses of the approval engine (`Engine`), which calls it: its
    parts, its policy, its preflight and its hooks, so a step is tried, run and recorded
    exactly as a remedy approved on its own."""

    settings: Settings
    store: StateStore
    ctx: RunContext
    executor: Executor
    notifier: Notifier
    roles: RoleResolver

    def plan_policy(self, remedy: Remedy, plan: Plan) -> Policy: ...

    async def _approvers(self, approval_id: str) -> list[str]: ...

    async def _acting(self, approval_id: str, actor_id: str) -> LeapsIdentity | None: ...

    async def _preflight(self, remedy: Remedy, plan: Plan, policy: Any, user_id: str) -> Plan: ...

    @staticmethod
    async def _hook(remedy: Remedy, name: str, call: Awaitable[None]) -> None: ...


RunState = Literal["done", "failed"]


def step_id(approval_id: str, number: int) -> str:
    """The id a step runs under: its backup tables and its transaction's advisory lock."""
    return f"{approval_id}-s{number}"


def bound_of(estimate: int, pct: float) -> int:
    """estimate + pct %, rounded up (exact: never below the estimate, 10 % of 10 is 1)."""
    return ceil(Fraction(estimate) * (100 + Fraction(str(pct))) / 100)


def bind(plan: Plan, pct: float) -> Plan:
    """The runbook's plan with each step's bound: its estimate + `pct` %, rounded up, plus
    the bounds of the earlier steps it follows (`RunbookStep.follows`)."""
    bounds: dict[int, int] = {}
    steps: list[RunbookStep] = []
    for step in plan.runbook or []:
        if step.estimate is None:
            steps.append(step)
            continue
        bound = bound_of(step.estimate, pct) + sum(bounds.get(i, 0) for i in step.follows)
        bounds[step.number] = bound
        steps.append(step.model_copy(update={"bound": bound}))
    return plan.model_copy(
        update={
            "runbook": steps,
            "targets": step_rows(steps),
            "data": {**plan.data, "tolerance_pct": pct},
        }
    )


class LeaseLost(Exception):
    """The runbook's lock session on the target is gone: it no longer holds its lease."""


@dataclass
class TargetLease:
    """A target session holding the approval's advisory lock (session level)."""

    conn: psycopg.AsyncConnection[Any]

    async def check(self) -> None:
        try:
            await self.conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise LeaseLost(first_line(exc)) from exc


@asynccontextmanager
async def target_lease(dsn: str, approval_id: str) -> AsyncIterator[TargetLease]:
    """Hold `execution_lock_key(approval_id)` on a dedicated session until the block ends
    (closing the session frees it, also when the process dies)."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            dsn, application_name=APPLICATION_NAME, connect_timeout=5, autocommit=True
        )
    except psycopg.Error as exc:
        raise LeaseLost(f"could not connect: {first_line(exc)}") from exc
    key = execution_lock_key(approval_id)
    try:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        got = await cur.fetchone()
        if not (got and got[0]):
            raise LeaseLost("another session holds the runbook's lock")
        try:
            yield TargetLease(conn)
        finally:
            # Given back before the approval's end is recorded: a closed session's backend
            # may hold it a moment longer, and a sweep meanwhile would see it running.
            with contextlib.suppress(psycopg.Error):
                await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    finally:
        await conn.close()


@dataclass
class _Run:
    engine: Engine
    approval: Approval
    plan: Plan
    actor_id: str
    identity: LeapsIdentity | None
    lease: TargetLease | None = None
    done: list[RunbookStep] = field(default_factory=list)
    affected: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def freeze(self) -> bool:
        return bool(self.plan.data.get("freeze"))

    async def audit(self, action: str, detail: dict[str, Any]) -> None:
        await self.engine.store.audit(
            action,
            actor_id=self.actor_id,
            approval_id=self.approval.id,
            channel_id=self.approval.channel_id,
            detail=detail,
        )

    async def post(self, text: str, plan: Plan | None = None) -> None:
        """A message in the approval's thread, with a step's plan when given (raises when
        Slack did not take it)."""
        thread = self.approval.thread_ts
        if thread is None:
            return
        message = (
            render.error_text(text)
            if plan is None
            else render.runbook_step_message(text, plan, self.engine.executor.limits_for(plan))
        )
        await self.engine.notifier.post_plan(self.approval.channel_id, thread, message)

    async def post_quietly(self, text: str) -> None:
        try:
            await self.post(text)
        except SLACK_FAILURES:
            log.exception("runbook %s: could not post in the thread", self.approval.id)


async def run(
    engine: Engine, claimed: Approval, actor_id: str, plan: Plan
) -> tuple[RunState, Outcome]:
    """Every step in order, under the runbook's lease; the approval's final state."""
    identity = await engine._acting(claimed.id, actor_id)
    steps = plan.runbook or []
    state = _Run(engine, claimed, plan, actor_id, identity)
    try:
        async with target_lease(engine.executor.dsn, claimed.id) as lease:
            state.lease = lease
            for step in steps:
                why = await _step(state, step)
                if why is not None:
                    return "failed", await _stop(state, step, why)
                state.done.append(step)
    except LeaseLost as exc:
        why = f"the runbook could not hold its lease on the target: {exc}"
        left = [s for s in steps if s not in state.done]
        if not left:
            return "failed", Outcome(ok=False, summary=why, error=why)
        return "failed", await _stop(state, left[0], why)
    summary = f"all {len(steps)} steps done, {state.affected} rows changed: " + "; ".join(
        state.notes
    )
    await state.post_quietly(f"Runbook `{claimed.id}` done: {summary}")
    return "done", Outcome(ok=True, summary=summary, affected=state.affected)


async def _stop(state: _Run, step: RunbookStep, why: str) -> Outcome:
    steps = state.plan.runbook or []
    done = ", ".join(f"{s.number}. {s.remedy}" for s in state.done) or "none"
    rest = ", ".join(f"{s.number}. {s.remedy}" for s in steps if s.number >= step.number)
    again = continue_command(state.freeze, step.number)
    summary = (
        f"stopped at step {step.number} (`{step.remedy}`): {why}. Done: {done}. "
        f"Not done: {rest}."
        + (" The freeze stays." if state.freeze and step.remedy != "freeze-writes" else "")
        + f" To continue: `{again}`"
    )
    try:
        await state.audit(
            STOPPED, {"step": step.number, "remedy": step.remedy, "why": why, "command": again}
        )
    except Exception:
        log.exception("runbook %s: could not audit the stop", state.approval.id)
    await state.post_quietly(summary)
    return Outcome(
        ok=False,
        summary=summary,
        affected=state.affected,
        error=f"stopped at step {step.number}: {why}",
        offers=[again.removeprefix("/db ")],  # rendered as `/db …`
    )


async def _step(state: _Run, step: RunbookStep) -> str | None:
    """Run one step; None when it is done, else why the run stops here."""
    engine, approval = state.engine, state.approval
    if not await engine.store.renew_lease(approval.id, claimer=approval.claimed_by or ""):
        return "the runbook was taken over by another process"
    try:
        if state.lease is not None:
            await state.lease.check()
    except LeaseLost as exc:
        return f"the runbook lost its lease on the target ({exc})"
    if step.remedy == VERIFY:
        return await _verify_step(state, step)
    remedy = REMEDIES.get(step.remedy)
    if remedy is None:
        return "its remedy is not available in this bot"
    try:
        plan = await remedy.plan(engine.ctx, step.args)
    except Exception as exc:
        return f"it could not be planned: {exc}"
    bound = step.bound if step.bound is not None else step.estimate or 0
    if plan.count > bound:
        return (
            f"re-planned now it would change {plan.count} rows, over its bound of {bound} "
            f"(estimated {step.estimate} when approved); nothing of it was run"
        )
    policy = engine.plan_policy(remedy, plan)
    if role_rank(policy.approver_role) > role_rank(approval.approver_role) or (
        policy.approvers > approval.needed_approvals
    ):
        return (
            f"its plan now needs {policy.approvers} x {policy.approver_role}, more than "
            f"this runbook's approval ({approval.needed_approvals} x {approval.approver_role})"
        )
    if plan.count == 0:
        note = f"nothing to do: {plan.summary}"
        await state.audit(DONE, _done_detail(step, plan, 0, note))
        await state.post_quietly(f"Step {step.number} `{step.remedy}`: {note}")
        state.notes.append(f"{step.number}. {step.remedy}: nothing to do")
        return None
    if remedy.preflight:
        plan = await engine._preflight(remedy, plan, policy, state.actor_id)
        tried = plan.preflight
        if tried is not None and tried.status == "refused":
            return f"the database refused it when tried: {tried.describe()}"
    digest = plan.fingerprint()
    run_id = step_id(approval.id, step.number)
    await state.audit(
        PLANNED,
        {
            "step": step.number,
            "remedy": step.remedy,
            "count": plan.count,
            "bound": bound,
            "plan_hash": digest,
            "run_id": run_id,
            "plan": plan.model_dump(mode="json"),
        },
    )
    try:
        await state.post(
            f"Step {step.number} `{step.remedy}`: plan `{digest[:16]}` (sha256 of the plan "
            f"below), {plan.count} rows (bound {bound}). Running it now.",
            plan,
        )
    except SLACK_FAILURES as exc:
        return f"its plan could not be posted in the thread ({exc}), so it was not run"
    execution = Execution(run_id, state.actor_id, claimed_at=approval.updated_at)
    await engine._hook(remedy, "started", remedy.started(engine.ctx, plan, execution))
    applied, outcome = await engine.executor.apply(
        remedy, plan, run_id, state.identity, actor_id=state.actor_id
    )
    landed: bool | None = None
    found = ""
    if applied in ("done", "unknown"):
        landed, found = await _landed(engine, remedy, plan, execution)
    if applied == "unknown":
        applied = "done" if landed else "failed"
    await engine._hook(remedy, "finished", remedy.finished(engine.ctx, plan, execution, outcome))
    if applied != "done":
        return f"it {applied}: {outcome.summary}"
    state.affected += outcome.affected
    # The executor saw it commit: done. The verification is reported beside it; where it
    # cannot confirm a committed change (a CONCURRENTLY refresh leaves no trace), it says so.
    checked = f"verified: {found}" if landed else f"its verification could not confirm it: {found}"
    note = f"{outcome.summary}; {checked}"
    await state.audit(DONE, _done_detail(step, plan, outcome.affected, note, digest))
    await state.post_quietly(f"Step {step.number} `{step.remedy}` done: {note}")
    state.notes.append(f"{step.number}. {step.remedy}: {outcome.affected} rows")
    return None


def _done_detail(
    step: RunbookStep, plan: Plan, affected: int, summary: str, digest: str | None = None
) -> dict[str, Any]:
    return {
        "step": step.number,
        "remedy": step.remedy,
        "count": plan.count,
        "affected": affected,
        "plan_hash": digest,
        "summary": summary[:500],
    }


async def _landed(
    engine: Engine, remedy: Remedy, plan: Plan, execution: Execution
) -> tuple[bool, str]:
    """The step remedy's own read-only verification, bounded in time."""
    try:
        async with asyncio.timeout(engine.settings.verify_timeout_s):
            verdict = await engine.ctx.gateway.read(lambda db: remedy.verify(db, plan, execution))
    except Exception as exc:
        log.exception("verification of %s failed", execution.approval_id)
        return False, f"nothing: the verification could not run ({type(exc).__name__})"
    return verdict.landed, verdict.found


async def _verify_step(state: _Run, step: RunbookStep) -> str | None:
    """`/db recover`'s verification, read-only. Not clean with steps after it (the
    unfreeze): the run stops there and the freeze stays until someone decides. Not clean
    as the last step: the runbook did what it was approved for, and its outcome says what
    the verification still finds lost (what the sources did not hold)."""
    try:
        report = await recover(state.engine.ctx, ["--dry-run"])
    except Exception as exc:
        return f"the verification could not run: {type(exc).__name__}: {exc}"
    shown = [f for f in report.findings if not f.check.startswith("step: ")]
    clean = recovery_verified(report)
    # every count (what came back, what did not), then whatever else is not ok
    counts = [f.summary for f in shown if f.check.startswith("count: ")]
    problems = [
        f.summary for f in shown if f.status is not Status.OK and not f.check.startswith("count: ")
    ]
    found = "; ".join(counts + problems) or "nothing to compare"
    later = [s for s in state.plan.runbook or [] if s.number > step.number]
    verdict = f"{'clean' if clean else 'not clean'}: {found}"
    if not clean and later:
        past = continue_command(state.freeze, later[0].number)
        return f"the recovery verification is {verdict} (to go on past it: `{past}`)"
    await state.audit(
        DONE,
        {
            "step": step.number,
            "remedy": step.remedy,
            "count": 0,
            "affected": 0,
            "summary": verdict[:500],
        },
    )
    await state.post_quietly(f"Step {step.number} `{step.remedy}`: {verdict}")
    state.notes.append(f"{step.number}. {step.remedy}: {verdict}")
    return None


# --- after a crash ------------------------------------------------------------------------


async def verdict(engine: Engine, approval: Approval) -> tuple[bool, str]:
    """Whether a runbook whose run nobody saw end did every step, from its records: the
    steps recorded done, and for the one in flight its remedy's own verification."""
    plan = Plan.model_validate(approval.plan)
    trail = await engine.store.audit_trail(approval.id, limit=1000)
    done = {int(e.detail["step"]) for e in trail if e.action == DONE}
    planned = {
        int(e.detail["step"]): e for e in trail if e.action == PLANNED and "plan" in e.detail
    }
    freeze = bool(plan.data.get("freeze"))
    finished: list[str] = []
    for step in plan.runbook or []:
        if step.number in done:
            finished.append(str(step.number))
            continue
        entry = planned.get(step.number)
        remedy = REMEDIES.get(step.remedy)
        if entry is not None and remedy is not None:
            landed, _ = await _landed_after(engine, remedy, entry, approval)
            if landed:
                finished.append(str(step.number))
                continue
        why = "its change did not land" if entry is not None else "the run broke off before it"
        return False, (
            f"stopped at step {step.number} (`{step.remedy}`): {why}; steps done: "
            f"{', '.join(finished) or 'none'}. To continue: "
            f"`{continue_command(freeze, step.number)}`"
        )
    return True, f"every step of the runbook is done ({', '.join(finished)})"


async def _landed_after(
    engine: Engine, remedy: Remedy, entry: AuditEntry, approval: Approval
) -> tuple[bool, str]:
    plan = Plan.model_validate(entry.detail["plan"])
    run_id = str(entry.detail.get("run_id") or step_id(approval.id, int(entry.detail["step"])))
    return await _landed(engine, remedy, plan, Execution(run_id, "bot", approval.updated_at))


# --- /db recover --status --------------------------------------------------------------------


async def runbook_status(store: StateStore) -> list[Row]:
    """The running runbooks and the last one, one row per step, newest first."""
    latest = await store.latest_approvals(RUNBOOK_NAME, limit=5)
    shown = [a for a in latest if a.state == "executing"]
    last = next((a for a in latest if a.state != "executing"), None)
    if last is not None:
        shown.append(last)
    rows: list[Row] = []
    for approval in shown:
        plan = Plan.model_validate(approval.plan)
        trail = await store.audit_trail(approval.id, limit=1000)
        by_step: dict[int, tuple[str, str]] = {}
        for e in trail:
            number = e.detail.get("step")
            if not isinstance(number, int):
                continue
            if e.action == PLANNED:
                by_step[number] = ("running", str(e.detail.get("plan_hash") or "")[:16])
            elif e.action == DONE:
                by_step[number] = ("done", str(e.detail.get("summary", ""))[:120])
            elif e.action == STOPPED:
                by_step[number] = ("stopped", str(e.detail.get("why", ""))[:120])
        outcome = (approval.outcome or {}).get("summary")
        for step in plan.runbook or []:
            state, note = by_step.get(step.number, ("not run", ""))
            if state == "running" and approval.state != "executing":
                state = "interrupted"
            rows.append(
                {
                    "approval": approval.id,
                    "runbook_state": approval.state,
                    "outcome": str(outcome)[:300] if outcome else None,
                    "step": step.number,
                    "remedy": step.remedy,
                    "bound": step.bound,
                    "state": state,
                    "note": note,
                }
            )
    return rows
