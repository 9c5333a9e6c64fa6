"""The authorization matrix: every remedy x every approver role x self-approval x expiry
x wrong channel, through the real approval engine, state store and target database.

One test per remedy (each on its own LEAPS copy), so that the matrix spreads over the
suite's workers."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from psycopg.conninfo import conninfo_to_dict

from bot.access.roles import RoleResolver
from bot.approvals.engine import APPROVE, ApprovalEngine, Click
from bot.approvals.executor import Executor
from bot.embedded_pg import EmbeddedPostgres
from bot.gateway import TargetGateway
from bot.messages.notify import SlackNotifier
from bot.router import RunContext
from bot.slack.app import make_web_client
from bot.state import StateStore, open_store
from commands.audit_trail import audit_trail
from commands.base import ROLES, LeapsIdentity, Reader, Row, role_rank
from commands.fixture.faults import FaultInjector
from commands.remedies.base import REMEDIES
from tests.conftest import FAST_THRESHOLDS, bot_settings
from tests.fakeslack import FakeSlack
from tests.test_approvals import Victims

CHANNEL = "C0MATRIX"
REQUESTER = "U0REQ"
PLAIN_VIEW = "time_series_metrics"
_migrations = itertools.count()  # part A: migration-resolve's failed migrations
_copies = itertools.count()
COPY = "restore-from-copy"


@dataclass
class Rig:
    store: StateStore
    engine: ApprovalEngine
    short: ApprovalEngine  # same parts, approvals that expire at once
    victims: Victims
    gateway: TargetGateway


@pytest_asyncio.fixture(loop_scope="session")
async def rig(
    leaps_dsn: str,
    fake_slack: FakeSlack,
    faults: FaultInjector,
    tmp_path: Path,
    pg: EmbeddedPostgres,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Rig]:
    copy = None  # restore-from-copy: a copy of the database before any loss
    if getattr(request.node, "callspec", None) and request.node.callspec.params["of"] == COPY:
        name = conninfo_to_dict(leaps_dsn)["dbname"]
        copy = pg.create_database(f"{name}_copy", template=str(name))
    await faults.drop_view_unique_index(PLAIN_VIEW)  # so refresh-views needs approval
    users = {REQUESTER: "REVIEWER"} | {f"U0{role}{i}": role for role in ROLES for i in ("", 2)}
    settings = bot_settings(leaps_dsn, fake_slack, role_map=users)
    short = settings.model_copy(update={"approval_ttl_s": 0.05})
    store = await open_store(f"sqlite:///{tmp_path}/matrix.sqlite3")
    gateway = TargetGateway(leaps_dsn)
    # Approvers here have no Slack e-mail: remedies act as the service identity (rule 8).
    service = LeapsIdentity("matrix-service", "ADMIN", "service identity")
    copy_gateway = TargetGateway(copy) if copy else None
    ctx = RunContext(gateway, FAST_THRESHOLDS, service_identity=service, recovery_copy=copy_gateway)
    client = make_web_client(settings)
    roles = RoleResolver(settings.role_map, client, gateway)
    executor = Executor(leaps_dsn, lock_timeout_ms=2000, recovery_dsn=copy)
    victims = Victims(leaps_dsn)
    yield Rig(
        store,
        ApprovalEngine(settings, store, ctx, executor, SlackNotifier(client), roles),
        ApprovalEngine(short, store, ctx, executor, SlackNotifier(client), roles),
        victims,
        gateway,
    )
    await victims.close()
    await gateway.close()
    if copy_gateway is not None:
        await copy_gateway.close()
    await store.close()


SET_ROLE_USER_SQL = (
    "SELECT handle, role::text AS role FROM users WHERE role::text IN ('PARTICIPANT', 'REVIEWER')"
    " ORDER BY id LIMIT 1"
)


async def fetch_rows(query: str, db: Reader) -> list[Row]:
    return await db.fetch(query)


async def args_for(remedy: str, rig: Rig, faults: FaultInjector) -> list[str]:
    """Arguments, and a fresh problem, so that the remedy's plan needs an approval."""
    if remedy == "fix-audit-id":  # production's audit trail, again
        try:
            await faults.production_audit_trail()
        except LookupError:  # the function is production's already: the default goes
            async with await psycopg.AsyncConnection.connect(rig.victims.dsn) as conn:
                await conn.execute("ALTER TABLE audit_log ALTER COLUMN id DROP DEFAULT")
        return []
    if (await rig.gateway.read(audit_trail)).path == "bot":  # fixed, as fix-audit-id leaves it
        async with await psycopg.AsyncConnection.connect(rig.victims.dsn) as conn:
            await conn.execute(
                "ALTER TABLE audit_log ALTER COLUMN id SET DEFAULT gen_random_uuid()::text"
            )
    if remedy == "refresh-views":
        return [PLAIN_VIEW]
    if remedy == "freeze-writes":  # not frozen, so every plan freezes
        await faults.lift_freeze()
        return []
    if remedy == "unfreeze-writes":  # frozen by hand, so every plan lifts it
        await faults.freeze_by_hand()
        return []
    if remedy == COPY:  # a school lost again (or still), found in the copy's schools alone
        async with await psycopg.AsyncConnection.connect(rig.victims.dsn) as conn:
            await conn.execute("DELETE FROM schools WHERE id = (SELECT min(id) FROM schools)")
        return ["--tables", "schools"]
    if remedy == "cleanup-orphans":
        await faults.orphan_ledger_rows(1)
        return ["points_ledger"]
    if remedy == "dedupe-learn":
        await faults.duplicate_learn(1)
        return []
    if remedy == "dedupe-ledger-events":
        await faults.duplicate_external_events(1)
        return []
    if remedy == "create-index":  # the recommended index dropped, whatever built it
        await faults.drop_index("points_ledger_user_id_created_at_idx")
        await faults.drop_index("points_ledger_by_user_newest")
        return ["points_ledger_by_user_newest"]
    if remedy == "drop-index":
        return [await faults.duplicate_index(name=f"submissions_user_id_copy_{next(_copies)}")]
    if remedy == "reconcile-points":
        await faults.missing_awards(1)
        return []
    if remedy == "migration-resolve":  # part A: a new failed migration each time
        name = f"20251101{next(_migrations):06d}_matrix"
        await faults.failed_migration(name)
        return [name, "--rolled-back"]
    if remedy in ("recover-users", "rematch-kajabi", "recover-learn"):
        # a loss the last run did not recover is still there; fixture users are few
        if (await REMEDIES[remedy].plan(rig.engine.ctx, [])).count == 0:
            accounts, unmatched = int(remedy == "recover-users"), int(remedy == "rematch-kajabi")
            await faults.data_loss(0.1, accounts=accounts, unmatched=unmatched, kajabi_only=True)
        return []
    if remedy == "set-role":  # one user, back and forth, so every plan changes a row
        (user,) = await rig.gateway.read(partial(fetch_rows, SET_ROLE_USER_SQL))
        return [str(user["handle"]), "REVIEWER" if user["role"] == "PARTICIPANT" else "PARTICIPANT"]
    if remedy in ("rematch-emails", "reprocess-webhooks", "dedupe-webhooks"):
        if (await REMEDIES[remedy].plan(rig.engine.ctx, [])).count == 0:
            if remedy == "rematch-emails":
                await faults.miscased_unmatched_events(1)
            elif remedy == "reprocess-webhooks":
                await faults.unmatched_webhook_backlog(1)
            else:
                await faults.duplicate_webhook_payloads(1)
        return []
    (pid,) = await rig.victims.open(1)
    await asyncio.sleep(0.05)
    return ["0"] if remedy == "kill-idle" else [str(pid)]


