"""`/db integrity` on a big LEAPS database: its time against the guide's SQL and a plain scan,
and whether each reports the injected faults exactly.

On an embedded PostgreSQL holding the scale fixture (`bench/scale.py`: by default 100,000
users, 1,000,000 submissions, 2,000,000 ledger rows) with each fault kind injected
`--faults` times, this times, warm (one untimed pass first), median of `--runs`:

(a) the bot's `/db integrity` through the real router and gateway, as a Slack command runs
    it (the dispatcher's coalescing window is set to 0 so that every run really queries);
(b) the operators' guide's own SQL for the same checks, read at run time from
    `../shared/guide-sql/` (relative to the repository root) and run as written, one file
    after the other, fetching every row;
(c) one `SELECT count(*)` over each table the checks read, one after the other;
(d) the bare `GROUP BY user_id` of points_ledger and then of submissions, every row fetched:
    an index-only grouping that no reconciliation can match (`group_s`, `ratio_to_group`);
(e) the bot's reconciliation alone (`bot_points_s`): the pass of `/db integrity` that makes
    the points findings (`commands.integrity._run_pass`, with the orphan and duplicate
    findings it derives from the same per-user aggregates; not the attachment and foreign
    key checks), against (f) what any exact reconciliation must at least compute
    (`needed_s`), run at once on two connections as the pass runs its ranges two at a
    time: the ledger's `sum(delta_points)` per user and activity, and the submissions'
    approved count and AMPLIFY payload sums per user and activity (the keys the live quota
    function reads), each in one statement with the pass's own session settings (work_mem,
    no JIT, no parallel workers), every group computed and counted on the server.
    `ratio_to_needed` = bot_points_s / needed_s, the server CPU ratio beside it. (e) and
    (f) alternate run by run, so that the machine's neighbours weigh on both alike; the
    longest single check (one transaction, one statement for each range of users) of
    the pass is printed as `longest_check_s`.

Beside each median wall time it prints the server CPU seconds the run cost (all of the
server's processes, parallel workers included; `bench.scale.ServerCpu`): on a machine
whose two cores other work shares, wall time also measures the neighbours.

Then it compares answers per fault kind with what was injected (the definitions are in
`bench.scale.inject_faults`), and times `/db quota <handle>` for random handles.

    python bench/integrity.py [--users 100000] [--faults 25] [--runs 3]
    python bench/integrity.py --dsn postgresql://...   # a database kept by scale.py --keep
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale import (  # noqa: E402  (this directory: python bench/integrity.py)
    FAULT_COUNT_SQL,
    FAULT_KINDS,
    ServerCpu,
    expected_findings,
    scale_database,
)

from bot.gateway import TargetGateway  # noqa: E402
from bot.router import Dispatcher, RunContext  # noqa: E402
from commands import integrity as ig  # noqa: E402
from commands.base import Finding, Report, Status, Thresholds  # noqa: E402

GUIDE_DIR = ROOT.parent / "shared" / "guide-sql"
# Guide file per fault kind; the three point kinds share point_mismatch.sql.
GUIDE_FILES: tuple[str, ...] = (
    "orphaned_submissions",
    "orphaned_points",
    "orphaned_attachments",
    "duplicate_learn",
    "duplicate_external_events",
    "point_mismatch",
)
# Tables the checks read, for the scan baseline.
SCANNED_TABLES: tuple[str, ...] = (
    "users",
    "activities",
    "submissions",
    "submission_attachments",
    "points_ledger",
)
# The bot's findings per fault kind (their counts are added up).
BOT_FINDINGS: dict[str, tuple[str, ...]] = {
    "orphan_submissions": (
        "orphans: submissions without a user",
        "orphans: submissions without an activity",
    ),
    "orphan_ledger_rows": (
        "orphans: ledger rows without a user",
        "orphans: ledger rows without an activity",
    ),
    "orphan_attachments": ("orphans: attachments without a submission",),
    "duplicate_learn": ("duplicate LEARN submissions",),
    "duplicate_external_events": ("duplicate external_event_id",),
    "missing_awards": ("points: missing awards",),
    "extra_awards": ("points: extra awards",),
    "point_differences": ("points: differences",),
    "negative_totals": ("points: negative totals",),
}
# The floor: what any exact per-user reconciliation must at least do to each big table.
GROUP_SQL: tuple[str, ...] = (
    "SELECT user_id, count(*) FROM points_ledger GROUP BY user_id",
    "SELECT user_id, count(*) FROM submissions GROUP BY user_id",
)
# What any exact reconciliation must compute (see the docstring's (f)): each aggregate
# counted on the server so that every group is made and none is shipped. `%(peers)s` and
# `%(students)s` are the payload keys the live quota function reads.
NEEDED_SQL: tuple[str, ...] = (
    "SELECT count(*), sum(q.pts) FROM (SELECT user_id, activity_code,"
    " sum(delta_points) AS pts FROM points_ledger GROUP BY user_id, activity_code) AS q",
    "SELECT count(*), sum(q.approved), sum(q.amplify) FROM (SELECT user_id, activity_code,"
    " count(*) FILTER (WHERE status = 'APPROVED') AS approved,"
    " sum(2 * (payload ->> %(peers)s)::int + (payload ->> %(students)s)::int)"
    "   FILTER (WHERE status = 'APPROVED' AND activity_code = 'AMPLIFY') AS amplify"
    " FROM submissions GROUP BY user_id, activity_code) AS q",
)
QUOTA_RUNS = 200


def load_commands() -> bool:
    """Register the integrity and quota commands (whether or not the package imports
    them yet); returns whether `/db quota` exists."""
    importlib.import_module("commands.integrity")
    try:
        importlib.import_module("commands.quota")
    except ModuleNotFoundError:
        return False
    return True


# ------------------------------------------------------------------------------ bot


def finding_counts(report: Report) -> dict[str, int | None]:
    """Count per fault kind from the report: the first number of each finding's summary,
    0 for an OK finding, None when a finding is missing, skipped or failed."""
    by_name = {f.check: f for f in report.findings}
    out: dict[str, int | None] = {}
    for kind, names in BOT_FINDINGS.items():
        total: int | None = 0
        for name in names:
            finding = by_name.get(name)
            if finding is None or finding.status in (Status.SKIPPED, Status.ERROR):
                total = None
                break
            if finding.status is Status.OK:
                continue
            match = re.search(r"-?\d+", finding.summary)
            if match is None or total is None:
                total = None
                break
            total += int(match.group())
        out[kind] = total
    return out


# ---------------------------------------------------------------------------- guide


def guide_sql(where: Path = GUIDE_DIR) -> dict[str, str]:
    """The guide's files, as written; read at run time, never copied."""
    if not where.is_dir():
        raise SystemExit(f"the operators' guide SQL is not at {where} (see --guide-dir)")
    return {name: (where / f"{name}.sql").read_text(encoding="utf-8") for name in GUIDE_FILES}


