"""The recovery runbook (issue 15, part 3): one approval for the whole recovery, each step
re-planned, bounded, hashed and posted in the thread before it runs, audited and verified;
a step over its bound stops the run and `--from-step N` continues; the approval policy is
the most any step needs; the sweeper leaves a live runbook alone; `/db recover --status`.

The real approval engine, state store, executor and target; Slack is the fake Web API."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio

from bot.access.roles import RoleResolver
from bot.approvals.engine import APPROVE, ApprovalEngine, Click
from bot.approvals.executor import Executor, remedy_running
from bot.approvals.runbook import bound_of, runbook_status, step_id, target_lease
from bot.embedded_pg import EmbeddedPostgres
from bot.gateway import TargetGateway
from bot.messages.notify import SlackNotifier
from bot.router import RunContext
from bot.settings import RemedyPolicy, Settings
from bot.slack.app import make_web_client
from bot.state import IncidentStore, StateStore
from bot.state.baselines import StoreBaselines
from commands.base import UsageError
from commands.fixture.faults import FaultInjector
from commands.recover import recover, take_baseline
from commands.remedies.base import REMEDIES, Plan
from commands.remedies.runbook import RUNBOOK_NAME
from tests.conftest import FAST_THRESHOLDS, bot_settings
from tests.fakeslack import FakeSlack
from tests.test_recover import admin, counts, execute, scalar
from tests.test_recovery_remedies import rows

_copies = itertools.count()
CHANNEL = "C0RUNBOOK"
REQUESTER = "U0REQ"
PEOPLE = {REQUESTER: "REVIEWER"} | {
    f"U0{role}{i}": role for role in ("ADMIN", "SUPERADMIN") for i in ("", "2")
}
STEPS = [
    "recover-users",
    "rematch-kajabi",
    "recover-learn",
    "reconcile-points",
    "refresh-views",
    "verify-recovery",
]


@dataclass
class Rig:
    engine: ApprovalEngine
    store: StateStore
    ctx: RunContext
    fake: FakeSlack
    dsn: str

    async def request(self, args: list[str]) -> str:
        approval_id = await self.engine.request(
            REMEDIES[RUNBOOK_NAME],
            args,
            user_id=REQUESTER,
            user_name="req",
            channel_id=CHANNEL,
        )
        assert approval_id
        return approval_id

    async def press(self, approval_id: str, user: str) -> None:
        approval = await self.store.get_approval(approval_id)
        assert approval is not None
        await self.engine.on_click(
            Click(
                action_id=APPROVE,
                value=self.engine.sign(approval_id, CHANNEL),
                user_id=user,
                user_name=user.lower(),
                channel_id=CHANNEL,
                message_ts=approval.message_ts or "",
            )
        )

    async def thread(self, approval_id: str) -> list[str]:
        """The texts posted in the approval's thread after its plan, in order."""
        approval = await self.store.get_approval(approval_id)
        assert approval is not None and approval.thread_ts
        return [
            str(c.params.get("text"))
            for c in self.fake.calls_to("chat.postMessage")
            if c.params.get("thread_ts") == approval.thread_ts
            and "Approve" not in str(c.params.get("blocks"))
        ]


async def make_rig(
    leaps_dsn: str,
    fake_slack: FakeSlack,
    store: StateStore,
    ctx: RunContext,
    executor: Executor | None = None,
    **overrides: Any,
) -> Rig:
    settings: Settings = bot_settings(leaps_dsn, fake_slack, role_map=PEOPLE, **overrides)
    who = await admin(leaps_dsn)  # approvers have no Slack e-mail: the service identity acts
    run_ctx = replace(ctx, service_identity=who, runbook_status=partial(runbook_status, store))
    client = make_web_client(settings)
    roles = RoleResolver(settings.role_map, client, ctx.gateway)
    engine = ApprovalEngine(
        settings, store, run_ctx, executor or Executor(leaps_dsn), SlackNotifier(client), roles
    )
    return Rig(engine, store, run_ctx, fake_slack, leaps_dsn)