# The recovery runbook's policy is the most of its steps' (each in this matrix), and its
# approval is tested whole in test_runbook.py: each executed case here would run a whole
# recovery.
@pytest.mark.parametrize("of", sorted(n for n, r in REMEDIES.items() if not r.runbook))
async def test_authorization_matrix(rig: Rig, faults: FaultInjector, of: str) -> None:
    results: dict[tuple[str, str, bool, bool, bool], str] = {}
    cases = itertools.product([of], ROLES, (False, True), (False, True))
    for remedy_name, role, own, expired in cases:
        remedy = REMEDIES[remedy_name]
        requester = f"U0{role}" if own else REQUESTER
        engine = rig.short if expired else rig.engine
        args = await args_for(remedy_name, rig, faults)
        needed = engine.policy(remedy).approvers
        approval_id = await engine.request(
            remedy, args, user_id=requester, user_name=requester.lower(), channel_id=CHANNEL
        )
        approval = await rig.store.get_approval(approval_id)
        assert approval is not None and approval.state == "pending", (remedy_name, args)
        if expired:  # past its deadline before anyone clicks: wait what is left of it
            left = approval.expires_at - datetime.now(UTC)
            await asyncio.sleep(max(0.0, left.total_seconds()) + 0.005)
            assert approval.is_expired()
        # The same clicks from another channel first, then from the approval's own: a
        # click from elsewhere must change nothing (asserted below), so the second case
        # meets the approval exactly as a fresh one (one request, one preflight, for two).
        for elsewhere in (True, False):
            channel = "C0ELSEWHERE" if elsewhere else CHANNEL
            # as many distinct people of the role as the policy asks for (the first may
            # be the requester, whose own click never counts)
            for approver in [f"U0{role}", *(f"U0{role}{i}" for i in range(2, needed + 1))]:
                await engine.on_click(
                    Click(
                        action_id=APPROVE,
                        value=engine.sign(approval_id, channel),
                        user_id=approver,
                        user_name=approver.lower(),
                        channel_id=channel,
                        message_ts=approval.message_ts or "",
                    )
                )
            final = await rig.store.get_approval(approval_id)
            assert final is not None
            if elsewhere:  # not even counted as a decision towards the next clicks
                assert not await rig.store.decisions(approval_id), (remedy_name, role)
            results[(remedy_name, role, own, expired, elsewhere)] = final.state
        await rig.victims.close()
        rig.victims.conns.clear()

    for (remedy_name, role, own, expired, elsewhere), state in results.items():
        approver_role = rig.engine.policy(REMEDIES[remedy_name]).approver_role
        should_run = (
            not own
            and not expired
            and not elsewhere
            and role_rank(role) >= role_rank(approver_role)
        )
        case = f"{remedy_name} approved by {role} own={own} expired={expired} other={elsewhere}"
        if should_run:
            assert state == "done", f"{case}: expected execution, got {state}"
        else:
            # a payload from another channel changes nothing, not even expiry
            assert state == ("expired" if expired and not elsewhere else "pending"), case
    executed = sum(1 for s in results.values() if s == "done")
    assert executed == sum(
        1
        for name in [of]
        for role in ROLES
        if role_rank(role) >= role_rank(rig.engine.policy(REMEDIES[name]).approver_role)
    )
