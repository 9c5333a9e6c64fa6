"""`/db recover` after the guide's data-loss scenario on a production-sized LEAPS database:
the verification's time against the guide's own validation SQL, and how much the recovery
steps bring back of what was lost.

On an embedded PostgreSQL holding the scale fixture (`bench/scale.py`: by default 100,000
users, 1,000,000 submissions, 2,000,000 ledger rows), this

1. gives every webhook LEARN award of the fixture the processed Kajabi event it came from
   (tag "LEAPS Learn Complete", matched to its user, with its `learn_tag_grants` row): the
   scale fixture's own events are newsletter tags only;
2. takes a baseline (`commands.recover.take_baseline`, into a SQLite state store);
3. deletes `--pct` % of users' submissions and ledger rows (`FaultInjector.data_loss`), a
   tenth of them losing their account too (their sign-up audit rows stay), and leaves
   `--unmatched` of their processed Kajabi events unmatched by e-mail case;
4. times, warm (one untimed run first), median of `--runs`: the verification
   (`commands.recover.measure`, three read-only transactions side by side, as `/db recover`
   reads) and the guide's `post_recovery_validation.sql`, read at run time from
   `../shared/guide-sql/` and run as written (both statements, every row fetched);
5. plans and applies each recovery step in order through the real executor, as an ADMIN
   of the fixture, timing each, and verifies again.

`recovered_pct` is the share of the lost rows (users, submissions, ledger rows) that are
back; the line before it says what the sources allow and why the rest cannot come back.

    python bench/recover.py [--users 100000] [--pct 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale import scale_database  # noqa: E402
from timing import median_s  # noqa: E402  (this directory: python bench/...)

from bot.approvals.executor import Executor  # noqa: E402
from bot.gateway import TargetGateway  # noqa: E402
from bot.router import RunContext  # noqa: E402
from bot.state import open_store  # noqa: E402
from bot.state.baselines import StoreBaselines  # noqa: E402
from commands.base import LeapsIdentity, Thresholds  # noqa: E402
from commands.fixture.faults import FaultInjector  # noqa: E402
from commands.recover import measure, recover, take_baseline  # noqa: E402
from commands.remedies.base import REMEDIES  # noqa: E402

GUIDE_FILE = ROOT.parent / "shared" / "guide-sql" / "post_recovery_validation.sql"
STEPS = ("recover-users", "rematch-kajabi", "recover-learn", "reconcile-points", "refresh-views")
LEARN_TAG = "LEAPS Learn Complete"

# The Kajabi event behind each webhook LEARN award of the scale fixture (its ledger row
# carries the event id), as the webhook handler would have stored it.
_LEARN_EVENTS_SQL = """
INSERT INTO kajabi_events (id, received_at, payload, processed_at, user_match, event_id,
                           tag_name_raw, tag_name_norm, contact_id, email, created_at_utc,
                           status, raw)
SELECT 'kl' || l.id, l.created_at - interval '5 seconds', p.pl, l.created_at, u.id,
       l.external_event_id, %(tag)s::text, lower(%(tag)s::text), u.kajabi_contact_id, u.email,
       (l.created_at - interval '5 seconds') AT TIME ZONE 'UTC', 'processed', p.pl
  FROM points_ledger AS l JOIN users AS u ON u.id = l.user_id
 CROSS JOIN LATERAL (SELECT jsonb_build_object('event', 'contact.tagged',
        'id', l.external_event_id, 'contact', jsonb_build_object('email', u.email),
        'tag', jsonb_build_object('name', %(tag)s::text)) AS pl) AS p
 WHERE l.external_source = 'kajabi' AND l.activity_code = 'LEARN'
"""
_GRANTS_SQL = """
INSERT INTO learn_tag_grants (id, user_id, tag_name, kajabi_event_id, granted_at)
SELECT 'g' || e.id, e.user_match, lower(%(tag)s::text), e.id, e.processed_at
  FROM kajabi_events AS e WHERE e.id LIKE 'kl%%'
"""
_COUNTS_SQL = """
SELECT (SELECT count(*) FROM users) AS users,
       (SELECT count(*) FROM submissions) AS submissions,
       (SELECT count(*) FROM points_ledger) AS ledger_rows
"""


async def one_row(dsn: str, query: str, params: Any = None) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query.encode(), params)
        row = await cur.fetchone()
        assert row is not None and cur.description is not None
        return {d.name: v for d, v in zip(cur.description, row, strict=True)}


async def webhook_learners(dsn: str) -> set[str]:
    """Users whose LEARN a Kajabi webhook awarded, read before the loss: what the processed
    events can prove, measured apart from the remedy that reads them."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT DISTINCT user_id FROM points_ledger WHERE external_source = 'kajabi'"
        )
        return {str(r[0]) for r in await cur.fetchall()}