@pytest_asyncio.fixture(loop_scope="session")
async def rig(
    leaps_dsn: str, fake_slack: FakeSlack, store: StateStore, ctx: RunContext
) -> AsyncIterator[Rig]:
    yield await make_rig(leaps_dsn, fake_slack, store, ctx)


def test_bounds_round_up_and_never_fall_below_the_estimate() -> None:
    assert [bound_of(n, 10) for n in (0, 1, 9, 10, 11, 100)] == [0, 2, 10, 11, 13, 110]
    assert bound_of(10, 0) == 10 and bound_of(3, 33.4) == 5 and bound_of(7, 0.1) == 8


async def test_one_approval_runs_the_whole_recovery_step_by_step(
    rig: Rig, faults: FaultInjector
) -> None:
    incidents = IncidentStore.attach(rig.store)
    now = datetime.now(UTC)
    incident = await incidents.open_incident(
        channel_id=CHANNEL,
        title="data loss",
        severity="sev2",
        commander_id=REQUESTER,
        created_by=REQUESTER,
        started_at=now,
        detected_at=now,
        detected_by="start",
    )
    await take_baseline(rig.ctx)
    before = await counts(rig.dsn)
    loss = await faults.data_loss(pct=2, accounts=1, unmatched=1, kajabi_only=True)

    # `/db recover --runbook`: the steps by name, the runbook requested as a follow-up.
    report = await recover(rig.ctx, ["--runbook"])
    assert report.follow_ups == [RUNBOOK_NAME]
    assert [f.check for f in report.findings][:6] == [
        f"runbook step {i}: {n}" for i, n in enumerate(STEPS, 1)
    ]
    # with a freeze: first the freeze, last the unfreeze, around the same steps
    frozen = await recover(rig.ctx, ["--runbook", "--freeze"])
    assert frozen.follow_ups == [f"{RUNBOOK_NAME} --freeze"]
    assert [f.check for f in frozen.findings][:8] == [
        f"runbook step {i}: {n}"
        for i, n in enumerate(["freeze-writes", *STEPS, "unfreeze-writes"], 1)
    ]

    approval_id = await rig.request([])
    approval = await rig.store.get_approval(approval_id)
    assert approval is not None and approval.state == "pending"
    assert (approval.approver_role, approval.needed_approvals) == ("ADMIN", 1)
    plan = Plan.model_validate(approval.plan)
    assert plan.runbook is not None and [s.remedy for s in plan.runbook] == STEPS
    bounds = {s.remedy: s.bound for s in plan.runbook}
    estimates = {s.remedy: s.estimate for s in plan.runbook}
    assert estimates["recover-users"] == 1 and bounds["recover-users"] == 2
    # recover-learn may also add one LEARN per user restored or event re-matched
    assert bounds["recover-learn"] == bound_of(estimates["recover-learn"] or 0, 10) + 2 + 2
    assert bounds["verify-recovery"] is None

    await rig.press(approval_id, "U0ADMIN")
    done = await rig.store.get_approval(approval_id)
    assert done is not None
    assert done.state == "done", done.outcome
    outcome = done.outcome or {}
    assert outcome["summary"].startswith("all 6 steps done")

    # every step re-planned, hashed, recorded and posted before it ran, then done
    trail = await rig.store.audit_trail(approval_id, limit=200)
    planned = [e.detail for e in trail if e.action == "runbook.step_planned"]
    finished = [e.detail for e in trail if e.action == "runbook.step_done"]
    assert [d["step"] for d in finished] == [1, 2, 3, 4, 5, 6]
    ran = [d["remedy"] for d in planned]
    assert ran == [
        "recover-users",
        "rematch-kajabi",
        "recover-learn",
        "reconcile-points",
        "refresh-views",
    ]
    posts = await rig.thread(approval_id)
    for detail in planned:
        stored = Plan.model_validate(detail["plan"])
        assert stored.fingerprint() == detail["plan_hash"] and detail["count"] <= detail["bound"]
        said = next(i for i, p in enumerate(posts) if f"plan `{detail['plan_hash'][:16]}`" in p)
        ended = next(
            i for i, p in enumerate(posts) if f"Step {detail['step']} `" in p and " done: " in p
        )
        assert said < ended
        # its own transaction and backup tables under the step's id
        assert detail["run_id"] == step_id(approval_id, detail["step"])
    # the post carries the step's whole plan: its SQL and what the try before it said
    (users_post,) = [
        json.dumps(c.params.get("blocks"))
        for c in rig.fake.calls_to("chat.postMessage")
        if f"plan `{planned[0]['plan_hash'][:16]}`" in str(c.params.get("text"))
    ]
    assert "INSERT INTO users" in users_post and "tried before approval" in users_post
    learn = next(d for d in planned if d["remedy"] == "recover-learn")
    awards = next(d for d in finished if d["remedy"] == "reconcile-points")
    assert learn["count"] > 0 and awards["affected"] == learn["count"]
    assert (await counts(rig.dsn))["users"] == before["users"]
    back = await scalar(rig.dsn, "SELECT count(*) FROM users WHERE id = ANY(%s)", (loss.accounts,))
    assert back == len(loss.accounts) == 1
    # the verification ran last, read-only, and says what the sources could not bring
    verified = finished[-1]
    assert verified["remedy"] == "verify-recovery"
    assert "users 100 %" in verified["summary"]
    assert "submissions" in verified["summary"]
    # every step joined the incident's timeline
    timeline = [e.text for e in await incidents.timeline(incident.id)]
    for n, name in enumerate(STEPS, 1):
        assert any(t.startswith(f"runbook step {n} `{name}` done: ") for t in timeline), timeline

    status = await recover(rig.ctx, ["--status"])
    (shown,) = [f for f in status.findings if f.check == f"runbook {approval_id}"]
    assert shown.summary.startswith("done: 6 of 6 steps done")
    assert [r["state"] for r in shown.rows] == ["done"] * 6


