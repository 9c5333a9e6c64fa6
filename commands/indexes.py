"""Indexes: `/db indexes`, and the catalog reads `create-index` and `drop-index`
(commands/remedies/indexes.py) share.

Every verdict compares index *definitions* read from `pg_index` (columns, operator
classes, collations, sort options, expressions, predicate, access method), never names:
production's indexes were named by whoever made them, and a recommended index that
exists under another name is there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from commands.base import (
    Context,
    Finding,
    Reader,
    Report,
    Row,
    Status,
    UsageError,
    human_size,
    register,
)

# An unused index smaller than this costs little; listing it would bury the big ones.
UNUSED_MIN_BYTES = 1024 * 1024
_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb)?\s*$")
_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}


@dataclass(frozen=True)
class Recommended:
    """An index the operators' guide asks for ("Performance Issues → Add Missing
    Indexes"). `columns` are column names, each optionally followed by DESC; `where` is a
    predicate written here (repo data, never user input), compared with the live one
    after both are normalised (`same_predicate`)."""

    name: str
    table: str
    columns: tuple[str, ...]
    why: str
    where: str | None = None
    schema: str = "public"

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    def describe(self) -> str:
        text = f"{self.qualified}({', '.join(self.columns)})"
        return text + (f" WHERE {self.where}" if self.where else "")


# The guide's recommended indexes, in our words. Names are the bot's own (what
# `create-index <name>` takes); matching against the live catalog is by definition.
RECOMMENDED: tuple[Recommended, ...] = (
    Recommended(
        name="submissions_by_user_activity_status",
        table="submissions",
        columns=("user_id", "activity_code", "status"),
        why="a participant's submissions of one activity in one state (the profile page, "
        "the single-attempt and quota rules)",
    ),
    Recommended(
        name="points_ledger_by_user_newest",
        table="points_ledger",
        columns=("user_id", "created_at DESC"),
        why="a participant's newest ledger rows first (point history, reconciliation)",
    ),
    Recommended(
        name="submissions_pending_by_age",
        table="submissions",
        columns=("created_at", "status"),
        where="status = 'PENDING'",
        why="the review queue: pending submissions, oldest first, without reading the decided ones",
    ),
)


def recommended(name: str) -> Recommended | None:
    return next((r for r in RECOMMENDED if r.name == name.strip().lower()), None)


# --- the catalog --------------------------------------------------------------------

# indoption bit 0 is DESC (pg_index.h: INDOPTION_DESC).
_DESC = 1

_INDEXES_SQL = """
SELECT i.indexrelid::bigint AS oid, i.indrelid::bigint AS table_oid,
       n.nspname::text AS schema, t.relname::text AS "table", c.relname::text AS index,
       am.amname::text AS method,
       i.indisunique AS is_unique, i.indisprimary AS is_primary,
       i.indisvalid AS is_valid, i.indisready AS is_ready, i.indisreplident AS is_replident,
       i.indnkeyatts::int AS nkey, i.indnatts::int AS natts,
       i.indkey::int2[]::int[] AS keys,
       i.indclass::oid[]::bigint[] AS opclasses,
       i.indcollation::oid[]::bigint[] AS collations,
       i.indoption::int2[]::int[] AS options,
       i.indexprs IS NOT NULL AS has_exprs, i.indpred IS NOT NULL AS partial,
       con.conname::text AS "constraint",
       pg_get_indexdef(i.indexrelid) AS definition,
       format('CREATE %sINDEX %s ON %s%s.%s USING ',
              CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END, quote_ident(c.relname),
              CASE WHEN c.relkind = 'I' THEN 'ONLY ' ELSE '' END,
              quote_ident(n.nspname), quote_ident(t.relname)) AS head,
       ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true)
               FROM generate_series(1, i.indnkeyatts) AS k) AS columns
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
JOIN pg_am am ON am.oid = c.relam
LEFT JOIN pg_constraint con
       ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
      AND con.contype IN ('p', 'u', 'x')
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
ORDER BY n.nspname, t.relname, c.relname
"""

# Sizes and scan counts take an ACCESS SHARE lock per relation: a separate read, so the
# remedies' rechecks (which must hold no lock on the table) can use `load_indexes` alone.
_STATS_SQL = """
SELECT i.indexrelid::bigint AS oid,
       pg_relation_size(i.indexrelid)::bigint AS bytes,
       pg_total_relation_size(i.indrelid)::bigint AS table_bytes,
       coalesce(s.idx_scan, 0)::bigint AS scans
