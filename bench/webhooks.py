"""`/db webhooks` and `reprocess-webhooks` on a scaled LEAPS database, against baselines
measured in the same run.

On an embedded PostgreSQL holding the scale fixture (`bench/scale.py`, `--users` users,
10 submissions, 20 ledger rows and one Kajabi event each) with webhook faults injected
(`--backlog` unprocessed events from unknown addresses, `--learners` unprocessed LEARN
events of users, `--dupes` repeated payloads),
this times, warm, median of `--runs`:

(a) the bot's `/db webhooks`, whole (its repeated-external_event_id finding is
    `/db integrity`'s cheap check: here, with the unique index standing, a catalog read);
(b) the same command's four webhook checks alone (without that finding), and that
    finding alone beside `/db integrity`'s whole aggregate pass, which it used to run
    (`--ledger-dupes N` drops the unique index and repeats N event ids, so the check
    has to scan);
(c) the operators' guide's `duplicate_external_events.sql`, read at run time from
    `../shared/guide-sql/` and run as written (the guide's only webhook query kept there);
(d) `reprocess-webhooks` on the backlog through the executor (a savepoint, an award
    attempt and an update per event), applied once on a copy of the database, against
(e) one set-based UPDATE marking the same events processed, rolled back: the floor of
    touching those rows at all;
(f) `reprocess-webhooks`' plan (its survey reads which keys the ledger holds) against
    one pass counting the ledger's rows that carry an external_event_id: without the
    unique index (`--ledger-dupes`) the survey should cost about that pass, not a pass
    per event.

    python bench/webhooks.py [--users 20000] [--backlog 1000] [--learners 200] [--dupes 100]
                             [--ledger-dupes 0] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from functools import partial
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale import SCALE_SERVER_SETTINGS, build_scale_fixture  # noqa: E402
from timing import median_s  # noqa: E402  (this directory: python bench/...)

import commands  # noqa: E402, F401  (registers the commands and remedies)
from bot.approvals.executor import Executor  # noqa: E402
from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.gateway import TargetGateway  # noqa: E402
from bot.router import RunContext  # noqa: E402
from commands import webhooks as wh  # noqa: E402
from commands.base import Report, Thresholds  # noqa: E402
from commands.fixture.faults import FaultInjector  # noqa: E402
from commands.integrity import _pass_findings, check_duplicate_events  # noqa: E402
from commands.remedies.base import Plan  # noqa: E402
from commands.remedies.webhooks import REPROCESS_WEBHOOKS  # noqa: E402

GUIDE_SQL = ROOT.parent / "shared" / "guide-sql" / "duplicate_external_events.sql"


async def bench(dsn: str, copy_dsn: str, runs: int) -> None:
    gateway = TargetGateway(dsn)
    ctx = RunContext(gateway, Thresholds())
    guide = GUIDE_SQL.read_text()

    async def whole() -> Report:
        return await wh.webhooks(ctx, [])

    async def checks_only() -> None:
        t = ctx.thresholds
        for name, check in (
            (wh.UNPROCESSED, wh.check_unprocessed),
            (wh.ALERT, wh.check_alert),
            (wh.EMAILS, wh.check_emails),
            (wh.DUPLICATES, wh.check_duplicates),
        ):
            await gateway.run_check(name, partial(check, t))

    async def guide_dup() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await (await conn.execute(guide.encode())).fetchall()

    report = await whole()
    for f in report.findings:
        print(f"  {f.status.value:5} {f.check}: {f.summary}")
    whole_s = await median_s(whole, runs)
    checks_s = await median_s(checks_only, runs)
    guide_s = await median_s(guide_dup, runs)

    async def dup_check() -> None:
        await gateway.run_check("dup", check_duplicate_events)

    async def whole_pass() -> None:
        await gateway.read(_pass_findings)

    dup_s = await median_s(dup_check, runs)
    pass_s = await median_s(whole_pass, runs)
    print(
        f"BENCH webhooks bot_s={whole_s:.3f} checks_s={checks_s:.3f} guide_dup_s={guide_s:.3f} "
        f"ratio_bot_guide={whole_s / guide_s:.2f} ratio_checks_guide={checks_s / guide_s:.2f} "
        f"dup_check_s={dup_s:.3f} integrity_pass_s={pass_s:.3f} "
        f"ratio_pass_dup={pass_s / max(dup_s, 1e-6):.1f}"
    )
    await gateway.close()

    copy_gw = TargetGateway(copy_dsn)
    copy_ctx = RunContext(copy_gw, Thresholds())

    async def plan_once() -> Plan:
        return await REPROCESS_WEBHOOKS.plan(copy_ctx, [])

    async def ledger_pass() -> None:
        await copy_gw.read(
            lambda db: db.fetch(
                "SELECT count(*) AS n FROM points_ledger WHERE external_event_id IS NOT NULL"
            )
        )

    plan_s = await median_s(plan_once, runs)
    pass_s = await median_s(ledger_pass, runs)
    plan = await plan_once()
    ids = list(plan.data["ids"])
    async with await psycopg.AsyncConnection.connect(copy_dsn) as conn:
        started = time.perf_counter()
        await conn.execute(
            "UPDATE kajabi_events SET processed_at = now() AT TIME ZONE 'UTC',"
            " user_match = 'NO_USER_FOUND' WHERE id = ANY(%s) AND processed_at IS NULL",
            (ids,),
        )
        floor_s = time.perf_counter() - started
        await conn.rollback()
    started = time.perf_counter()
    state, outcome = await Executor(copy_dsn).apply(REPROCESS_WEBHOOKS, plan, "bench")
    apply_s = time.perf_counter() - started
    await copy_gw.close()
    print(f"  reprocess-webhooks: {state}: {outcome.summary}")
    print(
        f"BENCH reprocess_webhooks events={len(ids)} apply_s={apply_s:.3f} "
        f"set_update_s={floor_s:.3f} ratio={apply_s / max(floor_s, 1e-6):.1f} "
        f"per_event_ms={1000 * apply_s / max(len(ids), 1):.2f} plan_s={plan_s:.3f} "
        f"ledger_pass_s={pass_s:.3f} ratio_plan_pass={plan_s / max(pass_s, 1e-6):.1f}"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--backlog", type=int, default=1_000)
    ap.add_argument("--dupes", type=int, default=100)
    ap.add_argument("--learners", type=int, default=200, help="unprocessed events that pay")
    ap.add_argument("--ledger-dupes", type=int, default=0, help="repeated external_event_ids")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    pg = EmbeddedPostgres(settings=SCALE_SERVER_SETTINGS)
    pg.start()
    try:
        dsn = pg.create_database("leaps_webhooks_bench")
        started = time.perf_counter()
        counts = await build_scale_fixture(
            dsn,
            users=args.users,
            submissions=args.users * 10,
            ledger=args.users * 20,
            kajabi=args.users,
            faults={"duplicate_external_events": args.ledger_dupes} if args.ledger_dupes else {},
            seed=0,
        )
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            # The scale fixture's events are newsletter tags and it grants no LEARN tag;
            # reprocess-webhooks reads the LEARN tag from learn_tag_grants, so give it one.
            await conn.execute(
                "INSERT INTO learn_tag_grants (id, user_id, tag_name)"
                " SELECT 'bench_grant', min(id), %s FROM users",
                (FaultInjector.KAJABI_LEARN_TAG.lower(),),
            )
        async with FaultInjector(dsn) as faults:
            await faults.unmatched_webhook_backlog(args.backlog)
            await faults.unprocessed_webhook_events(args.learners, old=args.learners // 2)
            await faults.duplicate_webhook_payloads(args.dupes)
        print(
            f"scale fixture: {counts['users']:,} users, {counts['points_ledger']:,} ledger "
            f"rows, {counts['kajabi_events']:,} Kajabi events + {args.backlog} unprocessed from "
            f"strangers, {args.learners} unprocessed LEARN events, "
            f"{args.dupes} repeated; built in {time.perf_counter() - started:.1f} s"
        )
        copy_dsn = pg.create_database("leaps_webhooks_copy", template="leaps_webhooks_bench")
        await bench(dsn, copy_dsn, args.runs)
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
