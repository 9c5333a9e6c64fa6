"""A real point-in-time recovery at production size, and what bringing the lost rows back
from the restored copy costs (issue 15): `restore-from-copy` against the guide's way
(dumping the tables) and the floor of any insert.

On an archiving embedded PostgreSQL (`EmbeddedPostgres(archive=True)`: wal_level=replica,
every WAL segment archived, replication allowed) holding the scale fixture (`bench/scale.py`:
by default 100,000 users, 1,000,000 submissions, 2,000,000 ledger rows), this

1. takes a base backup (`pg_basebackup`), marks the point (`pg_create_restore_point`) and
   records each public table's row hashes by primary key (in a schema of the bench's own);
2. damages production as an incident does: `--pct` % of the users lose their submissions
   and ledger rows and a tenth of them their account (`FaultInjector.data_loss`, 50 of
   their Kajabi events left unmatched), `--changed` users and submissions are changed and
   `--new` users sign up with a submission and a ledger row each; the hashes again give
   exactly which rows were lost, changed and added;
3. switches and archives the WAL, restores a second cluster from the backup to the mark
   (`recovery.signal`, promote) and stages the lost rows, read from it, in production;
4. times, in the same run:
   - `dump_s`: the guide's way, `pg_dump --data-only --format=custom --compress=0` of the
     same tables from the copy to /dev/null;
   - `insert_floor_s`: one plain `INSERT … SELECT` per table of the same lost rows from
     the staging tables, in foreign-key order, triggers firing (as a LEAPS ADMIN, so the
     audit trigger writes its rows too), in a transaction rolled back;
   - and, when the `restore-from-copy` remedy exists: `diff_s` (its plan, `--until` the
     mark) and `apply_s` (`Executor.apply`), then `rows_restored` (lost rows back, by
     primary key), `recovered_pct` (of the lost rows no guard refuses: the floor proves
     which) and whether every changed and new row kept production's version.

`rows_lost` and `conflicts` (rows changed since the mark: in both, different) are the
bench's own count from its row hashes, not the remedy's. Each timed step starts after a
CHECKPOINT on both servers, and the bench's own tables (its row hashes, the staged rows)
are not autovacuumed: neither the writing of pages nor a vacuum of the bench's bookkeeping
left by the step before is charged to the next one.

    python bench/pitr.py [--users 100000] [--pct 2] [--changed 200] [--new 200] [--keep]

There is no `--dsn`: the bench must own the archiving server it backs up and restores.
`--keep` leaves both clusters running at the end and prints their DSNs.

    BENCH pitr users= rows_lost= rows_restored= recovered_pct= conflicts= diff_s= apply_s=
               insert_floor_s= dump_s=
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scale import (  # noqa: E402  (this directory)
    SCALE_SERVER_SETTINGS,
    build_scale_fixture,
    keep_serving,
)

from bot.approvals.executor import Executor  # noqa: E402
from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.gateway import TargetGateway  # noqa: E402
from bot.router import RunContext  # noqa: E402
from commands.base import LeapsIdentity, Thresholds  # noqa: E402
from commands.fixture.faults import FaultInjector  # noqa: E402
from commands.remedies.base import REMEDIES  # noqa: E402

Conn = psycopg.AsyncConnection[Any]
DB = "leaps_pitr_bench"
MARK = "bench-before-the-damage"
REMEDY = "restore-from-copy"
# What restore-from-copy leaves out (issue 15): the migrations and the bot's own backups.
NOT_RESTORED = ("_prisma_migrations", "dbops_backup")
# A table's own creation column (issue 15): the order rows were made in.
CREATION_COLUMNS = ("created_at", "earned_at", "granted_at", "received_at", "event_time")
BENCH = sql.Identifier("pitr_bench")  # the bench's own schema: not public, so not restored

_TABLES_SQL = """
SELECT c.relname, a.attname AS pk,
       (SELECT x.attname FROM pg_attribute AS x
         WHERE x.attrelid = c.oid AND x.attname = ANY(%s) AND NOT x.attisdropped
         ORDER BY array_position(%s, x.attname::text) LIMIT 1) AS created
  FROM pg_class AS c
  JOIN pg_namespace AS n ON n.oid = c.relnamespace
  JOIN pg_index AS i ON i.indrelid = c.oid AND i.indisprimary AND i.indnatts = 1
  JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum = i.indkey[0]
 WHERE n.nspname = 'public' AND c.relkind = 'r' AND NOT c.relname = ANY(%s)