FROM pg_index i
LEFT JOIN pg_stat_all_indexes s ON s.indexrelid = i.indexrelid
WHERE i.indexrelid = ANY(%s::oid[])
"""

_STATS_SINCE_SQL = """
SELECT d.stats_reset, pg_postmaster_start_time() AS started
FROM pg_stat_database d WHERE d.datname = current_database()
"""

_UNINDEXED_FK_SQL = """
SELECT con.conname::text AS "constraint", n.nspname::text AS schema,
       t.relname::text AS "table", con.conrelid::bigint AS table_oid,
       rn.nspname::text AS ref_schema, rt.relname::text AS ref_table,
       ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
              ORDER BY k.ord) AS columns,
       pg_total_relation_size(con.conrelid)::bigint AS table_bytes,
       greatest(t.reltuples, 0)::bigint AS est_rows
FROM pg_constraint con
JOIN pg_class t ON t.oid = con.conrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
JOIN pg_class rt ON rt.oid = con.confrelid
JOIN pg_namespace rn ON rn.oid = rt.relnamespace
WHERE con.contype = 'f'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (
    SELECT 1 FROM pg_index i
     WHERE i.indrelid = con.conrelid AND i.indisvalid AND i.indpred IS NULL
       AND i.indnkeyatts >= cardinality(con.conkey)
       AND (SELECT array_agg(k.attnum ORDER BY k.attnum)
              FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
             WHERE k.ord <= cardinality(con.conkey))
         = (SELECT array_agg(x ORDER BY x) FROM unnest(con.conkey) AS x))
ORDER BY n.nspname, t.relname, con.conname
"""

_FOREIGN_KEYS_SQL = """
SELECT con.conrelid::bigint AS table_oid, con.conname::text AS name, con.conkey::int[] AS keys
FROM pg_constraint con WHERE con.contype = 'f'
"""

_TABLE_SQL = """
SELECT c.oid::bigint AS oid, n.nspname::text AS schema, c.relname::text AS "table",
       c.relkind::text AS kind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %s AND (%s::text IS NULL OR n.nspname = %s)
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY n.nspname = 'public' DESC, n.nspname
"""

_COLUMNS_SQL = """
SELECT a.attnum::int AS attnum, a.attname::text AS name
FROM pg_attribute a
WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


@dataclass
class Index:
    oid: int
    table_oid: int
    schema: str
    table: str
    name: str
    method: str
    is_unique: bool
    is_primary: bool
    is_valid: bool
    is_ready: bool
    is_replident: bool
    nkey: int
    natts: int
    keys: tuple[int, ...]
    opclasses: tuple[int, ...]
    collations: tuple[int, ...]
    options: tuple[int, ...]
    exprs: str | None  # the definition's tail when some key is an expression, else None
    predicate: str | None
    tail: str
    constraint: str | None
    definition: str
    columns: tuple[str, ...]
    bytes: int | None = None
    table_bytes: int | None = None
    scans: int | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def signature(self) -> tuple[Any, ...]:
        """What makes two indexes answer the same queries the same way: equal signatures
        are exact duplicates, whatever their names and uniqueness."""
        return (
            self.table_oid,
            self.method,
            self.nkey,
            self.keys,
            self.opclasses,
            self.collations,
            self.options,
            self.tail,
        )

    @property
    def protected(self) -> str | None:
        """Why the bot never drops this index, or None."""
        if self.is_primary:
            return "it is the primary key"
        if self.constraint:
            return f"it backs constraint {self.constraint}"
        if self.is_unique:
            return "it is unique: it enforces a rule, whatever its scans"
        if self.is_replident:
            return "it is the table's replica identity"
        return None

    def key_text(self) -> str:
        parts = []
        for col, opt in zip(self.columns, self.options, strict=False):
            parts.append(f"{col} DESC" if opt & _DESC else col)
        text = f"{self.qualified_table}({', '.join(parts)})"
        return text + (f" WHERE {self.predicate}" if self.predicate else "")

    def row(self, **extra: Any) -> Row:
        return {
            "table": self.qualified_table,
            "index": self.qualified,
            "size": human_size(self.bytes),
            "table_size": human_size(self.table_bytes),
            "scans": self.scans,
            "definition": self.definition,
            **extra,
        }


