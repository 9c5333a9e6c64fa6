"""Migrations: `/db migrations`, Prisma's migration history and schema drift, worst first.

Prisma keeps its history in `_prisma_migrations`; a row neither finished nor rolled
back is a failed migration, and `prisma migrate deploy` refuses to run anything while
one exists. The table is looked up in every schema (a Supabase project may keep it
outside `public`), and a database without it is a finding, not a failure.

Drift is measured against `expected_schema.json`, kept beside this module and dumped
from the fixture schema (`python -m bot.console.expected`), because the
live database is what drifts: the check reads only the catalog, read-only, and lists
per kind what is missing, extra or changed. Only the expected schema is compared, so
the bot's own backups (schema `dbops_backup`) and the platform's schemas never count.

LEAPS's audit trail is listed too (`check_audit_trail`, which `/db health` runs as well):
production's audit function inserts its audit_log row without an id while the column has
no default, a defect of the schema the application's migrations should fix; the finding
names `/db fix-audit-id` and the Prisma migration to add.

Migration logs hold SQL and error text: they are shown cut short, with string literals
redacted and connection-string passwords masked, like every query text of the bot.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from psycopg import sql

from commands.audit_trail import AUDIT_TABLE, audit_trail
from commands.base import (
    Context,
    Finding,
    Reader,
    Report,
    Row,
    Status,
    UsageError,
    human_duration,
    redact_literals,
    register,
)

MIGRATIONS_TABLE = "_prisma_migrations"
# `prisma migrate` holds this advisory lock while it works (prisma-engines, postgres
# flavour): a held lock means a migration may be running right now.
PRISMA_LOCK_KEY = 72707369
EXPECTED_FILE = Path(__file__).with_name("expected_schema.json")
LOG_CHARS = 300
MAX_ROWS = 200

# --- the migration history --------------------------------------------------------------

_TABLES_SQL = """
SELECT n.nspname::text AS schema
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %s AND c.relkind IN ('r', 'p')
ORDER BY array_position(current_schemas(false), n.nspname::text) NULLS LAST, n.nspname
"""
_LOCK_SQL = """
SELECT l.pid FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = %s
  AND l.objsubid = 1 AND l.pid <> pg_backend_pid()
ORDER BY l.pid
"""


def history_sql(schema: str) -> sql.Composed:
    """The rows that need a look (unfinished or rolled back), newest first, and whether
    a later attempt of the same migration was applied."""
    table = sql.Identifier(schema, MIGRATIONS_TABLE)
    return sql.SQL(
        "SELECT m.id, m.migration_name, m.started_at, m.finished_at, m.rolled_back_at,"
        " m.applied_steps_count, left(coalesce(m.logs, ''), 4000) AS logs,"
        " EXISTS (SELECT 1 FROM {t} a WHERE a.migration_name = m.migration_name"
        "   AND a.finished_at IS NOT NULL AND a.rolled_back_at IS NULL) AS applied_later"
        " FROM {t} m WHERE m.finished_at IS NULL OR m.rolled_back_at IS NOT NULL"
        " ORDER BY m.started_at DESC, m.id LIMIT {n}"
    ).format(t=table, n=sql.Literal(MAX_ROWS))


def applied_sql(schema: str) -> sql.Composed:
    table = sql.Identifier(schema, MIGRATIONS_TABLE)
    return sql.SQL(
        "SELECT count(*) AS n, (SELECT a.migration_name FROM {t} a"
        "   WHERE a.finished_at IS NOT NULL AND a.rolled_back_at IS NULL"
        "   ORDER BY a.finished_at DESC, a.migration_name DESC LIMIT 1) AS last"
        " FROM {t} m WHERE m.finished_at IS NOT NULL AND m.rolled_back_at IS NULL"
    ).format(t=table)


async def migration_schemas(db: Reader) -> list[str]:
    """Every schema holding a `_prisma_migrations` table, the search path's first."""
    return [str(r["schema"]) for r in await db.fetch(_TABLES_SQL, (MIGRATIONS_TABLE,))]


async def prisma_lock_holders(db: Reader) -> list[int]:
    return [int(r["pid"]) for r in await db.fetch(_LOCK_SQL, (PRISMA_LOCK_KEY,))]


_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]+:)[^\s@/]+@", re.IGNORECASE)
_KEY_PASSWORD = re.compile(r"\b(password|passwd|pwd)\s*=\s*\S+", re.IGNORECASE)


