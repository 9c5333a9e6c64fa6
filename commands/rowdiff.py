"""Two databases compared row by row, by primary key, without reading whole tables.

The method is datafold's data-diff: split a table's primary keys into ranges, compare a
count and a sum of row hashes per range on both sides, and descend only into the ranges
that differ, until a range is small enough to compare its (key, hash) pairs. Both sides
are queried at the same time, each statement over a bounded number of rows so that it
stays well within the per-check statement timeout at 100,000 users (2,000,000 ledger
rows): the ranges' bounds come from an index-ordered pass over the keys alone.

What makes the two sides comparable:
- every transaction on either side first sets the same text form of every value
  (`TEXT_FORM_SQL`: TimeZone UTC, DateStyle ISO, IntervalStyle postgres,
  extra_float_digits 1, bytea_output hex), whatever each server or database says;
- a row's hash is taken of its shared columns (sorted by name): `hash_record_extended()`
  of the values when both servers run the same major version, 14 or later, in UTF8 (the
  types' own hash functions, which hash partitioning relies on being the same on every
  platform; types whose hash ignores what their text shows, or hashes an OID, such as
  enums, are hashed as their text: `Compare.types`); else as one record's text:
  `hashtextextended()` (the same on every platform and version since 11) when both
  databases are UTF8, else md5 of the text converted to UTF8, so two encodings hash the
  same characters alike;
- a range is counted first (no hashing): one whose counts differ needs no checksum, and
  one whose counts differ by FANOUT rows or a 1/SPARSE of its rows or more is read as
  (key, hash) pairs at once, so each row is hashed once where the loss is dense; only
  the ranges whose counts agree are checksummed;
- the descent goes level by level, all the ranges that differ cut, counted and
  checksummed together (a few statements a level, not a few per range);
- the top level's bounds are the key's histogram from the statistics (no scan), an
  ordered pass over the keys without them; the diff's statements run without JIT (their
  compilation cost seconds each at 100,000 users) and hash their joins in memory;
- range bounds compare with the key column's collation when both sides use the same
  one (the index serves the range), else with `COLLATE "C"` on both (byte order, the
  same everywhere; the ranges then scan rather than use the index, and the plan says so).

Only the columns both sides share are hashed (generated columns left out: they follow
from the others and cannot be written); the caller lists the others.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from psycopg import sql

from commands.base import Gateway, Reader, Row

T = TypeVar("T")

# The same text form of every value on both sides, for this transaction only.
TEXT_FORM_SQL = (
    "SELECT set_config('TimeZone', 'UTC', true), set_config('DateStyle', 'ISO, YMD', true),"
    " set_config('IntervalStyle', 'postgres', true),"
    " set_config('extra_float_digits', '1', true), set_config('bytea_output', 'hex', true)"
)
# The diff's own statements, besides: no JIT (their cost estimates, many ranges and a
# hash per row, pass jit_above_cost, and compiling them costs far more than running them:
# seconds per statement at 100,000 users); the pairs joined in memory by hashing (a merge
# join sorts both sides by key in the key's collation, on disk at the default work_mem).
DIFF_SQL = (
    TEXT_FORM_SQL + ", set_config('jit', 'off', true), set_config('work_mem', '64MB', true),"
    " set_config('enable_mergejoin', 'off', true)"
)
CREATION_COLUMNS = ("created_at", "earned_at", "granted_at", "received_at", "event_time")
EXCLUDED_TABLES = ("_prisma_migrations",)
SEGMENT_ROWS = 50_000  # rows per range at the top level
STATEMENT_ROWS = 200_000  # rows one checksum statement may cover
FANOUT = 16  # sub-ranges of a range that differs
LEAF_ROWS = 2_000  # a range this small is compared key by key
COUNT_ROWS = 2_000_000  # rows one counting statement may cover (no hashing)
PAIR_ROWS = 100_000  # (key, hash) pairs one statement reads (the sides overlap by batch)
TABLES_AT_ONCE = 2  # tables diffed at the same time
SPARSE = 64  # a range whose counts differ by rows / SPARSE or more is read as pairs
RANGES_AT_ONCE = 256  # ranges one statement may cover

_FACTS_SQL = """
SELECT current_setting('server_version_num')::int AS version_num,
       current_setting('server_version') AS version,
       current_database() AS database,
       d.datcollate::text AS collate, pg_encoding_to_char(d.encoding)::text AS encoding,
       inet_server_addr()::text AS addr, inet_server_port() AS port,
       CASE WHEN has_function_privilege('pg_control_system()', 'execute')
            THEN (SELECT system_identifier::text FROM pg_control_system()) END AS system_id,
       pg_is_in_recovery() AS in_recovery,
       -- the timeline WAL is written on now: a copy restored from production's base backup
       -- keeps its system identifier, and its promotion starts a new timeline
       CASE WHEN NOT pg_is_in_recovery()
            THEN substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END AS timeline
