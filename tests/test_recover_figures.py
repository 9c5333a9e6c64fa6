"""Recovery figures that cannot lie (issue 13, part 3): growth does not hide a loss,
revocations only warn, old baselines are "counts only", a baseline whose counts fell is
flagged and used only when named. The target is the real fixture PostgreSQL; the
baselines live in a real state store (SQLite, and PostgreSQL for the migration)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from sqlalchemy import Connection, text

from bot.incidents.facts import verification_from_report
from bot.incidents.summary import impact_lines
from bot.messages import render
from bot.router import RunContext
from bot.state import StateStore, open_store
from bot.state.baselines import StoreBaselines
from bot.state.store import alembic_config, make_engine
from commands.base import Finding, Report, Status
from commands.recover import (
    BaselineConditions,
    baseline_refusal,
    recover,
    recovery_verified,
    take_baseline,
)
from tests.test_recover import counts

LOST, GROWN = 20, 30


def finding(report: Report, check: str) -> Finding:
    return next(f for f in report.findings if f.check == check)


async def rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query.encode(), params)
        return await cur.fetchall() if cur.description else []


async def lose_and_grow(dsn: str) -> Counter[str]:
    """20 participants created before the baseline are deleted (their submissions and
    ledger rows go with them, as the foreign keys cascade) and 30 new ones sign up: the
    users' total grows from N to N + 10. Returns the lost users by UTC day of creation."""
    victims = await rows(
        dsn,
        "SELECT id, created_at::date FROM users WHERE role = 'PARTICIPANT' ORDER BY id LIMIT %s",
        (LOST,),
    )
    await rows(dsn, "DELETE FROM users WHERE id = ANY(%s)", ([v[0] for v in victims],))
    await rows(
        dsn,
        "INSERT INTO users (id, handle, email, created_at)"
        " SELECT 'new-' || g, 'new-' || g, 'new' || g || '@example.org',"
        "        now() AT TIME ZONE 'UTC'"
        " FROM generate_series(1, %s) AS g",
        (GROWN,),
    )
    return Counter(str(v[1]) for v in victims)


async def test_growth_cannot_hide_a_loss(ctx: RunContext, leaps_dsn: str) -> None:
    """Today's total is higher than the baseline's, and the report still calls the loss:
    the rows created by the baseline's database time, now against then, beside today's
    totals, and the days on which the lost rows had been created."""
    before = await counts(leaps_dsn)
    base = await take_baseline(ctx)
    assert base is not None and base.db_now is not None and not base.counts_only
    assert base.tables["users"].count == base.tables["users"].upto == before["users"]
    assert base.tables["ledger_rows"].upto == before["ledger_rows"]
    lost_days = await lose_and_grow(leaps_dsn)
    after = await counts(leaps_dsn)
    assert after["users"] == before["users"] - LOST + GROWN > before["users"]

    report = await recover(ctx, ["--dry-run"])
    print(render.to_text(report))  # the text the closing note quotes
    users = finding(report, "count: users")
    n, at = before["users"], f"{base.taken_at:%H:%M}"
    pct = f"{100.0 * (n - LOST) / n:.1f}".removesuffix(".0")
    days = ", ".join(f"{d} ({k})" for d, k in sorted(lost_days.items())[:5])
    assert users.status is Status.CRIT
    assert users.summary.startswith(
        f"users {pct} % of those at the {at} baseline ({n - LOST:,} of the {n:,} created by "
        f"then): {LOST} lost, created {days}"
    ), users.summary
    assert users.summary.endswith(f"; {after['users']:,} in all now, {n:,} then")
    row = users.rows[0]
    assert (row["baseline"], row["now"], row["lost"]) == (n, n - LOST, LOST)
    assert (row["total"], row["baseline_total"]) == (after["users"], n)
    assert row["lost_by_day"] == dict(sorted(lost_days.items()))
    # Their submissions and ledger rows went with them: called too, with their totals.
    for key, label in (("submissions", "submissions"), ("ledger_rows", "ledger rows")):
        f = finding(report, f"count: {label}")
        gone = before[key] - after[key]
        assert gone > 0 and f.status is Status.CRIT and f.rows[0]["lost"] == gone
        assert sum(f.rows[0]["lost_by_day"].values()) == gone
    # Fewer approved submissions warn, never a loss (revocations do the same).
    approved = finding(report, "count: approved submissions")
    assert approved.status is Status.WARN and "not called a loss" in approved.summary
    assert not recovery_verified(report)
    baseline = finding(report, "baseline")
    assert baseline.status is Status.OK and base.name in baseline.summary

    # The incident's data impact reads the same figures.
    verification = verification_from_report(report, datetime.now(UTC))
    assert verification is not None and not verification.clean
    by_name = {m.name: m for m in verification.metrics}
    assert by_name["users"].lost == LOST and by_name["approved_submissions"].lost == 0
    impact = "\n".join(impact_lines(verification))
    assert f"• users: {pct} % ({n - LOST:,} of {n:,} created by the baseline, {LOST} missing" in (
        impact
    )
    assert f"; {after['users']:,} in all now)" in impact