def shown_log(text: str | None, limit: int = LOG_CHARS, show_literals: bool = False) -> str:
    """A migration log as a report may show it: literals redacted (before newlines are
    folded, so a `--` comment ends where it did), passwords masked, one line, cut."""
    if not text:
        return ""
    shown = text if show_literals else redact_literals(text)
    shown = _URL_PASSWORD.sub(r"\1***@", shown)
    shown = _KEY_PASSWORD.sub(r"\1=***", shown)
    shown = " ".join(shown.split())
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _iso(value: Any) -> str | None:
    if not isinstance(value, datetime):
        return None
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Attempt:
    """One row of the history that needs a look, and what state it is in."""

    schema: str
    row: Row
    state: str  # failed | running | rolled back | superseded

    @property
    def name(self) -> str:
        return str(self.row["migration_name"])

    @property
    def status(self) -> Status:
        return {
            "failed": Status.CRIT,
            "running": Status.WARN,
            "rolled back": Status.WARN,
        }.get(self.state, Status.OK)


_ORDER = {"failed": 0, "running": 1, "rolled back": 2, "superseded": 3}


def classify(schema: str, rows: list[Row], lock_held: bool) -> list[Attempt]:
    """Worst first: failed, running, rolled back and never applied, then rolled back
    attempts a later one replaced. While Prisma's lock is held, the newest unfinished
    attempt without a log is taken as running, not failed."""
    attempts: list[Attempt] = []
    running_taken = False
    for row in rows:  # newest first
        if row["finished_at"] is None and row["rolled_back_at"] is None:
            if lock_held and not running_taken and not row["logs"]:
                state, running_taken = "running", True
            else:
                state = "failed"
        elif row["rolled_back_at"] is not None and not row["applied_later"]:
            state = "rolled back"
        elif row["rolled_back_at"] is not None:
            state = "superseded"
        else:
            continue
        attempts.append(Attempt(schema, row, state))
    return sorted(attempts, key=lambda a: _ORDER[a.state])


def attempt_finding(a: Attempt, show_literals: bool, several_tables: bool) -> Finding:
    now = datetime.now(UTC)
    r = a.row
    started = r["started_at"]
    age = human_duration((now - started).total_seconds()) if isinstance(started, datetime) else "?"
    where = f" ({a.schema}.{MIGRATIONS_TABLE})" if several_tables else ""
    log = shown_log(r["logs"], show_literals=show_literals)
    steps = int(r["applied_steps_count"] or 0)
    if a.state == "failed":
        summary = (
            f"migration {a.name}{where} FAILED: started {age} ago, never finished nor rolled "
            f"back ({steps} steps applied); `prisma migrate deploy` refuses to run until it "
            "is resolved"
        )
        hint = (
            f"if its changes are absent, `/db migration-resolve {a.name} --rolled-back`, fix "
            f"and deploy again; if they are all in place, `/db migration-resolve {a.name} "
            "--applied` (both need approval)"
        )
    elif a.state == "running":
        summary = (
            f"migration {a.name}{where} started {age} ago and has not finished; a "
            "`prisma migrate` session holds its lock, so it is probably still running"
        )
        hint = "wait for it; if it hangs, `/db connections` shows the session"
    elif a.state == "rolled back":
        summary = (
            f"migration {a.name}{where} was rolled back ({_iso(r['rolled_back_at'])}) and "
            "has not been applied since: it is pending"
        )
        hint = "`prisma migrate deploy` applies it again once its cause is fixed"
    else:
        summary = f"migration {a.name}{where} was rolled back once and applied later"
        hint = None
    if log:
        summary += f"; log: {log}"
    return Finding(
        check=f"migration {a.name}",
        status=a.status,
        summary=summary,
        rows=[
            {
                "migration": a.name,
                "state": a.state,
                "started_at": _iso(r["started_at"]),
                "finished_at": _iso(r["finished_at"]),
                "rolled_back_at": _iso(r["rolled_back_at"]),
                "applied_steps": steps,
                "logs": log,
            }
        ],
        hint=hint,
    )


