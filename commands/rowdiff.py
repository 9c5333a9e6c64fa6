"""Two databases compared row by row, by primary key, without reading whole tables into
Python.

The method is set reconciliation by buckets, which sends what grows with the differences,
not with the rows. Each row is an entry (its key's hash, its row's hash). Both sides, at
the same time, sum their entries by bucket (the low bits of the key hash): per bucket the
count and the XOR of the key hashes and of the row hashes. Buckets equal on both sides
hold the same entries. A bucket with one entry more on one side gives that entry at once
(the XOR of both sides' sums), confirmed by looking its key hash up on that side; the few
buckets that differ otherwise (a row changed is two entries) are compared key by key: the
copy's (key, hash) pairs sent as arrays to production, which joins them with its own. The
buckets are sized from the counts' difference (BUCKETS_PER_DIFFERENCE a difference), and
summed again, more of them, when far more differ than that told. A table of SMALL_ROWS
rows or fewer is compared key by key at once. Every statement reads one key range of at
most CHUNK_ROWS rows (cut at the key's histogram bounds), so that it stays well within the
per-check statement timeout however big the table; each key falls in the same range on
both sides, updated meanwhile or not.

A copy of production's own lineage (a base backup restored, the usual point-in-time
recovery; `physical_lineage`) is compared by row version first (`_diff_versions`): a row
version is its key and the transaction that wrote it (xmin), the same on both sides until
production changes the row, so only the key is hashed, and only the versions that differ
are read whole; most of a table's rows are never hashed by their columns. Its buckets are
sized by the statistics' estimates (the pass counts the rows as it reads them), and the
second read tests each row's bucket in a bitmap of the buckets that differ before any
look-up. Where more than a quarter of the versions differ (every row rewritten), it is
compared by content as above.

What makes the two sides comparable:
- every transaction on either side first sets the same text form of every value
  (`TEXT_FORM_SQL`: TimeZone UTC, DateStyle ISO, IntervalStyle postgres,
  extra_float_digits 1, bytea_output hex), whatever each server or database says;
- a key's hash is `hashtextextended()` of its text, in byte order (COLLATE "C");
- a row's hash is taken of its shared columns (sorted by name): when both servers run the
  same major version, 14 or later, in UTF8, the XOR of each column's own hash function,
  seeded by its place (the functions hash partitioning relies on being the same on every
  platform and version; types whose hash ignores what their text shows, or hashes an OID,
  such as enums, are hashed as their text: `NATIVE_HASH`, `Compare.types`); else as one
  record's text: `hashtextextended()` (the same on every platform and version since 11)
  when both databases are UTF8, else md5 of the text converted to UTF8, so two encodings
  hash the same characters alike;
- before PostgreSQL 14 on either side (no `bit_xor()`), each range is compared key by key
  (`Compare.buckets`);
- range bounds compare with the key column's collation when both sides use the same one
  (the index serves the range), else with `COLLATE "C"` on both (byte order, the same
  everywhere; the plan says so).

The diff's statements run without JIT (compiling them costs more than running them) or
parallel workers (both servers are busy already), group by hashing and hash their joins in
memory. Only the columns both sides share are hashed (generated columns left out: they
follow from the others and cannot be written); the caller lists the others.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import struct
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from psycopg import sql

from commands.base import Gateway, Reader, Row, int8s

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
    " set_config('enable_mergejoin', 'off', true),"
    " set_config('max_parallel_workers_per_gather', '0', true)"
)
CREATION_COLUMNS = ("created_at", "earned_at", "granted_at", "received_at", "event_time")
EXCLUDED_TABLES = ("_prisma_migrations",)
SMALL_ROWS = 20_000  # a table this small is compared key by key at once
CHUNK_ROWS = 2_000_000  # rows one statement may read (a key range of a bigger table)
PAIR_ROWS = 100_000  # (key, hash) pairs one statement compares
KEYS_AT_ONCE = 2_000  # keys one statement looks up
TABLES_AT_ONCE = 2  # tables diffed at the same time
BUCKETS_PER_DIFFERENCE = 2  # buckets a difference expected (most then fall alone in theirs)
CHANGED_SHARE = 1_000  # a row in this many is expected changed (the counts do not tell)
MIN_BUCKETS = 1_024
MAX_BUCKETS = 1 << 20
MIXED_SHARE = 0.125  # the share of rows the buckets compared key by key may hold
# Compared by version (`_diff_versions`):
RANGE_ROWS = 4_096  # rows a range of blocks holds, whose buckets one scan sums
# Buckets a difference expected: more than by key hash, as more buckets cost little here
# (each range's are few) and every bucket with several differences is read whole.
VERSION_BUCKETS_PER_DIFFERENCE = 4
VERSIONS_GIVE_UP = 0.25  # a greater share of versions differing: compared by content instead
MAX_VERSION_BITS = 12  # buckets a range of blocks at most: 4,096

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
            THEN substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END AS timeline,
       -- the next transaction id, with its epoch: how far the two sides' ids have gone
       txid_snapshot_xmax(txid_current_snapshot()) AS next_xid,
       current_setting('track_counts') = 'on' AS track_counts
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
         AS key_default_collation,
       -- rows now: the statistics' live count once a VACUUM or ANALYZE has set it (it
       -- then follows every write, where reltuples waits for the next one), else
       -- reltuples (statistics reset: a restored copy, a database made from a template)
       CASE WHEN coalesce(s.last_vacuum, s.last_autovacuum, s.last_analyze,
                          s.last_autoanalyze) IS NOT NULL
            THEN s.n_live_tup ELSE greatest(c.reltuples, 0)::bigint END AS estimate,
       pg_relation_size(c.oid) / current_setting('block_size')::bigint AS blocks,
       -- rows written since the server's statistics began (a restored copy's: since it was
       -- promoted; WAL replayed is not counted)
       coalesce(s.n_tup_ins + s.n_tup_upd + s.n_tup_del, 0) AS writes
FROM pg_class AS c
JOIN pg_index AS i ON i.indrelid = c.oid AND i.indisprimary
LEFT JOIN pg_stat_all_tables AS s ON s.relid = c.oid
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
    estimate: int = 0  # rows, from the statistics
    blocks: int = 0  # the table's size in blocks
    writes: int = 0  # rows inserted, updated or deleted since the statistics began


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
            estimate=int(r["estimate"]),
            blocks=int(r["blocks"]),
            writes=int(r["writes"]),
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
# same on every platform and version: hash partitioning relies on it), whatever TimeZone
# or DateStyle: a timestamp hashes its instant (a timestamptz as UTC, the diff's TimeZone),
# text its bytes (COLLATE "C": never a nondeterministic collation's), jsonb its normalized
# value. Every other type is hashed as its text (an enum's own hash is of its OID, which
# differs between databases; numeric's and interval's ignore differences their text shows;
# citext's ignores case).
NATIVE_HASH = {
    "smallint": "hashint2extended({}, {})",
    "integer": "hashint4extended({}, {})",
    "bigint": "hashint8extended({}, {})",
    "uuid": "uuid_hash_extended({}, {})",
    "jsonb": "jsonb_hash_extended({}, {})",
    "timestamp without time zone": "timestamp_hash_extended({}, {})",
    "timestamp with time zone": "timestamp_hash_extended({}::timestamp, {})",
}
TEXT_TYPES = {"text", "character varying"}


def _hash_call(type_name: str) -> sql.SQL:
    """A value's hash function for its type: `{}` the value, `{}` the seed."""
    base = re.sub(r"\(\d+(,\d+)?\)", "", type_name).strip()
    if base in TEXT_TYPES:
        return sql.SQL('hashtextextended({} COLLATE "C", {})')
    if base in NATIVE_HASH:
        return sql.SQL(NATIVE_HASH[base])
    return sql.SQL('hashtextextended({}::text COLLATE "C", {})')


