"""Whole-table reads, exact, in statements of bounded size (issue 16).

At a million users one statement over all of `points_ledger` (20 million rows) or
`submissions` (10 million) takes longer than the per-check timeout; sampling would lose
the exactness recovery and repairs rest on. So such a read runs as one statement per
piece of the table, and the pieces' results are added up (counts) or merged (samples,
by the same order the whole statement would use):

* `key_pieces`: by ranges of a key column (a user id, a submission id), from the
  column's own statistics (`pg_stats.histogram_bounds`), so that each piece holds about
  `ROWS_PER_PIECE` rows. Every non-NULL key is in exactly one piece (`>= lo AND < hi`,
  compared in the column's collation, in which the histogram is sorted); where the
  column may hold NULL, a piece of its own reads those rows (`IS NULL`). A join on
  that key (users by id, submissions by id) restricted to the same range reads only the
  piece's share of the other table too. Without statistics (never analyzed) there is
  one piece, the whole table.
* `block_pieces`: by ranges of physical blocks (`ctid`, read by a TID range scan), for
  plain counts: each block is read once whatever the keys' order on disk. The last
  piece is open-ended, so rows in blocks added since the catalog counted them are read.

Each piece is its own read-only transaction (`run_pieces`, two at a time for the two
cores measured), so neither a statement nor a transaction grows with the table. The
pieces' snapshots differ by the milliseconds between them, as the shards of
`/db integrity` do.
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

from commands.base import Gateway, Reader, Row

# Rows a piece holds: under a second of hashing and joining on a busy 2-core machine
# (1,000,000 took up to 2.1 s with the load average at 8).
ROWS_PER_PIECE = 500_000
# Pieces read at once, each on its own pooled connection (the gateway's pool holds 4).
CONCURRENCY = 2
WORK_MEM = "64MB"

T = TypeVar("T")

_KEY_STATS_SQL = """
SELECT greatest(c.reltuples, 0)::bigint AS rows,
       (SELECT s.histogram_bounds::text::text[] FROM pg_stats AS s
        WHERE s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = %(column)s
        LIMIT 1) AS bounds,
       coalesce((SELECT a.attnotnull FROM pg_attribute AS a
                 WHERE a.attrelid = c.oid AND a.attname = %(column)s), false) AS not_null
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%(table)s)
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
        """The condition that puts a row in this piece: SQL over `column` with the
        bound parameters `%(lo<name>)s` / `%(hi<name>)s` (`params(name)`)."""
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


def split(bounds: Sequence[str], rows: int, per_piece: int | None = None) -> list[Piece]:
    """Pieces of about `per_piece` rows from a histogram's sorted `bounds` (equal
    shares of the rows lie between consecutive bounds)."""
    per = per_piece or ROWS_PER_PIECE
    n = max(1, math.ceil(rows / per)) if rows > 0 else 1
    if n == 1 or len(bounds) < 3:
        return [WHOLE]
    n = min(n, len(bounds) - 1)
    cuts = sorted({bounds[round(i * (len(bounds) - 1) / n)] for i in range(1, n)})
    edges: list[str | None] = [None, *cuts, None]
    return [Piece(lo, hi) for lo, hi in itertools.pairwise(edges)]


async def key_pieces(
    db: Reader,
    table: str,
    column: str,
    parent: str | None = None,
    rows: int | None = None,
    per_piece: int | None = None,
) -> list[Piece]:
    """`table`'s rows in pieces by ranges of `column` (one piece without statistics).
    With `parent` (the table the key refers to, whose share of each range the piece's
    statement reads too), its rows count towards the pieces' size as well. `rows`: the
    rows the pieces share instead (those a statement will work on), `per_piece` of them
    in each (ROWS_PER_PIECE by default)."""
    stats = await db.fetch(_KEY_STATS_SQL, {"table": table, "column": column})
    if not stats or stats[0]["bounds"] is None:
        return [WHOLE]
    n = int(stats[0]["rows"]) if rows is None else rows
    if parent is not None:
        n += int((await db.fetch(_BLOCKS_SQL, {"table": parent}))[0]["rows"])
    pieces = split([str(b) for b in stats[0]["bounds"]], n, per_piece)
    if len(pieces) > 1 and not stats[0]["not_null"]:
        pieces.insert(0, Piece(null=True))
    return pieces


async def block_pieces(db: Reader, table: str, rows_per_piece: int | None = None) -> list[Piece]:
    """`table`'s blocks in pieces of about `rows_per_piece` rows (ROWS_PER_PIECE by
    default); the last open-ended."""
    rows = await db.fetch(_BLOCKS_SQL, {"table": table})
    if not rows:
        return [WHOLE]
    n_rows, blocks = int(rows[0]["rows"]), int(rows[0]["blocks"])
    per = rows_per_piece or ROWS_PER_PIECE
    n = max(1, math.ceil(n_rows / per)) if n_rows > 0 else 1
    if n == 1 or blocks < n:
        return [Piece(blocks=True)]
    cuts = [f"({round(i * blocks / n)},0)" for i in range(1, n)]
    edges: list[str | None] = [None, *cuts, None]
    return [Piece(lo, hi, blocks=True) for lo, hi in itertools.pairwise(edges)]


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
    gate = asyncio.Semaphore(max(1, concurrency))
    failed = asyncio.Event()

    async def one(piece: Piece) -> T:
        async def fn(db: Reader) -> T:
            await tune(db, piece, settings)
            return await read(db, piece)

        async with gate:
            if failed.is_set():  # another piece failed: the answer is lost anyway
                raise asyncio.CancelledError
            try:
                return await gw.read(fn)
            except Exception:
                failed.set()
                raise

    results = await asyncio.gather(*(one(p) for p in pieces), return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise errors[0]
    cancelled = [r for r in results if isinstance(r, BaseException)]
    if cancelled:
        raise cancelled[0]
    return [r for r in results if not isinstance(r, BaseException)]


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
