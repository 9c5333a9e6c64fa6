"""Every `/db` diagnostic, and the plan of every row-writing remedy, through the console's
path at production size (issue 16): how long each takes against the default per-check
timeout, which findings come back skipped, the bot process's peak memory, and what the
watchdog costs the database server.

Without `--dsn` this builds `bench/scale.py`'s database on an embedded PostgreSQL
(`SCALE_SERVER_SETTINGS`): `--users` users (default 100,000) with 10 submissions, 20 ledger
rows and one Kajabi event each, `--faults` (default 25) of every `FAULT_KINDS` fault, then
a few more so that every plan has work to do: one failed Prisma migration
(migration-resolve), a data loss of `--faults` users, a fifth of them losing their account,
their processed Kajabi events left unmatched (recover-users, rematch-kajabi,
rematch-emails), a processed "LEAPS Learn Complete" event and tag grant for each of those
still there (recover-learn), `--faults` Kajabi events delivered twice (dedupe-webhooks) and
`--faults` LEARN events waiting (reprocess-webhooks); then ANALYZE, the guide's
recommended indexes (`add_recommended_indexes`), and pg_stat_statements in schema
`extensions` as Supabase has it (`/db slow` reads it). With `--dsn` it uses that database
as it is, or adds the same first with `--prepare` (for a database `bench/scale.py --keep`
built: a 1M-user build takes about ten minutes, worth doing once). An argument a plan
refuses there, such as a migration that is not failed, is said and that plan left out.

The bot is the one the console builds (`bot.house.build_house` with the console's
frontend, a state store that keeps nothing) from default `Settings` (nothing read from
the environment or `.env`: `CHECK_TIMEOUT_MS` and every other limit at its default), with
one change: `COALESCE_S=0`, or identical diagnostics run back to back would share one run
and measure nothing. Before anything is timed, one watchdog tick and the hourly baseline
are taken as the bot takes them (`Watchdog.tick`, `House.take_baseline`), so
`recover --dry-run` has a baseline to compare with. Then, one command after the other:

- the diagnostics, as `python -m bot run "<words>"` runs them (`Dispatcher.run_command`):
  health, connections, views, integrity, quota <handle> (a different participant each
  run), recover --dry-run, migrations, slow, indexes, explain leaderboard, webhooks,
  roles, leaderboard, analytics, export ledger (the console's answer: the rows counted);
- `export_ledger_csv`: the CSV itself, streamed as `/db export ledger` streams it in Slack
  (`bot.slack.exports.write_csv` on the export's own connection) into /dev/null;
- the plan of every remedy whose apply writes LEAPS rows (those the approval engine tries
  before approval, `Remedy.preflight`, and the recovery runbook), as the approval engine
  plans (`remedy.plan(engine.ctx, args)`, bound by `runbook.bind` for the runbook): a
  dry run, never applied nor tried. restore-from-copy is left out: it needs a recovery
  copy (RECOVERY_DATABASE_URL).

Each gets one warm-up run, then `--runs` timed runs (`--only name,name` picks some by
their BENCH name). A finding is skipped when its check could not answer (timeout, lock,
missing privilege: `Status.SKIPPED`); a plan that fails that way counts as one skipped
finding. `skipped=` is the count in the command's worst timed run (the run with most),
and the line after it names that run's skipped (and errored) findings.

Last, the watchdog: the database server's CPU seconds (`ServerCpu`, the postmaster and its
children, from /proc) for one watchdog tick (the mean of 20 ticks) plus one hourly
baseline spread over its hour (its CPU x WATCHDOG_INTERVAL_S / BASELINE_INTERVAL_S, both at
their defaults), as a percentage of one core over WATCHDOG_INTERVAL_S. `n/a` when the
server is not a process of this machine.

    python bench/all_commands.py [--users 100000] [--dsn URL [--prepare]] [--runs 20] [--faults 25]
                                 [--only health,quota] [--keep]

`--keep` leaves the built server running at the end (until Ctrl-C or SIGTERM) and prints
its DSN, for `--dsn` next time. Output, one line per command, then the summary:

    BENCH command name=<words joined by _> users=N p50_ms= p95_ms= skipped=
    BENCH commands users=N worst_interactive_p95_to_timeout= skipped_total= max_rss_mb=
                   watchdog_cpu_pct=

`worst_interactive_p95_to_timeout` is the worst p95 among health, connections, views,
quota, migrations, slow, indexes, explain, webhooks and roles over CHECK_TIMEOUT_MS;
`max_rss_mb` the peak resident set of this process (`ru_maxrss`), which ran every command,
the CSV export included (the server is another process). It also drove the build, whose
work is the server's (set-based SQL); the line after the build gives the peak by then.

The file is not `bench/commands.py`, the name issue 16 gives it: a module of that name
beside the other benches is the `commands` package's twin for mypy (bench/ is a root of
top-level modules), which then checks nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale import (  # noqa: E402  (this directory: python bench/...)
    FAULT_KINDS,
    SCALE_SERVER_SETTINGS,
    ServerCpu,
    add_recommended_indexes,
    build_scale_fixture,
    keep_serving,
)
from timing import pct  # noqa: E402

from bot.approvals import runbook  # noqa: E402
from bot.console.console import console_frontend  # noqa: E402
from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.gateway import explain_db_error  # noqa: E402
from bot.house import House, build_house  # noqa: E402
from bot.incidents.watchdog import Watchdog  # noqa: E402
from bot.router import Answer, preflight  # noqa: E402
from bot.settings import Settings  # noqa: E402
from bot.slack.exports import claim, connect, write_csv  # noqa: E402
from commands.base import Report, Status, UsageError  # noqa: E402
from commands.export import parse as parse_export  # noqa: E402
from commands.fixture.faults import DEFAULT_MIGRATION, FaultInjector  # noqa: E402
from commands.fixture.seed import add_statement_statistics  # noqa: E402
from commands.remedies.base import REMEDIES, Remedy  # noqa: E402

DB = "leaps_commands_bench"
DEFAULT_USERS = 100_000
WATCHDOG_TICKS = 20  # ticks measured: the CPU clock counts in ticks of 10 ms
INTERACTIVE = (
    "health",
    "connections",
    "views",
    "quota",
    "migrations",
    "slow",
    "indexes",
    "explain",
    "webhooks",
    "roles",
)
# (BENCH name, the words after /db); quota's handle is filled in per run.
DIAGNOSTICS: tuple[tuple[str, str], ...] = (
    ("health", "health"),
    ("connections", "connections"),
    ("views", "views"),
    ("integrity", "integrity"),
    ("quota", "quota {handle}"),
    ("recover_dry-run", "recover --dry-run"),
    ("migrations", "migrations"),
    ("slow", "slow"),
    ("indexes", "indexes"),
    ("explain_leaderboard", "explain leaderboard"),
    ("webhooks", "webhooks"),
    ("roles", "roles"),
    ("leaderboard", "leaderboard"),
    ("analytics", "analytics"),
    ("export_ledger", "export ledger"),
)
CSV_EXPORT = "export_ledger_csv"
# Arguments of the row-writing remedies that take some (the others take none): chosen to
# have work to do on the faulted fixture. `{handle}` is a participant's handle.
REMEDY_ARGS: dict[str, tuple[str, list[str]]] = {
    "cleanup-orphans": ("cleanup-orphans_all", ["all"]),
    "migration-resolve": ("migration-resolve_rolled-back", [DEFAULT_MIGRATION, "--rolled-back"]),
    "set-role": ("set-role", ["{handle}", "REVIEWER"]),
}
NOT_PLANNED = {
    "restore-from-copy": "needs a recovery copy (RECOVERY_DATABASE_URL) to diff against",
}
LEARN_TAG = "LEAPS Learn Complete"


def default_settings(dsn: str) -> Settings:
    """Settings at their defaults, nothing read from the environment or `.env`, except the
    target and COALESCE_S=0 (a bench runs the same diagnostic back to back)."""
    return Settings.model_construct(database_url=dsn, coalesce_s=0.0)


def watchdog_pct(
    tick_cpu_s: float, baseline_cpu_s: float, interval_s: float, baseline_interval_s: float
) -> float:
    """The server's share of one core (%) a watchdog costs: one tick every `interval_s`,
    and a baseline every `baseline_interval_s` spread over the ticks of its interval."""
    per_tick = tick_cpu_s + baseline_cpu_s * interval_s / baseline_interval_s
    return 100.0 * per_tick / interval_s


def max_rss_mb() -> float:
    """The peak resident set of this process so far (Linux gives ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def picked(only: str | None, known: list[str]) -> list[str]:
    """The names `--only` asks for (all when not given); an unknown name is an error."""
    if not only:
        return known
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return [k for k in known if k in wanted]


# --------------------------------------------------------------------------- the database


async def add_command_faults(dsn: str, users: int, n: int) -> dict[str, int]:
    """Beyond the scale fixture's faults, work for the plans those leave idle (see the
    module's docstring). Returns what was made."""
    made: dict[str, int] = {}
    async with FaultInjector(dsn) as faults:
        await faults.failed_migration(DEFAULT_MIGRATION)
        made["failed_migration"] = 1
        loss = await faults.data_loss(
            pct=100.0 * n / users, accounts=max(1, n // 5), unmatched=n, kajabi_only=True
        )
    made["data_loss_users"] = len(loss.users)
    made["data_loss_accounts"] = len(loss.accounts)
    made["unmatched_events"] = len(loss.unmatched_events)
    still = [u for u in loss.users if u not in set(loss.accounts)]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "INSERT INTO kajabi_events (id, received_at, payload, processed_at, user_match,"
            " event_id, tag_name_raw, tag_name_norm, contact_id, email, created_at_utc,"
            " status, raw)"
            " SELECT 'fault_learn_' || u.id, rec, pl, rec + interval '3 seconds', u.id,"
            " 'kjb_learn_' || u.id, %(tag)s::text, lower(%(tag)s::text), u.kajabi_contact_id,"
            " u.email, rec AT TIME ZONE 'UTC', 'processed', pl"
            " FROM users AS u CROSS JOIN LATERAL (SELECT"
            "  (now() AT TIME ZONE 'UTC') - interval '30 days' AS rec,"
            "  jsonb_build_object('event', 'contact.tagged', 'id', 'kjb_learn_' || u.id,"
            "   'contact', jsonb_build_object('email', u.email),"
            "   'tag', jsonb_build_object('name', %(tag)s::text)) AS pl) AS p"
            " WHERE u.id = ANY(%(ids)s)",
            {"tag": LEARN_TAG, "ids": still},
        )
        made["learn_events"] = cur.rowcount
        await conn.execute(
            "INSERT INTO learn_tag_grants (id, user_id, tag_name, kajabi_event_id, granted_at)"
            " SELECT 'fault_grant_' || e.id, e.user_match, lower(%s::text), e.id,"
            " e.processed_at FROM kajabi_events AS e WHERE e.id LIKE 'fault\\_learn\\_%%'",
            (LEARN_TAG,),
        )
        cur = await conn.execute(
            "INSERT INTO kajabi_events (id, received_at, payload, processed_at, user_match,"
            " event_id, tag_name_raw, tag_name_norm, contact_id, email, created_at_utc,"
            " status, raw)"
            " SELECT 'fault_dup_' || e.id, e.received_at + interval '1 minute', e.payload,"
            " e.processed_at + interval '1 minute', e.user_match, e.event_id, e.tag_name_raw,"
            " e.tag_name_norm, e.contact_id, e.email, e.created_at_utc, e.status, e.raw"
            " FROM kajabi_events AS e WHERE e.id LIKE 'k%%' ORDER BY e.id LIMIT %s",
            (n,),
        )
        made["duplicate_events"] = cur.rowcount
        cur = await conn.execute(
            "INSERT INTO kajabi_events (id, received_at, payload, processed_at, user_match,"
            " event_id, tag_name_raw, tag_name_norm, contact_id, email, created_at_utc,"
            " status, raw)"
            " SELECT 'fault_wait_' || u.id, rec, pl, NULL, NULL, 'kjb_wait_' || u.id,"
            " %(tag)s::text, lower(%(tag)s::text), u.kajabi_contact_id, u.email,"
            " rec AT TIME ZONE 'UTC', 'received', pl"
            " FROM (SELECT * FROM users WHERE role = 'PARTICIPANT' ORDER BY id DESC"
            "       LIMIT %(n)s) AS u CROSS JOIN LATERAL (SELECT"
            "  (now() AT TIME ZONE 'UTC') - interval '2 hours' AS rec,"
            "  jsonb_build_object('event', 'contact.tagged', 'id', 'kjb_wait_' || u.id,"
            "   'contact', jsonb_build_object('email', u.email),"
            "   'tag', jsonb_build_object('name', %(tag)s::text)) AS pl) AS p",
            {"tag": LEARN_TAG, "n": n},
        )
        made["waiting_events"] = cur.rowcount
        await conn.execute("ANALYZE")
    return made


async def build(pg: EmbeddedPostgres, users: int, n_faults: int) -> str:
    dsn = pg.create_database(DB)
    started = time.perf_counter()
    counts = await build_scale_fixture(
        dsn,
        users=users,
        submissions=users * 10,
        ledger=users * 20,
        kajabi=users,
        faults=dict.fromkeys(FAULT_KINDS, n_faults) if n_faults else None,
    )
    print(
        f"scale fixture: {counts['users']:,} users, {counts['submissions']:,} submissions, "
        f"{counts['points_ledger']:,} ledger rows, {n_faults} of each fault kind, built in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    await prepare(dsn, users, n_faults)
    print(f"peak RSS of this process after the build: {max_rss_mb():.1f} MB", flush=True)
    return dsn


async def prepare(dsn: str, users: int, n_faults: int) -> None:
    """What the bench adds to the scale fixture: the plans' own faults, the recommended
    indexes, pg_stat_statements (also for a `--dsn` database built by bench/scale.py, with
    `--prepare`)."""
    started = time.perf_counter()
    if n_faults:
        made = await add_command_faults(dsn, users, n_faults)
        print(
            "faults for the plans: "
            + ", ".join(f"{k} {v}" for k, v in made.items())
            + f" (in {time.perf_counter() - started:.1f} s, ANALYZE included)",
            flush=True,
        )
    started = time.perf_counter()
    added = await add_recommended_indexes(dsn)
    print(
        f"recommended indexes added: {', '.join(added) or 'none (all present)'}"
        f" (in {time.perf_counter() - started:.1f} s)",
        flush=True,
    )
    # as Supabase has it: `/db slow` reads it, and its history holds what the build and the
    # bench ran
    if not await add_statement_statistics(dsn):
        print("pg_stat_statements is not preloaded on this server: `slow` will say so")


async def count_users(dsn: str) -> int:
    """The users of a given database (what `users=` says of it)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        row = await (await conn.execute("SELECT count(*) FROM users")).fetchone()
    return int(row[0]) if row else 0


async def participants(dsn: str, n: int) -> list[str]:
    """`n` handles of participants with submissions, spread by a hash (the same each run)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT u.handle FROM users AS u WHERE u.role = 'PARTICIPANT'"
            " AND u.handle IS NOT NULL"
            " AND EXISTS (SELECT 1 FROM submissions AS s WHERE s.user_id = u.id)"
            " ORDER BY md5(u.id) LIMIT %s",
            (n,),
        )
        found = [str(r[0]) for r in await cur.fetchall()]
    if not found:
        raise SystemExit("no participant with submissions in this database")
    return found


# ----------------------------------------------------------------------------- the runs


@dataclass
class Run:
    ms: float
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str = ""


class CannotRun(Exception):
    """The command refused its arguments here (a usage error): left out, and said why."""


Runner = Callable[[int], Awaitable[Run]]


@dataclass(frozen=True)
class Spec:
    name: str
    run: Runner  # the run's number (0: the warm-up)


def of_report(report: Report) -> tuple[list[str], list[str]]:
    skipped = [f"{f.check} ({f.summary})" for f in report.findings if f.status is Status.SKIPPED]
    errors = [f"{f.check} ({f.summary})" for f in report.findings if f.status is Status.ERROR]
    return skipped, errors


def failed(ms: float, what: str, exc: BaseException) -> Run:
    """A plan or export that raised: skipped when its check could not answer (timeout,
    lock, privilege), else an error, as the gateway would call a check's."""
    status, reason = explain_db_error(exc)
    line = f"{what} ({reason})"
    if status is Status.SKIPPED:
        return Run(ms, skipped=[line])
    return Run(ms, errors=[line])


def diagnostic(house: House, words: str, handles: list[str]) -> Runner:
    async def run(i: int) -> Run:
        text = words.format(handle=handles[i % len(handles)])
        pre = preflight(text)
        if isinstance(pre, Answer):
            raise CannotRun(pre.text)
        started = time.perf_counter()
        result = await house.dispatcher.run_command(*pre)
        ms = (time.perf_counter() - started) * 1000
        if not isinstance(result, Report):
            raise CannotRun(getattr(result, "text", str(result)))
        skipped, errors = of_report(result)
        return Run(ms, skipped, errors)

    return run


def plan_of(house: House, remedy: Remedy, args: list[str]) -> Runner:
    """As `ApprovalEngine.request` plans, and no further: no preflight, no approval."""

    async def run(_i: int) -> Run:
        engine = house.engine
        started = time.perf_counter()
        try:
            plan = await remedy.plan(engine.ctx, args)
            if remedy.runbook:
                plan = runbook.bind(plan, engine.settings.runbook_tolerance_pct)
        except UsageError as exc:
            raise CannotRun(str(exc)) from None
        except Exception as exc:
            ms = (time.perf_counter() - started) * 1000
            return failed(ms, "plan", exc)
        ms = (time.perf_counter() - started) * 1000
        return Run(ms, note=f"rows planned {plan.count:,}")

    return run


def csv_export(house: House) -> Runner:
    """The CSV as `/db export ledger` streams it, into /dev/null."""
    settings = house.settings
    request = parse_export(["ledger"])

    async def run(_i: int) -> Run:
        assert settings.database_url is not None
        started = time.perf_counter()
        conn = await connect(settings.database_url, settings.connect_timeout_s)
        try:
            if not await claim(conn, request.kind.name):
                raise CannotRun("an export of the ledger is already running")
            with Path(os.devnull).open("wb") as out:  # noqa: ASYNC230 (/dev/null)
                written = await write_csv(conn, request, out)
        except psycopg.Error as exc:
            return failed((time.perf_counter() - started) * 1000, "export", exc)
        finally:
            await conn.close()
        ms = (time.perf_counter() - started) * 1000
        return Run(ms, note=f"rows {written.rows:,}, {written.size / 1e6:,.0f} MB")

    return run


def planned_remedies() -> list[tuple[str, Remedy, list[str]]]:
    """(BENCH name, remedy, arguments) of every remedy whose plan is timed: those whose
    apply writes LEAPS rows (the engine tries them before approval, or the runbook of
    them), but restore-from-copy."""
    out: list[tuple[str, Remedy, list[str]]] = []
    for name, remedy in sorted(REMEDIES.items()):
        if name in NOT_PLANNED or not (remedy.preflight or remedy.runbook):
            continue
        bench_name, args = REMEDY_ARGS.get(name, (name, []))
        out.append((f"plan_{bench_name}", remedy, args))
    return out


def spec_names() -> list[str]:
    """Every BENCH name, in the order they run (known before anything is built)."""
    return [
        *(name for name, _ in DIAGNOSTICS),
        CSV_EXPORT,
        *(name for name, _, _ in planned_remedies()),
    ]


def not_planned() -> list[str]:
    """Why the other remedies' plans are not timed."""
    notes = [f"not planned: {n}: {why}" for n, why in NOT_PLANNED.items() if n in REMEDIES]
    others = sorted(
        n for n, r in REMEDIES.items() if not (r.preflight or r.runbook) and n not in NOT_PLANNED
    )
    notes.append("not planned (they write no LEAPS rows): " + ", ".join(others))
    return notes


def specs(house: House, handles: list[str]) -> list[Spec]:
    """Every command to time, in `spec_names()` order."""
    out = [Spec(name, diagnostic(house, words, handles)) for name, words in DIAGNOSTICS]
    out.append(Spec(CSV_EXPORT, csv_export(house)))
    for name, remedy, args in planned_remedies():
        filled = [a.format(handle=handles[0]) for a in args]
        out.append(Spec(name, plan_of(house, remedy, filled)))
    assert [s.name for s in out] == spec_names()
    return out


@dataclass
class Result:
    name: str
    p50: float
    p95: float
    worst: Run


async def time_one(spec: Spec, runs: int, users: int) -> Result | None:
    try:
        await spec.run(0)  # warm-up
        timed = [await spec.run(i) for i in range(1, runs + 1)]
    except CannotRun as exc:
        print(f"  {spec.name}: left out: {str(exc).splitlines()[0]}", flush=True)
        return None
    ms = [r.ms for r in timed]
    worst = max(timed, key=lambda r: (len(r.skipped), len(r.errors)))
    result = Result(spec.name, pct(ms, 50), pct(ms, 95), worst)
    print(
        f"BENCH command name={spec.name} users={users} p50_ms={result.p50:.1f} "
        f"p95_ms={result.p95:.1f} skipped={len(worst.skipped)}",
        flush=True,
    )
    details = [f"max {max(ms):.1f} ms"]
    if worst.note:
        details.append(worst.note)
    if worst.skipped:
        details.append("skipped in the worst run: " + "; ".join(worst.skipped))
    if worst.errors:
        details.append("errors in the worst run: " + "; ".join(worst.errors))
    print(f"  {spec.name}: " + ", ".join(details)[:1500], flush=True)
    return result


async def watchdog_cost(house: House, dsn: str) -> tuple[float, float] | None:
    """(server CPU seconds of one watchdog tick, the mean of WATCHDOG_TICKS; of one hourly
    baseline), or None where the server is not a local process."""
    cpu = await ServerCpu.of(dsn)
    if cpu is None:
        return None
    watchdog = house.watchdog
    assert isinstance(watchdog, Watchdog)
    before = cpu.seconds()
    for _ in range(WATCHDOG_TICKS):
        await watchdog.tick()
    tick_s = (cpu.seconds() - before) / WATCHDOG_TICKS
    before = cpu.seconds()
    taken = await house.take_baseline()
    baseline_s = cpu.seconds() - before
    if not taken:
        print("  watchdog: the hourly baseline was not taken (see the log): its cost is partial")
    return tick_s, baseline_s


async def bench(dsn: str, users: int, runs: int, names: list[str]) -> None:
    settings = default_settings(dsn)
    timeout_ms = settings.check_timeout_ms
    async with build_house(settings, console_frontend(io.StringIO()), keeps_state=False) as house:
        watchdog = house.watchdog
        assert isinstance(watchdog, Watchdog)
        await watchdog.tick()  # as a serving bot: health first, then the baseline
        started = time.perf_counter()
        if not await house.take_baseline():
            print("the first baseline was not taken (see the log): recover compares with none")
        else:
            print(f"baseline taken in {time.perf_counter() - started:.2f} s")
        handles = await participants(dsn, runs + 1)
        for note in not_planned():
            print(note)
        results: list[Result] = []
        for spec in specs(house, handles):
            if spec.name in names:
                result = await time_one(spec, runs, users)
                if result is not None:
                    results.append(result)
        cost = await watchdog_cost(house, dsn)
    interactive = [r for r in results if r.name.split("_")[0] in INTERACTIVE]
    ratio = f"{max(r.p95 for r in interactive) / timeout_ms:.3f}" if interactive else "n/a"
    skipped_total = sum(len(r.worst.skipped) for r in results)
    if cost is None:
        wd = "n/a"
    else:
        tick_s, baseline_s = cost
        print(
            f"watchdog: one tick {tick_s * 1000:.0f} ms of server CPU, one hourly baseline "
            f"{baseline_s * 1000:.0f} ms (CHECK_TIMEOUT_MS={timeout_ms}, "
            f"WATCHDOG_INTERVAL_S={settings.watchdog_interval_s:g}, "
            f"BASELINE_INTERVAL_S={settings.baseline_interval_s:g})"
        )
        share = watchdog_pct(
            tick_s, baseline_s, settings.watchdog_interval_s, settings.baseline_interval_s
        )
        wd = f"{share:.3f}"
    print(
        f"BENCH commands users={users} worst_interactive_p95_to_timeout={ratio} "
        f"skipped_total={skipped_total} max_rss_mb={max_rss_mb():.1f} watchdog_cpu_pct={wd}",
        flush=True,
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--users",
        type=int,
        help=f"users to build (default {DEFAULT_USERS:,}: 10 submissions each); with --dsn "
        "what users= says (default: the database's count)",
    )
    ap.add_argument("--dsn", help="use this LEAPS database as it is instead of building one")
    ap.add_argument("--runs", type=int, default=20, help="timed runs of each command")
    ap.add_argument("--faults", type=int, default=25, help="how many of each fault kind")
    ap.add_argument("--only", help="comma-separated BENCH names: time only these")
    ap.add_argument(
        "--prepare",
        action="store_true",
        help="with --dsn: first add what a build adds (the plans' faults, the recommended "
        "indexes, pg_stat_statements); writes to that database",
    )
    ap.add_argument("--keep", action="store_true", help="keep the built server; print its DSN")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    names = picked(args.only, spec_names())  # a typo fails now, not after the build
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.dsn:
        users = args.users if args.users is not None else await count_users(args.dsn)
        if args.prepare:
            await prepare(args.dsn, users, args.faults)
        await bench(args.dsn, users, args.runs, names)
        return
    users = args.users if args.users is not None else DEFAULT_USERS
    pg = EmbeddedPostgres(settings=SCALE_SERVER_SETTINGS)
    pg.start()
    try:
        dsn = await build(pg, users, args.faults)
        await bench(dsn, users, args.runs, names)
        if args.keep:
            await keep_serving({"DSN": dsn})
    finally:
        pg.stop()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