def _hashed(col: sql.Composable, type_name: str, seed: int) -> sql.Composable:
    """One column's hash, seeded by its place (NULL: the seed itself)."""
    seed_sql = sql.Literal(seed)
    return sql.SQL("coalesce({}, {})").format(_hash_call(type_name).format(col, seed_sql), seed_sql)


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
    # Both UTF8 and the same major version, 14 or later: each column's own hash function
    # of its values (no text output), each column's type (parallel to `columns`) when
    # it is the same on both sides, "" where not; see `row_hash`.
    types: tuple[str, ...] = ()
    # Both sides PostgreSQL 14 or later (bit_xor()): the rows are compared by bucket
    # (`diff_table`); else key by key.
    buckets: bool = True
    # Both sides one physical lineage, the copy unwritten since (`physical_lineage`): the
    # rows are compared by version first (`_diff_versions`), the table being this many
    # blocks on the bigger side.
    physical: bool = False
    blocks: int = 0
    # Rows on each side, from the statistics (`TableShape.estimate`): what the row-version
    # comparison sizes its buckets by (it counts the rows as it reads them).
    estimates: tuple[int, int] = (0, 0)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier("public", self.table)

    def key_expr(self, alias: str = "t") -> sql.Composable:
        col = sql.Identifier(alias, self.key)
        return sql.SQL('{} COLLATE "C"').format(col) if self.byte_order else col

    def key_hash(self, alias: str = "t") -> sql.Composable:
        """A key's hash as a bigint, of its text form (the same on both sides)."""
        col = sql.Identifier(alias, self.key)
        if self.fast_hash:
            return sql.SQL('hashtextextended({}::text COLLATE "C", 0)').format(col)
        return sql.SQL(
            "('x' || left(md5(convert_to({}::text, 'UTF8')), 16))::bit(64)::bigint"
        ).format(col)

    def row_hash(self, alias: str = "t") -> sql.Composable:
        """A row's hash as a bigint."""
        record = sql.SQL(", ").join(sql.Identifier(alias, c) for c in self.columns)
        if self.types and self.fast_hash:
            return sql.SQL("({})").format(
                sql.SQL(" # ").join(
                    _hashed(sql.Identifier(alias, c), t, n)
                    for n, (c, t) in enumerate(zip(self.columns, self.types, strict=True), 1)
                )
            )
        if self.fast_hash:
            return sql.SQL("hashtextextended(ROW({})::text, 0)").format(record)
        return sql.SQL(
            "('x' || left(md5(convert_to(ROW({})::text, 'UTF8')), 15))::bit(60)::bigint"
        ).format(record)

    def version_hash(self, alias: str = "t") -> sql.Composable:
        """A row version's hash as a bigint: of its key, seeded by the transaction that
        wrote it (`xmin`, read through `age()`, relative to `v0.r`: `_VERSION_BASE`, so
        that the same xmin gives the same seed on either side)."""
        seed = sql.SQL("((age({}.xmin)::bigint - v0.r) & 4294967295)").format(sql.Identifier(alias))
        return _hash_call(self.key_type).format(sql.Identifier(alias, self.key), seed)

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
    # The copy's ctid of keys only in the copy, when compared by version (where the
    # copy's row can be read again without its key's index).
    copy_tids: dict[str, str] = field(default_factory=dict)
    # How: VERSIONS, BUCKETS (by key hash) or KEYS (key by key at once).
    method: str = ""


