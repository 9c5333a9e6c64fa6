"""`/db export ledger` on a 1,000,000-row ledger: the bot's path against a plain COPY.

Builds a throwaway database on an embedded PostgreSQL (the LEAPS fixture schema, a few
thousand users and `--rows` ledger rows made with generate_series, inserted with
`session_replication_role = replica` so the audit, notify and foreign-key triggers do not
run per row), then in the same run:

(a) the bot's export: `bot.slack.exports.write_csv` on the export's own connection into a file,
    the code `/db export` and `python -m bot export` run; its peak RSS growth is the
    resident set sampled at every chunk minus the one before (and `ru_maxrss` after
    minus before, whichever is larger);
(b) the baseline: `psql -c "COPY (the same SELECT) TO STDOUT …" > file`, as an engineer
    would export by hand (psycopg's synchronous copy into a file when psql is missing).

Both files must be byte-identical. Prints
`BENCH export rows_per_s=<n> peak_rss_growth_mb=<n> copy_rows_per_s=<n> ratio=<n>`
(targets: ratio >= 0.5, peak RSS growth <= 50 MB).

    python bench/export.py [--rows 1000000] [--users 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import filecmp
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.slack.exports import connect, write_csv  # noqa: E402
from commands.export import ExportQuery, build_query, parse  # noqa: E402
from commands.fixture.seed import schema_sql  # noqa: E402

SERVER_SETTINGS = {
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "wal_level": "minimal",
    "max_wal_senders": "0",
}

_FILL_USERS = """
INSERT INTO users (id, handle, name, email, role, created_at)
SELECT 'u' || g, 'handle' || g, 'Educator ' || g, 'user' || g || '@example.org',
       'PARTICIPANT', now() - interval '1 day' * (g %% 365)
  FROM generate_series(1, %(users)s) AS g
"""
_FILL_LEDGER = """
INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points, external_source,
                           external_event_id, created_at, event_time, meta)
SELECT 'l' || g,
       'u' || (1 + g %% %(users)s),
       (ARRAY['LEARN','EXPLORE','AMPLIFY','PRESENT','SHINE'])[1 + g %% 5],
       (ARRAY['MANUAL','WEBHOOK','FORM'])[1 + g %% 3]::"LedgerSource",
       1 + g %% 50,
       CASE WHEN g %% 3 = 1 THEN 'kajabi' END,
       CASE WHEN g %% 3 = 1 THEN 'evt_' || g END,
       timestamp '2025-01-01' + interval '1 second' * g,
       timestamptz '2025-01-01 00:00:00+00' + interval '1 second' * g,
       jsonb_build_object('note', 'row ' || g, 'batch', g / 1000)
  FROM generate_series(1, %(rows)s) AS g
"""


def build(dsn: str, users: int, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(schema_sql())
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(_FILL_USERS, {"users": users})
            conn.execute(_FILL_LEDGER, {"users": users, "rows": rows})
        conn.execute("VACUUM ANALYZE points_ledger")


def rss_bytes() -> int:
    """The process's resident set now (Linux: /proc/self/statm), for sampling."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def bot_export(dsn: str, path: Path) -> tuple[int, float, float]:
    """(rows, seconds, peak RSS growth in MB) of the bot's export into `path`.

    The growth is the larger of two measures: the resident set sampled at every chunk
    against the one before, and `ru_maxrss` after against before (which misses growth
    that stays under an earlier high-water mark, hence the sampling)."""
    request = parse(["ledger"])
    conn = await connect(dsn)
    peak = start = rss_bytes()

    def sample(_rows: int) -> None:
        nonlocal peak
        peak = max(peak, rss_bytes())

    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        with path.open("wb") as out:
            written = await write_csv(conn, request, out, on_progress=sample)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        await conn.close()
    growth = max((peak - start) / 1024 / 1024, (after - before) / 1024)
    return written.rows, seconds, growth


def copy_statement(dsn: str, query: ExportQuery) -> str:
    with psycopg.connect(dsn) as conn:
        return query.copy.as_string(conn)


def baseline_export(dsn: str, query: ExportQuery, path: Path) -> float:
    statement = copy_statement(dsn, query)
    psql = shutil.which("psql")
    # The same session settings the export sets, so the two files can be compared.
    setup = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD';"
    started = time.perf_counter()
    if psql is not None:
        with path.open("wb") as out:
            subprocess.run(
                [
                    psql,
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    dsn,
                    "-c",
                    setup,
                    "-c",
                    statement,
                ],
                stdout=out,
                check=True,
            )
    else:
        with psycopg.connect(dsn) as conn, path.open("wb") as out:
            conn.execute(setup)
            with conn.cursor() as cur, cur.copy(statement) as copy:
                for data in copy:
                    out.write(data)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=5000)
    args = parser.parse_args()
    pg = EmbeddedPostgres(settings=SERVER_SETTINGS)
    pg.start()
    work = Path(tempfile.mkdtemp(prefix="dbops-bench-export-"))
    try:
        dsn = pg.create_database("bench_export")
        started = time.perf_counter()
        build(dsn, args.users, args.rows)
        print(f"built {args.rows:,} ledger rows in {time.perf_counter() - started:.1f}s")
        query = build_query(parse(["ledger"]))
        baseline_export(dsn, query, work / "warmup.csv")  # same cache state for both
        rows, seconds, rss_mb = asyncio.run(bot_export(dsn, work / "bot.csv"))
        copy_s = baseline_export(dsn, query, work / "copy.csv")
        if rows != args.rows:
            raise SystemExit(f"the bot exported {rows} rows, expected {args.rows}")
        if not filecmp.cmp(work / "bot.csv", work / "copy.csv", shallow=False):
            raise SystemExit("the bot's CSV differs from COPY's")
        size_mb = (work / "bot.csv").stat().st_size / 1024 / 1024
        print(f"bot {seconds:.2f}s, COPY {copy_s:.2f}s, {size_mb:.0f} MB each, identical")
        rate, copy_rate = rows / seconds, rows / copy_s
        print(
            f"BENCH export rows_per_s={rate:.0f} peak_rss_growth_mb={rss_mb:.1f} "
            f"copy_rows_per_s={copy_rate:.0f} ratio={rate / copy_rate:.2f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        pg.stop()


if __name__ == "__main__":
    main()