async def history_findings(ctx: Context) -> list[Finding]:
    """The migration history as findings: the problems worst first, then one summary."""
    found: list[tuple[str, list[Row], int, str | None]] = []
    lock: list[int] = []

    async def survey(db: Reader) -> Finding:
        schemas = await migration_schemas(db)
        lock.extend(await prisma_lock_holders(db))
        for schema in schemas:
            rows = await db.fetch(history_sql(schema).as_string())
            (applied,) = await db.fetch(applied_sql(schema).as_string())
            found.append((schema, rows, int(applied["n"]), applied["last"]))
        return Finding(check="migrations", status=Status.OK, summary="read")

    head = await ctx.gateway.run_check("migrations", survey)
    if head.status is not Status.OK:
        return [head]
    if not found:
        return [
            Finding(
                check="migrations",
                status=Status.WARN,
                summary=f"no `{MIGRATIONS_TABLE}` table in any schema: migrations are not "
                "tracked by Prisma on this database (applied by other means?), so there is "
                "no migration history to check",
                hint="schema drift below still compares the live catalog with the expected objects",
            )
        ]
    show = ctx.thresholds.show_query_literals
    findings: list[Finding] = []
    several = len(found) > 1
    for schema, rows, applied, last in found:
        attempts = classify(schema, rows, bool(lock))
        findings += [attempt_finding(a, show, several) for a in attempts]
        counts = {s: sum(1 for a in attempts if a.state == s) for s in _ORDER}
        problems = [f"{counts[s]} {s}" for s in ("failed", "running", "rolled back") if counts[s]]
        worst = min((a.status for a in attempts), key=lambda s: s.severity, default=Status.OK)
        where = f"{schema}.{MIGRATIONS_TABLE}"
        summary = f"{where}: {applied} applied (last {last or 'none'})"
        summary += "; " + ", ".join(problems) if problems else "; none failed, none pending"
        if lock:
            summary += f"; `prisma migrate` lock held by pid {', '.join(map(str, lock))}"
        findings.append(Finding(check=f"migrations {where}", status=worst, summary=summary))
    return findings


# --- the audit trail's id (LEAPS_SCHEMA.md, Audit) ---------------------------------------

FIX_AUDIT_ID = "fix-audit-id"
AUDIT_CHECK = "audit trail"
# What `fix-audit-id` runs, by audit_log.id's type (LEAPS: text).
AUDIT_ID_DEFAULTS = {"text": "gen_random_uuid()::text", "uuid": "gen_random_uuid()"}
# The application's side of the fix: Prisma introspects the default as this expression,
# so its schema must say so too, or `prisma migrate diff` / `migrate dev` see drift.
PRISMA_AUDIT_ID = 'id String @id @default(dbgenerated("(gen_random_uuid())::text"))'
PRISMA_AUDIT_MIGRATION = "audit_log_id_default"
PRISMA_AUDIT_SQL = (
    'ALTER TABLE "audit_log" ALTER COLUMN "id" SET DEFAULT (gen_random_uuid())::text;'
)

_AUDIT_ID_COLUMN_SQL = """
SELECT format_type(a.atttypid, a.atttypmod) AS type, a.atttypid::regtype::text AS base_type,
       a.attnotnull AS not_null, pg_get_expr(d.adbin, d.adrelid) AS "default",
       nullif(a.attidentity::text, '') AS identity,
       to_regprocedure('gen_random_uuid()') IS NOT NULL AS uuid_available
FROM pg_attribute AS a
LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = to_regclass('public.audit_log') AND a.attname = 'id' AND NOT a.attisdropped
"""


async def audit_id_column(db: Reader) -> Row | None:
    """audit_log.id as the catalog has it (type, NOT NULL, default, identity), and whether
    gen_random_uuid() exists; None without the table or the column."""
    rows = await db.fetch(_AUDIT_ID_COLUMN_SQL)
    return rows[0] if rows else None


def describe_audit_id(column: Row) -> str:
    """`text NOT NULL, no default` and the like: the column's definition in one phrase."""
    if column["default"]:
        default = f"DEFAULT {column['default']}"
    else:
        default = "GENERATED AS IDENTITY" if column["identity"] else "no default"
    return f"{column['type']}{' NOT NULL' if column['not_null'] else ''}, {default}"


def audit_fix_hint() -> str:
    return (
        f"`/db {FIX_AUDIT_ID}` sets `ALTER TABLE audit_log ALTER COLUMN id SET DEFAULT "
        f"{AUDIT_ID_DEFAULTS['text']}` (one SUPERADMIN approves); then add it to the "
        f"application as a Prisma migration (`{PRISMA_AUDIT_MIGRATION}`: `{PRISMA_AUDIT_ID}` "
        "in schema.prisma), or Prisma sees the default as drift"
    )