async def test_a_step_over_its_bound_stops_the_run_and_from_step_continues(
    leaps_dsn: str,
    fake_slack: FakeSlack,
    store: StateStore,
    ctx: RunContext,
    faults: FaultInjector,
) -> None:
    # REMEDY_POLICIES: re-matching needs two approvers, reconciling a SUPERADMIN; the
    # runbook needs both of the most any step needs.
    policies = {
        "rematch-kajabi": RemedyPolicy(approvers=2),
        "reconcile-points": RemedyPolicy(approver_role="SUPERADMIN"),
    }
    rig = await make_rig(leaps_dsn, fake_slack, store, ctx, remedy_policies=policies)
    loss = await faults.data_loss(pct=2, unmatched=2, kajabi_only=True)
    approval_id = await rig.request([])
    approval = await rig.store.get_approval(approval_id)
    assert approval is not None
    assert (approval.approver_role, approval.needed_approvals) == ("SUPERADMIN", 2)
    plan = Plan.model_validate(approval.plan)
    assert plan.runbook is not None
    rematch = next(s for s in plan.runbook if s.remedy == "rematch-kajabi")
    assert (rematch.number, rematch.estimate, rematch.bound) == (2, 2, 3)

    # The data grows between the approval and the run: two more events lose their match.
    grown = [
        str(r["id"])
        for r in await rows(
            leaps_dsn,
            "SELECT id FROM kajabi_events WHERE processed_at IS NOT NULL"
            " AND user_match IS NOT NULL AND user_match <> 'NO_USER_FOUND'"
            " AND NOT id = ANY(%s) ORDER BY id LIMIT 2",
            (loss.unmatched_events,),
        )
    ]
    await execute(
        leaps_dsn,
        "UPDATE kajabi_events SET user_match = 'NO_USER_FOUND', email = upper(email)"
        " WHERE id = ANY(%s)",
        (grown,),
    )
    lost = [*loss.unmatched_events, *grown]
    unmatched_sql: LiteralString = (
        "SELECT count(*) FROM kajabi_events WHERE user_match = 'NO_USER_FOUND' AND id = ANY(%s)"
    )
    await rig.press(approval_id, "U0ADMIN")  # the wrong role: refused, nothing runs
    assert not await rig.store.decisions(approval_id)
    await rig.press(approval_id, "U0SUPERADMIN")
    pending = await rig.store.get_approval(approval_id)
    assert pending is not None and pending.state == "pending"  # one of two
    await rig.press(approval_id, "U0SUPERADMIN2")
    stopped = await rig.store.get_approval(approval_id)
    assert stopped is not None and stopped.state == "failed"
    outcome = stopped.outcome or {}
    assert outcome["error"].startswith(
        "stopped at step 2: re-planned now it would change 4 rows, over its bound of 3"
    )
    said = (await rig.thread(approval_id))[-1]
    assert "stopped at step 2 (`rematch-kajabi`)" in said
    assert "Done: 1. recover-users." in said
    assert (
        "Not done: 2. rematch-kajabi, 3. recover-learn, 4. reconcile-points, "
        "5. refresh-views, 6. verify-recovery."
    ) in said
    assert "`/db recover --runbook --from-step 2`" in said
    assert await scalar(leaps_dsn, unmatched_sql, (lost,)) == 4  # nothing of step 2 ran

    status = await recover(rig.ctx, ["--status"])
    (shown,) = [f for f in status.findings if f.check == f"runbook {approval_id}"]
    assert [r["state"] for r in shown.rows] == ["done", "stopped"] + ["not run"] * 4

    # `/db recover --runbook --from-step 2` asks for the rest, numbered as before.
    report = await recover(rig.ctx, ["--runbook", "--from-step", "2"])
    assert report.follow_ups == [f"{RUNBOOK_NAME} --from-step 2"]
    again = await rig.request(["--from-step", "2"])
    asked = await rig.store.get_approval(again)
    assert asked is not None
    plan = Plan.model_validate(asked.plan)
    assert plan.runbook is not None and [s.number for s in plan.runbook] == [2, 3, 4, 5, 6]
    await rig.press(again, "U0SUPERADMIN")
    await rig.press(again, "U0SUPERADMIN2")
    done = await rig.store.get_approval(again)
    assert done is not None
    assert done.state == "done", done.outcome
    assert await scalar(leaps_dsn, unmatched_sql, (lost,)) == 0