async def test_revoked_approvals_only_warn_and_do_not_spoil_a_clean_verification(
    ctx: RunContext, leaps_dsn: str
) -> None:
    await take_baseline(ctx)
    async with await psycopg.AsyncConnection.connect(leaps_dsn) as conn:
        # past the status guard (an APPROVED decision is final in the fixture), as a
        # revocation by the application would be
        await conn.execute("SET LOCAL session_replication_role = replica")
        cur = await conn.execute(
            "UPDATE submissions SET status = 'REVOKED'"
            " WHERE id IN (SELECT id FROM submissions WHERE status = 'APPROVED'"
            "              AND activity_code <> 'LEARN' ORDER BY id LIMIT 5) RETURNING id"
        )
        revoked = await cur.fetchall()
    assert len(revoked) == 5
    report = await recover(ctx, ["--dry-run"])
    approved = finding(report, "count: approved submissions")
    assert approved.status is Status.WARN
    assert "5 fewer, which a revocation (REVOKED) also makes: not called a loss" in (
        approved.summary
    )
    assert approved.hint is None
    for label in ("users", "submissions", "ledger rows"):
        assert finding(report, f"count: {label}").status is Status.OK
    assert recovery_verified(report)


async def test_an_old_counts_only_baseline_is_labelled(
    ctx: RunContext, store: StateStore, leaps_dsn: str
) -> None:
    """A baseline stored before the census (no database time, no histograms) compares
    totals: growth could hide a loss, and the report says so; never clean."""
    before = await counts(leaps_dsn)
    await StoreBaselines(store).save(ctx.gateway.target, before)
    report = await recover(ctx, ["--dry-run"])
    said = finding(report, "baseline")
    assert said.status is Status.WARN
    assert "counts only, so growth can hide a loss" in said.summary
    users = finding(report, "count: users")
    assert users.status is Status.OK and "counts only: growth can hide a loss" in users.summary
    assert not recovery_verified(report)
    verification = verification_from_report(report, datetime.now(UTC))
    assert verification is not None and verification.counts_only and not verification.clean
    assert "counts only: growth can hide a loss" in impact_lines(verification)[0]