async def check_audit_trail(db: Reader) -> Finding:
    """Production's latent defect (LEAPS_SCHEMA.md, Audit), from the catalog: the live
    audit function inserts its audit_log row without an id, and the column has no
    default, so every write made with `app.user_id` set is refused. A warning, not an
    outage: the application's writes without app.user_id pass, and the bot's remedies
    write their audit rows themselves meanwhile (DESIGN.md rule 11)."""
    column = await audit_id_column(db)
    if column is None:
        return Finding(
            check=AUDIT_CHECK,
            status=Status.SKIPPED,
            summary=f"no `{AUDIT_TABLE}.id` column: this database keeps no LEAPS audit trail",
        )
    trail = await audit_trail(db)
    tables = sorted({t.table for t in trail.triggers})
    rows: list[Row] = [
        {
            "function": f"{t.function}()",
            "trigger": t.trigger,
            "table": t.table,
            "events": "/".join(t.events),
            "update_of": ", ".join(t.columns) or None,
            "omits_id": t.function in trail.omitting,
        }
        for t in trail.triggers
    ]
    defined = describe_audit_id(column)
    defect = trail.defect()
    if defect is not None:
        return Finding(
            check=AUDIT_CHECK,
            status=Status.WARN,
            summary=f"{defect} ({AUDIT_TABLE}.id: {defined}); audited tables: "
            f"{', '.join(tables)}. A latent defect, not an outage: the application's writes "
            "without app.user_id pass, and the bot's remedies write their audit rows "
            "themselves until it is fixed",
            rows=rows,
            hint=audit_fix_hint(),
        )
    if trail.path == "none":
        summary = f"no enabled trigger writes {AUDIT_TABLE} rows ({AUDIT_TABLE}.id: {defined})"
    else:
        how = (
            f"{AUDIT_TABLE}.id defaults to {trail.id_default}"
            if trail.id_default
            else "the live function supplies the id"
        )
        summary = (
            f"{', '.join(f'{f}()' for f in trail.functions)} writes {AUDIT_TABLE} rows for "
            f"{', '.join(tables)}; {how}: writes made with app.user_id are accepted"
        )
    return Finding(check=AUDIT_CHECK, status=Status.OK, summary=summary, rows=rows)


# --- schema drift -----------------------------------------------------------------------

_RELATIONS_SQL = """
SELECT c.relname::text AS rel, c.relkind::text AS kind, a.attname::text AS col,
       format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'v', 'm') AND c.relname <> %(prisma)s
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY c.relname, a.attnum
"""
_ENUMS_SQL = """
SELECT t.typname::text AS name, array_agg(e.enumlabel::text ORDER BY e.enumsortorder) AS labels
FROM pg_type t
JOIN pg_namespace n ON n.oid = t.typnamespace
JOIN pg_enum e ON e.enumtypid = t.oid
WHERE n.nspname = %(schema)s
GROUP BY t.typname
"""
_FUNCTIONS_SQL = """
SELECT p.proname::text || '(' || pg_get_function_identity_arguments(p.oid) || ')' AS sig
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %(schema)s AND p.prokind IN ('f', 'p')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                  AND d.objid = p.oid AND d.deptype = 'e')
"""
_TRIGGERS_SQL = """
SELECT c.relname::text || '.' || t.tgname::text AS name, p.proname::text AS function
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_proc p ON p.oid = t.tgfoid
WHERE n.nspname = %(schema)s AND NOT t.tgisinternal
"""
# Keyed by what the index enforces (relation, method, key columns, predicate), not by
# its name: an equivalent index under another name serves the same rule.
_UNIQUE_SQL = """
SELECT ic.relname::text AS name, c.relname::text AS rel, am.amname::text AS method,
       (SELECT string_agg(pg_get_indexdef(i.indexrelid, k, true), ', ' ORDER BY k)
          FROM generate_series(1, i.indnkeyatts) AS k) AS columns,
       pg_get_expr(i.indpred, i.indrelid, true) AS predicate, i.indisvalid AS valid
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_am am ON am.oid = ic.relam
WHERE i.indisunique AND n.nspname = %(schema)s AND c.relname <> %(prisma)s
"""

RELATION_KINDS = {"r": "tables", "p": "tables", "v": "views", "m": "materialized_views"}
# The finding of each kind, in the order a report lists them.
KINDS = {
    "tables": "tables",
    "columns": "columns",
    "enums": "enums",
    "views": "views",
    "materialized_views": "materialized views",
    "functions": "functions",
    "triggers": "triggers",
    "unique_indexes": "unique indexes",
}