async def test_the_sweeper_leaves_a_running_runbook_alone(
    leaps_dsn: str,
    fake_slack: FakeSlack,
    store: StateStore,
    ctx: RunContext,
    faults: FaultInjector,
) -> None:
    # Approvals executing for longer than 0.1 s count as stuck; the sweep lease is 1 ms.
    quick = Executor(leaps_dsn, statement_timeout_ms=100)
    rig = await make_rig(
        leaps_dsn, fake_slack, store, ctx, quick, sweep_margin_s=0, verify_timeout_s=0.001
    )
    await faults.data_loss(pct=2, unmatched=1, kajabi_only=True)
    approval_id = await rig.request([])
    await store.record_decision(
        approval_id, user_id="U0ADMIN", user_name="admin", role="ADMIN", decision="approve"
    )
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    claimed = await store.claim(approval_id, claimer=rig.engine.claimer, now=long_ago)
    assert claimed is not None
    # What a live runbook holds: the approval's lock on a target session for the whole
    # run, and its lease in the state store, renewed before every step.
    async with target_lease(quick.dsn, approval_id):
        assert await store.renew_lease(approval_id, claimer=rig.engine.claimer)
        stuck = await store.stuck_executing(0.1, sweep_lease_s=60)
        assert approval_id not in [a.id for a in stuck]  # the state store's side
        # a lease left to lapse: the target's side alone still keeps the sweeper off
        assert await store.renew_lease(approval_id, claimer=rig.engine.claimer, now=long_ago)
        stuck = await store.stuck_executing(0.1, sweep_lease_s=60)
        assert approval_id in [a.id for a in stuck]
        assert await rig.ctx.gateway.read(partial(remedy_running, approval_id=approval_id))
        assert await rig.engine.sweep() == []
        status = await recover(rig.ctx, ["--status"])
        (shown,) = [f for f in status.findings if f.check == f"runbook {approval_id}"]
        assert shown.summary.startswith("running: 0 of 6 steps done")
    still = await store.get_approval(approval_id)
    assert still is not None and still.state == "executing"
    # The process is gone (the lock with its session): the sweeper decides it from the
    # step records, honestly: nothing ran.
    assert await rig.engine.sweep() == [approval_id]
    swept = await store.get_approval(approval_id)
    assert swept is not None and swept.state == "failed"
    summary = (swept.outcome or {})["summary"]
    assert "stopped at step 1 (`recover-users`): the run broke off before it" in summary
    assert "`/db recover --runbook`" in summary
    # a claimer that no longer holds the row cannot renew its lease: it must stop
    assert not await store.renew_lease(approval_id, claimer=rig.engine.claimer)


