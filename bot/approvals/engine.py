"""The approval rules of DESIGN.md, on the bot's own state store.

A remedy is planned read-only, posted in a thread with Approve / Reject buttons, and
executed at most once, by whichever process wins the conditional `pending -> executing`
update, after enough distinct approvers with the remedy's role (never the requester)
pressed Approve before expiry. The approval binds the plan's fingerprint; the remedy
recounts inside its guarded transaction and aborts on drift. Every step is audited and
the thread's plan message is updated on every change of state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any, Literal

from slack_sdk.errors import SlackClientError

from bot.access.roles import ResolvedRole, RoleResolver, approval_refusal
from bot.approvals import runbook
from bot.approvals.executor import UNKNOWN_COMMIT, ApplyState, Executor, remedy_running
from bot.approvals.identity import acting_identity, preflight_identity
from bot.messages import render
from bot.messages.keyed_mac import APPROVAL_BUTTON, KeyedMac, button_secret
from bot.messages.notify import Notifier
from bot.router import RunContext
from bot.settings import Settings
from bot.state.models import DecisionKind, Origin
from bot.state.store import Approval, InvalidTransition, StateStore
from commands.audit_trail import audit_trail
from commands.base import LeapsIdentity, role_rank
from commands.remedies.base import REMEDIES, Execution, Outcome, Plan, Remedy, Verification

log = logging.getLogger(__name__)

APPROVE = "dbops_approve"
REJECT = "dbops_reject"


FinalState = Literal["done", "failed", "aborted"]


@dataclass(frozen=True)
class Policy:
    approver_role: str
    approvers: int


@dataclass(frozen=True)
class Click:
    action_id: str
    value: str
    user_id: str
    user_name: str
    channel_id: str
    message_ts: str
    origin: Origin = "slack"  # the console presses buttons by command line


class NotPosted(Exception):
    """The plan could not be shown in Slack, so the approval was cancelled; the message
    is for the requester."""


async def _to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` to its end even when the caller is cancelled meanwhile (shutdown):
    the final state of an approval must be written before the task dies."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def process_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ApprovalEngine:
    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        ctx: RunContext,
        executor: Executor,
        notifier: Notifier,
        roles: RoleResolver,
    ) -> None:
        self.settings = settings
        self.store = store
        # Remedies' hooks record into the same store the approvals live in.
        self.ctx = replace(ctx, refresh_journal=ctx.refresh_journal or StoreRefreshJournal(store))
        self.executor = executor
        self.notifier = notifier
        self.roles = roles
        self.claimer = process_id()
        secret = button_secret(settings.slack_signing_secret, settings.slack_bot_token)
        self._mac = KeyedMac.for_purpose(APPROVAL_BUTTON, secret, hex_chars=24)

    # --- policy and button values ----------------------------------------------------

    def policy(self, remedy: Remedy) -> Policy:
        override = self.settings.remedy_policies.get(remedy.name)
        role = (override.approver_role if override else None) or remedy.approver_role
        count = (override.approvers if override else None) or remedy.approvers
        if remedy.destroys_data:
            count = max(count, 2)
        return Policy(role, count)

    def plan_policy(self, remedy: Remedy, plan: Plan) -> Policy:
        """The remedy's policy, with the plan's own approver role and count where they are
        higher. A runbook needs the highest role and the largest count of any of its
        steps: each step's remedy's policy (REMEDY_POLICIES, `destroys_data`) and what its
        dry run asked for."""
        policy = self.policy(remedy)
        needs: list[tuple[str | None, int | None]] = [(plan.approver_role, plan.approvers)]
        for step in plan.runbook or []:
            step_remedy = REMEDIES.get(step.remedy)
            if step_remedy is not None:
                own = self.policy(step_remedy)
                needs.append((own.approver_role, own.approvers))
            needs.append((step.approver_role, step.approvers))
        for role, count in needs:
            if role and role_rank(role) > role_rank(policy.approver_role):
                policy = replace(policy, approver_role=role)
            if count and count > policy.approvers:
                policy = replace(policy, approvers=count)
        return policy

    def sign(self, approval_id: str, channel_id: str) -> str:
        return f"{approval_id}.{self._mac.sign(f'{approval_id}|{channel_id}')}"

    def verify(self, value: str, channel_id: str) -> str | None:
        approval_id, _, mac = value.partition(".")
        genuine = self._mac.matches(f"{approval_id}|{channel_id}", mac)
        return approval_id if genuine else None

    # --- request ------------------------------------------------------------------------

    async def request(
        self,
        remedy: Remedy,
        args: list[str],
        *,
        user_id: str,
        user_name: str,
        channel_id: str,
        origin: Origin = "slack",
    ) -> str:
        """Plan the remedy and either run it (no approval needed) or post it for approval.

        Returns the approval id, or "" when the plan found nothing to do or the database
        refused the change when it was tried (rule 10): then only the requester is told
        (privately), the channel gets nothing and no approval exists; the audit trail
        keeps the request. Raises UsageError for arguments the plan refuses, and
        NotPosted when Slack would not take the thread (the approval is then cancelled:
        nobody could have seen it to approve it).
        """
        plan = await remedy.plan(self.ctx, args)
        if remedy.runbook:  # its bounds: the rule 5 exception, bound by the fingerprint
            plan = runbook.bind(plan, self.settings.runbook_tolerance_pct)
        if plan.count == 0:
            await self._nothing_to_do(remedy, args, plan, user_id, channel_id)
            return ""
        policy = self.plan_policy(remedy, plan)
        if remedy.preflight:
            # Before the approval exists, so that its fingerprint binds what was tried.
            plan = await self._preflight(remedy, plan, policy, user_id)
            if plan.preflight is not None and plan.preflight.status == "refused":
                await self._refused(remedy, args, plan, user_id, channel_id)
                return ""
        needed = policy.approvers if plan.needs_approval else 0
        approval = await self.store.create_approval(
            remedy=remedy.name,
            args=args,
            requester_id=user_id,
            requester_name=user_name,
            channel_id=channel_id,
            plan=plan.model_dump(mode="json"),
            plan_hash=plan.fingerprint(),
            needed_approvals=needed,
            approver_role=policy.approver_role,
            ttl_s=self.settings.approval_ttl_s,
            origin=origin,
        )
        await self.store.audit(
            "approval.requested",
            actor_id=user_id,
            approval_id=approval.id,
            channel_id=channel_id,
            detail={"remedy": remedy.name, "args": args, "count": plan.count, "needed": needed},
        )
        try:
            thread_ts = await self.notifier.post_request(channel_id, self._parent(approval, plan))
            approval = await self._post_plan(approval, plan, thread_ts)
        except SlackClientError as exc:
            await self._cancel_unposted(approval, user_id, exc)
            raise NotPosted(
                f"Slack refused the approval thread for `/db {remedy.name}` ({exc}), so "
                f"approval `{approval.id}` is cancelled; nothing was changed. Try again."
            ) from exc
        if needed == 0:
            await self.execute(approval.id, actor_id=user_id)
        return approval.id

    async def _preflight(self, remedy: Remedy, plan: Plan, policy: Policy, user_id: str) -> Plan:
        """The plan with the database's answer to a rolled-back try of it (`preflight`)
        and the path its audit rows take (`audit`), acting as the approver role."""
        try:
            identity = await preflight_identity(
                user_id, policy.approver_role, self.roles, self.ctx.gateway
            )
        except Exception as exc:  # the target may be the thing that is sick
            log.warning("preflight identity of %s failed: %s", remedy.name, exc)
            identity = None
        tried = await self.executor.preflight(
            remedy,
            plan,
            identity,
            max_rows=self.settings.preflight_max_rows,
            role=policy.approver_role,
        )
        log.info("preflight of %s: %s", remedy.name, tried.describe())
        audit = plan.audit
        if audit is None:
            try:
                audit = (await self.ctx.gateway.read(audit_trail)).plan_note()
            except Exception as exc:  # the plan still opens; the executor reads it again
                log.warning("could not read the audit trail for %s: %s", remedy.name, exc)
                audit = "audit path unknown: the catalog could not be read at plan time"
        return plan.model_copy(update={"preflight": tried, "audit": audit})

    async def _refused(
        self, remedy: Remedy, args: list[str], plan: Plan, user_id: str, channel_id: str
    ) -> None:
        """The database refused the tried change: no approval, the requester is told why."""
        tried = plan.preflight
        assert tried is not None
        command = " ".join([remedy.name, *args])
        await self.store.audit(
            "approval.refused_by_database",
            actor_id=user_id,
            channel_id=channel_id,
            detail={
                "remedy": remedy.name,
                "args": args,
                "count": plan.count,
                "tried": tried.tried,
                "guard": tried.guard,
                "error": tried.error,
                "identity": tried.identity,
            },
        )
        await self.notifier.tell(
            channel_id,
            user_id,
            f"`/db {render.esc(command)}`: no approval was opened, because "
            f"{render.esc(tried.describe())}. It was tried before approval "
            f"({render.esc(tried.identity)}) and nothing was changed.",
            None,
        )

    async def _nothing_to_do(
        self, remedy: Remedy, args: list[str], plan: Plan, user_id: str, channel_id: str
    ) -> None:
        await self.store.audit(
            "remedy.nothing_to_do",
            actor_id=user_id,
            channel_id=channel_id,
            detail={"remedy": remedy.name, "args": args, "summary": plan.summary},
        )
        await self.notifier.tell(
            channel_id,
            user_id,
            f"`/db {' '.join([remedy.name, *args])}`: nothing to do: {plan.summary}",
            None,
        )

    def _mention_groups(self, approver_role: str) -> list[str]:
        """User groups (ROLE_GROUPS) whose role is the approver role: they are the ones
        who can act, so the parent message pings them."""
        return [g for g, role in self.settings.role_groups.items() if role == approver_role]

    def _parent(
        self,
        approval: Approval,
        plan: Plan,
        approvers: list[str] | None = None,
        outcome: Outcome | None = None,
        rejected_by: list[str] | None = None,
    ) -> str:
        return render.approval_parent(
            approval_id=approval.id,
            plan=plan,
            requester_id=approval.requester_id,
            command="/db " + " ".join([approval.remedy, *approval.args]),
            needed=approval.needed_approvals,
            expires_at=approval.expires_at,
            mention_groups=self._mention_groups(approval.approver_role),
            state=approval.state,
            changed_at=approval.updated_at if approval.is_terminal else None,
            approved_by=approvers,
            rejected_by=rejected_by,
            outcome=outcome,
        )

    async def _cancel_unposted(self, approval: Approval, user_id: str, exc: Exception) -> None:
        reason = f"cancelled: the plan could not be posted in Slack ({exc}); nothing was changed"
        log.warning("approval %s: %s", approval.id, reason)
        outcome = Outcome(ok=False, summary=reason, error=str(exc)[:300])
        await self.store.cancel(approval.id, outcome=outcome.model_dump(mode="json"))
        await self.store.audit(
            "approval.cancelled",
            actor_id=user_id,
            approval_id=approval.id,
            channel_id=approval.channel_id,
            detail={"reason": reason},
        )

    async def _post_plan(self, approval: Approval, plan: Plan, thread_ts: str) -> Approval:
        message = self._render(approval, plan, decided=[])
        message_ts = await self.notifier.post_plan(approval.channel_id, thread_ts, message)
        await self.store.set_messages(approval.id, thread_ts=thread_ts, message_ts=message_ts)
        fresh = await self.store.get_approval(approval.id)
        assert fresh is not None
        return fresh

    def _render(
        self,
        approval: Approval,
        plan: Plan,
        decided: list[str],
        outcome: Outcome | None = None,
        decided_at: dict[str, datetime] | None = None,
    ) -> render.SlackMessage:
        remedy = REMEDIES.get(approval.remedy)
        return render.approval_message(
            approval_id=approval.id,
            plan=plan,
            state=approval.state,
            requester_id=approval.requester_id,
            needed=approval.needed_approvals,
            approver_role=approval.approver_role,
            approved_by=decided,
            expires_at=approval.expires_at,
            outcome=outcome,
            limits=self.executor.limits_for(plan),
            button_value=self.sign(approval.id, approval.channel_id),
            decided_at=decided_at,
            changed_at=approval.updated_at if approval.state != "pending" else None,
            destroys_data=bool(remedy and remedy.destroys_data),
            not_tried=remedy.not_tried if remedy and not remedy.preflight else "",
        )

    async def _update(
        self, approval: Approval, decided: list[str], outcome: Outcome | None = None
    ) -> None:
        if not approval.message_ts:
            return
        plan = Plan.model_validate(approval.plan)
        decisions = await self.store.decisions(approval.id)
        times = {d.user_id: d.decided_at for d in decisions if d.decision == "approve"}
        message = self._render(approval, plan, decided, outcome, times)
        try:
            await self.notifier.update_plan(approval.channel_id, approval.message_ts, message)
            if approval.is_terminal and approval.thread_ts:
                await self.notifier.update_request(
                    approval.channel_id,
                    approval.thread_ts,
                    self._parent(
                        approval,
                        plan,
                        decided,
                        outcome,
                        rejected_by=[d.user_id for d in decisions if d.decision == "reject"],
                    ),
                )
        except SlackClientError:  # the state store holds the truth; Slack shows it late
            log.exception("could not update the plan message of %s", approval.id)

    async def _tell(self, click: Click | None, approval: Approval | None, text: str) -> None:
        if click is None:
            return
        thread = approval.thread_ts if approval and approval.thread_ts else None
        await self.notifier.tell(click.channel_id, click.user_id, text, thread)

    # --- clicks -------------------------------------------------------------------------

    async def on_click(self, click: Click) -> None:
        approval_id = self.verify(click.value, click.channel_id)
        approval = await self.store.get_approval(approval_id) if approval_id else None
        if (
            approval is None
            or approval.channel_id != click.channel_id
            or (approval.message_ts and approval.message_ts != click.message_ts)
        ):
            await self.store.audit(
                "payload.tampered",
                actor_id=click.user_id,
                approval_id=approval.id if approval else None,
                channel_id=click.channel_id,
                detail={"value": click.value[:80], "action": click.action_id},
            )
            log.warning(
                "refused a button payload from %s in %s: %r",
                click.user_id,
                click.channel_id,
                click.value[:80],
            )
            await self._tell(click, None, "This button is not valid here; nothing was changed.")
            return
        if await self.store.expire_if_due(approval.id):
            await self.store.audit(
                "approval.expired", actor_id=click.user_id, approval_id=approval.id, detail={}
            )
            expired = await self.store.get_approval(approval.id)
            assert expired is not None
            await self._update(expired, await self._approvers(approval.id))
            await self._tell(
                click, approval, f"Approval `{approval.id}` has expired; request it again."
            )
            return
        if approval.state != "pending":
            await self._tell(click, approval, await self._who_acted(approval))
            return
        resolved = await self.roles.resolve(click.user_id)
        role = resolved.role_for("approve")  # never a stale role
        decision: DecisionKind = "approve" if click.action_id == APPROVE else "reject"
        refusal = self._refusal(approval, click.user_id, resolved, decision, click.origin)
        if refusal:
            await self.store.audit(
                "approval.refused",
                actor_id=click.user_id,
                approval_id=approval.id,
                channel_id=click.channel_id,
                detail={
                    "decision": decision,
                    "role": role,
                    "role_origin": resolved.describe(),
                    "reason": refusal,
                    "origin": click.origin,
                },
            )
            await self._tell(click, approval, refusal)
            return
        result = await self.store.record_decision(
            approval.id,
            user_id=click.user_id,
            user_name=click.user_name,
            role=role,
            decision=decision,
        )
        if result.duplicate:
            await self._tell(click, approval, f"You already pressed {decision} on `{approval.id}`.")
            return
        await self.store.audit(
            f"approval.{decision}d" if decision == "approve" else "approval.rejected",
            actor_id=click.user_id,
            approval_id=approval.id,
            channel_id=click.channel_id,
            detail={"role": role},
        )
        current = await self.store.get_approval(approval.id)
        assert current is not None
        approvers = [d.user_id for d in result.approvers]
        if current.state != "pending":
            await self._update(current, approvers)
            if decision == "approve":
                await self._tell(click, current, await self._who_acted(current))
            return
        if len(approvers) < current.needed_approvals:
            await self._update(current, approvers)
            return
        await self.execute(approval.id, actor_id=click.user_id, click=click)

    def _refusal(
        self,
        approval: Approval,
        user_id: str,
        resolved: ResolvedRole,
        decision: str,
        origin: Origin,
    ) -> str | None:
        if decision == "approve" and origin == "console" and approval.origin != "console":
            return (
                f"`{approval.id}` was requested in Slack: approve it there, in its thread; "
                "the console approves only console requests."
            )
        if decision == "reject" and user_id == approval.requester_id:
            return None  # withdrawing one's own request is always allowed
        if decision == "approve" and user_id == approval.requester_id:
            return "You cannot approve your own request; another person must."
        return approval_refusal(approval.approver_role, resolved, f"{decision} `{approval.id}`")

    async def _acting(self, approval_id: str, actor_id: str) -> LeapsIdentity | None:
        """Rule 8: who an execution acts as in LEAPS: the LEAPS account of the one who set
        it going or of its latest approvers, else the service identity."""
        approvers = await self._approvers(approval_id)
        return await acting_identity(
            [actor_id, *reversed(approvers)],
            self.roles,
            self.ctx.gateway,
            self.ctx.service_identity,
        )

    async def _approvers(self, approval_id: str) -> list[str]:
        decisions = await self.store.decisions(approval_id)
        return list(dict.fromkeys(d.user_id for d in decisions if d.decision == "approve"))

    async def _who_acted(self, approval: Approval) -> str:
        approvers = await self._approvers(approval.id)
        who = ", ".join(f"<@{u}>" for u in approvers) or "nobody"
        if approval.state == "rejected":
            return f"`{approval.id}` was rejected; nothing was changed."
        if approval.state == "expired":
            return f"`{approval.id}` expired; request it again."
        if approval.state == "cancelled":
            return f"`{approval.id}` was cancelled; nothing was changed. Request it again."
        return f"`{approval.id}` is already {approval.state} (approved by {who})."

    # --- execution ----------------------------------------------------------------------

    async def execute(self, approval_id: str, *, actor_id: str, click: Click | None = None) -> None:
        claimed = await self.store.claim(approval_id, claimer=self.claimer)
        if claimed is None:
            current = await self.store.get_approval(approval_id)
            if current is not None:
                await self._tell(click, current, await self._who_acted(current))
            return
        # From here on the approval must end in a terminal state, whatever happens.
        approvers: list[str] = []
        try:
            approvers = await self._approvers(approval_id)
            await self.store.audit(
                "approval.claimed",
                actor_id=actor_id,
                approval_id=approval_id,
                channel_id=claimed.channel_id,
                detail={"claimer": self.claimer, "approvers": approvers},
            )
            await self._update(claimed, approvers)
            state, outcome = await self._run(claimed, actor_id)
        except asyncio.CancelledError:
            # Shutdown (SIGTERM) or a cancelled task: the transaction was rolled back on
            # the way out; record the end before the task dies.
            stopped = self._interrupted(claimed, actor_id, approvers, "the bot was stopped")
            await _to_the_end(stopped)
            raise
        except Exception as exc:
            log.exception("executing approval %s failed", approval_id)
            await self._interrupted(claimed, actor_id, approvers, f"{type(exc).__name__}: {exc}")
            return
        await _to_the_end(self._conclude(claimed, state, outcome, actor_id, approvers))

    async def _run(self, claimed: Approval, actor_id: str) -> tuple[FinalState, Outcome]:
        remedy = REMEDIES.get(claimed.remedy)
        plan = Plan.model_validate(claimed.plan)
        if remedy is None or plan.fingerprint() != claimed.plan_hash:
            return "failed", Outcome(
                ok=False,
                summary="the stored plan does not match its approval; nothing was run",
                error="plan fingerprint mismatch" if remedy else "unknown remedy",
            )
        if remedy.runbook:  # step by step, each re-planned, bounded and verified
            return await runbook.run(self, claimed, actor_id, plan)
        run = Execution(claimed.id, actor_id, claimed_at=claimed.updated_at)
        await self._hook(remedy, "started", remedy.started(self.ctx, plan, run))
        identity = await self._acting(claimed.id, actor_id)
        applied, outcome = await self.executor.apply(
            remedy, plan, claimed.id, identity, actor_id=actor_id
        )
        state, outcome = await self._decided(claimed, actor_id, applied, outcome)
        await self._hook(remedy, "finished", remedy.finished(self.ctx, plan, run, outcome))
        return state, outcome

    async def _decided(
        self, claimed: Approval, actor_id: str, state: ApplyState, outcome: Outcome
    ) -> tuple[FinalState, Outcome]:
        """An execution whose COMMIT nobody can vouch for (the connection was lost during
        it) is decided by the remedy's verification, as an interrupted one is (rule 9)."""
        if state != "unknown":
            return state, outcome
        landed, found = await self._verdict(claimed, actor_id)
        # "unknown: the connection was lost during COMMIT; verification found … (acted as …)"
        summary = outcome.summary.replace(UNKNOWN_COMMIT, f"{UNKNOWN_COMMIT}; {found}", 1)
        return ("done" if landed else "failed"), outcome.model_copy(
            update={
                "ok": landed,
                "summary": summary,
                "error": None if landed else outcome.error or "connection lost during COMMIT",
            }
        )

    async def _interrupted(
        self, claimed: Approval, actor_id: str, approvers: list[str], why: str
    ) -> None:
        """The execution broke off: its remedy's verification says what is in the database."""
        landed, found = await self._verdict(claimed, actor_id)
        outcome = Outcome(
            ok=landed,
            summary=f"interrupted: {why}; {found}",
            error=None if landed else f"interrupted: {why}",
        )
        await self._finished_hook(claimed, actor_id, outcome)
        await self._conclude(claimed, "done" if landed else "failed", outcome, actor_id, approvers)

    async def _verdict(self, approval: Approval, actor_id: str) -> tuple[bool, str]:
        """Whether the change landed, and what the verification found, for an execution
        whose end nobody saw (interrupted, or its COMMIT's answer lost)."""
        verdict = await self._verify(approval, actor_id)
        landed = verdict is not None and verdict.landed
        found = f"verification found {verdict.found}" if verdict else "verification could not run"
        return landed, found

    async def _verify(self, approval: Approval, actor_id: str) -> Verification | None:
        """The remedy's own read-only verification, bounded in time; None if it failed."""
        remedy = REMEDIES.get(approval.remedy)
        if remedy is None:
            return None
        plan = Plan.model_validate(approval.plan)
        run = Execution(approval.id, actor_id, claimed_at=approval.updated_at)
        try:
            if remedy.runbook:  # its step records, and the step in flight's verification
                landed, found = await runbook.verdict(self, approval)
                return Verification(landed=landed, found=found)
            async with asyncio.timeout(self.settings.verify_timeout_s):
                return await self.ctx.gateway.read(lambda db: remedy.verify(db, plan, run))
        except Exception:
            log.exception("verification of approval %s failed", approval.id)
            return None

    async def _finished_hook(self, approval: Approval, actor_id: str, outcome: Outcome) -> None:
        """The remedy's `finished` hook, for an execution that ended without `_run`."""
        remedy = REMEDIES.get(approval.remedy)
        if remedy is not None:
            plan = Plan.model_validate(approval.plan)
            run = Execution(approval.id, actor_id, claimed_at=approval.updated_at)
            await self._hook(remedy, "finished", remedy.finished(self.ctx, plan, run, outcome))

    async def _conclude(
        self,
        claimed: Approval,
        state: FinalState,
        outcome: Outcome,
        actor_id: str,
        approvers: list[str],
    ) -> None:
        """Record the end (only the process holding the claim may), audit, update the thread."""
        try:
            await self.store.finish(
                claimed.id,
                state=state,
                outcome=outcome.model_dump(mode="json"),
                claimer=claimed.claimed_by,
            )
        except InvalidTransition:
            log.warning("approval %s was decided elsewhere meanwhile", claimed.id)
            return
        await self.store.audit(
            {"done": "remedy.executed", "aborted": "remedy.aborted"}.get(state, "remedy.failed"),
            actor_id=actor_id,
            approval_id=claimed.id,
            channel_id=claimed.channel_id,
            detail={
                "affected": outcome.affected,
                "backed_up": outcome.backed_up,
                "backup_table": outcome.backup_table,
                "error": outcome.error,
                "summary": outcome.summary,
            },
        )
        final = await self.store.get_approval(claimed.id)
        if final is not None:
            await self._update(final, approvers, outcome)

    # --- the sweeper --------------------------------------------------------------------

    async def sweep(self) -> list[str]:
        """Decide approvals left `executing` by a process that died: the ids decided.

        Only past the statement timeout (+ a margin), and only when the remedy's
        transaction is no longer open on the target (its advisory lock is free); one
        process takes each over with a conditional update, then the remedy's own
        verification says `done` or `failed`.
        """
        limit_s = self.executor.statement_timeout_ms / 1000 + self.settings.sweep_margin_s
        decided: list[str] = []
        # a sweep that took a row over owns it for its verification and a margin
        lease_s = self.settings.verify_timeout_s + self.settings.sweep_margin_s
        for stuck in await self.store.stuck_executing(limit_s, sweep_lease_s=lease_s):
            try:
                if await self.ctx.gateway.read(partial(remedy_running, approval_id=stuck.id)):
                    continue
            except Exception:
                log.exception("cannot tell whether approval %s still runs", stuck.id)
                continue
            taken = await self.store.take_over(stuck, claimer=f"sweeper:{self.claimer}")
            if taken is None:
                continue  # another process took it
            verdict = await self._verify(taken, "bot")
            if verdict is None:
                continue  # the target cannot answer now; the next sweep tries again
            await self.store.audit(
                "approval.swept",
                actor_id="bot",
                approval_id=taken.id,
                channel_id=taken.channel_id,
                detail={"was_claimed_by": stuck.claimed_by, "landed": verdict.landed},
            )
            outcome = Outcome(
                ok=verdict.landed,
                summary=f"process died during execution; verification found {verdict.found}",
                error=None if verdict.landed else "process died during execution",
            )
            await self._finished_hook(taken, "bot", outcome)
            state: FinalState = "done" if verdict.landed else "failed"
            await self._conclude(taken, state, outcome, "bot", await self._approvers(taken.id))
            decided.append(taken.id)
        return decided

    @staticmethod
    async def _hook(remedy: Remedy, name: str, call: Awaitable[None]) -> None:
        """A hook keeps the remedy's own records; its failure must not decide the outcome."""
        try:
            await call
        except Exception:
            log.exception("the %s hook of remedy %s failed", name, remedy.name)

    async def recover(self) -> None:
        """At start-up: expire what is due, finish approvals a dead process left approved."""
        for approval_id in await self.store.expire_due():
            await self.store.audit(
                "approval.expired", actor_id="bot", approval_id=approval_id, detail={}
            )
            expired = await self.store.get_approval(approval_id)
            if expired is not None:
                await self._update(expired, await self._approvers(approval_id))
        for approval in await self.store.pending_for_restart():
            log.info("completing approval %s left by a stopped process", approval.id)
            await self.execute(approval.id, actor_id="bot")


async def refresh_history(store: StateStore) -> dict[str, dict[str, Any]]:
    """The bot's refresh log, as `/db views` reads it (the last refresh of each view)."""
    return {
        view: {
            "started_at": e.started_at,
            "finished_at": e.finished_at,
            "rows": e.rows,
            "error": e.error,
            "mode": e.mode,
        }
        for view, e in (await store.last_refreshes()).items()
    }


class StoreRefreshJournal:
    """The refresh journal remedies write through `ctx.refresh_journal`, in the state store."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def started(self, view: str, mode: str, *, approval_id: str, actor_id: str) -> None:
        await self._store.refresh_started(
            view, "concurrently" if mode == "concurrently" else "plain", actor_id, approval_id
        )

    async def finished(
        self, view: str, *, approval_id: str, rows: int | None, error: str | None
    ) -> None:
        await self._store.refresh_finished_for(approval_id, view, rows=rows, error=error)