FROM pg_database AS d WHERE d.datname = current_database()
"""

_TABLES_SQL = """
SELECT c.relname::text AS name,
       ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(num, n)
             JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum = k.num
             ORDER BY k.n) AS key,
       ARRAY(SELECT a.attname::text FROM pg_attribute AS a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''
             ORDER BY a.attnum) AS columns,
       ARRAY(SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute AS a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''
             ORDER BY a.attnum) AS types,
       (SELECT co.collname::text FROM pg_attribute AS a
        JOIN pg_collation AS co ON co.oid = a.attcollation
        WHERE a.attrelid = c.oid AND a.attnum = i.indkey[0]) AS key_collation,
       EXISTS (SELECT 1 FROM pg_attribute AS a WHERE a.attrelid = c.oid AND a.attnum = i.indkey[0]
               AND a.attcollation = (SELECT oid FROM pg_collation WHERE collname = 'default'))
         AS key_default_collation
FROM pg_class AS c
JOIN pg_index AS i ON i.indrelid = c.oid AND i.indisprimary
WHERE c.relnamespace = to_regnamespace('public') AND c.relkind IN ('r', 'p')
  AND NOT c.relname = ANY(%s)
ORDER BY 1
"""

_FKS_SQL = """
SELECT c.relname::text AS child, p.relname::text AS parent,
       ARRAY(SELECT a.attname::text FROM unnest(k.conkey::int2[]) WITH ORDINALITY AS x(num, n)
             JOIN pg_attribute AS a ON a.attrelid = k.conrelid AND a.attnum = x.num
             ORDER BY x.n) AS columns,
       ARRAY(SELECT a.attname::text FROM unnest(k.confkey::int2[]) WITH ORDINALITY AS x(num, n)
             JOIN pg_attribute AS a ON a.attrelid = k.confrelid AND a.attnum = x.num
             ORDER BY x.n) AS refs
FROM pg_constraint AS k
JOIN pg_class AS c ON c.oid = k.conrelid
JOIN pg_class AS p ON p.oid = k.confrelid
WHERE k.contype = 'f' AND c.relnamespace = to_regnamespace('public')
  AND p.relnamespace = to_regnamespace('public')
ORDER BY 1, 2
"""

_UNIQUES_SQL = """
SELECT c.relname::text AS "table", ic.relname::text AS index,
       ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(num, n)
             JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum = k.num
             ORDER BY k.n) AS columns,
       pg_get_expr(i.indpred, i.indrelid) AS predicate
FROM pg_index AS i
JOIN pg_class AS c ON c.oid = i.indrelid
JOIN pg_class AS ic ON ic.oid = i.indexrelid
WHERE i.indisunique AND NOT i.indisprimary AND i.indexprs IS NULL
  AND c.relnamespace = to_regnamespace('public')