async def test_a_freeze_made_before_it_is_lifted_at_its_end_after_a_restore_from_a_copy(
    pg: EmbeddedPostgres, leaps_template: str, fake_slack: FakeSlack, store: StateStore
) -> None:
    """The emergency recovery as the guide has it, one approval: the writes were stopped
    by hand, a restored copy is configured, the runbook restores from it, verifies and
    lifts the freeze."""
    n = next(_copies)
    prod = pg.create_database(f"rbk_prod_{n}", template=leaps_template)
    copy = pg.create_database(f"rbk_copy_{n}", template=f"rbk_prod_{n}")  # before the loss
    gateway, copy_gateway = TargetGateway(prod), TargetGateway(copy)
    ctx = RunContext(gateway, FAST_THRESHOLDS, baselines=StoreBaselines(store))
    ctx = replace(ctx, recovery_copy=copy_gateway)
    rig = await make_rig(prod, fake_slack, store, ctx, Executor(prod, recovery_dsn=copy))
    try:
        await take_baseline(rig.ctx)
        before = await counts(prod)
        async with FaultInjector(prod) as faults:
            loss = await faults.data_loss(pct=2, accounts=1)
            await faults.freeze_by_hand()
            try:
                report = await recover(rig.ctx, ["--runbook"])
                assert [f.check for f in report.findings][-2] == "runbook step 6: unfreeze-writes"
                assert report.findings[0].check == "runbook step 1: restore-from-copy"
                with pytest.raises(UsageError, match="frozen already"):
                    await recover(rig.ctx, ["--runbook", "--freeze"])

                approval_id = await rig.request([])
                approval = await rig.store.get_approval(approval_id)
                assert approval is not None  # restore-from-copy asks two ADMINs: so does it
                assert (approval.approver_role, approval.needed_approvals) == ("ADMIN", 2)
                await rig.press(approval_id, "U0ADMIN")
                await rig.press(approval_id, "U0ADMIN2")
                final = await rig.store.get_approval(approval_id)
                assert final is not None
                assert final.state == "done", final.outcome
                assert await counts(prod) == before  # every lost row is back
                assert loss.users
                health = await recover(rig.ctx, ["--status"])
                assert "6 of 6 steps done" in health.findings[0].summary
                async with await psycopg.AsyncConnection.connect(prod) as conn:
                    cur = await conn.execute(
                        "SELECT count(*) FROM pg_db_role_setting s JOIN pg_roles r"
                        " ON r.oid = s.setrole WHERE r.rolname = 'authenticator'"
                        " AND s.setdatabase = (SELECT oid FROM pg_database"
                        "  WHERE datname = current_database())"
                        " AND 'default_transaction_read_only=on' = ANY(s.setconfig)"
                    )
                    assert (await cur.fetchone()) == (0,)  # lifted by the runbook
            finally:
                await faults.lift_freeze()
    finally:
        await gateway.close()
        await copy_gateway.close()