def _tail(r: Row) -> str:
    """The definition after `... ON table USING `: method, keys, expressions, INCLUDE,
    storage parameters and predicate, as PostgreSQL prints them, name left out."""
    definition, head = str(r["definition"]), str(r["head"])
    if definition.startswith(head):
        return definition[len(head) :]
    return definition.split(" USING ", 1)[-1]


def _index(r: Row) -> Index:
    tail = _tail(r)
    predicate = tail.split(" WHERE ", 1)[1] if r["partial"] and " WHERE " in tail else None
    return Index(
        oid=int(r["oid"]),
        table_oid=int(r["table_oid"]),
        schema=str(r["schema"]),
        table=str(r["table"]),
        name=str(r["index"]),
        method=str(r["method"]),
        is_unique=bool(r["is_unique"]),
        is_primary=bool(r["is_primary"]),
        is_valid=bool(r["is_valid"]),
        is_ready=bool(r["is_ready"]),
        is_replident=bool(r["is_replident"]),
        nkey=int(r["nkey"]),
        natts=int(r["natts"]),
        keys=tuple(int(k) for k in r["keys"]),
        opclasses=tuple(int(k) for k in r["opclasses"]),
        collations=tuple(int(k) for k in r["collations"]),
        options=tuple(int(k) for k in r["options"]),
        exprs=tail if r["has_exprs"] else None,
        predicate=predicate,
        tail=tail,
        constraint=r["constraint"],
        definition=str(r["definition"]),
        columns=tuple(str(c) for c in r["columns"]),
    )


async def load_indexes(db: Reader) -> list[Index]:
    """Every index outside the system schemas, from the catalog alone: no lock taken on
    any table or index, so a remedy can recheck with it and then run DROP INDEX
    CONCURRENTLY, which waits for every lock on the table. (`pg_get_expr` would lock the
    table; the predicate and expressions are read from `pg_get_indexdef`, which does not.)"""
    return [_index(r) for r in await db.fetch(_INDEXES_SQL)]


async def measure(db: Reader, indexes: Sequence[Index]) -> None:
    if not indexes:
        return
    stats = {int(r["oid"]): r for r in await db.fetch(_STATS_SQL, ([i.oid for i in indexes],))}
    for i in indexes:
        s = stats.get(i.oid)
        if s is not None:
            i.bytes, i.table_bytes, i.scans = (
                int(s["bytes"]),
                int(s["table_bytes"]),
                int(s["scans"]),
            )


def concurrently_drop(index: Index) -> str:
    return drop_statement(index.schema, index.name).as_string()


def drop_statement(schema: str, name: str) -> sql.Composed:
    return sql.SQL("DROP INDEX CONCURRENTLY {}").format(sql.Identifier(schema, name))


# --- definitions compared -----------------------------------------------------------

_CAST = re.compile(r'::(?:"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_]*)(?:\[\])?')


def normalise_predicate(text: str | None) -> str | None:
    """A predicate as comparable text: PostgreSQL prints `(status = 'PENDING'::"S")`
    for what was written `status = 'PENDING'`, so casts, parentheses and spaces go."""
    if text is None:
        return None
    return re.sub(r"[()\s]", "", _CAST.sub("", text))