ORDER BY 1, 2
"""


@dataclass(frozen=True)
class TableShape:
    name: str
    key: tuple[str, ...]
    columns: tuple[str, ...]
    types: dict[str, str]
    key_collation: str | None
    default_collation: bool


@dataclass(frozen=True)
class ForeignKey:
    child: str
    parent: str
    columns: tuple[str, ...]
    refs: tuple[str, ...]


@dataclass(frozen=True)
class UniqueKey:
    table: str
    index: str
    columns: tuple[str, ...]
    predicate: str | None


@dataclass(frozen=True)
class Catalog:
    facts: Row
    tables: dict[str, TableShape]
    fks: tuple[ForeignKey, ...]
    uniques: tuple[UniqueKey, ...]


async def read_catalog(db: Reader) -> Catalog:
    facts = (await db.fetch(_FACTS_SQL))[0]
    tables: dict[str, TableShape] = {}
    for r in await db.fetch(_TABLES_SQL, (list(EXCLUDED_TABLES),)):
        columns = tuple(str(c) for c in r["columns"])
        tables[str(r["name"])] = TableShape(
            name=str(r["name"]),
            key=tuple(str(k) for k in r["key"]),
            columns=columns,
            types=dict(zip(columns, (str(t) for t in r["types"]), strict=True)),
            key_collation=r["key_collation"],
            default_collation=bool(r["key_default_collation"]),
        )
    fks = tuple(
        ForeignKey(
            str(r["child"]),
            str(r["parent"]),
            tuple(str(c) for c in r["columns"]),
            tuple(str(c) for c in r["refs"]),
        )
        for r in await db.fetch(_FKS_SQL)
    )
    uniques = tuple(
        UniqueKey(
            str(r["table"]),
            str(r["index"]),
            tuple(str(c) for c in r["columns"]),
            r["predicate"],
        )
        for r in await db.fetch(_UNIQUES_SQL)
    )
    return Catalog(facts, tables, fks, uniques)


def fk_order(tables: Sequence[str], fks: Sequence[ForeignKey]) -> list[str]:
    """`tables` with every parent before its children (self-references ignored; a cycle
    is broken by name order)."""
    left = sorted(set(tables))
    parents = {t: {f.parent for f in fks if f.child == t and f.parent != t} for t in left}
    done: list[str] = []
    while left:
        ready = [t for t in left if not (parents[t] & set(left))] or left[:1]
        for t in ready:
            done.append(t)
            left.remove(t)
    return done


def with_parents(named: Sequence[str], fks: Sequence[ForeignKey]) -> set[str]:
    """The tables named and every table they need, transitively (their FK parents)."""
    found = set(named)
    grow = True
    while grow:
        more = {f.parent for f in fks if f.child in found} - found
        found |= more
        grow = bool(more)
    return found


def creation_column(columns: Sequence[str]) -> str | None:
    return next((c for c in CREATION_COLUMNS if c in columns), None)


# Types whose own hash function hashes the value exactly as its text form tells it (the
# same on every platform: hash partitioning relies on it), whatever TimeZone or DateStyle:
# a timestamp hashes its instant, text its bytes (COLLATE "C": never a nondeterministic
# collation's), jsonb its normalized value. Every other type is hashed as its text (an
# enum's own hash is of its OID, which differs between databases; numeric's and
# interval's ignore differences their text shows; citext's ignores case).
NATIVE_HASH = {
    "boolean", "smallint", "integer", "bigint", "uuid", "date", "bytea", "jsonb",
    "timestamp without time zone", "timestamp with time zone",
}  # fmt: skip
TEXT_TYPES = {"text", "character varying", "character"}


def _hashed(col: sql.Composable, type_name: str) -> sql.Composable:
    base = re.sub(r"\(\d+(,\d+)?\)", "", type_name).strip()
    if base in TEXT_TYPES:
        return sql.SQL('{} COLLATE "C"').format(col)
    if base in NATIVE_HASH:
        return col
    return sql.SQL('{}::text COLLATE "C"').format(col)


@dataclass(frozen=True)
class Compare:
    """How one table is compared: its key, the shared columns hashed (sorted), the key's
    type for the bounds, and whether the bounds compare in byte order."""

    table: str
    key: str
    key_type: str
    columns: tuple[str, ...]
    byte_order: bool
    # Both databases UTF8 (PostgreSQL 11+): hashtextextended() of the row's text, the
    # hash partitioning relies on being the same everywhere; else md5 of its UTF8 bytes.
    fast_hash: bool = True
    # Both UTF8 and the same major version, 14 or later: hash_record_extended() of the
    # values themselves (no text output), each column's type (parallel to `columns`) when
    # it is the same on both sides, "" where not; see `row_hash`.
    types: tuple[str, ...] = ()

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier("public", self.table)

    def key_expr(self, alias: str = "t") -> sql.Composable:
        col = sql.Identifier(alias, self.key)
        return sql.SQL('{} COLLATE "C"').format(col) if self.byte_order else col

    def row_hash(self, alias: str = "t") -> sql.Composable:
        """A row's hash as a bigint."""
        record = sql.SQL(", ").join(sql.Identifier(alias, c) for c in self.columns)
        if self.types and self.fast_hash:
            return sql.SQL("hash_record_extended(ROW({}), 0)").format(
                sql.SQL(", ").join(
                    _hashed(sql.Identifier(alias, c), t)
                    for c, t in zip(self.columns, self.types, strict=True)
                )
            )
        if self.fast_hash:
            return sql.SQL("hashtextextended(ROW({})::text, 0)").format(record)
        return sql.SQL(
            "('x' || left(md5(convert_to(ROW({})::text, 'UTF8')), 15))::bit(60)::bigint"
        ).format(record)

    def range_cond(self, lo: str | None, hi: str | None, params: list[Any]) -> sql.Composable:
        parts: list[sql.Composable] = []
        cast = sql.SQL(self.key_type)
        if lo is not None:
            parts.append(sql.SQL("{} >= %s::{}").format(self.key_expr(), cast))
            params.append(lo)
        if hi is not None:
            parts.append(sql.SQL("{} < %s::{}").format(self.key_expr(), cast))
            params.append(hi)
        return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