async def test_a_baseline_whose_counts_fell_is_flagged_and_used_only_when_named(
    ctx: RunContext, leaps_dsn: str
) -> None:
    assert ctx.baselines is not None
    now = datetime.now(UTC)
    quiet = BaselineConditions(now=now - timedelta(hours=2))
    good = await take_baseline(ctx, quiet)
    assert good is not None and good.flagged is None and good.critical == frozenset()
    await lose_and_grow(leaps_dsn)  # the total grows: only the census sees the fall
    bad = await take_baseline(ctx, BaselineConditions(now=now - timedelta(hours=1)))
    assert bad is not None and bad.flagged is not None
    assert bad.flagged.startswith(f"fewer rows than {good.name}: users created by then")
    assert (await ctx.baselines.latest(ctx.gateway.target)) == good  # the latest unflagged
    assert await ctx.baselines.latest(ctx.gateway.target, include_flagged=True) == bad

    # By default: the unflagged one, named, and the flagged one passed over, said so.
    report = await recover(ctx, ["--dry-run"])
    said = finding(report, "baseline")
    assert said.status is Status.OK
    assert said.summary.startswith(f"compared with {good.name}")
    assert f"{bad.name} is flagged" in said.summary
    assert f"`--baseline {bad.taken_at:%H:%M}` compares with it" in said.summary
    assert finding(report, "count: users").status is Status.CRIT
    # Named: the flagged one, by its own HH:MM (taken at HH:MM:ss), with a warning.
    report = await recover(ctx, ["--dry-run", "--baseline", f"{bad.taken_at:%H:%M}"])
    said = finding(report, "baseline")
    assert said.status is Status.WARN and said.summary.startswith(f"compared with {bad.name}")
    assert "it is flagged, fewer rows than" in said.summary
    assert finding(report, "count: users").status is Status.OK  # the loss is in it


def test_the_baseline_rule() -> None:
    """`baseline_refusal`, each case on its own (the bot's wiring is in test_incidents)."""
    t = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
    from commands.base import Baseline

    last = Baseline(taken_at=t, counts={}, critical=frozenset({"a"}), db_now=t)
    old = Baseline(taken_at=t, counts={})  # counts only: what was critical is unknown

    def ask(last: Baseline | None, **kw: Any) -> str | None:
        return baseline_refusal(BaselineConditions(now=t + timedelta(hours=2), **kw), last)

    assert "incident #7 is open" in str(ask(last, open_incidents=(7,)))
    assert "incident #7 is open" in str(ask(None, open_incidents=(7,), critical={"b": t}))
    quiet = ask(last, recovered_at=t + timedelta(hours=1, minutes=30))
    assert quiet is not None and "quiet until 11:30 UTC" in quiet
    assert ask(last, recovered_at=t + timedelta(hours=1)) is None  # an hour ago: over
    assert ask(last, critical={"a": t - timedelta(hours=20)}) is None  # throughout
    assert ask(last, critical={"a": t + timedelta(hours=1)}) == (
        f"critical since {last.name}: a"  # cleared and came back
    )
    assert ask(last, critical={"b": t + timedelta(hours=1)}) == f"critical since {last.name}: b"
    assert ask(None, critical={"b": t}) is None  # the first one, whatever is critical
    assert ask(old, critical={"b": t}) is None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_rows_stored_before_the_census_still_load_as_counts_only(
    backend: str, tmp_path: Path, pg_dsn_factory: Callable[[str], str]
) -> None:
    """A state store at revision 0006 with a baseline in it, upgraded: the row loads."""
    url = f"sqlite:///{tmp_path}/old.sqlite3" if backend == "sqlite" else pg_dsn_factory("old")
    engine = make_engine(url)
    cfg = alembic_config()

    def to_0006(sync_conn: Connection) -> None:
        cfg.attributes["connection"] = sync_conn
        command.upgrade(cfg, "0006")

    taken = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    async with engine.connect() as conn, conn.begin():
        await conn.run_sync(to_0006)
        await conn.execute(
            text(
                "INSERT INTO dbops_baselines (target, kind, taken_at, counts)"
                " VALUES ('db', 'hourly', :at, :counts)"
            ),
            {
                "at": taken if backend == "postgresql" else "2026-12-01 09:00:00.000000",
                "counts": '{"users": 50, "submissions": 70}',
            },
        )
    await engine.dispose()
    store = await open_store(url)
    try:
        (old,) = await StoreBaselines(store).all("db")
        assert old.counts_only and old.db_now is None and old.tables == {}
        assert old.critical is None and old.flagged is None
        assert dict(old.counts) == {"users": 50, "submissions": 70}
        assert old.taken_at == taken
        assert await StoreBaselines(store).latest("db") == old  # not flagged
    finally:
        await store.close()
