"""Whole-table reads, exact, in statements of bounded size (issue 16): the one place
that cuts a table into ranges of keys or of blocks from the planner's statistics, and
runs the pieces.

At a million users one statement over all of `points_ledger` (20 million rows) or
`submissions` (10 million) takes longer than the per-check timeout; sampling would lose
the exactness recovery and repairs rest on. So such a read runs as one statement per
piece of the table, and the pieces' results are added up (counts) or merged (samples,
by the same order the whole statement would use):

* by ranges of a key column (a user id, a submission id): `key_stats` reads the
  column's histogram (`pg_stats.histogram_bounds`) and the planner's row counts,
  `pieces_needed` says how many pieces hold about so many rows each, `cut_points`
  picks where they meet from the histogram, and `key_ranges` makes the pieces
  (`split` and `key_pieces` do all of it). Every non-NULL key is in exactly one range
  (`>= lo AND < hi`, compared in the column's collation, in which the histogram is
  sorted); where a key column may hold NULL, a piece of its own reads those rows
  (`IS NULL`), so every row is in exactly one piece. A join on that key (users by id,
  submissions by id) restricted to the same range reads only the piece's share of the
  other table too. Without statistics (never analyzed) there is one piece, the whole
  table.
* `block_pieces`: by ranges of physical blocks (`ctid`, read by a TID range scan), for
  plain counts: each block is read once whatever the keys' order on disk. The last
  piece is open-ended, so rows in blocks added since the catalog counted them are read.

Each piece is its own read-only transaction, at most CONCURRENCY at once (the two
cores measured): `run_pieces` for a plan (an error is raised), `check_pieces` for a
check (a timeout comes back as the check's finding, skipped). Neither a statement nor
a transaction grows with the table. The pieces' snapshots differ by the milliseconds
between them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
from array import array
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from commands.base import Finding, Gateway, Reader, Row, Status

# Rows a piece holds: under a second of hashing and joining on a busy 2-core machine
# (1,000,000 took up to 2.1 s with the load average at 8).
ROWS_PER_PIECE = 500_000
# Pieces read at once, each on its own pooled connection (the gateway's pool holds 4):
# two, for the two cores of the machines measured.
CONCURRENCY = 2
WORK_MEM = "64MB"

T = TypeVar("T")

# The rows of `tables` as the planner last counted them; the histogram of
# `table.column` (the table's own statistics first, then those with its children), in
# the column's order; whether no key column (`keyed`.`columns`) may hold NULL.
_KEY_STATS_SQL = """
SELECT (SELECT coalesce(sum(greatest(c.reltuples, 0)::float8), 0)::bigint FROM pg_class AS c
        WHERE c.oid = ANY(ARRAY(SELECT to_regclass(t) FROM unnest(%(tables)s::text[]) AS t)))
         AS rows,
       (SELECT s.histogram_bounds::text::text[]
        FROM pg_class AS c
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        JOIN pg_stats AS s ON s.schemaname = n.nspname AND s.tablename = c.relname
        WHERE c.oid = to_regclass(%(table)s) AND s.attname = %(column)s
        ORDER BY s.inherited LIMIT 1) AS bounds,
       (SELECT bool_and(coalesce(a.attnotnull, false))
        FROM unnest(%(keyed)s::text[], %(columns)s::text[]) AS k(t, col)
        LEFT JOIN pg_attribute AS a ON a.attrelid = to_regclass(k.t) AND a.attname = k.col)
         AS not_null
"""
_BLOCKS_SQL = """
SELECT greatest(c.reltuples, 0)::bigint AS rows,
       (pg_relation_size(c.oid) / current_setting('block_size')::bigint) AS blocks