@dataclass
class TableDiff:
    table: str
    only_copy: list[str] = field(default_factory=list)
    only_prod: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    copy_rows: int = 0
    prod_rows: int = 0
    statements: int = 0


Range = tuple[str | None, str | None]


async def _on(db: Gateway, fn: Callable[[Reader], Awaitable[T]]) -> T:
    async def run(r: Reader) -> T:
        await r.fetch(DIFF_SQL)
        return await fn(r)

    return await db.read(run)


async def _both(prod: Gateway, copy: Gateway, fn: Callable[[Reader], Awaitable[T]]) -> tuple[T, T]:
    """The same read on both sides at the same time."""
    p, c = await asyncio.gather(_on(prod, fn), _on(copy, fn))
    return p, c


async def _bounds(db: Reader, cmp: Compare, rng: Range, every: int) -> list[str]:
    """Every `every`-th key of the range in the compared order (keys only, no hashing)."""
    return (await _cuts(db, cmp, [(rng, every)]))[0]


async def _cuts(db: Reader, cmp: Compare, ranges: Sequence[tuple[Range, int]]) -> list[list[str]]:
    """`_bounds` of several ranges (each with its `every`) in one statement."""
    params: list[Any] = []
    parts = []
    for n, ((lo, hi), every) in enumerate(ranges):
        cond = cmp.range_cond(lo, hi, params)
        parts.append(
            sql.SQL(
                "SELECT {n} AS n, rn, k::text AS k FROM (SELECT {key} AS k,"
                " row_number() OVER (ORDER BY {key}) AS rn FROM {t} AS t WHERE {cond}) AS s"
                " WHERE rn > 1 AND mod(rn - 1, %s) = 0"
            ).format(n=sql.Literal(n), key=cmp.key_expr(), t=cmp.ident, cond=cond)
        )
        params.append(max(1, every))
    query = sql.SQL("SELECT n, k FROM ({}) AS x ORDER BY n, rn").format(
        sql.SQL("\nUNION ALL\n").join(parts)
    )
    out: list[list[str]] = [[] for _ in ranges]
    for r in await db.fetch(query.as_string(), params):
        out[int(r["n"])].append(str(r["k"]))
    return out


async def _checksums(db: Reader, cmp: Compare, ranges: Sequence[Range]) -> list[tuple[int, str]]:
    params: list[Any] = []
    parts = []
    for n, (lo, hi) in enumerate(ranges):
        cond = cmp.range_cond(lo, hi, params)
        parts.append(
            sql.SQL(
                "SELECT {n} AS n, count(*) AS c, coalesce(sum({h}), 0)::text AS h"
                " FROM {t} AS t WHERE {cond}"
            ).format(n=sql.Literal(n), h=cmp.row_hash(), t=cmp.ident, cond=cond)
        )
    query = sql.SQL("\nUNION ALL\n").join(parts)
    rows = {
        int(r["n"]): (int(r["c"]), str(r["h"])) for r in await db.fetch(query.as_string(), params)
    }
    return [rows[n] for n in range(len(ranges))]