VERSIONS, BUCKETS, KEYS = "by row version", "by bucket of key hash", "key by key"


Range = tuple[str | None, str | None]
# A bucket: its rows, and the bitwise XOR of their key hashes and of their row hashes.
Cell = tuple[int, int, int]
_EMPTY: Cell = (0, 0, 0)
_CELL = struct.Struct(">qqqq")
# A chunk of a big table is read through the key's index (a sequential scan would read the
# whole table for each chunk).
_NO_SEQSCAN = ", set_config('enable_seqscan', 'off', true)"


async def _on(db: Gateway, fn: Callable[[Reader], Awaitable[T]], seqscan: bool = True) -> T:
    async def run(r: Reader) -> T:
        await r.fetch(DIFF_SQL if seqscan else DIFF_SQL + _NO_SEQSCAN)
        return await fn(r)

    return await db.read(run)


async def _both(
    prod: Gateway, copy: Gateway, fn: Callable[[Reader], Awaitable[T]], seqscan: bool = True
) -> tuple[T, T]:
    """The same read on both sides at the same time."""
    p, c = await asyncio.gather(_on(prod, fn, seqscan), _on(copy, fn, seqscan))
    return p, c


@dataclass(frozen=True)
class _Part:
    """What one statement reads of a table: a key range (`(None, None)`: all of it) and,
    when given, only the rows whose key hash falls in one of `buckets` (`mask` its bits)."""

    rng: Range
    buckets: tuple[int, ...] | None = None
    mask: int = 0


def _part_sql(cmp: Compare, part: _Part, params: list[Any], what: sql.Composable) -> sql.Composed:
    """`SELECT what` over the part's rows (`t`)."""
    cond = cmp.range_cond(*part.rng, params)
    if part.buckets is not None:
        cond = sql.SQL("{} AND {} & {} = ANY(%s::bigint[])").format(
            cond, cmp.key_hash(), sql.Literal(part.mask)
        )
        params.append(list(part.buckets))
    return sql.SQL("SELECT {} FROM {} AS t WHERE {}").format(what, cmp.ident, cond)


async def _bounds(db: Reader, cmp: Compare, every: int) -> list[str]:
    """Every `every`-th key in the compared order (an ordered pass over the keys alone)."""
    rows = await db.fetch(
        sql.SQL(
            "SELECT k::text AS k FROM (SELECT {key} AS k, row_number() OVER (ORDER BY {key})"
            " AS rn FROM {t} AS t) AS s WHERE rn > 1 AND mod(rn - 1, %s) = 0 ORDER BY rn"
        )
        .format(key=cmp.key_expr(), t=cmp.ident)
        .as_string(),
        (max(1, every),),
    )
    return [str(r["k"]) for r in rows]


