"""`restore-from-copy`: the rows a damaged production lost, back from a restored copy.

The copy (RECOVERY_DATABASE_URL, `ctx.recovery_copy`) is a database restored from a
backup or to a point in time; the bot only reads it. The plan compares it with
production table by table (`commands.rowdiff`: for a copy of production's own lineage, row
versions reconciled by bucket per range of blocks; else row hashes by bucket of key hash;
both sides at once) for every table of schema public with data, and classifies them in
foreign-key order, each table's own reads starting as soon as its diff is done. Every
differing row falls in one class:

- lost: in the copy, created at or before `--until`, absent from production: restored;
- after --until: in the copy, created after `--until`: not restored;
- deleted on purpose: absent from production and its deletion is on record (an audited
  DELETE in production's audit_log, a row of a `dbops_backup` table of the bot's own
  approved remedies, or a parent deleted so): listed, not restored;
- superseded: its business key (a unique constraint or index of production's catalog,
  partial ones with their predicate) is taken by another row, or the bot's own recovery
  (reconcile-points, recover-learn) made the row of the same user and activity since
  `--until`, or its parent is superseded: listed with the row that took its place;
- changed since: in both, different: listed with the columns that differ; production's
  stays unless `--overwrite` names the table (the copy's then, production's backed up);
- new since: only in production: kept.

The apply streams the rows out of the copy with COPY into a temporary table on
production and inserts them from there through production's triggers and constraints,
acting as the application. A row a guard refuses is found (savepoints, halving the
batch) and reported with the guard; the others go on. One transaction per table batch,
in foreign-key order (`Writer.commit`).
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import psycopg
from psycopg import sql
from pydantic import BaseModel, Field

from commands.audit_trail import audit_trail
from commands.base import BACKUP_SCHEMA, ROLES, Context, Gateway, Reader, Row, UsageError, role_rank
from commands.guards import mask_personal, name_refusal, plan_notes
from commands.remedies.base import (
    DriftError,
    Execution,
    LockScope,
    Outcome,
    OutsideStepFailed,
    Plan,
    PlanStep,
    Remedy,
    RemedyAbort,
    RowCountError,
    Verification,
    Writer,
    add_remedy,
    backup_name,
    nothing_planned,
)
from commands.remedies.ledger import RECONCILE_NAME
from commands.remedies.recovery import LEARN_ID_PREFIX, RECOVER_LEARN_NAME
from commands.remedies.rowsets import plural
from commands.rowdiff import (
    TEXT_FORM_SQL,
    Catalog,
    Compare,
    ForeignKey,
    TableDiff,
    TableShape,
    creation_column,
    diff_tables,
    differing_columns,
    fk_order,
    physical_lineage,
    read_catalog,
    texts,
    with_parents,
)

RESTORE_NAME = "restore-from-copy"
UNTIL, TABLES, OVERWRITE, KEEP_ROLES = "--until", "--tables", "--overwrite", "--keep-roles"
USAGE = (
    f"/db {RESTORE_NAME} [{UNTIL} <HH:MM | ISO 8601 with zone>] [{TABLES} t1,t2] "
    f"[{OVERWRITE} t1,…] [{KEEP_ROLES}]"
)
CLASSES = ("lost", "after_until", "deleted", "superseded", "changed", "new")
SAMPLES = 3  # rows shown per class and table
CHUNK = 20_000  # keys per statement when classifying (audit_log is scanned once per chunk)
# Rows the bot's own recovery makes (reconcile-points, recover-learn): a lost row of the
# same user and activity is superseded by one of these made since --until.
BOT_PREFIXES = {"reconcile_": RECONCILE_NAME, LEARN_ID_PREFIX: RECOVER_LEARN_NAME}
LEAST_ROLE = ROLES[0]
NO_COPY = (
    "no recovery copy is configured: set RECOVERY_DATABASE_URL to a database restored "
    "from a backup or to a point in time (a Supabase restore into a new project, or "
    "pg_basebackup with a recovery target), a role that may read it, and restart the bot; "
    "the bot only reads it"
)
ATOMICITY = (
    "one transaction per table batch, in foreign-key order (a batch: one table's lost "
    "rows, then its overwritten rows); a batch that fails rolls back alone, the batches "
    "committed before it stay (a later `/db restore-from-copy` plans only what is left)"
)


class TableRestore(BaseModel):
    table: str
    key: str
    columns: list[str]  # shared columns, written
    created: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    differing: list[str] = Field(default_factory=list)  # shared columns that differ
    restore: list[str] = Field(default_factory=list)  # keys, in creation order
    overwrite: list[str] = Field(default_factory=list)  # keys


class RestoreData(BaseModel):
    until: datetime
    keep_roles: bool = False
    tables: list[TableRestore]  # foreign-key order

    @property
    def rows(self) -> int:
        return sum(len(t.restore) + len(t.overwrite) for t in self.tables)


# --- arguments ----------------------------------------------------------------------


def _parse(args: list[str]) -> tuple[str | None, list[str], list[str], bool]:
    words = [w for a in args for w in a.split() if w]
    until: str | None = None
    tables: list[str] = []
    overwrite: list[str] = []
    keep = False
    while words:
        word = words.pop(0)
        name, eq, value = word.partition("=")
        if name == KEEP_ROLES and not eq:
            keep = True
            continue
        if name not in (UNTIL, TABLES, OVERWRITE):
            raise UsageError(f"unknown argument `{word}`; usage: `{USAGE}`")
        if not eq:
            if not words:
                raise UsageError(f"`{name}` needs a value; usage: `{USAGE}`")
            value = words.pop(0)
        if name == UNTIL:
            until = value
        else:
            names = [v.strip() for v in value.split(",") if v.strip()]
            (tables if name == TABLES else overwrite).extend(names)
    return until, tables, overwrite, keep


def _inherit(
    found: dict[str, str],
    keys: Sequence[str],
    fks: Sequence[ForeignKey],
    values: Mapping[str, Mapping[str, str | None]],
    parents: Mapping[str, set[str]],
    why: str,
) -> None:
    """A row whose parent row is in a class (deleted on purpose, superseded) is in it too:
    `found` gains each of `keys` whose foreign key (`values`: column, key, its text) names
    such a parent, with the reason."""
    for f in fks:
        classed = parents.get(f.parent)
        if not classed:
            continue
        column = values.get(f.columns[0], {})
        for k in keys:
            v = column.get(k)
            if k not in found and v is not None and v in classed:
                found[k] = f"its {f.parent} row {v} {why}"


async def _detection(ctx: Context) -> tuple[datetime, str] | None:
    """The open incident's detection (`--until`'s default), or None: none is open, or the
    bot keeps no incidents, or its state store cannot say now (then the copy's newest
    creation time, and the plan says which)."""
    if ctx.incident_detection is None:
        return None
    try:
        found = await ctx.incident_detection()
    except Exception:
        return None
    if found is None:
        return None
    at, which = found
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC), which


def parse_until(text: str, now: datetime | None = None) -> datetime:
    """HH:MM (UTC, the latest such moment not in the future) or ISO 8601 with a zone."""
    now = now or datetime.now(UTC)
    if re.fullmatch(r"\d{1,2}:\d{2}", text):
        hh, mm = (int(x) for x in text.split(":"))
        if hh > 23 or mm > 59:
            raise UsageError(f"`{UNTIL} {text}` is not a time of day")
        at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        return at - timedelta(days=1) if at > now else at
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(
            f"`{UNTIL}` takes HH:MM (UTC) or ISO 8601 with a zone, not `{text}`"
        ) from exc
    if at.tzinfo is None:
        raise UsageError(f"`{UNTIL} {text}` has no zone; add one (e.g. `Z` or `+02:00`)")
    return at.astimezone(UTC)


# --- the copy -----------------------------------------------------------------------


def _same_database(ctx: Context, copy: Gateway, prod: Catalog, other: Catalog) -> str | None:
    p, c = prod.facts, other.facts
    if ctx.gateway.target == copy.target:
        return f"RECOVERY_DATABASE_URL names production itself ({copy.target})"
    same_system = p["system_id"] and p["system_id"] == c["system_id"]
    # A copy restored from production's base backup keeps its system identifier; once
    # promoted it writes on a timeline of its own. The same identifier, database and
    # timeline, or a copy still replaying (a replica), is production itself.
    if same_system and p["database"] == c["database"]:
        if c.get("in_recovery") or c.get("timeline") == p.get("timeline"):
            return (
                f"the copy is production itself: same system identifier ({p['system_id']}), "
                f"database ({p['database']}) and "
                + ("a replica still replaying it" if c.get("in_recovery") else "timeline")
            )
    if p["addr"] and (p["addr"], p["port"], p["database"]) == (c["addr"], c["port"], c["database"]):
        return f"the copy is production itself: same host, port and database ({p['database']})"
    return None


def _server_warnings(prod: Catalog, copy: Catalog, byte_order: list[str]) -> list[str]:
    p, c = prod.facts, copy.facts
    notes = []
    if int(p["version_num"]) // 10000 != int(c["version_num"]) // 10000:
        notes.append(
            f"the servers differ in major version (production {p['version']}, copy "
            f"{c['version']}): values are compared in the text form both print under the "
            "same settings; a type whose output changed between versions shows its rows as "
            "changed (listed, never overwritten unless asked); lost rows are found by key "
            "and are not affected"
        )
    if p["encoding"] != c["encoding"]:
        notes.append(
            f"the databases' encodings differ (production {p['encoding']}, copy "
            f"{c['encoding']}): rows are hashed as UTF8 on both sides, so the same "
            "characters compare equal; COPY converts through the client encoding (UTF8)"
        )
    if not notes and not byte_order:
        notes.append(
            f"the servers agree (PostgreSQL {p['version']} and {c['version']}, encoding "
            f"{p['encoding']}, collation {p['collate']}); both sides are read in the same text "
            "form (TimeZone UTC, DateStyle ISO, IntervalStyle postgres, extra_float_digits 1, "
            "bytea_output hex) whatever each one's own settings"
        )
    if byte_order:
        notes.append(
            f"the key collations differ (production {p['collate']}, copy {c['collate']}): "
            f"the key ranges of {', '.join(byte_order)} compare in byte order "
            '(COLLATE "C") on both sides, which scans instead of using the key\'s index'
        )
    return notes


def _methods_note(lineage: bool, methods: Mapping[str, list[str]]) -> str:
    """How the tables were compared, and why."""
    how = "; ".join(f"{m}: {', '.join(ts)}" for m, ts in methods.items())
    if lineage:
        why = (
            "the copy is of production's own lineage (the same system identifier: a base "
            "backup restored), so a row unchanged since is the same row version (key and "
            "the transaction that wrote it, xmin) on both sides and only the versions that "
            "differ are read; a table the copy has written since its restore, or whose "
            "versions differ by more than a quarter, is compared by content"
        )
    else:
        why = (
            "the copy is not of production's own lineage (another system identifier: a "
            "logical restore), so rows are compared by content"
        )
    return f"the diff: {how or 'no table with rows'} ({why})"


# --- the plan -----------------------------------------------------------------------


async def _newest_creation(copy: Gateway, shapes: list[TableShape]) -> datetime | None:
    """The copy's newest creation time over the tables (one statement per table, so each
    stays within the per-check timeout)."""
    found: list[datetime] = []
    for shape in shapes:
        col = creation_column(shape.columns)
        if col is None:
            continue
        expr = sql.SQL("max({c})").format(c=sql.Identifier(col))
        if "with time zone" not in shape.types[col]:
            expr = sql.SQL("max({c}) AT TIME ZONE 'UTC'").format(c=sql.Identifier(col))
        query = sql.SQL("SELECT {e} AS at FROM {t}").format(
            e=expr, t=sql.Identifier("public", shape.name)
        )

        async def newest(db: Reader, query: sql.Composed = query) -> Any:
            await db.fetch(TEXT_FORM_SQL)
            return (await db.fetch(query.as_string()))[0]["at"]

        at = await copy.read(newest)
        if isinstance(at, datetime):
            found.append(at.astimezone(UTC))
    return max(found) if found else None


def _before(shape: TableShape, col: str | None) -> sql.Composable:
    """`created <= until` for the table's creation column (UTC wall-clock or zoned)."""
    if col is None:
        return sql.SQL("true")
    if "with time zone" in shape.types[col]:
        return sql.SQL("t.{} <= %(until)s::timestamptz").format(sql.Identifier(col))
    return sql.SQL("t.{} <= (%(until)s::timestamptz AT TIME ZONE 'UTC')").format(
        sql.Identifier(col)
    )