"""
_FKS_SQL = """
SELECT c.relname, p.relname
  FROM pg_constraint AS k
  JOIN pg_class AS c ON c.oid = k.conrelid
  JOIN pg_class AS p ON p.oid = k.confrelid
  JOIN pg_namespace AS n ON n.oid = c.relnamespace
 WHERE k.contype = 'f' AND n.nspname = 'public'
"""
_SIGNUPS_SQL = """
WITH n AS (SELECT g, 'u_pitr_new_' || g AS id FROM generate_series(1, %(n)s) AS g),
u AS (INSERT INTO users (id, handle, name, email)
      SELECT id, 'pitr-new-' || g, 'New signup ' || g, 'pitr.new.' || g || '@example.org'
        FROM n RETURNING id),
s AS (INSERT INTO submissions (id, user_id, activity_code, status, payload, updated_at)
      SELECT 's_' || id, id, 'EXPLORE', 'PENDING',
             '{"reflection": "Tried it.", "evidence_url": "https://evidence.example/x"}',
             now() AT TIME ZONE 'UTC' FROM u RETURNING 1)
INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points, event_time)
SELECT 'l_' || id, id, 'EXPLORE', 'MANUAL', 5, now() FROM u
"""


class Table:
    def __init__(self, name: str, pk: str, created: str | None) -> None:
        self.name, self.pk, self.created = name, pk, created

    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.name)

    def snap(self, when: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(BENCH, sql.Identifier(f"{when}_{self.name}"))


async def connect(dsn: str) -> Conn:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def tables_in_fk_order(dsn: str) -> list[Table]:
    async with await connect(dsn) as conn:
        cur = await conn.execute(
            _TABLES_SQL, (list(CREATION_COLUMNS), list(CREATION_COLUMNS), list(NOT_RESTORED))
        )
        found = {str(r[0]): Table(str(r[0]), str(r[1]), r[2]) for r in await cur.fetchall()}
        cur = await conn.execute(_FKS_SQL)
        edges = [(str(a), str(b)) for a, b in await cur.fetchall()]
    graph: dict[str, set[str]] = {name: set() for name in found}
    for child, parent in edges:
        if child in graph and parent in graph and child != parent:
            graph[child].add(parent)
    return [found[name] for name in TopologicalSorter(graph).static_order()]


async def record(dsn: str, tables: list[Table], when: str) -> None:
    """Each table's (primary key, md5 of the whole row) into the bench's schema."""
    async with await connect(dsn) as conn:
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(BENCH))
        for t in tables:
            await conn.execute(
                sql.SQL(
                    # the bench's own tables: no autovacuum of them during a timed step
                    "CREATE UNLOGGED TABLE {} WITH (autovacuum_enabled = off)"
                    " AS SELECT {}::text AS k, md5(to_jsonb(t)::text) AS h FROM {} AS t"
                ).format(t.snap(when), sql.Identifier(t.pk), t.ident())
            )
            await conn.execute(sql.SQL("CREATE UNIQUE INDEX ON {} (k)").format(t.snap(when)))


async def classify(dsn: str, tables: list[Table]) -> dict[str, dict[str, int]]:
    """Per table: rows lost (keys kept in pitr_bench.lost_<table>), changed, new."""
    out: dict[str, dict[str, int]] = {}
    async with await connect(dsn) as conn:
        for t in tables:
            before, after = t.snap("before"), t.snap("after")
            lost = t.snap("lost")
            await conn.execute(
                sql.SQL(
                    "CREATE UNLOGGED TABLE {} WITH (autovacuum_enabled = off)"
                    " AS SELECT k FROM {} AS b"
                    " WHERE NOT EXISTS (SELECT 1 FROM {} AS a WHERE a.k = b.k)"
                ).format(lost, before, after)
            )
            counts = await (
                await conn.execute(
                    sql.SQL(
                        "SELECT (SELECT count(*) FROM {lost}),"
                        " (SELECT count(*) FROM {b} AS b JOIN {a} AS a USING (k) WHERE a.h <> b.h),"
                        " (SELECT count(*) FROM {a} AS a WHERE NOT EXISTS"
                        "   (SELECT 1 FROM {b} AS b WHERE b.k = a.k))"
                    ).format(lost=lost, b=before, a=after)
                )
            ).fetchone()
            assert counts is not None
            out[t.name] = {"lost": counts[0], "changed": counts[1], "new": counts[2]}
    return out


async def damage(dsn: str, users: int, pct: float, changed: int, new: int) -> None:
    async with FaultInjector(dsn) as faults:
        n_victims = max(1, round(users * pct / 100))
        loss = await faults.data_loss(pct=pct, accounts=max(1, n_victims // 10), unmatched=50)
    print(
        f"data loss: {len(loss.users):,} users lost {loss.submissions:,} submissions and "
        f"{loss.ledger_rows:,} ledger rows, {len(loss.accounts):,} of them their account"
    )
    async with await connect(dsn) as conn, conn.transaction():
        # As the application: no app.user_id, so the audit trigger records none of it.
        await conn.execute(
            "UPDATE users SET name = coalesce(name, '') || ' (edited)' WHERE id IN ("
            " SELECT id FROM users WHERE NOT id = ANY(%s) ORDER BY md5(id) LIMIT %s)",
            (loss.users, changed),
        )
        await conn.execute(
            "UPDATE submissions SET visibility = CASE visibility WHEN 'PUBLIC'"
            " THEN 'PRIVATE'::\"Visibility\" ELSE 'PUBLIC' END WHERE id IN ("
            " SELECT id FROM submissions WHERE NOT user_id = ANY(%s) ORDER BY md5(id) LIMIT %s)",
            (loss.users, changed),
        )
        await conn.execute(_SIGNUPS_SQL, {"n": new})
        await conn.execute("ANALYZE")


async def stage(prod_dsn: str, copy_dsn: str, tables: list[Table]) -> None:
    """The lost rows, read from the copy by primary key, into pitr_bench.stage_<table>."""
    async with await connect(prod_dsn) as prod, await connect(copy_dsn) as copy:
        for t in tables:
            cur = await prod.execute(sql.SQL("SELECT k FROM {}").format(t.snap("lost")))
            wanted = [r[0] for r in await cur.fetchall()]
            await prod.execute(
                sql.SQL(
                    "CREATE UNLOGGED TABLE {} (LIKE public.{}) WITH (autovacuum_enabled = off)"
                ).format(t.snap("stage"), t.ident())
            )
            if not wanted:
                continue
            await copy.execute("CREATE TEMP TABLE IF NOT EXISTS lost_keys (k text PRIMARY KEY)")
            await copy.execute("TRUNCATE lost_keys")
            async with copy.cursor().copy("COPY lost_keys (k) FROM STDIN") as into:
                for k in wanted:
                    await into.write_row((k,))
            out = sql.SQL(
                "COPY (SELECT t.* FROM {} AS t JOIN lost_keys AS l ON l.k = t.{}::text) TO STDOUT"
            ).format(t.ident(), sql.Identifier(t.pk))
            into_stage = sql.SQL("COPY {} FROM STDIN").format(t.snap("stage"))
            async with prod.cursor().copy(into_stage) as dst:
                async with copy.cursor().copy(out) as src:
                    async for chunk in src:
                        await dst.write(chunk)


async def insert_floor(prod_dsn: str, tables: list[Table], identity: LeapsIdentity) -> float:
    """One INSERT … SELECT per table from its staging table, in foreign-key order, in
    creation order, triggers firing, as the identity; rolled back. Seconds."""
    async with await psycopg.AsyncConnection.connect(prod_dsn) as conn:
        await conn.execute("SET statement_timeout = 0")
        started = time.perf_counter()
        try:
            await conn.execute(
                "SELECT set_config('app.user_id', %s, true), set_config('app.user_role', %s, true)",
                (identity.user_id, identity.role),
            )
            for t in tables:
                order = sql.Identifier(t.created or t.pk)
                await conn.execute(
                    sql.SQL("INSERT INTO public.{} SELECT * FROM {} ORDER BY {}").format(
                        t.ident(), t.snap("stage"), order
                    )
                )
            return time.perf_counter() - started
        finally:
            await conn.rollback()


def dump_s(pg: EmbeddedPostgres, copy: EmbeddedPostgres, tables: list[Table]) -> float:
    """The guide's way: pg_dump of the same tables' data from the copy, to /dev/null."""
    cmd = [
        str(pg.bin_dir / "pg_dump"),
        "--data-only",
        "--format=custom",
        "--compress=0",
        "--file=/dev/null",
        "--no-sync",
        "--host=127.0.0.1",
        f"--port={copy.port}",
        "--username=postgres",
        "--no-password",
        *[f"--table=public.{t.name}" for t in tables],
        DB,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = copy.password
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:  # (its warning about users' self-reference is expected)
        raise RuntimeError(f"pg_dump failed (exit {done.returncode}): {done.stderr.strip()}")
    return elapsed


async def settle(*dsns: str) -> None:
    """A CHECKPOINT on each server, so that a timed step does not pay for the writing of the
    pages the step before it dirtied (the copy's hint bits its first reader sets, a rolled
    back insert's pages)."""
    for dsn in dsns:
        async with await connect(dsn) as conn:
            await conn.execute("CHECKPOINT")


def executor_for(prod_dsn: str, copy_dsn: str) -> Executor:
    """The executor, told where the copy is; the bench's apply has no hour limit."""
    return Executor(prod_dsn, statement_timeout_ms=3_600_000, recovery_dsn=copy_dsn)


async def back_and_kept(prod_dsn: str, tables: list[Table]) -> tuple[int, int, int, int]:
    """(lost rows back by primary key, of them identical to the marked row, changed and new
    rows whose production version is gone): read after the remedy."""
    back = same = changed_lost = new_lost = 0
    async with await connect(prod_dsn) as conn:
        for t in tables:
            now = sql.SQL(
                "(SELECT {}::text AS k, md5(to_jsonb(t)::text) AS h FROM {} AS t)"
            ).format(sql.Identifier(t.pk), t.ident())
            row = await (
                await conn.execute(
                    sql.SQL(
                        "SELECT count(n.k), count(n.k) FILTER (WHERE n.h = b.h)"
                        " FROM {lost} AS l JOIN {b} AS b USING (k) LEFT JOIN {now} AS n USING (k)"
                    ).format(lost=t.snap("lost"), b=t.snap("before"), now=now)
                )
            ).fetchone()
            gone = await (
                await conn.execute(
                    sql.SQL(
                        "SELECT count(*) FILTER (WHERE b.k IS NOT NULL AND b.h <> a.h),"
                        " count(*) FILTER (WHERE b.k IS NULL)"
                        " FROM {a} AS a LEFT JOIN {b} AS b USING (k) LEFT JOIN {now} AS n USING (k)"
                        " WHERE (b.k IS NULL OR b.h <> a.h) AND n.h IS DISTINCT FROM a.h"
                    ).format(a=t.snap("after"), b=t.snap("before"), now=now)
                )
            ).fetchone()
            assert row is not None and gone is not None
            back, same = back + row[0], same + row[1]
            changed_lost, new_lost = changed_lost + gone[0], new_lost + gone[1]
    return back, same, changed_lost, new_lost


async def admin(dsn: str) -> LeapsIdentity:
    async with await connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT id FROM users WHERE role = 'ADMIN' ORDER BY created_at, id LIMIT 1"
        )
        row = await cur.fetchone()
    assert row is not None, "the fixture has no ADMIN"
    return LeapsIdentity(str(row[0]), "ADMIN", "bench: a LEAPS ADMIN of the fixture")


