"""`/db recover`: the verification against a stored baseline and each recovery step's
before and after on the fixture with production's guard triggers, after the guide's
data-loss scenario (`FaultInjector.data_loss`)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import psycopg
import pytest

from bot.approvals.executor import Executor
from bot.router import RunContext
from bot.state import StateStore
from bot.state.baselines import StoreBaselines
from commands.base import Finding, LeapsIdentity, Report, Status
from commands.fixture.faults import DataLoss, FaultInjector
from commands.recover import percentages, recover, take_baseline
from commands.remedies.base import Plan, Remedy
from commands.remedies.ledger import RECONCILE_POINTS
from commands.remedies.recovery import (
    LEARN_ID_PREFIX,
    RECOVER_LEARN,
    RECOVER_USERS,
    REMATCH_KAJABI,
    LearnRecoveryData,
)
from commands.remedies.refresh import REFRESH_VIEWS
from tests.conftest import RunningBot, bot_settings, fresh_state_url, running_bot
from tests.fakeslack import FakeSlack

_ids = itertools.count()


async def scalar(dsn: str, query: LiteralString, params: tuple[Any, ...] | None = None) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
        return row[0] if row else None


async def execute(dsn: str, query: str, params: tuple[Any, ...] | None = None) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(query.encode(), params)


async def counts(dsn: str) -> dict[str, int]:
    return {
        "users": int(await scalar(dsn, "SELECT count(*) FROM users")),
        "submissions": int(await scalar(dsn, "SELECT count(*) FROM submissions")),
        "ledger_rows": int(await scalar(dsn, "SELECT count(*) FROM points_ledger")),
        "approved_submissions": int(
            await scalar(dsn, "SELECT count(*) FROM submissions WHERE status = 'APPROVED'")
        ),
    }


async def admin(dsn: str) -> LeapsIdentity:
    user = await scalar(dsn, "SELECT id FROM users WHERE role = 'ADMIN' ORDER BY id LIMIT 1")
    return LeapsIdentity(str(user), "ADMIN", "a test approver's account")


async def run_step(
    dsn: str, remedy: Remedy, plan: Plan, identity: LeapsIdentity | None
) -> tuple[str, Any]:
    return await Executor(dsn).apply(remedy, plan, f"apv-rcv{next(_ids)}", identity)


def finding(report: Report, check: str) -> Finding:
    return next(f for f in report.findings if f.check == check)


async def webhook_learners(dsn: str) -> set[str]:
    """The users whose LEARN a Kajabi webhook awarded (read before the loss): the
    independent measure of what the processed events can bring back."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT DISTINCT user_id FROM points_ledger WHERE external_source = 'kajabi'"
        )
        return {str(r[0]) for r in await cur.fetchall()}


async def test_verification_percentages_against_a_stored_baseline(
    ctx: RunContext, store: StateStore, leaps_dsn: str, faults: FaultInjector
) -> None:
    assert ctx.baselines is not None
    before = await counts(leaps_dsn)
    base = await take_baseline(ctx)
    assert base is not None and {k: base.counts[k] for k in before} == before
    loss = await faults.data_loss(pct=10, accounts=3)
    after = await counts(leaps_dsn)
    assert after["users"] == before["users"] - 3
    assert after["submissions"] == before["submissions"] - loss.submissions
    assert after["ledger_rows"] == before["ledger_rows"] - loss.ledger_rows

    report = await recover(ctx, ["--dry-run"])
    assert report.follow_ups == []
    hhmm = base.taken_at.strftime("%H:%M")
    assert finding(report, "baseline").status is Status.OK
    for key, label in (("users", "users"), ("submissions", "submissions")):
        f = finding(report, f"count: {label}")
        pct = 100.0 * after[key] / before[key]
        assert f.status is Status.CRIT
        assert f.summary.startswith(
            f"{label} {pct:.1f} % of those at the {hhmm} baseline".replace(".0 %", " %")
        )
        assert f.rows[0]["now"] == after[key] and f.rows[0]["baseline"] == before[key]
        assert f.rows[0]["total"] == after[key] and f.rows[0]["lost"] == before[key] - after[key]
    assert percentages(report)["ledger_rows"] == round(
        100.0 * after["ledger_rows"] / before["ledger_rows"], 2
    )
    stale = finding(report, "leaderboard_totals vs live ledger")
    assert stale.status is Status.WARN

    # --baseline HH:MM takes the latest one not after that time, and says which.
    older = datetime.now(UTC) - timedelta(hours=3)
    await StoreBaselines(store).save(ctx.gateway.target, {"users": after["users"] * 2}, now=older)
    at = (older + timedelta(minutes=1)).strftime("%H:%M")
    report = await recover(ctx, ["--dry-run", "--baseline", at])
    said = finding(report, "baseline")
    assert f"compared with the {older:%H:%M} baseline ({older:%Y-%m-%d %H:%M} UTC)" in said.summary
    # stored before the census: counts only, said, and never a clean verification
    assert said.status is Status.WARN and "counts only" in said.summary
    assert finding(report, "count: users").summary.startswith(
        f"users 50 % of the {older:%H:%M} count ({after['users']:,} of {2 * after['users']:,};"
        " counts only: growth can hide a loss)"
    )
    # No baseline before the moment asked: said, and not compared.
    report = await recover(
        ctx, ["--dry-run", "--baseline", (older - timedelta(minutes=5)).strftime("%H:%M")]
    )
    assert finding(report, "baseline").status is Status.WARN