class _Candidates:
    """The rows only in the copy of one table: their creation, whether before --until,
    and the values the classification needs (foreign keys, unique keys)."""

    def __init__(self, needed: Sequence[str]) -> None:
        self.created: dict[str, str] = {}
        self.before: dict[str, bool] = {}
        # per column needed, each key's value as its text (None for NULL)
        self.values: dict[str, dict[str, str | None]] = {c: {} for c in needed}


async def _candidates(
    copy: Gateway,
    shape: TableShape,
    key: str,
    keys: list[str],
    needed: list[str],
    until: datetime,
    tids: Mapping[str, str] | None = None,
) -> _Candidates:
    """The rows of `keys` in the copy: read by their ctid where the diff gave it (a row
    whose key is not there any more is read by its key)."""
    col = creation_column(shape.columns)
    out = _Candidates(needed)
    # Each value as its text: the superseded check reads them back as the column's type.
    values = sql.SQL("").join(
        sql.SQL(", t.{}::text AS {}").format(sql.Identifier(c), sql.Identifier(f"v{i}"))
        for i, c in enumerate(needed)
    )
    select = sql.SQL(
        "SELECT t.{k}::text AS k, {created} AS created, {before} AS before{values} FROM {t} AS t"
    ).format(
        k=sql.Identifier(key),
        created=sql.SQL("t.{}::text").format(sql.Identifier(col)) if col else sql.SQL("''"),
        before=_before(shape, col),
        values=values,
        t=sql.Identifier("public", shape.name),
    )
    by_key = sql.SQL("{} WHERE t.{}::text = ANY(%(keys)s::text[])").format(
        select, sql.Identifier(key)
    )
    by_tid = sql.SQL("{} WHERE t.ctid = ANY(%(keys)s::tid[])").format(select)
    at = tids or {}
    wanted = set(keys)
    names = ["k", "created", "before", *(f"v{i}" for i in range(len(needed)))]
    # each column as one array (tens of thousands of rows cost far more as rows)
    arrays = sql.SQL(", ").join(
        sql.SQL("coalesce(array_agg({c}), '{{}}') AS {c}").format(c=sql.Identifier(n))
        for n in names
    )

    async def rows(query: sql.Composed, of: list[str]) -> None:
        agg = sql.SQL("SELECT {} FROM ({}) AS r").format(arrays, query)
        for start in range(0, len(of), CHUNK):
            chunk = of[start : start + CHUNK]

            async def read(db: Reader, chunk: list[str] = chunk) -> Row:
                await db.fetch(TEXT_FORM_SQL)
                if query is by_tid:  # the planner, costing a page read a tid, scans all
                    await db.fetch("SELECT set_config('enable_seqscan', 'off', true)")
                params = {"keys": texts(chunk), "until": until}
                return (await db.fetch(agg.as_string(), params))[0]

            got = await copy.read(read)
            if not wanted.issuperset(got["k"]):
                keep = [k in wanted for k in got["k"]]
                got = {n: list(itertools.compress(got[n], keep)) for n in names}
            ks = got["k"]
            out.created.update(zip(ks, map(str, got["created"]), strict=True))
            out.before.update(zip(ks, got["before"], strict=True))
            for i, c in enumerate(needed):
                out.values[c].update(zip(ks, got[f"v{i}"], strict=True))

    await rows(by_tid, [at[k] for k in keys if k in at])
    await rows(by_key, [k for k in keys if k not in out.before])
    return out