async def bench(args: argparse.Namespace) -> None:
    pg = EmbeddedPostgres(settings=SCALE_SERVER_SETTINGS, archive=True)
    copy: EmbeddedPostgres | None = None
    pg.start()
    try:
        prod_dsn = pg.create_database(DB)
        started = time.perf_counter()
        counts = await build_scale_fixture(
            prod_dsn,
            users=args.users,
            submissions=args.users * 10,
            ledger=args.users * 20,
            kajabi=args.users,
        )
        print(
            f"scale fixture: {counts['users']:,} users, {counts['submissions']:,} submissions, "
            f"{counts['points_ledger']:,} ledger rows, built (WAL archived) in "
            f"{time.perf_counter() - started:.1f} s"
        )
        tables = await tables_in_fk_order(prod_dsn)
        started = time.perf_counter()
        backup = pg.base_backup()
        backup_s = time.perf_counter() - started
        mark = pg.create_restore_point(MARK)
        await record(prod_dsn, tables, "before")
        await damage(prod_dsn, args.users, args.pct, args.changed, args.new)
        await record(prod_dsn, tables, "after")
        classes = await classify(prod_dsn, tables)
        rows_lost = sum(c["lost"] for c in classes.values())
        conflicts = sum(c["changed"] for c in classes.values())
        new_rows = sum(c["new"] for c in classes.values())
        for name, c in classes.items():
            if any(c.values()):
                print(f"  {name}: lost {c['lost']:,}, changed {c['changed']:,}, new {c['new']:,}")
        started = time.perf_counter()
        pg.switch_wal(timeout=600)
        copy = pg.restore(backup, target_name=mark.name, start_timeout=600)
        restore_s = time.perf_counter() - started
        copy_dsn = copy.dsn(DB)
        print(
            f"base backup {backup_s:.1f} s; WAL archived and copy restored to {mark.name!r} "
            f"({mark.lsn}, {mark.time.isoformat()}) and promoted in {restore_s:.1f} s"
        )
        await stage(prod_dsn, copy_dsn, tables)
        identity = await admin(prod_dsn)

        try:
            await settle(prod_dsn, copy_dsn)
            floor = f"{await insert_floor(prod_dsn, tables, identity):.2f}"
            refused = "no guard refuses any lost row in creation order"
        except psycopg.Error as exc:  # one refused row stops a plain INSERT … SELECT
            floor, refused = "failed", f"a guard refused a row: {exc.diag.message_primary}"
        await settle(prod_dsn, copy_dsn)
        dumped_s = dump_s(pg, copy, tables)
        print(
            f"baselines: dump_s={dumped_s:.2f} (pg_dump of {len(tables)} tables from the copy) "
            f"insert_floor_s={floor} ({rows_lost:,} rows, triggers firing, rolled back: "
            f"{refused})"
        )
        result = {"rows_restored": "n/a", "recovered_pct": "n/a", "diff_s": "n/a"}
        result["apply_s"] = "n/a"
        if REMEDY not in REMEDIES:
            print(f"{REMEDY}: missing from this build (issue 15, part B): baselines only")
        else:
            gateway = TargetGateway(prod_dsn, check_timeout_ms=3_600_000, pool_max_size=4)
            source = TargetGateway(copy_dsn, check_timeout_ms=3_600_000, pool_max_size=4)
            ctx = RunContext(gateway, Thresholds(), recovery_copy=source, service_identity=identity)
            try:
                remedy = REMEDIES[REMEDY]
                await settle(prod_dsn, copy_dsn)
                started = time.perf_counter()
                plan = await remedy.plan(ctx, ["--until", mark.time.isoformat()])
                diff_s = time.perf_counter() - started
                print(f"plan: {plan.count:,} rows; {plan.summary}"[:400])
                await settle(prod_dsn, copy_dsn)
                started = time.perf_counter()
                state, outcome = await executor_for(prod_dsn, copy_dsn).apply(
                    remedy, plan, "bench_pitr", identity
                )
                apply_s = time.perf_counter() - started
                print(f"apply: {state}, {outcome.affected:,} rows; {outcome.summary}"[:400])
            finally:
                await gateway.close()
                await source.close()
            back, same, changed_lost, new_lost = await back_and_kept(prod_dsn, tables)
            print(
                f"after: {back:,} of {rows_lost:,} lost rows back ({same:,} identical to the "
                f"mark); production's version lost for {changed_lost:,} of {conflicts:,} "
                f"changed rows and {new_lost:,} of {new_rows:,} new rows"
            )
            result = {
                "rows_restored": str(back),
                "recovered_pct": f"{100.0 * back / rows_lost if rows_lost else 100.0:.1f}",
                "diff_s": f"{diff_s:.2f}",
                "apply_s": f"{apply_s:.2f}",
            }
        print(
            f"BENCH pitr users={args.users} rows_lost={rows_lost} "
            f"rows_restored={result['rows_restored']} recovered_pct={result['recovered_pct']} "
            f"conflicts={conflicts} diff_s={result['diff_s']} apply_s={result['apply_s']} "
            f"insert_floor_s={floor} dump_s={dumped_s:.2f}",
            flush=True,
        )
        if args.keep:
            await keep_serving({"PRODUCTION": prod_dsn, "COPY": copy_dsn})
    finally:
        if copy is not None:
            copy.stop()
        pg.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=100_000, help="scale: 10 submissions a user")
    ap.add_argument("--pct", type=float, default=2.0, help="percent of users who lose their rows")
    ap.add_argument("--changed", type=int, default=200, help="users and submissions changed")
    ap.add_argument("--new", type=int, default=200, help="users signing up after the mark")
    ap.add_argument("--keep", action="store_true", help="keep both servers running; print DSNs")
    args = ap.parse_args()
    asyncio.run(bench(args))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