def same_predicate(a: str | None, b: str | None) -> bool:
    return normalise_predicate(a) == normalise_predicate(b)


@dataclass(frozen=True)
class KeyColumn:
    name: str
    desc: bool = False

    def text(self) -> str:
        return f"{self.name} DESC" if self.desc else self.name


def parse_column(text: str) -> KeyColumn:
    words = text.split()
    if len(words) == 2 and words[1].upper() in ("ASC", "DESC"):
        return KeyColumn(words[0], words[1].upper() == "DESC")
    if len(words) == 1:
        return KeyColumn(words[0])
    raise UsageError(f"`{text}` is not a column (a name, optionally ASC or DESC)")


def serves(
    index: Index,
    table_oid: int,
    attnums: Sequence[int],
    desc: Sequence[bool],
    predicate: str | None,
) -> bool:
    """True when `index` (valid, btree, plain columns) starts with exactly these key
    columns in this order and direction, with the same predicate."""
    n = len(attnums)
    if index.table_oid != table_oid or not index.is_valid or index.method != "btree":
        return False
    if index.exprs is not None or index.nkey < n:
        return False
    if not same_predicate(index.predicate, predicate):
        return False
    return list(index.keys[:n]) == list(attnums) and [
        bool(o & _DESC) for o in index.options[:n]
    ] == list(desc)


def _keeper_first(i: Index) -> tuple[bool, bool, int, int]:
    """Which of equal indexes stays: the one backing a constraint, else a unique one,
    else the most scanned, else the oldest."""
    return (i.constraint is None and not i.is_primary, not i.is_unique, -(i.scans or 0), i.oid)


def duplicate_groups(indexes: Sequence[Index]) -> list[list[Index]]:
    """Valid indexes with equal signatures, each group's keeper first."""
    groups: dict[tuple[Any, ...], list[Index]] = {}
    for i in indexes:
        if i.is_valid and i.is_ready:
            groups.setdefault(i.signature, []).append(i)
    ordered = [sorted(g, key=_keeper_first) for g in groups.values() if len(g) > 1]
    return sorted(ordered, key=lambda g: (g[0].qualified_table, g[0].name))


def twin_of(index: Index, indexes: Sequence[Index]) -> Index | None:
    """Another valid index with exactly `index`'s definition (the one that stays when
    `index` goes), or None. `index` itself may be invalid: a half-done drop."""
    twins = [
        i
        for i in indexes
        if i.oid != index.oid and i.is_valid and i.is_ready and i.signature == index.signature
    ]
    return min(twins, key=_keeper_first) if twins else None


def overlaps(indexes: Sequence[Index]) -> list[tuple[Index, Index]]:
    """(covered, wider): a plain btree index whose key columns are a strict leading
    prefix of another valid btree index's on the same table, same predicate. The
    covered one is dropped only by a person: it may still win on size."""
    plain = [
        i
        for i in indexes
        if i.is_valid and i.method == "btree" and i.exprs is None and i.nkey == i.natts
    ]
    twins: dict[tuple[Any, ...], int] = {}
    for i in plain:
        twins[i.signature] = twins.get(i.signature, 0) + 1
    found = []
    for a in plain:
        if a.protected is not None or twins[a.signature] > 1:  # a duplicate: listed as such
            continue
        for b in plain:
            if b.oid == a.oid or b.table_oid != a.table_oid or b.nkey <= a.nkey:
                continue
            n = a.nkey
            if (
                b.keys[:n] == a.keys[:n]
                and b.opclasses[:n] == a.opclasses[:n]
                and b.collations[:n] == a.collations[:n]
                and b.options[:n] == a.options[:n]
                and same_predicate(a.predicate, b.predicate)
            ):
                found.append((a, b))
                break
    return found


# --- arguments ----------------------------------------------------------------------