async def _counts(db: Reader, cmp: Compare, ranges: Sequence[Range]) -> list[int]:
    params: list[Any] = []
    parts = []
    for n, (lo, hi) in enumerate(ranges):
        cond = cmp.range_cond(lo, hi, params)
        parts.append(
            sql.SQL("SELECT {n} AS n, count(*) AS c FROM {t} AS t WHERE {cond}").format(
                n=sql.Literal(n), t=cmp.ident, cond=cond
            )
        )
    query = sql.SQL("\nUNION ALL\n").join(parts)
    rows = {int(r["n"]): int(r["c"]) for r in await db.fetch(query.as_string(), params)}
    return [rows[n] for n in range(len(ranges))]


def _merged(ranges: Sequence[Range]) -> list[Range]:
    """Adjacent ranges as one (one scan of the span rather than one per range)."""
    out: list[Range] = []
    for lo, hi in ranges:
        if out and out[-1][1] is not None and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _pairs_sql(cmp: Compare, ranges: Sequence[Range], params: list[Any]) -> sql.Composable:
    parts = []
    for lo, hi in _merged(ranges):
        cond = cmp.range_cond(lo, hi, params)
        parts.append(
            sql.SQL("SELECT t.{k}::text AS k, {h} AS h FROM {t} AS t WHERE {cond}").format(
                k=sql.Identifier(cmp.key), h=cmp.row_hash(), t=cmp.ident, cond=cond
            )
        )
    return sql.SQL("\nUNION ALL\n").join(parts)


async def _pairs_arrays(db: Reader, cmp: Compare, ranges: Sequence[Range]) -> tuple[str, str]:
    """The ranges' keys and hashes as two array literals (parsed by the other server, not
    by Python)."""
    params: list[Any] = []
    query = sql.SQL(
        "SELECT coalesce(array_agg(x.k), '{{}}')::text AS k,"
        " coalesce(array_agg(x.h), '{{}}')::text AS h FROM ({}) AS x"
    ).format(_pairs_sql(cmp, ranges, params))
    row = (await db.fetch(query.as_string(), params))[0]
    return str(row["k"]), str(row["h"])


async def _compare_pairs(
    db: Reader, cmp: Compare, ranges: Sequence[Range], blob: tuple[str, str]
) -> list[tuple[str, str]]:
    """The keys whose pairs differ: (key, "c" only in the copy | "p" only here | "d" both,
    different)."""
    params: list[Any] = [*blob]
    query = sql.SQL(
        "WITH c AS (SELECT * FROM unnest(%s::text[], %s::bigint[]) AS x(k, h)),"
        " p AS ({})"
        " SELECT coalesce(c.k, p.k) AS k,"
        " CASE WHEN p.k IS NULL THEN 'c' WHEN c.k IS NULL THEN 'p' ELSE 'd' END AS side"
        " FROM c FULL JOIN p ON p.k = c.k WHERE c.h IS DISTINCT FROM p.h"
    ).format(_pairs_sql(cmp, ranges, params))
    return [(str(r["k"]), str(r["side"])) for r in await db.fetch(query.as_string(), params)]