async def run_guide(conn: psycopg.AsyncConnection[Any], files: dict[str, str]) -> dict[str, Any]:
    """Run every file in turn, fetching all rows; returns rows per file."""
    out: dict[str, Any] = {}
    for name, text in files.items():
        cur = await conn.execute(text.encode())
        out[name] = await cur.fetchall()
    return out


def guide_counts(rows: dict[str, Any]) -> dict[str, int | None]:
    """Count per fault kind from the guide's rows: distinct ids for the orphan queries, one
    per row for the grouped ones; point_mismatch rows split by their expected and actual
    points into missing (nothing in the ledger), extra (nothing expected) and differences.
    The guide has no query for negative totals."""
    missing = extra = diff = 0
    for _user, _activity, expected, actual, _difference in rows["point_mismatch"]:
        if int(actual) == 0 and int(expected) > 0:
            missing += 1
        elif int(expected) == 0:
            extra += 1
        else:
            diff += 1
    return {
        "orphan_submissions": len({r[0] for r in rows["orphaned_submissions"]}),
        "orphan_ledger_rows": len({r[0] for r in rows["orphaned_points"]}),
        "orphan_attachments": len({r[0] for r in rows["orphaned_attachments"]}),
        "duplicate_learn": len({r[0] for r in rows["duplicate_learn"]}),
        "duplicate_external_events": len({r[0] for r in rows["duplicate_external_events"]}),
        "missing_awards": missing,
        "extra_awards": extra,
        "point_differences": diff,
        "negative_totals": None,
    }