async def read_objects(db: Reader, schema: str = "public") -> dict[str, Any]:
    """The objects of `schema` as the live catalog has them, in the expected file's shape."""
    params = {"schema": schema, "prisma": MIGRATIONS_TABLE}
    objects: dict[str, Any] = {"schema": schema, "tables": {}, "views": {}}
    objects["materialized_views"] = {}
    for r in await db.fetch(_RELATIONS_SQL, params):
        columns = objects[RELATION_KINDS[r["kind"]]].setdefault(r["rel"], {})
        if r["col"] is not None:
            columns[r["col"]] = str(r["type"]) + (" not null" if r["not_null"] else "")
    objects["enums"] = {r["name"]: list(r["labels"]) for r in await db.fetch(_ENUMS_SQL, params)}
    objects["functions"] = sorted(str(r["sig"]) for r in await db.fetch(_FUNCTIONS_SQL, params))
    objects["triggers"] = {r["name"]: r["function"] for r in await db.fetch(_TRIGGERS_SQL, params)}
    unique: dict[str, str] = {}
    for r in await db.fetch(_UNIQUE_SQL, params):
        key = f"{r['rel']} USING {r['method']} ({r['columns']})"
        if r["predicate"]:
            key += f" WHERE {r['predicate']}"
        unique[key] = str(r["name"]) + ("" if r["valid"] else " (INVALID)")
    objects["unique_indexes"] = unique
    ordered: dict[str, Any] = _sorted(objects)
    return ordered


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return value


def load_expected(path: Path = EXPECTED_FILE) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@dataclass(frozen=True)
class Drift:
    kind: str  # a key of KINDS
    object: str
    change: str  # missing | extra | changed
    expected: str | None = None
    found: str | None = None

    def row(self) -> Row:
        return {
            "object": self.object,
            "change": self.change,
            "expected": self.expected,
            "found": self.found,
        }


def _names(kind: str, expected: Iterable[str], live: Iterable[str]) -> list[Drift]:
    exp, got = set(expected), set(live)
    return [Drift(kind, n, "missing") for n in sorted(exp - got)] + [
        Drift(kind, n, "extra") for n in sorted(got - exp)
    ]


def _changed(
    kind: str,
    expected: Mapping[str, Any],
    live: Mapping[str, Any],
    label: Callable[[str], str] = str,
    show: Callable[[Any], str] = str,
) -> list[Drift]:
    return [
        Drift(kind, label(k), "changed", show(expected[k]), show(live[k]))
        for k in sorted(set(expected) & set(live))
        if expected[k] != live[k]
    ]


def _relations(kind: str, expected: Mapping[str, Any], live: Mapping[str, Any]) -> list[Drift]:
    """Relations of one kind, and the columns of those present on both sides (a missing
    or extra relation is one finding, not one per column)."""
    drifts = _names(kind, expected, live)
    for rel in sorted(set(expected) & set(live)):
        exp, got = expected[rel], live[rel]
        drifts += [
            Drift("columns", f"{rel}.{d.object}", d.change, exp.get(d.object), got.get(d.object))
            for d in _names("columns", exp, got)
        ]
        drifts += _changed("columns", exp, got, label=f"{rel}.{{}}".format)
    return drifts


def _enum_values(expected: Mapping[str, list[str]], live: Mapping[str, list[str]]) -> list[Drift]:
    drifts = _names("enums", expected, live)
    for name in sorted(set(expected) & set(live)):
        exp, got = expected[name], live[name]
        if exp == got:
            continue
        missing, extra = [v for v in exp if v not in got], [v for v in got if v not in exp]
        change = "missing" if missing else "extra" if extra else "changed"
        drifts.append(Drift("enums", f"{name} values", change, ", ".join(exp), ", ".join(got)))
    return drifts


def _relation_of(index_key: str) -> str:
    """The relation a unique-index key (`rel USING method (columns)`) belongs to."""
    return index_key.partition(" USING ")[0]