def _split(rng: Range, bounds: Sequence[str]) -> list[Range]:
    edges: list[str | None] = [rng[0], *bounds, rng[1]]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _batches(ranges: Sequence[Range], sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Indexes of `ranges` grouped so that one statement covers at most `limit` rows, and
    at most RANGES_AT_ONCE ranges (each one a part of the statement to plan)."""
    out: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if out[-1] and (total + size > limit or len(out[-1]) >= RANGES_AT_ONCE):
            out.append([])
            total = 0
        out[-1].append(i)
        total += size
    return [b for b in out if b]


def diff_tables(
    prod: Gateway, copy: Gateway, cmps: Sequence[Compare]
) -> dict[str, asyncio.Task[TableDiff]]:
    """`diff_table` of each, TABLES_AT_ONCE at a time, started in the order given (the
    caller awaits them in that order and cancels what it leaves)."""
    gate = asyncio.Semaphore(TABLES_AT_ONCE)

    async def one(cmp: Compare) -> TableDiff:
        async with gate:
            return await diff_table(prod, copy, cmp)

    return {c.table: asyncio.ensure_future(one(c)) for c in cmps}


async def diff_table(prod: Gateway, copy: Gateway, cmp: Compare) -> TableDiff:
    """Keys only in the copy, only in production, and in both with different rows."""
    result = TableDiff(cmp.table)

    async def count(db: Reader) -> int:
        rows = await db.fetch(sql.SQL("SELECT count(*) AS n FROM {}").format(cmp.ident).as_string())
        return int(rows[0]["n"])

    result.prod_rows, result.copy_rows = await _both(prod, copy, count)
    result.statements += 1
    biggest = max(result.prod_rows, result.copy_rows)
    if biggest == 0:
        return result
    whole: Range = (None, None)
    if biggest <= LEAF_ROWS:
        await _leaves(prod, copy, cmp, [(whole, biggest)], result)
        return result
    # The top level's bounds come from the bigger side; any bounds would do, as both
    # sides are cut at the same keys.
    bigger = copy if result.copy_rows >= result.prod_rows else prod
    bounds = await _on(bigger, partial(_histogram, cmp=cmp))
    if len(bounds) < 2 or biggest // (len(bounds) + 1) > SEGMENT_ROWS:
        bounds = await _on(bigger, partial(_bounds, cmp=cmp, rng=whole, every=SEGMENT_ROWS))
    result.statements += 1
    size = -(-biggest // (len(bounds) + 1))
    await _descend(prod, copy, cmp, _split(whole, bounds), [size] * (len(bounds) + 1), result)
    return result


async def _histogram(db: Reader, cmp: Compare) -> list[str]:
    """The key's histogram bounds from the statistics (no scan): sorted in the key's
    collation, or by code point (UTF-8 byte order: COLLATE "C") when the ranges compare in
    byte order. Stale statistics only make the ranges uneven: both sides are still cut at
    the same keys. None without statistics, or in byte order outside UTF8."""
    if cmp.byte_order and not cmp.fast_hash:
        return []
    rows = await db.fetch(
        "SELECT histogram_bounds::text::text[] AS b FROM pg_stats WHERE schemaname = 'public'"
        " AND tablename = %s AND attname = %s AND NOT inherited",
        (cmp.table, cmp.key),
    )
    found = [str(b) for b in rows[0]["b"] or []] if rows else []
    return sorted(set(found)) if cmp.byte_order else list(dict.fromkeys(found))


async def _descend(
    prod: Gateway,
    copy: Gateway,
    cmp: Compare,
    ranges: list[Range],
    sizes: list[int],
    result: TableDiff,
) -> None:
    """Count `ranges` on both sides, and checksum those whose counts agree (those whose
    counts differ differ); read the differing ones that are small, or dense with
    differences (`_dense`), as (key, hash) pairs; cut the others into FANOUT sub-ranges
    and descend. Level by level: the sub-ranges of every range that differs are cut,
    counted and checksummed together, a few statements a level however many ranges
    differ (changes scattered over the whole table make most ranges differ)."""
    leaves: list[tuple[Range, int]] = []

    def differs(rng: Range, rows: int, delta: int) -> None:
        if rows <= LEAF_ROWS or (rows <= SEGMENT_ROWS and _dense(rows, delta)):
            leaves.append((rng, rows))
        else:
            to_cut.append((rng, rows))

    while ranges:
        checked: list[Range] = []
        checked_sizes: list[int] = []
        to_cut: list[tuple[Range, int]] = []
        for batch in _batches(ranges, sizes, COUNT_ROWS):
            part = [ranges[i] for i in batch]
            pn, cn = await _both(prod, copy, partial(_counts, cmp=cmp, ranges=part))
            result.statements += 1
            for rng, a, b in zip(part, pn, cn, strict=True):
                if a != b:  # differs: no checksum needed to tell
                    differs(rng, max(a, b), abs(a - b))
                elif a:
                    checked.append(rng)
                    checked_sizes.append(a)
        for batch in _batches(checked, checked_sizes, STATEMENT_ROWS):
            part = [checked[i] for i in batch]
            p, c = await _both(prod, copy, partial(_checksums, cmp=cmp, ranges=part))
            result.statements += 1
            for rng, pc, cc in zip(part, p, c, strict=True):
                if pc != cc:
                    differs(rng, pc[0], 0)
        # Each range cut at every rows // FANOUT-th key of the copy's, else production's
        # when the copy's gives fewer than two cuts; uncut, it is compared key by key.
        cuts = await _cut_all(copy, cmp, to_cut, result)
        again = [i for i, sub in enumerate(cuts) if len(sub) < 2]
        for i, sub in zip(
            again, await _cut_all(prod, cmp, [to_cut[i] for i in again], result), strict=True
        ):
            cuts[i] = sub
        ranges, sizes = [], []
        for (rng, rows), sub in zip(to_cut, cuts, strict=True):
            if not sub:
                leaves.append((rng, rows))
                continue
            ranges += _split(rng, sub)
            sizes += [max(1, rows // FANOUT)] * (len(sub) + 1)
    await _leaves(prod, copy, cmp, leaves, result)


def _dense(rows: int, delta: int) -> bool:
    """Whether a range whose counts differ by `delta` would have most of its FANOUT
    sub-ranges differ (at least one difference each on average, or a 1/SPARSE of its rows
    or more): descending would then checksum it again only to read most of it as pairs."""
    return delta >= FANOUT or delta * SPARSE >= rows


async def _cut_all(
    db: Gateway, cmp: Compare, ranges: Sequence[tuple[Range, int]], result: TableDiff
) -> list[list[str]]:
    """`_cuts` of the ranges at every rows // FANOUT-th key, a few statements in all."""
    wanted = [(rng, max(1, rows // FANOUT)) for rng, rows in ranges]
    out: list[list[str]] = []
    for batch in _batches([r for r, _ in ranges], [n for _, n in ranges], STATEMENT_ROWS):
        out += await _on(db, partial(_cuts, cmp=cmp, ranges=[wanted[i] for i in batch]))
        result.statements += 1
    return out


async def _leaves(
    prod: Gateway, copy: Gateway, cmp: Compare, leaves: list[tuple[Range, int]], result: TableDiff
) -> None:
    """The ranges compared key by key, several per statement (at most PAIR_ROWS rows):
    the copy's (key, hash) pairs come as two array literals, which production joins with its
    own pairs, returning only the keys that differ (no row becomes a Python object). The
    copy reads the next batch while production compares this one."""
    batches = [
        [leaves[i][0] for i in batch]
        for batch in _batches([r for r, _ in leaves], [n for _, n in leaves], PAIR_ROWS)
    ]
    if not batches:
        return
    ahead = asyncio.ensure_future(_on(copy, partial(_pairs_arrays, cmp=cmp, ranges=batches[0])))
    try:
        for i, part in enumerate(batches):
            blob = await ahead
            if i + 1 < len(batches):
                nxt = partial(_pairs_arrays, cmp=cmp, ranges=batches[i + 1])
                ahead = asyncio.ensure_future(_on(copy, nxt))
            found = await _on(prod, partial(_compare_pairs, cmp=cmp, ranges=part, blob=blob))
            result.statements += 1
            for side, keys in (("c", result.only_copy), ("p", result.only_prod)):
                keys += sorted(k for k, s in found if s == side)
            result.changed += sorted(k for k, s in found if s == "d")
    finally:
        if not ahead.done():
            ahead.cancel()


async def differing_columns(
    prod: Gateway, copy: Gateway, cmp: Compare, keys: Sequence[str]
) -> dict[str, list[str]]:
    """For rows in both sides that differ: which shared columns differ, per key."""
    if not keys:
        return {}
    hashes = sql.SQL(", ").join(
        sql.SQL("md5(convert_to(t.{}::text, 'UTF8'))").format(sql.Identifier(c))
        for c in cmp.columns
    )
    query = sql.SQL(
        "SELECT t.{k}::text AS k, ARRAY[{h}] AS h FROM {t} AS t WHERE t.{k}::text = ANY(%s)"
    ).format(k=sql.Identifier(cmp.key), h=hashes, t=cmp.ident)
    out: dict[str, list[str]] = {}
    for start in range(0, len(keys), LEAF_ROWS):
        chunk = list(keys[start : start + LEAF_ROWS])

        async def read(db: Reader, chunk: list[str] = chunk) -> dict[str, list[Any]]:
            rows = await db.fetch(query.as_string(), (chunk,))
            return {str(r["k"]): list(r["h"]) for r in rows}

        p, c = await _both(prod, copy, read)
        for k in chunk:
            if k in p and k in c:
                out[k] = [col for col, a, b in zip(cmp.columns, p[k], c[k], strict=True) if a != b]
    return out