async def test_each_recovery_step_before_and_after_then_nothing_to_do(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await take_baseline(ctx)
    before = await counts(leaps_dsn)
    webhook = await webhook_learners(leaps_dsn)
    loss: DataLoss = await faults.data_loss(pct=10, accounts=3, unmatched=2)
    learners = len(webhook & set(loss.users))
    assert learners > 0
    who = await admin(leaps_dsn)

    # Round 1: the users and the event links; LEARN waits for them.
    report = await recover(ctx, [])
    assert report.follow_ups == ["recover-users", "rematch-kajabi"]
    assert "after recover-users, rematch-kajabi" in finding(report, "step: recover-learn").summary

    plan = await RECOVER_USERS.plan(ctx, [])
    assert plan.count == 3 and sorted(t["id"] for t in plan.targets) == sorted(loss.accounts)
    assert any(
        "audit_trigger_func() writes whole rows: meta 'new_values'" in w for w in plan.warnings
    )
    audit_before = int(await scalar(leaps_dsn, "SELECT count(*) FROM audit_log"))
    state, outcome = await run_step(leaps_dsn, RECOVER_USERS, plan, who)
    assert state == "done", outcome
    assert outcome.affected == 3
    assert (await counts(leaps_dsn))["users"] == before["users"]
    # The users trigger audited the recovery under the acting identity.
    assert int(await scalar(leaps_dsn, "SELECT count(*) FROM audit_log")) == audit_before + 3
    assert (
        await scalar(
            leaps_dsn,
            "SELECT count(*) FROM audit_log WHERE actor_id = %s AND action = 'INSERT_users'"
            " AND target_id = ANY(%s)",
            (who.user_id, loss.accounts),
        )
        == 3
    )
    assert (await RECOVER_USERS.plan(ctx, [])).count == 0

    plan = await REMATCH_KAJABI.plan(ctx, [])
    assert plan.count == 2 and sorted(t["id"] for t in plan.targets) == sorted(
        loss.unmatched_events
    )
    state, outcome = await run_step(leaps_dsn, REMATCH_KAJABI, plan, who)
    assert state == "done" and outcome.affected == 2 and outcome.backed_up == 2, outcome
    assert (
        await scalar(
            leaps_dsn,
            "SELECT count(*) FROM kajabi_events e JOIN users u ON u.id = e.user_match"
            " WHERE e.id = ANY(%s) AND lower(u.email) = lower(e.email)",
            (loss.unmatched_events,),
        )
        == 2
    )
    assert (await REMATCH_KAJABI.plan(ctx, [])).count == 0

    # Round 2: LEARN from the processed events, as the acting identity.
    report = await recover(ctx, [])
    assert report.follow_ups == ["recover-learn"]
    plan = await RECOVER_LEARN.plan(ctx, [])
    assert plan.count == learners
    state, outcome = await run_step(leaps_dsn, RECOVER_LEARN, plan, None)
    assert state == "aborted" and "names its reviewer" in outcome.summary
    subs = (await counts(leaps_dsn))["submissions"]
    state, outcome = await run_step(leaps_dsn, RECOVER_LEARN, plan, who)
    assert state == "done" and outcome.affected == learners, outcome
    assert (await counts(leaps_dsn))["submissions"] == subs + learners
    assert (
        await scalar(
            leaps_dsn,
            "SELECT count(*) FROM submissions WHERE id LIKE %s AND status = 'APPROVED'"
            " AND reviewer_id = %s AND payload ->> 'course_name' <> ''",
            (LEARN_ID_PREFIX + "%", who.user_id),
        )
        == learners
    )
    assert (await RECOVER_LEARN.plan(ctx, [])).count == 0

    # Round 3: their points; round 4: the views.
    report = await recover(ctx, [])
    assert report.follow_ups == ["reconcile-points"]
    plan = await RECONCILE_POINTS.plan(ctx, [])
    assert plan.count == learners
    ledger = (await counts(leaps_dsn))["ledger_rows"]
    state, outcome = await run_step(leaps_dsn, RECONCILE_POINTS, plan, who)
    assert state == "done" and outcome.affected == learners
    assert (await counts(leaps_dsn))["ledger_rows"] == ledger + learners

    report = await recover(ctx, [])
    assert report.follow_ups == ["refresh-views"]
    state, outcome = await run_step(
        leaps_dsn, REFRESH_VIEWS, await REFRESH_VIEWS.plan(ctx, []), who
    )
    assert state == "done", outcome

    # A second run plans nothing; what the sources could not bring back stays below.
    report = await recover(ctx, [])
    assert report.follow_ups == []
    for step in ("recover-users", "rematch-kajabi", "recover-learn", "reconcile-points"):
        assert finding(report, f"step: {step}").status is Status.OK
    assert finding(report, "leaderboard_totals vs live ledger").status is Status.OK
    assert finding(report, "count: users").status is Status.OK
    assert finding(report, "count: submissions").status is Status.CRIT


async def test_step_plans_bind_their_rows_and_abort_on_drift(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.data_loss(pct=10, accounts=2, unmatched=1)
    who = await admin(leaps_dsn)
    plan = await RECOVER_USERS.plan(ctx, [])
    assert plan.count == 2
    state, _ = await run_step(leaps_dsn, RECOVER_USERS, plan, who)
    assert state == "done"
    users = (await counts(leaps_dsn))["users"]
    state, outcome = await run_step(leaps_dsn, RECOVER_USERS, plan, who)
    assert (
        state == "aborted"
        and "drift: the plan counted 2 recoverable users, now there are 0" in outcome.summary
    )
    assert (await counts(leaps_dsn))["users"] == users

    # An event matched meanwhile by someone else: the re-match plan no longer holds.
    plan = await REMATCH_KAJABI.plan(ctx, [])
    assert plan.count == 1
    event = plan.targets[0]["id"]
    await execute(leaps_dsn, "UPDATE kajabi_events SET user_match = NULL WHERE id = %s", (event,))
    await execute(
        leaps_dsn,
        "INSERT INTO users (id, handle, email) SELECT 'twin', 'twin', lower(email)"
        " || '.twin' FROM kajabi_events WHERE id = %s",
        (event,),
    )
    await execute(
        leaps_dsn, "UPDATE kajabi_events SET email = email || '.twin' WHERE id = %s", (event,)
    )
    state, outcome = await run_step(leaps_dsn, REMATCH_KAJABI, plan, who)
    assert state == "aborted" and "drift" in outcome.summary, outcome
    assert (
        await scalar(leaps_dsn, "SELECT user_match FROM kajabi_events WHERE id = %s", (event,))
        is None
    )

    # A change that touches another number of rows than planned rolls back: here a rule of
    # the database that silently drops one of the inserted submissions.
    plan = await RECOVER_LEARN.plan(ctx, [])
    assert plan.count >= 2
    dropped = LEARN_ID_PREFIX + plan.private(LearnRecoveryData).ids[0]
    await execute(
        leaps_dsn,
        "CREATE FUNCTION drop_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" IF NEW.id = '{dropped}' THEN RETURN NULL; END IF; RETURN NEW; END $$;"
        " CREATE TRIGGER drop_one BEFORE INSERT ON submissions"
        " FOR EACH ROW EXECUTE FUNCTION drop_one();",
    )
    subs = (await counts(leaps_dsn))["submissions"]
    state, outcome = await run_step(leaps_dsn, RECOVER_LEARN, plan, who)
    assert state == "aborted", outcome
    assert (
        f"row count: the plan said {plan.count} LEARN submissions, the change touched "
        f"{plan.count - 1}; rolled back" in outcome.summary
    )
    assert (await counts(leaps_dsn))["submissions"] == subs


async def test_a_clean_verification_calls_the_incidents_hook(
    ctx: RunContext, leaps_dsn: str
) -> None:
    heard: list[Report] = []

    async def hook(report: Report) -> None:
        heard.append(report)

    ctx.on_recovery_verified = hook
    report = await recover(ctx, [])  # no baseline yet: not clean
    assert heard == [] and finding(report, "baseline").status is Status.WARN
    await take_baseline(ctx)
    report = await recover(ctx, [])
    assert report.follow_ups == []
    assert [r.title for r in heard] == ["Recovery verification"]
    assert percentages(heard[0])["users"] == 100.0


@pytest.mark.parametrize("dry_run", [True, False])
async def test_recover_over_slack_requests_each_step_unless_dry_run(
    leaps_dsn: str, fake_slack: FakeSlack, dry_run: bool
) -> None:
    async with FaultInjector(leaps_dsn) as injector:
        await injector.data_loss(pct=5, accounts=2, unmatched=1)
    settings = bot_settings(
        leaps_dsn, fake_slack, baseline_interval_s=3600, role_map={"U0ALICE": "REVIEWER"}
    )
    bot: RunningBot
    async with running_bot(settings, fake_slack) as bot:
        text = "recover --dry-run" if dry_run else "recover"
        resp = await bot.slash(text, channel="C0INCIDENT", user="U0ALICE")
        assert resp.status == 200
        await bot.fake.wait_for("chat.postEphemeral", timeout=20)
        for _ in range(200):
            if len(bot.service.tracker) == 0:
                break
            await asyncio.sleep(0.05)
        assert bot.service.store is not None
        requested = [
            e.detail.get("remedy")
            for e in await bot.service.store.audit_trail(limit=100)
            if e.action == "approval.requested"
        ]
        assert requested == ([] if dry_run else ["recover-users", "rematch-kajabi"])
        assert bot.service.ctx.baselines is not None
        kept = await bot.service.ctx.baselines.latest_before(  # the start-up snapshot
            bot.service.gateway.target, datetime.now(UTC)
        )
        assert kept is not None


async def test_recover_from_the_console_requests_the_steps(
    leaps_dsn: str, faults: FaultInjector
) -> None:
    """`python -m bot run "recover" --user …`: the report, then each step requested as
    that user (pending approval), as from Slack; a participant may not."""
    import json

    from tests.test_cli import bot_cli

    await faults.data_loss(pct=5, accounts=2)
    env = {
        "DATABASE_URL": leaps_dsn,
        "STATE_DATABASE_URL": fresh_state_url(),  # a copy of the migrated template
        "ROLE_MAP": json.dumps({"U0ONCALL": "REVIEWER", "U0GUEST": "PARTICIPANT"}),
    }
    refused = bot_cli("run", "recover", "--user", "U0GUEST", env=env)
    assert refused.returncode == 2 and "You need the role REVIEWER" in refused.stderr
    asked = bot_cli("run", "recover", "--user", "U0ONCALL", env=env)
    assert asked.returncode == 0, asked.stderr
    assert "Recovery verification" in asked.stdout
    assert asked.stdout.count("is pending: python -m bot approve") == 1  # recover-users
    assert "Recover users from audit_log" in asked.stdout


async def test_a_clean_recover_in_an_incident_channel_marks_full_recovery(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    """Over Slack: with the counts back to the baseline, `/db recover` closes a resolved
    incident's full-recovery clock with the verification as evidence. While the incident
    is open a clean verification does not close it: "clean: resolve to close"."""
    channel = "C0RECOVERED"
    settings = bot_settings(leaps_dsn, fake_slack, role_map={"U0ALICE": "REVIEWER"}, coalesce_s=0)
    async with running_bot(settings, fake_slack) as bot:

        async def command(text: str) -> None:
            assert (await bot.slash(text, channel=channel, user="U0ALICE")).status == 200
            for _ in range(400):
                if len(bot.service.tracker) == 0:
                    return
                await asyncio.sleep(0.05)

        incidents = bot.service.incidents
        assert incidents is not None
        await command("incident start Restore after data loss sev2")
        incident = await incidents.store.active_in(channel)
        assert incident is not None
        await command("recover")  # no baseline yet: not clean, the clock keeps running
        assert await incidents.store.active_in(channel) is not None
        # the service takes none while an incident is open; store one as the leader's
        # hourly snapshot would have before the loss (the counts are the same here)
        assert not await bot.service.take_baseline()
        await take_baseline(bot.service.ctx)
        await command("recover")
        still = await incidents.store.active_in(channel)
        assert still is not None and still.state == "open" and still.recovered_at is None
        told = [
            str(c.params.get("text"))
            for c in fake_slack.calls_to("chat.postMessage")
            if c.params.get("channel") == channel and "resolve to close" in str(c.params)
        ]
        assert len(told) == 1 and told[0].startswith("Recovery verification clean: resolve to")
        assert f"Incident #{incident.id} is open" in told[0]
        await command("incident resolve")
        await command("recover")
        assert await incidents.store.active_in(channel) is None
        done = await incidents.store.get(incident.id)
        assert done is not None and done.state == "recovered"
        assert done.recovery_evidence is not None
        assert done.recovery_evidence["percentages"]["users"] == 100.0