def compare(expected: Mapping[str, Any], live: Mapping[str, Any]) -> list[Drift]:
    """What the live objects lack, add or changed, per kind; empty when they match."""
    drifts: list[Drift] = []
    for kind in ("tables", "views", "materialized_views"):
        drifts += _relations(kind, expected.get(kind, {}), live.get(kind, {}))
    drifts += _enum_values(expected.get("enums", {}), live.get("enums", {}))
    drifts += _names("functions", expected.get("functions", []), live.get("functions", []))
    exp_trg, got_trg = expected.get("triggers", {}), live.get("triggers", {})
    drifts += _names("triggers", exp_trg, got_trg)
    drifts += _changed("triggers", exp_trg, got_trg, show=lambda f: f"runs {f}()")
    # A relation missing or extra is one finding: its unique indexes are not listed again.
    kinds = ("tables", "views", "materialized_views")
    exp_rels = {r for k in kinds for r in expected.get(k, {})}
    got_rels = {r for k in kinds for r in live.get(k, {})}
    on_both = exp_rels & got_rels
    exp_idx, got_idx = (
        {k: v for k, v in side.get("unique_indexes", {}).items() if _relation_of(k) in on_both}
        for side in (expected, live)
    )
    drifts += [
        Drift("unique_indexes", d.object, d.change, exp_idx.get(d.object), got_idx.get(d.object))
        for d in _names("unique_indexes", exp_idx, got_idx)
    ]
    drifts += [
        Drift("unique_indexes", k, "changed", exp_idx[k], got_idx[k])
        for k in sorted(set(exp_idx) & set(got_idx))
        if got_idx[k].endswith("(INVALID)")
    ]
    return drifts


_DRIFT_HINT = (
    "the database no longer matches the migrations: `prisma migrate diff "
    "--from-schema-datasource prisma/schema.prisma --to-schema-datamodel prisma/schema.prisma "
    "--script` prints the SQL that brings it back; apply that as a new migration, not by hand"
)


def drift_findings(drifts: list[Drift], schema: str, max_rows: int) -> list[Finding]:
    findings: list[Finding] = []
    for kind, label in KINDS.items():
        mine = [d for d in drifts if d.kind == kind]
        if not mine:
            continue
        parts = []
        for change in ("missing", "changed", "extra"):
            items = [d.object for d in mine if d.change == change]
            if items:
                shown = ", ".join(items[:5]) + (
                    f" and {len(items) - 5} more" if len(items) > 5 else ""
                )
                parts.append(f"{len(items)} {change}: {shown}")
        serious = any(d.change != "extra" for d in mine)
        findings.append(
            Finding(
                check=f"schema drift: {label}",
                status=Status.CRIT if serious else Status.WARN,
                summary=f"{label} of schema {schema} differ from the expected objects: "
                + "; ".join(parts),
                rows=[d.row() for d in mine[:max_rows]],
                hint=_DRIFT_HINT,
            )
        )
    return findings


async def drift_report(ctx: Context) -> list[Finding]:
    try:
        expected = load_expected()
    except (OSError, ValueError) as exc:
        return [
            Finding(
                check="schema drift",
                status=Status.ERROR,
                summary=f"the expected objects ({EXPECTED_FILE.name}) cannot be read: {exc}",
            )
        ]
    schema = str(expected.get("schema", "public"))
    live: dict[str, Any] = {}

    async def survey(db: Reader) -> Finding:
        live.update(await read_objects(db, schema))
        return Finding(check="schema drift", status=Status.OK, summary="read")

    head = await ctx.gateway.run_check("schema drift", survey)
    if head.status is not Status.OK:
        return [head]
    drifts = compare(expected, live)
    if drifts:
        return drift_findings(drifts, schema, ctx.thresholds.max_rows)
    counted = ", ".join(
        f"{len(expected.get(k, {}))} {label}" for k, label in KINDS.items() if k != "columns"
    )
    return [
        Finding(
            check="schema drift",
            status=Status.OK,
            summary=f"schema {schema} matches the expected objects ({counted})",
        )
    ]


@register(
    "migrations",
    usage="/db migrations",
    summary="Prisma migration history (failed, rolled back, pending) and schema drift",
    role="REVIEWER",
)
async def migrations(ctx: Context, args: list[str]) -> Report:
    if args:
        raise UsageError("`migrations` takes no arguments")
    history, drift, audit = await asyncio.gather(
        history_findings(ctx),
        drift_report(ctx),
        ctx.gateway.run_check(AUDIT_CHECK, check_audit_trail),
    )
    return Report(
        title="Migrations and schema drift",
        target=ctx.gateway.target,
        findings=[*history, *drift, audit],
    ).sorted()