async def run_guide(dsn: str, text: str) -> list[list[Any]]:
    """The guide's file as written, every statement's rows fetched."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(text.encode())
        results = [await cur.fetchall()]
        while cur.nextset():
            results.append(await cur.fetchall())
        return results


async def bench(dsn: str, pct: float, unmatched: int, runs: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(_LEARN_EVENTS_SQL, {"tag": LEARN_TAG})
        await conn.execute(_GRANTS_SQL, {"tag": LEARN_TAG})
        await conn.execute("ANALYZE kajabi_events, learn_tag_grants")
    gateway = TargetGateway(dsn, check_timeout_ms=60_000, pool_max_size=4)
    state_dir = tempfile.mkdtemp(prefix="dbops-recover-bench-")
    store = await open_store(f"sqlite:///{state_dir}/state.sqlite3")
    ctx = RunContext(gateway, Thresholds(), baselines=StoreBaselines(store))
    try:
        base = await take_baseline(ctx)
        assert base is not None
        before = await one_row(dsn, _COUNTS_SQL)
        webhook = await webhook_learners(dsn)
        async with FaultInjector(dsn) as faults:
            n_users = round(before["users"] * pct / 100)
            loss = await faults.data_loss(pct=pct, accounts=n_users // 10, unmatched=unmatched)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("ANALYZE")
        lost = await one_row(dsn, _COUNTS_SQL)
        learners = len(webhook & set(loss.users))
        print(
            f"data loss: {len(loss.users):,} users lost {loss.submissions:,} submissions and "
            f"{loss.ledger_rows:,} ledger rows, {len(loss.accounts):,} of them their account; "
            f"{len(loss.unmatched_events)} events unmatched; {len(webhook):,} users had a "
            "webhook LEARN award before"
        )

        guide = GUIDE_FILE.read_text(encoding="utf-8")
        verify_s = await median_s(lambda: measure(ctx), runs)
        guide_s = await median_s(lambda: run_guide(dsn, guide), runs)
        started = time.perf_counter()
        report = await recover(ctx, ["--dry-run"])
        dry_run_s = time.perf_counter() - started
        print(f"/db recover --dry-run (verification + every step planned): {dry_run_s:.2f} s")
        for f in report.findings:
            print(f"  [{f.status.value}] {f.check}: {f.summary}"[:200])

        admin = await one_row(dsn, "SELECT id FROM users WHERE role = 'ADMIN' ORDER BY id LIMIT 1")
        identity = LeapsIdentity(str(admin["id"]), "ADMIN", "bench")
        executor = Executor(dsn, statement_timeout_ms=600_000)
        step_s: dict[str, float] = {}
        for name in STEPS:
            remedy = REMEDIES[name]
            started = time.perf_counter()
            plan = await remedy.plan(ctx, [])
            state, outcome = await executor.apply(remedy, plan, f"bench_{name}", identity)
            step_s[name] = time.perf_counter() - started
            line = f"  {name}: {state}, {outcome.affected:,} rows, {step_s[name]:.2f} s; "
            print((line + outcome.summary)[:240])
        after = await one_row(dsn, _COUNTS_SQL)
        final = await recover(ctx, ["--dry-run"])
        for f in final.findings:
            if f.check.startswith("count: ") or f.check.startswith("step: "):
                print(f"  after: [{f.status.value}] {f.check}: {f.summary}"[:200])

        keys = ("users", "submissions", "ledger_rows")
        lost_rows = sum(before[k] - lost[k] for k in keys)
        back_rows = sum(after[k] - lost[k] for k in keys)
        # What the sources hold: the sign-ups in audit_log, and for each lost user with a
        # processed LEARN-tag event one LEARN submission and its award.
        allowed = len(loss.accounts) + 2 * learners
        recovered_pct = 100.0 * back_rows / lost_rows if lost_rows else 100.0
        allowed_pct = 100.0 * allowed / lost_rows if lost_rows else 100.0
        print(
            f"lost {lost_rows:,} rows (users {before['users'] - lost['users']:,}, submissions "
            f"{before['submissions'] - lost['submissions']:,}, ledger "
            f"{before['ledger_rows'] - lost['ledger_rows']:,}); back {back_rows:,}; the sources "
            f"allow {allowed:,} ({allowed_pct:.1f} %): {len(loss.accounts):,} sign-ups in "
            f"audit_log, {learners:,} LEARN submissions proven by processed Kajabi events "
            "and their awards; no source holds the other submissions (EXPLORE, AMPLIFY, "
            "PRESENT, SHINE, form LEARN) or the corrections and claw-backs of the ledger"
        )
        print(
            "steps_s "
            + " ".join(f"{k}={v:.2f}" for k, v in step_s.items())
            + f" dry_run_s={dry_run_s:.2f}"
        )
        print(
            f"BENCH recover verify_s={verify_s:.2f} guide_verify_s={guide_s:.2f} "
            f"recovered_pct={recovered_pct:.1f}"
        )
    finally:
        await gateway.close()
        await store.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=100_000, help="scale: 10 submissions a user")
    ap.add_argument("--pct", type=float, default=2.0, help="percent of users who lose their rows")
    ap.add_argument("--unmatched", type=int, default=50, help="events left unmatched by case")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each (median reported)")
    args = ap.parse_args()
    async with scale_database("leaps_recover_bench", users=args.users) as (dsn, _counts):
        await bench(dsn, args.pct, args.unmatched, args.runs)


if __name__ == "__main__":
    asyncio.run(main())