async def _deleted_on_record(
    prod: Gateway, table: str, key: str, keys: list[str]
) -> dict[str, str]:
    """Keys whose deletion production has on record: an audited DELETE in audit_log (the
    live trigger's format, or `DELETE_<table>` as the action), or a row of a
    dbops_backup table of the bot's own approved remedies (`<approval>_<table>`)."""
    found: dict[str, str] = {}

    async def read(db: Reader, chunk: list[str]) -> dict[str, str]:
        got: dict[str, str] = {}
        has_audit = (await db.fetch("SELECT to_regclass('public.audit_log') IS NOT NULL AS y"))[0][
            "y"
        ]
        if has_audit:
            meta = (await audit_trail(db)).meta
            rows = await db.fetch(
                "SELECT DISTINCT target_id AS k FROM audit_log"
                " WHERE target_id = ANY(%(keys)s::text[])"
                " AND (action = %(action)s OR (meta ->> %(tbl)s = %(table)s"
                " AND upper(meta ->> %(op)s) = 'DELETE'))",
                {
                    "keys": texts(chunk),
                    "action": f"DELETE_{table}",
                    "tbl": meta.table_key,
                    "table": table,
                    "op": meta.op_key,
                },
            )
            got |= {str(r["k"]): "an audited DELETE in audit_log" for r in rows}
        backups = await db.fetch(
            "SELECT c.relname::text AS name FROM pg_class AS c"
            " JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attname = %s"
            " WHERE c.relnamespace = to_regnamespace(%s) AND c.relkind = 'r'"
            " AND right(c.relname, %s) = %s",
            (key, BACKUP_SCHEMA, len(table) + 1, f"_{table}"),
        )
        for b in backups:
            rows = await db.fetch(
                sql.SQL("SELECT DISTINCT {k}::text AS k FROM {t} WHERE {k}::text = ANY(%s::text[])")
                .format(k=sql.Identifier(key), t=sql.Identifier(BACKUP_SCHEMA, str(b["name"])))
                .as_string(),
                (texts(chunk),),
            )
            got |= {
                str(r["k"]): f"backed up in {BACKUP_SCHEMA}.{b['name']} by an approved remedy"
                for r in rows
                if str(r["k"]) not in got
            }
        return got

    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        found |= await prod.read(partial(read, chunk=chunk))
    return found