async def _histogram(db: Reader, cmp: Compare) -> list[str]:
    """The key's histogram bounds from the statistics (no scan): sorted in the key's
    collation, or by code point (UTF-8 byte order: COLLATE "C") when the ranges compare in
    byte order. Stale statistics only make the chunks uneven: both sides are still cut at
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


async def _chunks(prod: Gateway, copy: Gateway, cmp: Compare, rows: int, limit: int) -> list[Range]:
    """Key ranges of about `limit` rows at most (one range for a table that small):
    each statement of the diff reads one, so that it stays well within the statement
    timeout however big the table. Cut at the histogram's bounds of the copy (else
    production's), or at every `limit`-th key without statistics; both sides are cut
    at the same keys, so each key falls in the same chunk on both sides, updated meanwhile
    or not."""
    if rows <= limit:
        return [(None, None)]
    bounds = await _on(copy, partial(_histogram, cmp=cmp)) or await _on(
        prod, partial(_histogram, cmp=cmp)
    )
    if len(bounds) >= 2:
        step = max(1, -(-limit * (len(bounds) + 1) // rows))
        bounds = bounds[step - 1 :: step]
    else:
        bounds = await _on(copy, partial(_bounds, cmp=cmp, every=limit), seqscan=False)
    edges: list[str | None] = [None, *bounds, None]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


async def _cells(db: Reader, cmp: Compare, rng: Range, mask: int) -> dict[int, Cell]:
    """The range's rows by bucket (the low bits of their key hash): per bucket the count and
    the XOR of the key hashes and of the row hashes, read as one bytea (only the buckets
    become Python objects)."""
    params: list[Any] = []
    kh = cmp.key_hash()
    cells = _part_sql(
        cmp,
        _Part(rng),
        params,
        sql.SQL(
            "{kh} & {mask} AS b, count(*) AS n, bit_xor({kh}) AS kx, bit_xor({rh}) AS rx"
        ).format(kh=kh, mask=sql.Literal(mask), rh=cmp.row_hash()),
    )
    query = sql.SQL(
        "SELECT coalesce(string_agg(int8send(b) || int8send(n) || int8send(kx) || int8send(rx),"
        " ''), '') AS cells FROM ({} GROUP BY 1) AS c"
    ).format(cells)
    # Grouped by hashing: the planner, which cannot tell how few buckets there are,
    # would sort the rows instead (on disk, at a million rows).
    await db.fetch("SELECT set_config('enable_sort', 'off', true)")
    blob = bytes((await db.fetch(query.as_string(), params))[0]["cells"])
    return {b: (n, kx, rx) for b, n, kx, rx in _CELL.iter_unpack(blob)}


def _add(into: dict[int, Cell], more: dict[int, Cell]) -> None:
    for b, (n, kx, rx) in more.items():
        a = into.get(b, _EMPTY)
        into[b] = (a[0] + n, a[1] ^ kx, a[2] ^ rx)


def _decode(
    copy: dict[int, Cell], prod: dict[int, Cell]
) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]], list[int]]:
    """The buckets that differ, as ({key hash: (row hash, bucket)} of the entries only in
    the copy, the same only in production, the buckets to compare row by row). A bucket
    that differs by one entry more on one side gives that entry outright: the XOR of both
    sides' hashes (`_confirm` looks it up before it counts). One that differs otherwise (a
    row changed is two entries, the copy's and production's) is compared row by row."""
    only_copy: dict[int, tuple[int, int]] = {}
    only_prod: dict[int, tuple[int, int]] = {}
    mixed: list[int] = []
    for b in sorted(set(copy) | set(prod)):
        c, p = copy.get(b, _EMPTY), prod.get(b, _EMPTY)
        if c == p:
            continue
        n = c[0] - p[0]
        if n in (1, -1):
            (only_copy if n == 1 else only_prod)[c[1] ^ p[1]] = (c[2] ^ p[2], b)
        else:
            mixed.append(b)
    return only_copy, only_prod, mixed


def _buckets(rows: int, differences: int) -> int:
    """Buckets enough that most differences fall alone in theirs: BUCKETS_PER_DIFFERENCE a
    difference expected (the counts' difference, plus a row in CHANGED_SHARE changed)."""
    wanted = BUCKETS_PER_DIFFERENCE * (differences + rows // CHANGED_SHARE)
    return max(MIN_BUCKETS, min(MAX_BUCKETS, 1 << max(0, wanted - 1).bit_length()))


async def _entries_of(
    db: Reader, cmp: Compare, rng: Range, hashes: list[int]
) -> list[tuple[str, int, int]]:
    """The range's (key, key hash, row hash) whose key hash is one of `hashes`."""
    if not hashes:
        return []
    params: list[Any] = [hashes]
    query = sql.SQL(
        "SELECT t.{k}::text AS k, w.kh, {rh} AS rh FROM {t} AS t"
        " JOIN unnest(%s::bigint[]) AS w(kh) ON w.kh = {kh} WHERE {cond}"
    ).format(
        k=sql.Identifier(cmp.key),
        rh=cmp.row_hash(),
        t=cmp.ident,
        kh=cmp.key_hash(),
        cond=cmp.range_cond(*rng, params),
    )
    rows = await db.fetch(query.as_string(), params)
    return [(str(r["k"]), int(r["kh"]), int(r["rh"])) for r in rows]


def _confirm(
    wanted: dict[int, tuple[int, int]], found: list[tuple[str, int, int]], mixed: set[int]
) -> list[str]:
    """The keys of the entries `_decode` gave that are there as it gave them: one row with
    that key hash and row hash. A bucket whose entry is not (it differed by more than one
    entry after all) joins `mixed`."""
    rows: dict[int, list[tuple[str, int]]] = {}
    for key, kh, rh in found:
        rows.setdefault(kh, []).append((key, rh))
    keys = []
    for kh, (rh, bucket) in wanted.items():
        got = rows.get(kh, [])
        if len(got) == 1 and got[0][1] == rh:
            keys.append(got[0][0])
        else:
            mixed.add(bucket)
    return keys


def _pairs_sql(cmp: Compare, part: _Part, params: list[Any]) -> sql.Composable:
    return _part_sql(
        cmp,
        part,
        params,
        sql.SQL("t.{}::text AS k, {} AS h").format(sql.Identifier(cmp.key), cmp.row_hash()),
    )


async def _pairs_arrays(db: Reader, cmp: Compare, part: _Part) -> tuple[str, str]:
    """The part's keys and row hashes as two array literals (parsed by the other server,
    not by Python)."""
    params: list[Any] = []
    query = sql.SQL(
        "SELECT coalesce(array_agg(x.k), '{{}}')::text AS k,"
        " coalesce(array_agg(x.h), '{{}}')::text AS h FROM ({}) AS x"
    ).format(_pairs_sql(cmp, part, params))
    row = (await db.fetch(query.as_string(), params))[0]
    return str(row["k"]), str(row["h"])


async def _compare_pairs(
    db: Reader, cmp: Compare, part: _Part, blob: tuple[str, str]
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
    ).format(_pairs_sql(cmp, part, params))
    return [(str(r["k"]), str(r["side"])) for r in await db.fetch(query.as_string(), params)]


def diff_tables(
    prod: Gateway, copy: Gateway, cmps: Sequence[Compare], rows: dict[str, int] | None = None
) -> dict[str, asyncio.Task[TableDiff]]:
    """`diff_table` of each, TABLES_AT_ONCE at a time, the biggest (by `rows`, estimates)
    started first so that no long diff starts last (tasks start, and the semaphore lets
    them in, in the order they are made); the caller awaits them in its own order and
    cancels what it leaves."""
    gate = asyncio.Semaphore(TABLES_AT_ONCE)
    sizes = rows or {}

    async def one(cmp: Compare) -> TableDiff:
        async with gate:
            return await diff_table(prod, copy, cmp)

    ordered = sorted(cmps, key=lambda c: -sizes.get(c.table, 0))
    return {c.table: asyncio.ensure_future(one(c)) for c in ordered}


async def diff_table(prod: Gateway, copy: Gateway, cmp: Compare) -> TableDiff:
    """Keys only in the copy, only in production, and in both with different rows.

    A small table is compared key by key at once. A bigger one is summed by bucket on both
    sides (`_cells`, chunk by chunk), a bucket whose sums differ by one entry gives that
    entry's key hash (`_decode`), whose key one more pass reads (`_keys_of`); the few
    buckets that differ by more are compared key by key. When those would hold more than
    MIXED_SHARE of the rows (more differences than the counts told: rows changed), the
    buckets are summed again, as many more as the differences found call for. A copy of
    production's own lineage is compared by row version first (`_diff_versions`)."""
    result = TableDiff(cmp.table)
    by_version = cmp.physical and cmp.buckets
    prod_est, copy_est = cmp.estimates
    # By row version, the rows are counted as they are read: the statistics size the
    # buckets (a wrong estimate costs one more pass, never a wrong answer); without
    # them (a table never analyzed), the counts do.
    if by_version and min(prod_est, copy_est) > SMALL_ROWS:
        by_version = False
        biggest = max(prod_est, copy_est)
        if await _diff_versions(
            prod, copy, cmp, result, biggest, abs(prod_est - copy_est) + biggest // CHANGED_SHARE
        ):
            return result
        result = TableDiff(cmp.table, statements=result.statements)

    async def count(db: Reader) -> int:
        rows = await db.fetch(sql.SQL("SELECT count(*) AS n FROM {}").format(cmp.ident).as_string())
        return int(rows[0]["n"])

    result.prod_rows, result.copy_rows = await _both(prod, copy, count)
    result.statements += 1
    biggest = max(result.prod_rows, result.copy_rows)
    if biggest == 0:
        return result
    result.method = KEYS
    if biggest <= SMALL_ROWS:
        await _compare(prod, copy, cmp, [_Part((None, None))], result)
        return result
    if not cmp.buckets:  # no bit_xor() on a side (before PostgreSQL 14)
        chunks = await _chunks(prod, copy, cmp, biggest, PAIR_ROWS)
        await _compare(prod, copy, cmp, [_Part(r) for r in chunks], result, len(chunks) == 1)
        return result
    differences = abs(result.prod_rows - result.copy_rows)
    if by_version and await _diff_versions(
        prod, copy, cmp, result, biggest, differences + biggest // CHANGED_SHARE
    ):
        return result
    result.method = BUCKETS
    chunks = await _chunks(prod, copy, cmp, biggest, CHUNK_ROWS)
    whole = len(chunks) == 1
    buckets = _buckets(biggest, differences)
    while True:
        mask = buckets - 1
        in_copy: dict[int, Cell] = {}
        in_prod: dict[int, Cell] = {}
        for rng in chunks:
            p, c = await _both(prod, copy, partial(_cells, cmp=cmp, rng=rng, mask=mask), whole)
            result.statements += 1
            _add(in_prod, p)
            _add(in_copy, c)
        only_copy, only_prod, mixed_list = _decode(in_copy, in_prod)
        per_bucket = biggest / buckets
        if len(mixed_list) * per_bucket <= biggest * MIXED_SHARE or buckets >= MAX_BUCKETS:
            break
        # Poisson: `differing` of `buckets` buckets differ when about this many entries do.
        differing = min(len(only_copy) + len(only_prod) + len(mixed_list), buckets - 1)
        more = _buckets(0, math.ceil(-buckets * math.log(1 - differing / buckets)))
        if more <= buckets:
            break
        buckets = more
    mixed = set(mixed_list)
    found_c: list[tuple[str, int, int]] = []
    found_p: list[tuple[str, int, int]] = []
    for rng in chunks:
        in_c, in_p = await asyncio.gather(
            _on(copy, partial(_entries_of, cmp=cmp, rng=rng, hashes=list(only_copy)), whole),
            _on(prod, partial(_entries_of, cmp=cmp, rng=rng, hashes=list(only_prod)), whole),
        )
        result.statements += 1
        found_c += in_c
        found_p += in_p
    result.only_copy += _confirm(only_copy, found_c, mixed)
    result.only_prod += _confirm(only_prod, found_p, mixed)
    at_once = max(1, int(PAIR_ROWS / per_bucket))
    ordered = sorted(mixed)
    parts = [
        _Part(rng, tuple(ordered[i : i + at_once]), mask)
        for rng in chunks
        for i in range(0, len(ordered), at_once)
    ]
    await _compare(prod, copy, cmp, parts, result, whole)
    result.only_copy.sort()
    result.only_prod.sort()
    result.changed.sort()
    return result


# The reference `Compare.version_hash` reads xmin against: age() of the first normal
# transaction id, stable within the transaction, as every row's age() is.
_VERSION_BASE = sql.SQL("(SELECT age('3'::xid)::bigint AS r OFFSET 0) AS v0")  # read once
_LAST_BLOCK = 4_294_967_295  # no block is at or beyond it: the last range's open end
# A range's bucket of row versions: its number and count (shifted by _COUNT_BITS, or'ed)
# and XOR of the version hashes, two integers as `int8send` gives them. A range holds at
# most 4,096 blocks of at most 291 rows (MaxHeapTuplesPerPage) but the last, open-ended
# one: a bucket that held 2^24 rows or more is compared by content instead.
VCell = bytes
VCELL_BYTES = 16
_COUNT_BITS = 24
# A row version read: its key, row hash and ctid.
Version = tuple[str, int, str]


def physical_lineage(prod: Row, copy: Row) -> bool:
    """Whether the copy is a physical copy of production's (a base backup restored, a
    database created from it as a template): the same system identifier, PostgreSQL 14 or
    later on both, transaction ids within 2^31 of each other (none reused since), and the
    copy's statistics counting its writes (`Compare.physical` then also needs the copy's
    table unwritten since its restore: `TableShape.writes`)."""
    return (
        bool(prod["system_id"])
        and prod["system_id"] == copy["system_id"]
        and min(int(prod["version_num"]), int(copy["version_num"])) >= 140000
        and abs(int(prod["next_xid"]) - int(copy["next_xid"])) < 1 << 31
        and bool(copy["track_counts"])
    )


@dataclass(frozen=True)
class _Blocks:
    """A table's blocks in ranges of `per` blocks (the last open-ended), each range's
    rows summed in 2^bits buckets (by the low bits of their version hash); a statement
    reads the ranges of one chunk: `chunks`, first and last range."""

    per: int
    ranges: int
    bits: int
    at_once: int

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return [
            (g, min(g + self.at_once, self.ranges) - 1) for g in range(0, self.ranges, self.at_once)
        ]

    def scan(self, cmp: Compare) -> sql.Composable:
        """`t`'s rows in the range `g` (a TID range scan)."""
        hi = sql.SQL("CASE WHEN g >= {last} THEN {end} ELSE (g + 1) * {per} END").format(
            last=sql.Literal(self.ranges - 1),
            end=sql.Literal(_LAST_BLOCK),
            per=sql.Literal(self.per),
        )
        return sql.SQL(
            "{t} AS t WHERE t.ctid >= ('(' || g * {per} || ',0)')::tid"
            " AND t.ctid < ('(' || {hi} || ',0)')::tid"
        ).format(t=cmp.ident, per=sql.Literal(self.per), hi=hi)


async def _version_cells(
    db: Reader, cmp: Compare, blocks: _Blocks, g0: int, g1: int
) -> tuple[set[VCell], int, int]:
    """Ranges g0 to g1's rows by bucket (range, low bits of the version hash): per bucket
    its number and count (as one integer: `_COUNT_BITS`) and XOR of the version hashes,
    each bucket as its bytes (`VCell`): the buckets equal on both sides compare as bytes,
    never parsed. And the rows read, and the most a bucket held."""
    query = sql.SQL(
        "SELECT coalesce(string_agg(int8send((((g << {bits}) | x.s) << {count_bits}) | x.n)"
        " || int8send(x.h), ''), '') AS cells, coalesce(sum(x.n), 0)::bigint AS rows,"
        " coalesce(max(x.n), 0) AS most"
        " FROM {base}, generate_series(%s::bigint, %s::bigint) AS g,"
        " LATERAL (SELECT v.h & {mask} AS s, count(*) AS n, bit_xor(v.h) AS h"
        " FROM (SELECT {vh} AS h FROM {scan} OFFSET 0) AS v GROUP BY 1) AS x"
    ).format(
        bits=sql.Literal(blocks.bits),
        count_bits=sql.Literal(_COUNT_BITS),
        base=_VERSION_BASE,
        mask=sql.Literal((1 << blocks.bits) - 1),
        vh=cmp.version_hash(),
        scan=blocks.scan(cmp),
    )
    await db.fetch("SELECT set_config('enable_sort', 'off', true)")
    (row,) = await db.fetch(query.as_string(), (g0, g1))
    blob, size = bytes(row["cells"]), VCELL_BYTES
    cells = {blob[i : i + size] for i in range(0, len(blob), size)}
    return cells, int(row["rows"]), int(row["most"])


def _decode_versions(
    copy: set[VCell], prod: set[VCell]
) -> tuple[dict[int, int], dict[int, int], list[int]]:
    """`_decode` of the buckets that differ (on one side or both), as they come from
    `_version_cells`: ({version hash: its bucket} only in the copy, the same only in
    production, the buckets that differ by more than one version)."""

    def parsed(cells: set[VCell]) -> dict[int, tuple[int, int]]:
        n, low = int8s(b"".join(cells)), (1 << _COUNT_BITS) - 1
        return {bn >> _COUNT_BITS: (bn & low, h) for bn, h in zip(n[0::2], n[1::2], strict=True)}

    in_copy, in_prod = parsed(copy), parsed(prod)
    only_copy: dict[int, int] = {}
    only_prod: dict[int, int] = {}
    mixed: list[int] = []
    for b, (n, h) in in_copy.items():
        pn, ph = in_prod.pop(b, (0, 0))
        if n - pn == 1:
            only_copy[h ^ ph] = b
        elif n - pn == -1:
            only_prod[h ^ ph] = b
        else:
            mixed.append(b)
    for b, (n, h) in in_prod.items():
        if n == 1:
            only_prod[h] = b
        else:
            mixed.append(b)
    return only_copy, only_prod, mixed


async def _versions_of(
    db: Reader,
    cmp: Compare,
    blocks: _Blocks,
    ranges: list[int],
    wanted: dict[int, int],
    buckets: list[int],
) -> dict[int, Version]:
    """{version hash: (key, row hash, ctid)} of the rows of `ranges` whose version hash is
    one of `wanted` (each with its bucket), or whose bucket is one of `buckets` (a row's
    bucket is looked up in a bitmap of all those buckets first: a bit costs a row a
    fraction of what a look-up in the arrays does)."""
    mask = (1 << blocks.bits) - 1
    first = ranges[0]
    bitmap = bytearray((((ranges[-1] - first + 1) << blocks.bits) + 7) // 8)
    for b in itertools.chain(wanted.values(), buckets):
        i = b - (first << blocks.bits)
        bitmap[i >> 3] |= 1 << (i & 7)
    query = sql.SQL(
        "SELECT w.h, x.k, x.rh, w.tid::text AS tid FROM {base}, unnest(%s::bigint[]) AS g,"
        # each range scanned for itself, its version hashes taken once (pulled up, the
        # rows would be joined with every range, and hashed in each condition), and the
        # rows wanted read again by their ctid, for their row hash
        " LATERAL (SELECT v.h, v.tid FROM (SELECT {vh} AS h, t.ctid AS tid FROM {scan}"
        " OFFSET 0) AS v WHERE get_bit(%s::bytea, ((g - {first}) << {bits}) | (v.h & {mask})) = 1"
        " AND (v.h = ANY(%s::bigint[]) OR ((g << {bits}) | (v.h & {mask})) = ANY(%s::bigint[])))"
        " AS w"
        " CROSS JOIN LATERAL (SELECT r.{key}::text AS k, {rh} AS rh FROM {t} AS r"
        " WHERE r.ctid = w.tid OFFSET 0) AS x"
    ).format(
        base=_VERSION_BASE,
        vh=cmp.version_hash(),
        key=sql.Identifier(cmp.key),
        rh=cmp.row_hash("r"),
        t=cmp.ident,
        scan=blocks.scan(cmp),
        bits=sql.Literal(blocks.bits),
        mask=sql.Literal(mask),
        first=sql.Literal(first),
    )
    # as four arrays in one row (tens of thousands of rows cost far more as rows)
    arrays = sql.SQL(
        "SELECT coalesce(array_agg(f.h), '{{}}') AS h, coalesce(array_agg(f.k), '{{}}') AS k,"
        " coalesce(array_agg(f.rh), '{{}}') AS rh, coalesce(array_agg(f.tid), '{{}}') AS tid"
        " FROM ({}) AS f"
    ).format(query)
    params = (ints(ranges), bytes(bitmap), ints(wanted), ints(buckets))
    (row,) = await db.fetch(arrays.as_string(), params)
    return dict(zip(row["h"], zip(row["k"], row["rh"], row["tid"], strict=True), strict=True))


def ints(values: Iterable[int]) -> str:
    """A bigint[] literal (tens of thousands of numbers: psycopg's adapting of a list
    costs far more)."""
    return "{" + ",".join(map(str, values)) + "}"


def texts(values: Iterable[str | None]) -> str:
    """A text[] literal, each element quoted, None as NULL (as `ints`). JSON's form of a
    list of strings is that literal's (quotes and backslashes escaped alike, null read as
    NULL) unless a string holds a character JSON escapes otherwise (a control character):
    then each element is quoted here."""
    listed = list(values)
    dumped = json.dumps(listed, ensure_ascii=False)
    if not _OTHER_ESCAPE.search(dumped):
        return "{" + dumped[1:-1] + "}"
    return (
        "{"
        + ",".join(
            "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in listed
        )
        + "}"
    )


# A JSON escape other than of a quote or a backslash (an escaped backslash before a
# letter matches too: that list is only quoted the slower way).
_OTHER_ESCAPE = re.compile(r'\\[^"\\]')


def _bits_for(differences: float, ranges: int) -> int:
    """Bucket bits a range of blocks needs so that VERSION_BUCKETS_PER_DIFFERENCE buckets
    fall to a difference expected."""
    wanted = VERSION_BUCKETS_PER_DIFFERENCE * differences / max(1, ranges)
    return min(MAX_VERSION_BITS, max(0, math.ceil(math.log2(max(1.0, wanted)))))


async def _diff_versions(
    prod: Gateway, copy: Gateway, cmp: Compare, result: TableDiff, rows: int, differences: int
) -> bool:
    """The table compared by row version, for a copy of production's own lineage: a row
    version is its key and the transaction that wrote it (`xmin`), the same on both sides
    until production changes the row (an UPDATE writes a new version, a DELETE removes it;
    VACUUM, freezing and rewrites keep it). So no column is hashed but the key: per range
    of blocks read by a TID range scan, the versions are summed by bucket (count, XOR of
    the version hashes), no row leaving the server. A bucket with one version more on
    one side gives it (the XOR); the other buckets that differ are read whole. Only the
    versions that differ are read with their keys and row hashes: versions on both sides
    cancel, wherever each lies; the rest compare by key (a row on both sides with another
    version is changed when its row hash differs). False when more than VERSIONS_GIVE_UP
    of the rows differ (a table rewritten with new versions): then the caller compares by
    content.

    Why the same (key, xmin) is the same row: both sides share one history up to the
    copy's point, and a transaction id is used once in a cluster's history (the ids are
    within 2^31 of each other: none wrapped around since); after the point, production's
    new versions carry ids the copy never committed. The copy's own writes after its
    restore would carry ids production may have used too, for other rows: so a table the
    copy has written since (its statistics say) is compared by content."""
    per_block = max(1.0, rows / max(1, cmp.blocks))
    per = max(1, round(RANGE_ROWS / per_block))
    ranges = max(1, -(-cmp.blocks // per))
    blocks = _Blocks(per, ranges, _bits_for(differences, ranges), max(1, CHUNK_ROWS // RANGE_ROWS))
    while True:
        in_copy: set[VCell] = set()
        in_prod: set[VCell] = set()
        prod_rows = copy_rows = 0  # as the pass reads them
        for g0, g1 in blocks.chunks:
            (p, p_rows, p_most), (c, c_rows, c_most) = await _both(
                prod, copy, partial(_version_cells, cmp=cmp, blocks=blocks, g0=g0, g1=g1)
            )
            result.statements += 1
            if max(p_most, c_most) >> _COUNT_BITS:
                return False
            in_prod |= p
            in_copy |= c
            prod_rows, copy_rows = prod_rows + p_rows, copy_rows + c_rows
        # Only the buckets that differ (each is then on both sides, or empty on one).
        only_copy, only_prod, mixed = _decode_versions(in_copy - in_prod, in_prod - in_copy)
        buckets = ranges << blocks.bits
        differing = min(len(only_copy) + len(only_prod) + len(mixed), buckets - 1)
        # Poisson: `differing` of `buckets` buckets differ when about this many versions do.
        estimated = -buckets * math.log(1 - differing / buckets)
        if estimated > VERSIONS_GIVE_UP * 2 * max(1, rows):
            return False
        if len(mixed) * rows / buckets <= MIXED_SHARE * rows:
            break
        bits = _bits_for(estimated, ranges)
        if bits <= blocks.bits:
            break
        blocks = replace(blocks, bits=bits)
    # The versions that differ, read with their keys: first the buckets' single versions
    # and the mixed buckets whole; then, whole, the buckets whose version was not there
    # (they differed by more than one after all).
    found_c: dict[int, Version] = {}
    found_p: dict[int, Version] = {}
    wanted_c, wanted_p, whole = dict(only_copy), dict(only_prod), set(mixed)
    read_whole: set[int] = set()
    while wanted_c or wanted_p or whole:
        got_c, got_p = await asyncio.gather(
            _fetch_versions(copy, cmp, blocks, wanted_c, whole),
            _fetch_versions(prod, cmp, blocks, wanted_p, whole),
        )
        result.statements += 1
        found_c.update(got_c)
        found_p.update(got_p)
        read_whole |= whole
        whole = {b for h, b in wanted_c.items() if h not in found_c}
        whole |= {b for h, b in wanted_p.items() if h not in found_p}
        whole -= read_whole
        wanted_c, wanted_p = {}, {}
    common = found_c.keys() & found_p.keys()
    in_c = {k: (rh, tid) for h, (k, rh, tid) in found_c.items() if h not in common}
    in_p = {k: rh for h, (k, rh, _) in found_p.items() if h not in common}
    for k, (rh, tid) in in_c.items():
        if k not in in_p:
            result.only_copy.append(k)
            result.copy_tids[k] = tid
        elif in_p[k] != rh:
            result.changed.append(k)
    result.only_prod += [k for k in in_p if k not in in_c]
    for keys in (result.only_copy, result.only_prod, result.changed):
        keys.sort()
    result.prod_rows, result.copy_rows = prod_rows, copy_rows
    result.method = VERSIONS
    return True


async def _fetch_versions(
    gw: Gateway, cmp: Compare, blocks: _Blocks, wanted: dict[int, int], whole: set[int]
) -> dict[int, Version]:
    """`_versions_of` the `wanted` versions and the `whole` buckets, a chunk of ranges a
    statement."""
    bits, at_once = blocks.bits, blocks.at_once
    ranges: dict[int, set[int]] = defaultdict(set)
    hashes: dict[int, dict[int, int]] = defaultdict(dict)
    buckets: dict[int, list[int]] = defaultdict(list)
    for h, b in wanted.items():
        g = b >> bits
        ranges[g // at_once].add(g)
        hashes[g // at_once][h] = b
    for b in whole:
        g = b >> bits
        ranges[g // at_once].add(g)
        buckets[g // at_once].append(b)
    out: dict[int, Version] = {}
    for chunk in sorted(ranges):
        out |= await _on(
            gw,
            partial(
                _versions_of,
                cmp=cmp,
                blocks=blocks,
                ranges=sorted(ranges[chunk]),
                wanted=hashes[chunk],
                buckets=buckets[chunk],
            ),
        )
    return out


async def _compare(
    prod: Gateway,
    copy: Gateway,
    cmp: Compare,
    parts: list[_Part],
    result: TableDiff,
    seqscan: bool = True,
) -> None:
    """The parts compared key by key: the copy's (key, hash) pairs come as two array
    literals, which production joins with its own pairs, returning only the keys that
    differ (no row becomes a Python object). The copy reads the next part while production
    compares this one."""
    if not parts:
        return
    ahead = asyncio.ensure_future(
        _on(copy, partial(_pairs_arrays, cmp=cmp, part=parts[0]), seqscan)
    )
    try:
        for i, part in enumerate(parts):
            blob = await ahead
            if i + 1 < len(parts):
                nxt = partial(_pairs_arrays, cmp=cmp, part=parts[i + 1])
                ahead = asyncio.ensure_future(_on(copy, nxt, seqscan))
            found = await _on(prod, partial(_compare_pairs, cmp=cmp, part=part, blob=blob), seqscan)
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
    for start in range(0, len(keys), KEYS_AT_ONCE):
        chunk = list(keys[start : start + KEYS_AT_ONCE])

        async def read(db: Reader, chunk: list[str] = chunk) -> dict[str, list[Any]]:
            rows = await db.fetch(query.as_string(), (chunk,))
            return {str(r["k"]): list(r["h"]) for r in rows}

        p, c = await _both(prod, copy, read)
        for k in chunk:
            if k in p and k in c:
                out[k] = [col for col, a, b in zip(cmp.columns, p[k], c[k], strict=True) if a != b]
    return out