# ----------------------------------------------------------------------------- scan


async def run_group(conn: psycopg.AsyncConnection[Any]) -> int:
    """The floor, one table after the other, every row fetched; returns the groups."""
    groups = 0
    for query in GROUP_SQL:
        cur = await conn.execute(query)
        groups += len(await cur.fetchall())
    return groups


async def open_needed(dsn: str) -> list[psycopg.AsyncConnection[Any]]:
    """One connection per aggregate, with the pass's own session settings."""
    conns = []
    for _ in NEEDED_SQL:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name="bench-needed"
        )
        await conn.execute(
            "SELECT set_config('work_mem', %s, false), set_config('jit', 'off', false),"
            " set_config('max_parallel_workers_per_gather', %s, false)",
            (ig.WORK_MEM, str(ig.PARALLEL_WORKERS)),
        )
        conns.append(conn)
    return conns


async def run_needed(conns: list[psycopg.AsyncConnection[Any]], keys: tuple[str, str]) -> list[Any]:
    """The two aggregates at once, one on each connection."""

    async def one(conn: psycopg.AsyncConnection[Any], query: str) -> Any:
        cur = await conn.execute(query.encode(), {"peers": keys[0], "students": keys[1]})
        return await cur.fetchone()

    return list(await asyncio.gather(*(one(c, q) for c, q in zip(conns, NEEDED_SQL, strict=True))))


class CheckTimes:
    """The wall time of every check (one transaction) a gateway runs: the longest is the
    longest statement of the pass, each range of users being one statement."""

    def __init__(self, gateway: TargetGateway) -> None:
        self.longest = 0.0
        self.name = ""
        run_check = gateway.run_check

        async def timed_check(name: str, check: Any) -> Finding:
            started = time.perf_counter()
            try:
                return await run_check(name, check)
            finally:
                took = time.perf_counter() - started
                if took > self.longest:
                    self.longest, self.name = took, name

        gateway.run_check = timed_check  # type: ignore[method-assign]