async def _superseded(
    prod: Gateway,
    shape: TableShape,
    key: str,
    cands: _Candidates,
    keys: list[str],
    catalog: Catalog,
    until: datetime,
) -> dict[str, str]:
    """Keys whose business key production's rows hold now, with the row holding it."""
    found: dict[str, str] = {}
    table = sql.Identifier("public", shape.name)
    checks: list[tuple[str, sql.Composable]] = []
    # the copy's rows as a relation `c` of their key and the columns read, each value
    # back from its text to production's type of the column
    cols = [key, *(c for c in cands.values if c != key)]
    types = catalog.tables[shape.name].types
    c_rows = sql.SQL("WITH c AS (SELECT {} FROM unnest({}) AS u({}))").format(
        sql.SQL(", ").join(
            sql.SQL("u.{}::{} AS {}").format(
                sql.Identifier(f"c{i}"), sql.SQL(types[c]), sql.Identifier(c)
            )
            for i, c in enumerate(cols)
        ),
        sql.SQL(", ").join(
            sql.SQL("{}::text[]").format(sql.Placeholder(f"c{i}")) for i in range(len(cols))
        ),
        sql.SQL(", ").join(sql.Identifier(f"c{i}") for i in range(len(cols))),
    )
    for u in catalog.uniques:
        if u.table != shape.name or not set(u.columns) <= cands.values.keys():
            continue
        pred = sql.SQL(u.predicate) if u.predicate else sql.SQL("true")
        on = sql.SQL(" AND ").join(
            sql.SQL("p.{c} = c.{c}").format(c=sql.Identifier(c)) for c in u.columns
        )
        checks.append(
            (
                f"{u.index} ({', '.join(u.columns)})",
                sql.SQL(
                    "{c} SELECT c.{k}::text AS k, p.{k}::text AS by"
                    " FROM (SELECT * FROM c WHERE {pred}) AS c"
                    " JOIN (SELECT * FROM {t} WHERE {pred}) AS p ON {on} AND p.{k} <> c.{k}"
                ).format(c=c_rows, t=table, k=sql.Identifier(key), pred=pred, on=on),
            )
        )
    col = creation_column(shape.columns)
    if {"user_id", "activity_code"} <= set(shape.columns):
        made = _before(shape, col) if col else sql.SQL("false")
        checks.append(
            (
                "the bot's own recovery ("
                + ", ".join(f"{n}: {p}…" for p, n in BOT_PREFIXES.items())
                + ") for the same user and activity since --until",
                sql.SQL(
                    "{c} SELECT c.{k}::text AS k, min(t.{k}::text) AS by FROM c JOIN {t} AS t"
                    " ON t.user_id = c.user_id AND t.activity_code = c.activity_code"
                    " AND t.{k}::text LIKE ANY(%(prefixes)s) AND NOT ({made}) GROUP BY 1"
                ).format(c=c_rows, t=table, k=sql.Identifier(key), made=made),
            )
        )
    if not checks:
        return found
    prefixes = [p.replace("_", "\\_") + "%" for p in BOT_PREFIXES]
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        params: dict[str, Any] = {"prefixes": prefixes, "until": until, "c0": texts(chunk)}
        for i, c in enumerate(cols[1:], 1):
            params[f"c{i}"] = texts(cands.values[c].get(k) for k in chunk)

        async def read(db: Reader, params: dict[str, Any] = params) -> list[tuple[str, str, str]]:
            await db.fetch(TEXT_FORM_SQL)
            out = []
            for what, query in checks:
                got = await db.fetch(query.as_string(), params)
                out += [(str(r["k"]), str(r["by"]), what) for r in got]
            return out

        for k, by, what in await prod.read(read):
            found.setdefault(k, f"taken by {by}: {what}")
    return found


def _fks_of(catalog: Catalog, name: str) -> list[ForeignKey]:
    """The table's single-column foreign keys to other tables."""
    return [f for f in catalog.fks if f.child == name and len(f.columns) == 1 and f.parent != name]


@dataclass
class _Prepared:
    """One table's diff and the reads its classification needs, none of which depends on
    another table's: the candidates, those before --until, their deletions on record,
    the business keys production holds (of all those: the caller drops the ones deleted
    on record) and the columns that differ of the rows changed."""

    diff: TableDiff
    cands: _Candidates
    before: list[str]
    deleted: dict[str, str]
    superseded: dict[str, str]
    cols_of: dict[str, list[str]]


async def _prepare(
    prod_gw: Gateway,
    copy: Gateway,
    prod: Catalog,
    shape: TableShape,
    cmp: Compare,
    diffed: Awaitable[TableDiff],
    until: datetime,
) -> _Prepared:
    diff = await diffed
    name, key = cmp.table, cmp.key
    uniq_cols = {c for u in prod.uniques if u.table == name for c in u.columns}
    pred_cols = {
        c
        for u in prod.uniques
        if u.table == name and u.predicate
        for c in cmp.columns
        if re.search(rf"\b{re.escape(c)}\b", u.predicate)
    }
    fk_cols = {f.columns[0] for f in _fks_of(prod, name)}
    needed = sorted(
        (fk_cols | uniq_cols | pred_cols | {"user_id", "activity_code"}) & set(cmp.columns)
    )
    cands = await _candidates(copy, shape, key, diff.only_copy, needed, until, diff.copy_tids)
    before = [k for k in diff.only_copy if cands.before.get(k, True)]
    if not before:
        return _Prepared(
            diff, cands, before, {}, {}, await differing_columns(prod_gw, copy, cmp, diff.changed)
        )
    # at the same time; a key deleted on record is not superseded (the caller drops it)
    deleted, superseded, cols_of = await asyncio.gather(
        _deleted_on_record(prod_gw, name, key, before),
        _superseded(prod_gw, shape, key, cands, before, prod, until),
        differing_columns(prod_gw, copy, cmp, diff.changed),
    )
    return _Prepared(diff, cands, before, deleted, superseded, cols_of)