def parse_min_size(args: list[str]) -> int:
    if not args:
        return UNUSED_MIN_BYTES
    if len(args) > 1:
        raise UsageError("`indexes` takes at most one argument: the smallest unused index to list")
    m = _SIZE.match(args[0])
    if m is None:
        raise UsageError(f"`{args[0]}` is not a size (for example 0, 64kB, 10MB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


@dataclass(frozen=True)
class Table:
    oid: int
    schema: str
    name: str
    columns: dict[str, int]  # name -> attnum

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


async def find_table(db: Reader, name: str) -> Table:
    """A table named by a user, checked against the catalog (schema optional)."""
    schema, _, table = name.rpartition(".")
    rows = await db.fetch(_TABLE_SQL, (table, schema or None, schema or None))
    tables = [r for r in rows if r["kind"] in ("r", "p", "m")]
    if not tables:
        raise UsageError(f"there is no table `{name}`")
    if len(tables) > 1 and not schema and tables[0]["schema"] != "public":
        listing = ", ".join(f"`{r['schema']}.{r['table']}`" for r in tables)
        raise UsageError(f"`{name}` names several tables ({listing}); give the schema")
    t = tables[0]
    cols = {str(r["name"]): int(r["attnum"]) for r in await db.fetch(_COLUMNS_SQL, (t["oid"],))}
    return Table(int(t["oid"]), str(t["schema"]), str(t["table"]), cols)


def check_columns(table: Table, columns: Sequence[KeyColumn]) -> list[int]:
    missing = [c.name for c in columns if c.name not in table.columns]
    if missing:
        raise UsageError(
            f"{table.qualified} has no column {', '.join(f'`{m}`' for m in missing)}; "
            f"its columns: {', '.join(table.columns)}"
        )
    if len({c.name for c in columns}) != len(columns):
        raise UsageError("a column is named twice")
    return [table.columns[c.name] for c in columns]


# --- /db indexes --------------------------------------------------------------------


def _since(row: Row | None) -> str:
    if row is None:
        return "since statistics began"
    reset, started = row.get("stats_reset"), row.get("started")
    if isinstance(reset, datetime):
        return f"since the statistics were reset at {reset.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
    if isinstance(started, datetime):
        up = started.astimezone(UTC)
        return f"since statistics began (never reset; server up since {up:%Y-%m-%d %H:%M} UTC)"
    return "since statistics began"


def _listing(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def serves_foreign_key(index: Index, keys: Sequence[int]) -> bool:
    """An index the referencing side of a foreign key can use: its leading key columns
    are the key's columns (in any order), no expression, no predicate."""
    n = len(keys)
    return (
        index.is_valid
        and index.exprs is None
        and index.predicate is None
        and index.nkey >= n
        and sorted(index.keys[:n]) == sorted(keys)
    )


async def foreign_key_supporters(db: Reader, indexes: Sequence[Index]) -> set[int]:
    """For each foreign key, the one index that keeps its deletes and key updates from
    scanning the referencing table (the keeper among those that serve it): never
    offered as unused, since its scans are the referential actions nobody counts."""
    supporters: set[int] = set()
    for fk in await db.fetch(_FOREIGN_KEYS_SQL):
        serving = [
            i
            for i in indexes
            if i.table_oid == int(fk["table_oid"]) and serves_foreign_key(i, fk["keys"])
        ]
        if serving:
            supporters.add(min(serving, key=_keeper_first).oid)
    return supporters


async def check_unused(db: Reader, min_bytes: int) -> Finding:
    valid = [i for i in await load_indexes(db) if i.is_valid]
    await measure(db, valid)
    supporters = await foreign_key_supporters(db, valid)
    since = _since(next(iter(await db.fetch(_STATS_SINCE_SQL)), None))
    never = [
        i for i in valid if i.protected is None and i.scans == 0 and (i.bytes or 0) >= min_bytes
    ]
    unused = sorted((i for i in never if i.oid not in supporters), key=lambda i: -(i.bytes or 0))
    kept = len(never) - len(unused)
    kept_note = (
        f"; {kept} more never scanned but the only index of a foreign key, not listed"
        if kept
        else ""
    )
    if not unused:
        return Finding(
            check="unused indexes",
            status=Status.OK,
            summary=f"no unused index of {human_size(min_bytes)} or more; scans counted "
            f"{since}{kept_note}",
        )
    total = sum(i.bytes or 0 for i in unused)
    return Finding(
        check="unused indexes",
        status=Status.WARN,
        summary=f"{len(unused)} index(es) never scanned {since}, {human_size(total)} "
        "written on every change: "
        + _listing([f"{i.qualified} ({human_size(i.bytes)})" for i in unused])
        + kept_note,
        rows=[i.row(fix=concurrently_drop(i)) for i in unused],
        hint="scans on read replicas are not counted here: check them, then drop by hand "
        "with the row's `fix` (the bot's drop-index removes exact duplicates only)",
    )


async def check_invalid(db: Reader) -> Finding:
    invalid = [i for i in await load_indexes(db) if not i.is_valid]
    await measure(db, invalid)
    if not invalid:
        return Finding(check="invalid indexes", status=Status.OK, summary="no invalid index")
    return Finding(
        check="invalid indexes",
        status=Status.WARN,
        summary=f"{len(invalid)} invalid index(es), never used by queries"
        + (" but still written on every change" if any(i.is_ready for i in invalid) else "")
        + " (a failed CREATE INDEX CONCURRENTLY leaves them): "
        + _listing([f"{i.qualified} ({human_size(i.bytes)})" for i in invalid])
        + (
            "; a unique one among them still refuses duplicate values on every write"
            if any(i.is_ready and i.is_unique for i in invalid)
            else ""
        ),
        rows=[
            i.row(written=i.is_ready, unique=i.is_unique, fix=concurrently_drop(i)) for i in invalid
        ],
        hint="drop it with the row's `fix`, then build it again if it is wanted "
        "(`/db create-index table(columns)`)",
    )


async def check_duplicates(db: Reader) -> Finding:
    indexes = await load_indexes(db)
    await measure(db, indexes)
    rows: list[Row] = []
    said: list[str] = []
    for keeper, *extra in duplicate_groups(indexes):
        for i in extra:
            fix = (
                f"/db drop-index {i.qualified}"
                if i.protected is None
                else f"by hand: {i.protected}"
            )
            rows.append(i.row(duplicate_of=keeper.qualified, fix=fix))
            said.append(f"{i.qualified} = {keeper.qualified} ({human_size(i.bytes)})")
    if not rows:
        return Finding(check="duplicate indexes", status=Status.OK, summary="no duplicate index")
    return Finding(
        check="duplicate indexes",
        status=Status.WARN,
        summary=f"{len(rows)} exact duplicate(s), each written on every change for nothing: "
        + _listing(said),
        rows=rows,
        hint=str(rows[0]["fix"]) + " (needs approval; the definition is kept to recreate it)",
    )


async def check_overlaps(db: Reader) -> Finding:
    indexes = await load_indexes(db)
    await measure(db, indexes)
    pairs = overlaps(indexes)
    if not pairs:
        return Finding(check="overlapping indexes", status=Status.OK, summary="no overlap")
    return Finding(
        check="overlapping indexes",
        status=Status.WARN,
        summary=f"{len(pairs)} index(es) whose columns lead another index: "
        + _listing([f"{a.qualified} ⊂ {b.qualified} ({human_size(a.bytes)})" for a, b in pairs]),
        rows=[
            a.row(covered_by=b.qualified, wider=b.key_text(), fix=concurrently_drop(a))
            for a, b in pairs
        ],
        hint="the wider index answers the narrower one's queries; drop the narrower by hand "
        "once its scans are known to move (the bot drops exact duplicates only)",
    )


async def check_unindexed_foreign_keys(db: Reader) -> Finding:
    rows = await db.fetch(_UNINDEXED_FK_SQL)
    if not rows:
        return Finding(
            check="foreign keys without index",
            status=Status.OK,
            summary="every foreign key has an index on its columns",
        )
    out: list[Row] = []
    for r in rows:
        cols = ", ".join(r["columns"])
        out.append(
            {
                "table": f"{r['schema']}.{r['table']}",
                "constraint": r["constraint"],
                "columns": list(r["columns"]),
                "references": f"{r['ref_schema']}.{r['ref_table']}",
                "table_size": human_size(r["table_bytes"]),
                "est_rows": r["est_rows"],
                "fix": f"/db create-index {r['schema']}.{r['table']}({cols})",
            }
        )
    return Finding(
        check="foreign keys without index",
        status=Status.WARN,
        summary=f"{len(out)} foreign key(s) without an index: every delete or key change in "
        "the referenced table scans the whole referencing table: "
        + _listing([f"{o['table']}({', '.join(o['columns'])}) → {o['references']}" for o in out]),
        rows=out,
        hint=f"`{out[0]['fix']}` (needs approval)",
    )


async def check_recommended(db: Reader) -> Finding:
    indexes = await load_indexes(db)
    missing: list[Row] = []
    present: list[str] = []
    absent_tables: list[str] = []
    for rec in RECOMMENDED:
        try:
            table = await find_table(db, rec.qualified)
        except UsageError:
            absent_tables.append(rec.qualified)
            continue
        cols = [parse_column(c) for c in rec.columns]
        if any(c.name not in table.columns for c in cols):
            absent_tables.append(f"{rec.qualified} (columns changed)")
            continue
        attnums = [table.columns[c.name] for c in cols]
        match = next(
            (
                i
                for i in indexes
                if serves(i, table.oid, attnums, [c.desc for c in cols], rec.where)
            ),
            None,
        )
        if match is not None:
            present.append(f"{rec.name} as {match.qualified}")
            continue
        sizes = await db.fetch(
            "SELECT pg_total_relation_size(%s::oid)::bigint AS bytes,"
            " greatest(reltuples, 0)::bigint AS est_rows FROM pg_class WHERE oid = %s::oid",
            (table.oid, table.oid),
        )
        missing.append(
            {
                "recommended": rec.name,
                "definition": rec.describe(),
                "why": rec.why,
                "table_size": human_size(sizes[0]["bytes"]) if sizes else "?",
                "est_rows": sizes[0]["est_rows"] if sizes else None,
                "fix": f"/db create-index {rec.name}",
            }
        )
    note = f"; tables or columns not found: {', '.join(absent_tables)}" if absent_tables else ""
    if not missing:
        return Finding(
            check="recommended indexes",
            status=Status.OK,
            summary=f"all {len(present)} recommended indexes present ({', '.join(present)}){note}",
        )
    return Finding(
        check="recommended indexes",
        status=Status.WARN,
        summary=f"{len(missing)} of {len(RECOMMENDED)} recommended index(es) missing: "
        + ", ".join(str(m["definition"]) for m in missing)
        + note,
        rows=missing,
        hint=f"`{missing[0]['fix']}` builds it CONCURRENTLY (needs approval)",
    )


@register(
    "indexes",
    usage="/db indexes [min-size of unused, default 1MB]",
    summary="unused, invalid, duplicate and overlapping indexes; unindexed foreign keys; "
    "missing recommended indexes",
    role="REVIEWER",
)
async def indexes(ctx: Context, args: list[str]) -> Report:
    min_bytes = parse_min_size(args)
    gw = ctx.gateway

    async def unused(db: Reader) -> Finding:
        return await check_unused(db, min_bytes)

    findings = [
        await gw.run_check("invalid indexes", check_invalid),
        await gw.run_check("duplicate indexes", check_duplicates),
        await gw.run_check("recommended indexes", check_recommended),
        await gw.run_check("foreign keys without index", check_unindexed_foreign_keys),
        await gw.run_check("unused indexes", unused),
        await gw.run_check("overlapping indexes", check_overlaps),
    ]
    return Report(title="Indexes", target=gw.target, findings=findings).sorted()