FROM pg_class AS c WHERE c.oid = to_regclass(%(table)s)
"""


@dataclass(frozen=True)
class Piece:
    """One range of a key (`lo` inclusive, `hi` exclusive; None: unbounded), the rows
    whose key is NULL (`null`), or a range of blocks when `blocks` (then `lo` and `hi`
    are `(block,0)` tids)."""

    lo: str | None = None
    hi: str | None = None
    blocks: bool = False
    null: bool = False

    @property
    def ranged(self) -> bool:
        """A proper range of keys, or their NULLs (not blocks, not the whole table)."""
        return not self.blocks and (self.null or self.lo is not None or self.hi is not None)

    def where(self, column: str, name: str = "") -> str:
        """The condition that puts a row in this piece: SQL over `column` (SQL text of
        the caller's, never input) with the bound parameters `%(lo<name>)s` /
        `%(hi<name>)s` (`params(name)`)."""
        if self.null:
            return f"({column} IS NULL)"
        if self.blocks:
            column, cast = "ctid", "::tid"
        else:
            cast = ""
        parts = []
        if self.lo is not None:
            parts.append(f"{column} >= %(lo{name})s{cast}")
        if self.hi is not None:
            parts.append(f"{column} < %(hi{name})s{cast}")
        return f"({' AND '.join(parts) or 'TRUE'})"

    def params(self, name: str = "") -> dict[str, str | None]:
        return {f"lo{name}": self.lo, f"hi{name}": self.hi}


WHOLE = Piece()


@dataclass(frozen=True)
class KeyStats:
    """What the planner knows for reading a table by ranges of a key (`key_stats`)."""

    rows: int  # the rows of every table read in the ranges, as last counted
    bounds: tuple[str, ...]  # the key's histogram, in the column's order; () without one
    not_null: bool  # no key column may hold NULL (no piece of NULL keys is needed)


async def key_stats(
    db: Reader,
    table: str,
    column: str,
    also: Sequence[tuple[str, str]] = (),
    parents: Sequence[str] = (),
) -> KeyStats:
    """The statistics for reading `table` by ranges of `column`, together with the
    tables `also` names ((table, column): the same key in another table, its rows in
    the same ranges) and the `parents` (tables the key refers to, read by their primary
    key in the same ranges): the rows of them all, `table.column`'s histogram, and
    whether `column` and the columns of `also` are all NOT NULL."""
    keyed = [(table, column), *also]
    (row,) = await db.fetch(
        _KEY_STATS_SQL,
        {
            "tables": [t for t, _c in keyed] + list(parents),
            "table": table,
            "column": column,
            "keyed": [t for t, _c in keyed],
            "columns": [c for _t, c in keyed],
        },
    )
    return KeyStats(
        int(row["rows"] or 0),
        tuple(str(b) for b in row["bounds"] or ()),
        bool(row["not_null"]),
    )


def pieces_needed(rows: int, per_piece: int) -> int:
    """How many pieces `rows` rows make, `per_piece` (about) in each: at least one."""
    return max(1, math.ceil(max(rows, 0) / max(1, per_piece)))


def cut_points(bounds: Sequence[str], pieces: int) -> list[str]:
    """Where `pieces` ranges of a key meet so that each holds about as many rows, from
    the key's histogram (`bounds`, sorted; as many rows lie between any two consecutive
    bounds): evenly spaced bounds, in the histogram's own order (the column's
    collation, the order the ranges compare in: never sorted again), a repeated one
    once. No cut for one piece, nor in a histogram too short to split (under three
    bounds); at most one cut a bucket."""
    buckets = len(bounds) - 1
    n = min(pieces, buckets)
    if n < 2:
        return []
    # bound i * buckets / n for i = 1 .. n-1, rounded half up (in integers)
    return list(dict.fromkeys(bounds[(2 * i * buckets + n) // (2 * n)] for i in range(1, n)))


def key_ranges(cuts: Sequence[str], *, nulls: bool) -> list[Piece]:
    """The ranges `cuts` (ascending in the column's order) divide a key into: below the
    first, between each two, from the last on, so that every non-NULL key is in exactly
    one; with `nulls` (the key may be NULL), first a piece of the NULL keys, which no
    range holds. Without cuts one piece, the whole table (NULL keys too)."""
    if not cuts:
        return [WHOLE]
    edges: list[str | None] = [None, *cuts, None]
    ranges = [Piece(lo, hi) for lo, hi in itertools.pairwise(edges)]
    return [Piece(null=True), *ranges] if nulls else ranges


def block_ranges(cuts: Sequence[int]) -> list[Piece]:
    """The ranges of blocks `cuts` (block numbers, ascending) divide a table into: the
    first from its start, the last open-ended (blocks added meanwhile are read too)."""
    edges: list[str | None] = [None, *(f"({b},0)" for b in cuts), None]
    return [Piece(lo, hi, blocks=True) for lo, hi in itertools.pairwise(edges)]


def split(
    bounds: Sequence[str], rows: int, per_piece: int | None = None, *, nulls: bool
) -> list[Piece]:
    """Pieces of about `per_piece` rows (ROWS_PER_PIECE by default) of `rows`, cut
    where the histogram's sorted `bounds` put equal shares of them (`key_ranges`)."""
    return key_ranges(
        cut_points(bounds, pieces_needed(rows, per_piece or ROWS_PER_PIECE)), nulls=nulls
    )


async def key_pieces(
    db: Reader,
    table: str,
    column: str,
    parent: str | None = None,
    rows: int | None = None,
    per_piece: int | None = None,
    also: Sequence[tuple[str, str]] = (),
) -> list[Piece]:
    """`table`'s rows in pieces by ranges of `column` (one piece without statistics).
    With `parent` (the table the key refers to, whose share of each range the piece's
    statement reads too) and `also` (other tables' columns of the same key, read by the
    same ranges), their rows count towards the pieces' size as well, and a NULL in any
    key column gets its piece. `rows`: the rows the pieces share instead (those a
    statement will work on), `per_piece` of them in each (ROWS_PER_PIECE by default)."""
    stats = await key_stats(db, table, column, also, [parent] if parent is not None else [])
    n = stats.rows if rows is None else rows
    return split(stats.bounds, n, per_piece, nulls=not stats.not_null)


async def block_pieces(
    db: Reader,
    table: str,
    rows_per_piece: int | None = None,
    blocks_per_piece: int | None = None,
) -> list[Piece]:
    """`table`'s blocks in pieces of about `rows_per_piece` rows (ROWS_PER_PIECE by
    default), or of `blocks_per_piece` blocks each; the last open-ended."""
    rows = await db.fetch(_BLOCKS_SQL, {"table": table})
    if not rows:
        return [WHOLE]
    n_rows, blocks = int(rows[0]["rows"]), int(rows[0]["blocks"])
    if blocks_per_piece is not None:
        return block_ranges(range(blocks_per_piece, blocks, blocks_per_piece))
    n = pieces_needed(n_rows, rows_per_piece or ROWS_PER_PIECE)
    if blocks < n:
        return block_ranges([])
    return block_ranges([round(i * blocks / n) for i in range(1, n)])


async def no_jit(db: Reader) -> None:
    """For this transaction only: no JIT compilation, and room for hash tables. A
    statement over a big table is costed above `jit_above_cost`, and compiling took 2.3 s
    for a statement that runs in 80 ms (100,000 users, measured)."""
    await db.fetch(
        "SELECT set_config('jit', 'off', true), set_config('work_mem', %s, true)", (WORK_MEM,)
    )


async def tune(db: Reader, piece: Piece = WHOLE, settings: Mapping[str, str] | None = None) -> None:
    """For this transaction only: room for a piece's hash tables, no JIT (its compile
    time exceeds the gain), a plan for the piece's own bounds every time (a generic plan
    of a prepared piece query would not know how narrow its range is), no parallel
    workers (the pieces themselves run side by side on the cores) and, for a range of
    keys, no sequential scan: the range is read through the key's index (a bitmap heap
    scan visits only the blocks holding its rows), where a sequential scan would read
    the whole table for each piece. `settings` adds others ({"enable_hashjoin": "off"})."""
    values = {
        "work_mem": WORK_MEM,
        "jit": "off",
        "plan_cache_mode": "force_custom_plan",
        "max_parallel_workers_per_gather": "0",
        **({"enable_seqscan": "off"} if piece.ranged else {}),
        **(settings or {}),
    }
    calls = ", ".join("set_config(%s, %s, true)" for _ in values)
    await db.fetch(f"SELECT {calls}", [v for kv in values.items() for v in kv])


async def _each(
    pieces: Sequence[Piece], run: Callable[[int, Piece], Awaitable[T]], concurrency: int
) -> list[T]:
    """`run` of every piece (its position, the piece), at most `concurrency` at once; the
    results in the pieces' order. Once one has failed no other starts (the answer is
    lost anyway); the first failure is raised once the pieces under way have ended."""
    gate = asyncio.Semaphore(max(1, concurrency))
    failed = asyncio.Event()

    async def one(i: int, piece: Piece) -> T:
        async with gate:
            if failed.is_set():
                raise asyncio.CancelledError
            try:
                return await run(i, piece)
            except Exception:
                failed.set()
                raise

    results = await asyncio.gather(
        *(one(i, p) for i, p in enumerate(pieces)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise errors[0]
    cancelled = [r for r in results if isinstance(r, BaseException)]
    if cancelled:
        raise cancelled[0]
    return [r for r in results if not isinstance(r, BaseException)]


async def run_pieces(
    gw: Gateway,
    pieces: Sequence[Piece],
    read: Callable[[Reader, Piece], Awaitable[T]],
    settings: Mapping[str, str] | None = None,
    concurrency: int = CONCURRENCY,
) -> list[T]:
    """`read` of every piece, each in its own read-only transaction (`tune`d, with
    `settings`), at most `concurrency` at once; the results in the pieces' order. The
    first failure is raised once the pieces under way have ended."""

    async def run(_i: int, piece: Piece) -> T:
        async def fn(db: Reader) -> T:
            await tune(db, piece, settings)
            return await read(db, piece)

        return await gw.read(fn)

    return await _each(pieces, run, concurrency)


class _PieceFailed(Exception):
    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.summary)
        self.finding = finding


async def check_pieces(
    gw: Gateway,
    check: str,
    pieces: Sequence[Piece],
    read: Callable[[Reader, Piece], Awaitable[T]],
    concurrency: int = CONCURRENCY,
    numbered: bool = False,
) -> list[T] | Finding:
    """`read` of every piece, each a check of its own (`Gateway.run_check`: its own
    read-only transaction, bounded by the check timeout) named `check` (`check i/n`
    when `numbered`), at most `concurrency` at once: the results in the pieces' order,
    or a failed piece's finding (a timeout comes back skipped). `read` tunes its own
    transaction."""

    async def run(i: int, piece: Piece) -> T:
        got: list[T] = []
        name = f"{check} {i + 1}/{len(pieces)}" if numbered else check

        async def fn(db: Reader) -> Finding:
            got.append(await read(db, piece))
            return Finding(check=name, status=Status.OK, summary="")

        done = await gw.run_check(name, fn)
        if done.status is not Status.OK:
            raise _PieceFailed(done)
        return got[0]

    try:
        return await _each(pieces, run, concurrency)
    except _PieceFailed as failed:
        return failed.finding


def add_up(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The column-wise sums of the pieces' one-row counts (None counts 0)."""
    out: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            out[key] = out.get(key, 0) + int(value or 0)
    return out


# --- repeated keys without an index ---------------------------------------------------

# Hash buckets of the keys, at most: one bit each (seen), the buckets seen twice in a set.
BUCKETS = 1 << 27
# Candidate rows judged exactly per statement (whole hashes, so whole keys, together).
CANDIDATES_PER_STATEMENT = 100_000
# Each row's bucket as 4 bytes (big-endian), all in one value: 4 bytes a row in memory.
_U32 = next(code for code in "IL" if array(code).itemsize == 4)
_BUCKETS_SQL = """
SELECT string_agg(int4send((({hash}) & %(mask)s)::int4), ''::bytea) AS buckets
FROM {table} AS t WHERE {rows} AND {where}
"""
# The rows of the buckets held twice: their ids and 64-bit hashes (8 bytes each), in order.
_CANDIDATES_SQL = """
SELECT array_agg(c.id ORDER BY c.n) AS ids,
       string_agg(int8send(c.h), ''::bytea ORDER BY c.n) AS hashes
FROM (SELECT t.id::text AS id, ({hash}) AS h, row_number() OVER () AS n FROM {table} AS t
      WHERE {rows} AND {where} AND ({hash}) & %(mask)s = ANY(%(hot)s::bigint[])) AS c
"""
_S64 = next(code for code in "lq" if array(code).itemsize == 8)


async def repeated_candidates(
    gw: Gateway, table: str, hash_sql: str, where: str, rows_per_piece: int | None = None
) -> list[list[str]]:
    """The rows of `table` (alias `t`, those `where` holds) that may share their key with
    another: those whose key's 64-bit hash (`hash_sql`, equal for equal keys) another
    row's is equal to, a superset of the rows whose key repeats. Two passes over the
    table's blocks in pieces (of `rows_per_piece` rows): the buckets (the hash's low
    bits, BUCKETS of them) seen marked one bit each, whatever the table's size, those
    seen twice kept; then the hashes of the rows of those buckets. Returned in groups
    of whole hashes (every row of a key in one group), of about CANDIDATES_PER_STATEMENT
    rows each, for the caller to judge exactly, one statement per group."""

    async def pieces(db: Reader) -> tuple[list[Piece], int]:
        rows = await db.fetch(_BLOCKS_SQL, {"table": table})
        return await block_pieces(db, table, rows_per_piece), int(rows[0]["rows"]) if rows else 0

    found, n_rows = await gw.read(pieces)
    # 64 buckets a row (few shared by chance), at most BUCKETS
    size = min(BUCKETS, 1 << max(16, (64 * max(n_rows, 1) - 1).bit_length()))
    mask = size - 1
    seen = bytearray((size + 7) // 8)
    hot: set[int] = set()

    def sql(template: str, piece: Piece) -> str:
        return template.format(hash=hash_sql, table=table, rows=piece.where("ctid"), where=where)

    async def count(db: Reader, piece: Piece) -> array[int]:
        row = (await db.fetch(sql(_BUCKETS_SQL, piece), {"mask": mask, **piece.params()}))[0]
        buckets = array(_U32)
        buckets.frombytes(bytes(row["buckets"] or b""))
        if sys.byteorder == "little":
            buckets.byteswap()
        return buckets

    for buckets in await run_pieces(gw, found, count):
        for b in buckets:
            byte, bit = b >> 3, 1 << (b & 7)
            if seen[byte] & bit:
                hot.add(b)
            else:
                seen[byte] |= bit
    del seen
    if not hot:
        return []
    listed = sorted(hot)

    async def candidates(db: Reader, piece: Piece) -> tuple[list[str], array[int]]:
        params = {"mask": mask, "hot": listed, **piece.params()}
        row = (await db.fetch(sql(_CANDIDATES_SQL, piece), params))[0]
        hashes = array(_S64)
        hashes.frombytes(bytes(row["hashes"] or b""))
        if sys.byteorder == "little":
            hashes.byteswap()
        return [str(i) for i in row["ids"] or []], hashes

    ids: list[str] = []
    hashes = array(_S64)
    for got_ids, got_hashes in await run_pieces(gw, found, candidates):
        ids += got_ids
        hashes.extend(got_hashes)
    order = sorted(range(len(ids)), key=hashes.__getitem__)
    groups: list[list[str]] = [[]]
    for _h, run in itertools.groupby(order, key=hashes.__getitem__):
        same = list(run)
        if len(same) < 2:
            continue  # its bucket was shared, its hash (so its key) is not
        if len(groups[-1]) >= CANDIDATES_PER_STATEMENT:
            groups.append([])
        groups[-1].extend(ids[i] for i in same)
    return [g for g in groups if g]


async def judge_groups(
    gw: Gateway, query: str, groups: Sequence[list[str]], sample: int
) -> list[list[Row]]:
    """`query` (its parameters `%(ids)s` and `%(sample)s`) over each group of
    `repeated_candidates`, in a read of its own without JIT: each group's rows."""
    out: list[list[Row]] = []
    for ids in groups:

        async def judge(db: Reader, ids: list[str] = ids) -> list[Row]:
            await no_jit(db)
            return await db.fetch(query, {"ids": ids, "sample": sample})

        out.append(await gw.read(judge))
    return out


async def first_by_id(gw: Gateway, table: str, rows: Sequence[Row], limit: int) -> list[Row]:
    """The first `limit` of `rows` (each with the `id` of a row of `table`) in the
    database's own order of that id (its collation), as one statement's ORDER BY id
    would give them."""
    if len(rows) <= 1:
        return list(rows)[:limit]
    by_id = {str(r["id"]): r for r in rows}

    async def order(db: Reader) -> list[Row]:
        return await db.fetch(
            f"SELECT t.id FROM {table} AS t WHERE t.id = ANY(%s) ORDER BY t.id LIMIT %s",  # noqa: S608 (a table name of the caller's constants)
            (list(by_id), limit),
        )

    return [by_id[str(r["id"])] for r in await gw.read(order)]