async def run_scan(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for table in SCANNED_TABLES:
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        row = await cur.fetchone()
        out[table] = int(row[0]) if row else 0
    return out


# ---------------------------------------------------------------------------- timing


@dataclass
class Timed:
    seconds: list[float]
    last: Any
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else math.nan


async def timed(
    fn: Callable[[], Awaitable[Any]], runs: int, server: ServerCpu | None = None
) -> Timed:
    """One untimed warm-up call, then `runs` timed ones (and the server CPU of each)."""
    return (await alternating([fn], runs, server))[0]


async def alternating(
    fns: list[Callable[[], Awaitable[Any]]], runs: int, server: ServerCpu | None = None
) -> list[Timed]:
    """One untimed warm-up call of each, then `runs` rounds of one timed call of each in
    turn (and the server CPU of each)."""
    out = [Timed([], await fn(), []) for fn in fns]
    for _ in range(runs):
        for fn, t in zip(fns, out, strict=True):
            cpu_before = server.seconds() if server else 0.0
            started = time.perf_counter()
            t.last = await fn()
            t.seconds.append(time.perf_counter() - started)
            if server:
                t.cpu.append(server.seconds() - cpu_before)
    return out


async def quota_p50_ms(dispatcher: Dispatcher, dsn: str, runs: int, seed: int) -> float:
    """p50 of `/db quota <handle>` for random participant handles (one warm-up first)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT handle FROM users WHERE role = 'PARTICIPANT'")
        handles = [str(r[0]) for r in await cur.fetchall()]
    rng = random.Random(seed)
    picks = [rng.choice(handles) for _ in range(runs + 1)]
    report = await dispatcher.run(f"quota {picks[0]}")
    if not isinstance(report, Report):
        raise SystemExit(f"/db quota did not answer with a report: {report!r}")
    latencies: list[float] = []
    for handle in picks[1:]:
        started = time.perf_counter()
        await dispatcher.run(f"quota {handle}")
        latencies.append((time.perf_counter() - started) * 1000)
    return statistics.median(latencies)


# ------------------------------------------------------------------------------ main


async def injected_counts(dsn: str) -> dict[str, int]:
    """What the database holds per fault kind, by the scale fixture's own definitions."""
    out: dict[str, int] = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for kind in FAULT_KINDS:
            cur = await conn.execute(FAULT_COUNT_SQL[kind].encode())
            row = await cur.fetchone()
            out[kind] = int(row[0]) if row else 0
    return out


def _fmt(value: int | None) -> str:
    return "-" if value is None else str(value)


async def bench(
    dsn: str, injected: dict[str, int], runs: int, seed: int, guide_dir: Path = GUIDE_DIR
) -> None:
    has_quota = load_commands()
    files = guide_sql(guide_dir)
    server = await ServerCpu.of(dsn)
    expected = expected_findings(injected)
    gateway = TargetGateway(dsn, check_timeout_ms=600_000, pool_max_size=4)
    # A zero coalescing window: every run is a real run, not a share of the previous one.
    dispatcher = Dispatcher(RunContext(gateway, Thresholds()), coalesce_s=0.0)
    try:

        async def bot() -> Report:
            result = await dispatcher.run("integrity")
            if not isinstance(result, Report):
                raise SystemExit(f"/db integrity did not answer with a report: {result!r}")
            return result

        bot_t = await timed(bot, runs, server)
        keys = await gateway.read(ig.amplify_keys)
        needed_conns = await open_needed(dsn)
        checks = CheckTimes(gateway)
        try:
            points_t, needed_t = await alternating(
                [lambda: ig._run_pass(gateway), lambda: run_needed(needed_conns, keys)],
                runs,
                server,
            )
        finally:
            for conn in needed_conns:
                await conn.close()
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name="bench-guide"
        ) as conn:
            guide_t = await timed(lambda: run_guide(conn, files), runs, server)
            scan_t = await timed(lambda: run_scan(conn), runs, server)
            group_t = await timed(lambda: run_group(conn), runs, server)
        p50: float = math.nan
        if has_quota:
            p50 = await quota_p50_ms(dispatcher, dsn, QUOTA_RUNS, seed)
    finally:
        await gateway.close()

    bot_counts = finding_counts(bot_t.last)
    g_counts = guide_counts(guide_t.last)
    print(f"\n{'check':28} {'injected':>9} {'expected':>9} {'bot':>9} {'guide':>9}  bot guide")
    bot_ok = guide_ok = 0
    for kind in FAULT_KINDS:
        b, g, e = bot_counts[kind], g_counts[kind], expected[kind]
        bot_ok += b == e
        guide_ok += g == e
        print(
            f"{kind:28} {injected[kind]:>9} {e:>9} {_fmt(b):>9} {_fmt(g):>9}  "
            f"{'ok' if b == e else 'NO':>3} {'ok' if g == e else ('n/a' if g is None else 'NO'):>5}"
        )
    n = len(FAULT_KINDS)
    print(
        "\nexpected = injected, plus one point difference per negative total "
        "(bench/scale.py: expected_findings)"
    )
    print(
        "guide: no query for negative totals; point_mismatch rows split into missing "
        "(ledger 0), extra (expected 0) and differences"
    )
    for label, t in (
        ("bot /db integrity", bot_t),
        ("guide SQL", guide_t),
        ("count(*) scan", scan_t),
        ("GROUP BY user_id", group_t),
        ("bot reconciliation", points_t),
        ("needed aggregates", needed_t),
    ):
        each = ", ".join(f"{s:.2f}" for s in t.seconds)
        cpu = f"  server CPU median {t.cpu_median:.2f} s" if t.cpu else ""
        print(f"{label:20} median {t.median:.2f} s  (runs: {each}){cpu}")
    print(f"scanned rows: {scan_t.last}")
    print(
        f"longest check of the reconciliation: {checks.longest:.2f} s ({checks.name}); "
        f"needed groups (ledger, submissions): {[int(r[0]) for r in needed_t.last]}"
    )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end (1/5/15 min, {os.cpu_count()} CPUs): {load}")
    if not has_quota:
        print("commands/quota.py does not exist: no quota timing")
    bot_s, guide_s, scan_s = bot_t.median, guide_t.median, scan_t.median
    group_s = group_t.median
    points_s, needed_s = points_t.median, needed_t.median
    cpu = ""
    if server:
        bot_c, guide_c, group_c = bot_t.cpu_median, guide_t.cpu_median, group_t.cpu_median
        points_c, needed_c = points_t.cpu_median, needed_t.cpu_median
        cpu = (
            f" bot_cpu_s={bot_c:.2f} guide_cpu_s={guide_c:.2f} group_cpu_s={group_c:.2f}"
            f" cpu_ratio_to_group={bot_c / group_c:.2f} cpu_speedup_vs_guide={guide_c / bot_c:.2f}"
            f" bot_points_cpu_s={points_c:.2f} needed_cpu_s={needed_c:.2f}"
        )
    cpu_needed = (
        f" cpu_ratio_to_needed={points_t.cpu_median / needed_t.cpu_median:.2f}" if server else ""
    )
    print(
        f"BENCH integrity bot_s={bot_s:.2f} guide_s={guide_s:.2f} scan_s={scan_s:.2f} "
        f"ratio_to_scan={bot_s / scan_s:.2f} speedup_vs_guide={guide_s / bot_s:.2f} "
        f"group_s={group_s:.2f} ratio_to_group={bot_s / group_s:.2f} "
        f"bot_points_s={points_s:.2f} needed_s={needed_s:.2f} "
        f"ratio_to_needed={points_s / needed_s:.2f}{cpu_needed} "
        f"longest_check_s={checks.longest:.2f} "
        f"bot_correct={bot_ok}/{n} guide_correct={guide_ok}/{n}{cpu}"
    )
    print(f"BENCH quota p50_ms={p50:.1f}" if not math.isnan(p50) else "BENCH quota p50_ms=nan")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dsn", help="a database built by bench/scale.py (--keep); else build one")
    ap.add_argument("--users", type=int, default=100_000, help="scale: 10 submissions a user")
    ap.add_argument("--faults", type=int, default=25, help="how many of each fault kind")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--guide-dir",
        type=Path,
        default=GUIDE_DIR,
        help=f"the operators' guide SQL (default {GUIDE_DIR}: beside the repository)",
    )
    args = ap.parse_args()
    if args.dsn:
        injected = await injected_counts(args.dsn)
        await bench(args.dsn, injected, args.runs, args.seed, args.guide_dir)
        return
    async with scale_database(
        "leaps_integrity_bench",
        users=args.users,
        faults=dict.fromkeys(FAULT_KINDS, args.faults),
        seed=args.seed,
    ) as (dsn, counts):
        injected = {kind: counts[f"fault:{kind}"] for kind in FAULT_KINDS}
        await bench(dsn, injected, args.runs, args.seed, args.guide_dir)


if __name__ == "__main__":
    asyncio.run(main())
