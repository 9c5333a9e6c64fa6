"""Whole-table reads in pieces of bounded statements (commands/keyranges.py, issue 16): the
recovery verification, the baseline's census and the plans of the recovery remedies give
the same answers, to the row and the sample, read in many small pieces as in one piece.
The target is the real fixture PostgreSQL with every fault those plans repair."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from bot.router import RunContext
from commands import keyranges
from commands.fixture.faults import FaultInjector
from commands.keyranges import (
    WHOLE,
    Piece,
    block_pieces,
    block_ranges,
    cut_points,
    key_pieces,
    key_ranges,
    pieces_needed,
    split,
)
from commands.recover import census, census_days, measure
from commands.remedies import recovery
from commands.remedies.base import REMEDIES

# (remedy, arguments) whose plans read their tables in pieces.
PLANS: tuple[tuple[str, list[str]], ...] = (
    ("cleanup-orphans", ["all"]),
    ("dedupe-learn", []),
    ("recover-users", []),
    ("recover-learn", []),
    ("dedupe-webhooks", []),
    ("reprocess-webhooks", []),
    ("dedupe-ledger-events", []),
)


async def execute(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query.encode(), params)
        return await cur.fetchall() if cur.description else []


async def answers(ctx: RunContext, since: datetime) -> dict[str, Any]:
    measured = await measure(ctx, since)
    counted, days = await census(ctx, since, since)
    out: dict[str, Any] = {
        "counts": measured.counts,
        "errors": measured.errors,
        "days": await census_days(ctx, since),
        "census": (counted.counts, days),
    }
    for name, args in PLANS:
        out[name] = (await REMEDIES[name].plan(ctx, args)).model_dump(mode="json")
    return out


async def test_pieces_give_the_answers_of_the_whole_table(
    ctx: RunContext, leaps_dsn: str, faults: FaultInjector, monkeypatch: pytest.MonkeyPatch
) -> None:
    subs = await faults.orphan_submissions(3) + await faults.orphan_submissions(2, "activity")
    ledger = await faults.orphan_ledger_rows(3) + await faults.orphan_ledger_rows(2, "activity")
    attachments = await faults.orphan_attachments(3)
    await faults.duplicate_learn(4)
    await faults.duplicate_approved_learn(2)
    await faults.duplicate_external_events(3)
    await faults.data_loss(pct=5, accounts=3, unmatched=2, kajabi_only=True)
    originals = await faults.duplicate_webhook_payloads(2)
    # An attachment of an orphaned submission, and references to a repeated payload's copy.
    await execute(
        leaps_dsn,
        "INSERT INTO submission_attachments (id, submission_id, path)"
        " VALUES ('att_of_orphan', %s, 'evidence/orphan.pdf')",
        (subs[0],),
    )
    copy = f"{originals[0]}_again1"
    await execute(
        leaps_dsn,
        "INSERT INTO learn_tag_grants (id, user_id, tag_name, kajabi_event_id, granted_at)"
        " SELECT 'grant_of_copy', user_id, 'leaps learn complete', %s, now()"
        " FROM points_ledger ORDER BY id LIMIT 1",
        (copy,),
    )
    await execute(
        leaps_dsn,
        "UPDATE points_ledger SET meta = meta || jsonb_build_object('kajabi_event', %s::text)"
        " WHERE id = (SELECT id FROM points_ledger ORDER BY id DESC LIMIT 1)",
        (copy,),
    )
    # The LEARN event of the last user due (by id) given an id that sorts first: the
    # pieces (ranges of users) must still list the events in their ids' order.
    await execute(
        leaps_dsn,
        "INSERT INTO kajabi_events (id, received_at, payload, processed_at, user_match,"
        " event_id, tag_name_raw, tag_name_norm, contact_id, email, created_at_utc, status,"
        " raw) SELECT 'a0_' || e.id, e.received_at, e.payload || '{\"copy\": 1}',"
        " e.processed_at - interval '1 day', e.user_match, e.event_id, e.tag_name_raw,"
        " e.tag_name_norm, e.contact_id, e.email, e.created_at_utc, e.status, e.raw"
        " FROM kajabi_events AS e JOIN users AS u ON u.id = e.user_match"
        " WHERE e.processed_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM submissions AS s"
        "   WHERE s.user_id = u.id AND s.activity_code = 'LEARN')"
        " AND lower(btrim(e.tag_name_norm::text))"
        "   IN (SELECT lower(btrim(g.tag_name)) FROM learn_tag_grants AS g)"
        " ORDER BY u.id DESC LIMIT 1",
    )
    await execute(leaps_dsn, "ANALYZE")
    since = datetime.now(UTC)

    monkeypatch.setattr(keyranges, "ROWS_PER_PIECE", 10**9)
    whole = await answers(ctx, since)
    monkeypatch.setattr(keyranges, "ROWS_PER_PIECE", 150)
    # few hash buckets: keys that differ share them; the candidates come in many groups
    monkeypatch.setattr(keyranges, "BUCKETS", 8)
    monkeypatch.setattr(keyranges, "CANDIDATES_PER_STATEMENT", 3)
    monkeypatch.setattr(recovery, "LEARN_EVENTS_PER_PIECE", 2)

    async def pieces(db: Any) -> list[list[Piece]]:
        return [
            await key_pieces(db, "points_ledger", "user_id"),
            await key_pieces(db, "submissions", "user_id"),
            await key_pieces(db, "submission_attachments", "submission_id"),
            await block_pieces(db, "points_ledger"),
            await block_pieces(db, "audit_log"),
        ]

    assert [len(p) > 3 for p in await ctx.gateway.read(pieces)] == [True] * 5  # many each
    groups = await keyranges.repeated_candidates(
        ctx.gateway, "kajabi_events", "jsonb_hash_extended(t.payload, 0)", "TRUE", 10
    )
    # of all the rows in shared buckets, those of the repeated payloads alone
    assert sorted(i for g in groups for i in g) == sorted(
        [*originals, *(f"{o}_again1" for o in originals)]
    )
    pieced = await answers(ctx, since)
    assert pieced == whole

    # ... and the answers are the faults': nothing lost to a piece's edge.
    counts = whole["counts"]
    assert (counts["orphan_submissions"], counts["orphan_ledger_rows"]) == (3, 3)
    assert counts["orphan_attachments"] == 3 and not whole["errors"]
    assert sum(whole["days"]["ledger_rows"].values()) == counts["ledger_rows_upto"]
    assert whole["census"][1] == whole["days"]  # the baseline's pass gives the same census
    assert {k: v for k, v in whole["census"][0].items() if k in counts} == {
        k: counts[k] for k in whole["census"][0] if k in counts
    }
    orphans = whole["cleanup-orphans"]
    assert orphans["data"]["counts"] == {
        "attachments": 3,
        "child_attachments": 1,
        "submissions": 5,
        "points_ledger": 5,
    }
    assert orphans["count"] == 14 == len(orphans["targets"])  # under SAMPLE: all shown
    assert {t["id"] for t in orphans["targets"]} == {
        *attachments,
        "att_of_orphan",
        *subs,
        *ledger,
    }
    learn = whole["dedupe-learn"]
    assert learn["count"] == 4 and len(learn["data"]["needs_decision"]) == 2
    assert whole["recover-users"]["count"] == 3
    learn_due = whole["recover-learn"]
    assert learn_due["count"] > 2 and str(learn_due["targets"][0]["kajabi_event"]).startswith("a0_")
    assert whole["dedupe-ledger-events"]["count"] == 3
    webhooks = whole["dedupe-webhooks"]
    assert webhooks["count"] == 2
    (note,) = webhooks["warnings"]
    assert note.startswith("of the rows to delete, 1 are named by learn_tag_grants and 1 by")


def test_pieces_cover_every_key_once() -> None:
    """Each key of the histogram's range falls in exactly one piece (NULL in a piece of
    its own); too few rows or bounds make one piece, the whole table."""
    bounds = [f"u{i:03d}" for i in range(0, 101)]
    pieces = split(bounds, rows=1000, per_piece=100, nulls=False)
    assert len(pieces) == 10 and pieces[0].lo is None and pieces[-1].hi is None
    assert all(a.hi == b.lo for a, b in itertools.pairwise(pieces))
    for key in ["a", "u000", "u0505", "u050", "u100", "zz"]:
        inside = [
            p for p in pieces if (p.lo is None or key >= p.lo) and (p.hi is None or key < p.hi)
        ]
        assert len(inside) == 1, key
    with_nulls = split(bounds, rows=1000, per_piece=100, nulls=True)
    assert with_nulls == [Piece(null=True), *pieces]
    assert split(bounds, rows=99, per_piece=100, nulls=True) == [WHOLE]
    assert split(["a", "b"], rows=10**6, per_piece=100, nulls=True) == [WHOLE]
    assert (pieces_needed(0, 100), pieces_needed(100, 100), pieces_needed(101, 100)) == (1, 1, 2)
    # no more pieces than the histogram has buckets; a bound repeated is one cut
    assert cut_points(bounds, 10**6) == bounds[1:-1]
    assert cut_points(["a", "b", "b", "b", "c"], 4) == ["b"]
    # the bounds keep the histogram's order (the column's collation), never re-sorted
    assert key_ranges(cut_points(["b", "B", "a", "A"], 3), nulls=True) == [
        Piece(null=True),
        Piece(None, "B"),
        Piece("B", "a"),
        Piece("a", None),
    ]
    first, middle = pieces[0], pieces[1]
    assert first.where("l.user_id") == "(l.user_id < %(hi)s)"
    assert Piece(null=True).where("u.id") == "(u.id IS NULL)" and Piece(null=True).ranged
    assert middle.where("u.id") == "(u.id >= %(lo)s AND u.id < %(hi)s)"
    assert WHOLE.where("x") == "(TRUE)" and not WHOLE.ranged and middle.ranged
    blocks = Piece("(10,0)", None, blocks=True)
    assert blocks.where("ignored") == "(ctid >= %(lo)s::tid)" and not blocks.ranged
    assert block_ranges([10, 20]) == [
        Piece(None, "(10,0)", blocks=True),
        Piece("(10,0)", "(20,0)", blocks=True),
        Piece("(20,0)", None, blocks=True),
    ]