async def plan_restore(ctx: Context, args: list[str]) -> Plan:
    until_text, named, overwrite, keep_roles = _parse(args)
    copy = ctx.recovery_copy
    if copy is None:
        raise UsageError(NO_COPY)
    prod_gw = ctx.gateway

    async def catalog(db: Reader) -> Catalog:
        return await read_catalog(db)

    prod = await prod_gw.read(catalog)
    try:
        other = await copy.read(catalog)
    except Exception as exc:
        raise UsageError(f"the recovery copy ({copy.target}) cannot be read: {exc}") from exc
    same = _same_database(ctx, copy, prod, other)
    if same:
        raise UsageError(f"{same}; refused: the copy must be another database")
    shared = sorted(set(prod.tables) & set(other.tables))
    unknown = [t for t in [*named, *overwrite] if t not in shared]
    if unknown:
        raise UsageError(f"no table {', '.join(unknown)} on both sides (schema public)")
    chosen = with_parents(named, prod.fks) & set(shared) if named else set(shared)
    added = sorted(chosen - set(named)) if named else []
    warnings: list[str] = []
    skipped = [
        t for t in sorted(chosen) if len(prod.tables[t].key) != 1 or len(other.tables[t].key) != 1
    ]
    if skipped:
        warnings.append(f"not compared (no single-column primary key): {', '.join(skipped)}")
    order = fk_order([t for t in chosen if t not in skipped], prod.fks)
    asked = parse_until(until_text) if until_text is not None else None
    byte_order: list[str] = []
    fast = all(
        f["encoding"] == "UTF8" and int(f["version_num"]) >= 110000
        for f in (prod.facts, other.facts)
    )
    # The columns' own hash functions, for the same major version (14 or later) on both
    # sides (rowdiff.Compare.types); bit_xor() for the buckets needs 14 on both.
    majors = {int(f["version_num"]) // 10000 for f in (prod.facts, other.facts)}
    record = fast and len(majors) == 1 and min(majors) >= 14
    # A copy of production's own lineage (a base backup restored): rows compared by
    # version, table by table where the copy has not been written since its restore.
    lineage = physical_lineage(prod.facts, other.facts)
    tables: list[TableRestore] = []
    targets: list[Row] = []
    deleted_keys: dict[str, set[str]] = {}
    superseded_keys: dict[str, set[str]] = {}
    one_side: list[str] = []
    cmps: dict[str, Compare] = {}
    for name in order:
        p_shape, c_shape = prod.tables[name], other.tables[name]
        key = p_shape.key[0]
        columns = tuple(sorted(set(p_shape.columns) & set(c_shape.columns)))
        extra = sorted(set(p_shape.columns) ^ set(c_shape.columns))
        if extra:
            one_side.append(f"{name} ({', '.join(extra)})")
        same_order = p_shape.key_collation == c_shape.key_collation and (
            not p_shape.default_collation or prod.facts["collate"] == other.facts["collate"]
        )
        if not same_order:
            byte_order.append(name)
        types = tuple(
            c_shape.types[c] if c_shape.types[c] == p_shape.types[c] else "" for c in columns
        )
        cmps[name] = Compare(
            name,
            key,
            c_shape.types[key],
            columns,
            byte_order=not same_order,
            fast_hash=fast,
            types=types if record else (),
            buckets=min(majors) >= 14,
            physical=lineage and c_shape.writes == 0 and c_shape.types[key] == p_shape.types[key],
            blocks=max(p_shape.blocks, c_shape.blocks),
            estimates=(p_shape.estimate, c_shape.estimate),
        )
    # The tables are diffed at the same time (a few at once: each diff keeps both sides
    # busy already), and classified in foreign-key order as their diffs come.
    sizes = {t: max(prod.tables[t].estimate, other.tables[t].estimate) for t in cmps}
    diffs = diff_tables(prod_gw, copy, list(cmps.values()), sizes)
    prepared: dict[str, asyncio.Task[_Prepared]] = {}
    methods: dict[str, list[str]] = {}
    try:
        if asked is not None:
            until = asked
            warnings.append(f"--until {until:%Y-%m-%d %H:%M:%S} UTC (asked)")
        elif (detected := await _detection(ctx)) is not None:
            until, which = detected
            warnings.append(
                f"--until {until:%Y-%m-%d %H:%M:%S} UTC: the detection of {which}; rows the copy "
                f"holds from after it are listed, not restored (`{UNTIL}` sets another time)"
            )
        else:
            newest = await _newest_creation(copy, [other.tables[t] for t in order])
            until = newest or datetime.now(UTC)
            warnings.append(
                f"--until {until:%Y-%m-%d %H:%M:%S} UTC: the copy's newest creation time (no "
                f"incident is open to go by; `{UNTIL}` sets it)"
            )

        # Each table's own reads (its candidates, deletions on record, business keys
        # taken, differing columns) as soon as its diff is there; the classification
        # then goes in foreign-key order, a child inheriting its parents' classes.
        prepared = {
            name: asyncio.ensure_future(
                _prepare(prod_gw, copy, prod, other.tables[name], cmps[name], diffs[name], until)
            )
            for name in order
        }
        for name in order:
            p_shape, c_shape = prod.tables[name], other.tables[name]
            key = p_shape.key[0]
            cmp = cmps[name]
            columns = cmp.columns
            ready = await prepared[name]
            diff, cands = ready.diff, ready.cands
            if diff.method:
                methods.setdefault(diff.method, []).append(name)
            if diff.copy_rows == 0 and diff.prod_rows == 0:
                continue
            counts = dict.fromkeys(CLASSES, 0)
            samples: dict[str, list[Row]] = {c: [] for c in CLASSES}
            fks = _fks_of(prod, name)
            before = ready.before
            for k in diff.only_copy:
                if not cands.before.get(k, True):
                    counts["after_until"] += 1
                    if len(samples["after_until"]) < SAMPLES:
                        samples["after_until"].append(
                            {"key": k, "detail": f"created {cands.created.get(k)}"}
                        )
            deleted = dict(ready.deleted)
            _inherit(deleted, before, fks, cands.values, deleted_keys, "was deleted on purpose")
            rest = [k for k in before if k not in deleted]
            superseded = {k: why for k, why in ready.superseded.items() if k not in deleted}
            _inherit(superseded, rest, fks, cands.values, superseded_keys, "is superseded")
            deleted_keys[name] = set(deleted)
            superseded_keys[name] = set(superseded)
            lost = sorted(
                (k for k in rest if k not in superseded),
                key=lambda k: (cands.created.get(k, ""), k),
            )
            counts["deleted"], counts["superseded"], counts["lost"] = (
                len(deleted),
                len(superseded),
                len(lost),
            )
            for k, why in list(deleted.items())[:SAMPLES]:
                samples["deleted"].append({"key": k, "detail": why})
            for k, why in list(superseded.items())[:SAMPLES]:
                samples["superseded"].append({"key": k, "detail": why})
            for k in lost[:SAMPLES]:
                samples["lost"].append(
                    {"key": k, "detail": f"created {cands.created.get(k) or '-'}"}
                )
            cols_of = ready.cols_of
            changed = [k for k in diff.changed if cols_of.get(k)]
            counts["changed"] = len(changed)
            differing = sorted({c for k in changed for c in cols_of[k]})
            for k in changed[:SAMPLES]:
                samples["changed"].append(
                    {"key": k, "detail": "differs in " + ", ".join(cols_of[k])}
                )
            counts["new"] = len(diff.only_prod)
            for k in diff.only_prod[:SAMPLES]:
                samples["new"].append({"key": k, "detail": "only in production: kept"})
            for cls in CLASSES:
                targets += [{"table": name, "class": cls, **s} for s in samples[cls]]
            tables.append(
                TableRestore(
                    table=name,
                    key=key,
                    columns=list(columns),
                    created=creation_column(columns),
                    counts=counts,
                    differing=differing,
                    restore=lost,
                    overwrite=changed if name in overwrite else [],
                )
            )
    finally:
        for task in [*diffs.values(), *prepared.values()]:
            task.cancel()
    data = RestoreData(until=until, keep_roles=keep_roles, tables=tables)
    n = data.rows
    if one_side:
        warnings.append(
            "columns only on one side, not compared nor written: " + "; ".join(one_side)
        )
    warnings += _server_warnings(prod, other, byte_order)
    warnings.append(_methods_note(lineage, methods))
    if added:
        warnings.append(f"{TABLES}: added the tables they need: {', '.join(added)}")
    for t in tables:
        if t.counts["changed"]:
            how = (
                "the copy's version is restored, production's backed up first"
                if t.overwrite
                else f"production's stays (`{OVERWRITE} {t.table}` restores the copy's)"
            )
            warnings.append(
                f"{t.table}: {plural(t.counts['changed'], 'row')} changed since, in "
                f"{', '.join(t.differing)}: {how}"
            )
    above = await _roles_above(copy, data)
    superadmin = False
    if above:
        if keep_roles:
            superadmin = True
            warnings.append(
                f"{KEEP_ROLES}: restored users keep their role: {above}; a SUPERADMIN approves"
            )
        else:
            warnings.append(
                f"restored users come back as {LEAST_ROLE} (least privilege, as recover-users); "
                f"their roles in the copy: {above}; `{KEEP_ROLES}` keeps them (a SUPERADMIN "
                "approves)"
            )
    if any(t.table == "users" and t.overwrite for t in tables) and not keep_roles:
        warnings.append(
            f"{OVERWRITE} users leaves production's role of each overwritten user as it is; "
            f"`{KEEP_ROLES}` restores the copy's (a SUPERADMIN approves when one is above "
            f"{LEAST_ROLE})"
        )
    written = [t.table for t in tables if t.restore or t.overwrite]
    audit = None
    if written:
        for event in ("INSERT", "UPDATE") if any(t.overwrite for t in tables) else ("INSERT",):
            warnings += await plan_notes(ctx, written, event)
        trail = await prod_gw.read(audit_trail)
        audit = trail.plan_note()
    warnings.append(f"unit of atomicity: {ATOMICITY}")
    rows_text = "; ".join(
        f"{t.table}: " + ", ".join(f"{c} {v}" for c, v in t.counts.items() if v)
        for t in tables
        if any(t.counts.values())
    )
    restores = sum(len(t.restore) for t in tables)
    overwrites = sum(len(t.overwrite) for t in tables)
    return Plan(
        remedy=RESTORE_NAME,
        args=list(args),
        title=f"Restore lost rows from the recovery copy ({copy.target})",
        summary=(
            f"insert {plural(restores, 'lost row')} from the copy"
            + (
                f" and overwrite {plural(overwrites, 'changed row')} (backed up)"
                if overwrites
                else ""
            )
            + f", in foreign-key order ({', '.join(written)});"
            f" per table: {rows_text or 'no difference'}"
            if n
            else "nothing to restore: "
            + (rows_text or "the copy and production hold the same rows")
        ),
        steps=_steps(data),
        targets=targets,
        count=n,
        backup=(
            f"production's version of each overwritten row is copied first into "
            f'{BACKUP_SCHEMA}."<approval>_<table>"'
            if overwrites
            else None
        ),
        warnings=warnings,
        limits=ATOMICITY,
        needs_approval=n > 0,
        locks=LockScope(relations=written),
        approver_role="SUPERADMIN" if superadmin else None,
        data=data.model_dump(mode="json"),
        audit=audit,
    )


async def _roles_above(copy: Gateway, data: RestoreData) -> str:
    users = next((t for t in data.tables if t.table == "users" and "role" in t.columns), None)
    keys = (users.restore + (users.overwrite if data.keep_roles else [])) if users else []
    if not keys:
        return ""

    async def read(db: Reader) -> list[Row]:
        return await db.fetch(
            "SELECT role::text AS role, count(*) AS n FROM users WHERE id::text = ANY(%s)"
            " GROUP BY 1",
            (keys,),
        )

    roles = Counter({str(r["role"]): int(r["n"]) for r in await copy.read(read)})
    if not any(role_rank(r) > role_rank(LEAST_ROLE) for r in roles):
        return ""
    return ", ".join(f"{k} {v}" for k, v in sorted(roles.items(), key=lambda kv: role_rank(kv[0])))


def _steps(data: RestoreData) -> list[PlanStep]:
    steps = []
    for t in data.tables:
        cmp = _cmp(t)
        if t.restore:
            steps.append(
                PlanStep(
                    sql=_select_sql(cmp).as_string(),
                    params=[f"<{plural(len(t.restore), 'key')}>"],
                    note="on the copy, COPY … TO STDOUT into a temporary table on production",
                )
            )
            steps.append(
                PlanStep(
                    sql=_insert_sql(t, sql.Identifier("<staging>")).as_string(),
                    params=["<keys>"],
                    note=f"{t.table}: {plural(len(t.restore), 'row')}; a refused row is "
                    "reported with its guard and the others go on; then COMMIT",
                )
            )
        if t.overwrite:
            steps.append(
                PlanStep(
                    sql=_update_sql(t, sql.Identifier("<staging>"), data.keep_roles).as_string(),
                    params=["<keys>"],
                    note=f"{t.table}: {plural(len(t.overwrite), 'row')} overwritten with the "
                    "copy's version after a backup of production's; then COMMIT",
                )
            )
    return steps


def sample_restore(plan: Plan, n: int) -> Plan:
    """The first n rows in foreign-key order (parents first): restores, then overwrites."""
    if plan.count <= n:
        return plan
    data = plan.private(RestoreData)
    left = n
    tables = []
    for t in data.tables:
        restore = t.restore[: max(left, 0)]
        left -= len(restore)
        overwrite = t.overwrite[: max(left, 0)]
        left -= len(overwrite)
        tables.append(t.model_copy(update={"restore": restore, "overwrite": overwrite}))
    cut = data.model_copy(update={"tables": tables})
    return plan.model_copy(
        update={"count": cut.rows, "steps": _steps(cut), "data": cut.model_dump(mode="json")},
        deep=True,
    )


# --- the apply ----------------------------------------------------------------------


def _cmp(t: TableRestore) -> Compare:
    return Compare(t.table, t.key, "text", tuple(t.columns), byte_order=False)


def _cols(t: TableRestore, alias: str | None = None) -> sql.Composable:
    if alias:
        return sql.SQL(", ").join(sql.Identifier(alias, c) for c in t.columns)
    return sql.SQL(", ").join(sql.Identifier(c) for c in t.columns)


def _select_sql(cmp: Compare) -> sql.Composed:
    return sql.SQL("SELECT {cols} FROM {t} AS t WHERE t.{k}::text = ANY(%s::text[])").format(
        cols=sql.SQL(", ").join(sql.Identifier("t", c) for c in cmp.columns),
        t=cmp.ident,
        k=sql.Identifier(cmp.key),
    )


def _insert_sql(t: TableRestore, staging: sql.Identifier) -> sql.Composed:
    order = (
        sql.SQL("s.{}, s.{}").format(sql.Identifier(t.created), sql.Identifier(t.key))
        if t.created
        else sql.SQL("s.{}").format(sql.Identifier(t.key))
    )
    return sql.SQL(
        "INSERT INTO {t} ({cols}) SELECT {vals} FROM {s} AS s WHERE s.{k}::text = ANY(%s)"
        " ORDER BY {order} RETURNING {k}::text AS k"
    ).format(
        t=sql.Identifier("public", t.table),
        cols=_cols(t),
        vals=_cols(t, "s"),
        s=staging,
        k=sql.Identifier(t.key),
        order=order,
    )


def _kept(t: TableRestore, keep_roles: bool) -> set[str]:
    """Production's columns an overwrite leaves alone: a user's role unless --keep-roles
    (least privilege: the copy's role comes back only with a SUPERADMIN's approval)."""
    return {"role"} if t.table == "users" and not keep_roles else set()


def _update_sql(t: TableRestore, staging: sql.Identifier, keep_roles: bool) -> sql.Composed:
    kept = _kept(t, keep_roles) | {t.key}
    sets = sql.SQL(", ").join(
        sql.SQL("{c} = s.{c}").format(c=sql.Identifier(c)) for c in t.columns if c not in kept
    )
    return sql.SQL(
        "UPDATE {t} AS t SET {sets} FROM {s} AS s WHERE t.{k} = s.{k} AND t.{k}::text = ANY(%s)"
    ).format(t=sql.Identifier("public", t.table), sets=sets, s=staging, k=sql.Identifier(t.key))


_staging = itertools.count()
# What a guard raises: integrity (23: constraints, and the triggers' 23514/23505/23502),
# data exceptions (22), a plain RAISE (P0001) and a trigger's 42501 (insufficient role).
# Anything else (a lost connection, a timeout, a missing column) stops the batch.
_REFUSALS = ("23", "22", "P0")


async def _count_present(writer: Writer | Reader, t: TableRestore, keys: list[str]) -> int:
    rows = await writer.fetch(
        sql.SQL("SELECT count(*) AS n FROM {} WHERE {}::text = ANY(%s)")
        .format(sql.Identifier("public", t.table), sql.Identifier(t.key))
        .as_string(),
        (keys,),
    )
    return int(rows[0]["n"])


async def _stage(writer: Writer, t: TableRestore, keys: list[str]) -> sql.Identifier:
    staging = sql.Identifier(f"dbops_restore_{next(_staging)}")
    await writer.execute(
        sql.SQL(
            "CREATE TEMP TABLE {s} ON COMMIT DROP AS SELECT {cols} FROM {t} WITH NO DATA"
        ).format(s=staging, cols=_cols(t), t=sql.Identifier("public", t.table))
    )
    copied = await writer.copy_from_source(_select_sql(_cmp(t)), (keys,), staging)
    if copied != len(keys):
        raise DriftError(f"{t.table} rows in the copy", len(keys), copied, 0)
    return staging


async def _insert(
    writer: Writer, t: TableRestore, staging: sql.Identifier, keys: list[str]
) -> tuple[list[str], list[Row]]:
    inserted: list[str] = []
    refused: list[Row] = []
    query = _insert_sql(t, staging)

    async def attempt(chunk: list[str]) -> None:
        await writer.execute("SAVEPOINT dbops_restore")
        try:
            rows = await writer.fetch(query, (chunk,))
        except psycopg.Error as exc:
            diag = exc.diag
            state = diag.sqlstate or ""
            if state[:2] not in _REFUSALS and state != "42501":
                raise
            await writer.execute("ROLLBACK TO SAVEPOINT dbops_restore")
            await writer.execute("RELEASE SAVEPOINT dbops_restore")
            if len(chunk) > 1:
                half = len(chunk) // 2
                await attempt(chunk[:half])
                await attempt(chunk[half:])
                return
            guard = await name_refusal(
                writer, constraint=diag.constraint_name, table=diag.table_name, context=diag.context
            )
            refused.append(
                {
                    "table": t.table,
                    "key": chunk[0],
                    "guard": guard or "-",
                    "error": f"{diag.sqlstate}: {mask_personal(str(diag.message_primary))}",
                }
            )
            return
        await writer.execute("RELEASE SAVEPOINT dbops_restore")
        inserted.extend(str(r["k"]) for r in rows)

    await attempt(keys)
    return inserted, refused


@dataclass
class _Done:
    """What the committed batches did, so far."""

    per_table: list[Row] = field(default_factory=list)
    refusals: list[Row] = field(default_factory=list)
    backups: list[str] = field(default_factory=list)
    affected: int = 0
    backed_up: int = 0


async def _batch(writer: Writer, data: RestoreData, t: TableRestore, acc: _Done) -> None:
    """One table's batch: its lost rows inserted, its rows to overwrite backed up and
    overwritten, then COMMIT (the unit of atomicity)."""
    restored: list[str] = []
    refused: list[Row] = []
    overwritten = 0
    if t.restore:
        present = await _count_present(writer, t, t.restore)
        if present:
            raise DriftError(
                f"{t.table} rows still absent from production",
                len(t.restore),
                len(t.restore) - present,
                0,
            )
        staging = await _stage(writer, t, t.restore)
        if t.table == "users" and "role" in t.columns and not data.keep_roles:
            await writer.execute(
                sql.SQL("UPDATE {} SET role = {} WHERE role::text <> {}").format(
                    staging, sql.Literal(LEAST_ROLE), sql.Literal(LEAST_ROLE)
                )
            )
        restored, refused = await _insert(writer, t, staging, t.restore)
        if len(restored) + len(refused) != len(t.restore):
            raise RowCountError(
                f"{t.table} rows restored or refused",
                len(t.restore),
                len(restored) + len(refused),
            )
        await writer.audit.after(writer, t.table, "INSERT", restored)
    if t.overwrite:
        present = await _count_present(writer, t, t.overwrite)
        if present != len(t.overwrite):
            raise DriftError(f"{t.table} rows to overwrite", len(t.overwrite), present, 0)
        backup = await writer.backup_table(t.table)
        copied = await writer.execute(
            sql.SQL("CREATE TABLE {b} AS SELECT * FROM {t} WHERE {k}::text = ANY(%s)").format(
                b=backup, t=sql.Identifier("public", t.table), k=sql.Identifier(t.key)
            ),
            (t.overwrite,),
        )
        if copied != len(t.overwrite):
            raise RowCountError(f"{t.table} rows backed up", len(t.overwrite), copied)
        await writer.audit.before(writer, t.table, t.overwrite)
        staging = await _stage(writer, t, t.overwrite)
        overwritten = await writer.execute(_update_sql(t, staging, data.keep_roles), (t.overwrite,))
        if overwritten != len(t.overwrite):
            raise RowCountError(f"{t.table} rows overwritten", len(t.overwrite), overwritten)
        await writer.audit.after(writer, t.table, "UPDATE", t.overwrite)
        acc.backed_up += copied
        acc.backups.append(backup.as_string())
    if t.restore or t.overwrite:
        await writer.commit()
        acc.affected += len(restored) + overwritten
        acc.refusals += refused
        acc.per_table.append(
            {
                "table": t.table,
                "planned": len(t.restore) + len(t.overwrite),
                "restored": len(restored),
                "refused": len(refused),
                "overwritten": overwritten,
                "guards": ", ".join(sorted({str(r["guard"]) for r in refused})) or "-",
            }
        )


async def apply_restore(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(RestoreData)
    if plan.count == 0:
        return Outcome(ok=True, summary="nothing to restore; nothing was changed")
    acc = _Done()
    try:
        for t in data.tables:
            await _batch(writer, data, t, acc)
    except (psycopg.Error, RemedyAbort) as exc:
        per_table, refusals = acc.per_table, acc.refusals
        if not per_table:
            raise  # nothing committed: the executor rolls back and says so
        done = ", ".join(f"{r['table']} {r['restored'] + r['overwritten']}" for r in per_table)
        raise OutsideStepFailed(
            Outcome(
                ok=False,
                summary=f"the batches committed before stay ({done} rows); the next one "
                f"failed and was rolled back: {mask_personal(str(exc).splitlines()[0])}; "
                f"`/db {RESTORE_NAME}` again plans what is left",
                affected=acc.affected,
                rows=per_table + refusals,
                error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
        ) from exc
    # Verified by primary key, after the last batch committed.
    per_table, refusals = acc.per_table, acc.refusals
    affected, backed_up, backups = acc.affected, acc.backed_up, acc.backups
    for row in per_table:
        t = next(x for x in data.tables if x.table == row["table"])
        row["in_production"] = await _count_present(writer, t, t.restore) if t.restore else 0
    refused_n = len(refusals)
    summary = (
        f"restored {plural(affected, 'row')} from the copy in {len(per_table)} table "
        f"batch{'' if len(per_table) == 1 else 'es'} (one transaction each)"
        + (
            f", {plural(backed_up, 'overwritten row')} backed up in {', '.join(backups)}"
            if backed_up
            else ""
        )
        + (
            f"; {plural(refused_n, 'row')} refused by a guard and left out: "
            + ", ".join(sorted({str(r["guard"]) for r in refusals}))
            if refused_n
            else ""
        )
    )
    return Outcome(
        ok=True,
        summary=summary,
        affected=affected,
        backed_up=backed_up,
        backup_table=backups[0] if len(backups) == 1 else None,
        rows=per_table + refusals,
    )


async def verify_restore(db: Reader, plan: Plan, run: Execution) -> Verification:
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    data = plan.private(RestoreData)
    found = []
    landed = True
    for t in data.tables:
        if t.restore:
            n = await _count_present(db, t, t.restore)
            landed &= n == len(t.restore)
            found.append(f"{t.table}: {n} of {len(t.restore)} restored rows present")
        if t.overwrite:
            name = backup_name(run.approval_id, t.table)
            rows = await db.fetch(
                "SELECT to_regclass(%s) IS NOT NULL AS y",
                (sql.Identifier(BACKUP_SCHEMA, name).as_string(),),
            )
            landed &= bool(rows[0]["y"])
            found.append(f"{t.table}: backup {name} {'exists' if rows[0]['y'] else 'missing'}")
    return Verification(landed=landed, found="; ".join(found))


RESTORE_FROM_COPY = add_remedy(
    Remedy(
        name=RESTORE_NAME,
        usage=USAGE,
        summary="insert the rows production lost from a restored copy (RECOVERY_DATABASE_URL), "
        "diffed by primary key; changed rows listed (overwritten only when asked, backed up)",
        plan=plan_restore,
        apply=apply_restore,
        verify=verify_restore,
        approver_role="ADMIN",
        approvers=2,
        preflight=True,
        sample=sample_restore,
    )
)
