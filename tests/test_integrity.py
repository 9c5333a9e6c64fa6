"""`/db integrity` counts every injected fault exactly, kind by kind, through the real
gateway and router, on the small and on a medium fixture, and over Slack end to end."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Awaitable, Callable

import psycopg
import pytest
import pytest_asyncio
from psycopg.conninfo import conninfo_to_dict

from bot.embedded_pg import EmbeddedPostgres
from bot.gateway import TargetGateway
from bot.router import Dispatcher, RunContext
from commands import integrity as ig
from commands.base import Finding, Report, Status
from commands.fixture.faults import FaultInjector
from commands.fixture.seed import build_fixture
from commands.keyranges import cut_points, key_ranges, key_stats
from tests.conftest import FAST_THRESHOLDS, RunningBot
from tests.fakeslack import Call

MEDIUM_USERS = 5000
_copies = itertools.count()

ALL_FOREIGN_KEYS = {
    "submissions.user_id → users",
    "submissions.activity_code → activities",
    "points_ledger.user_id → users",
    "points_ledger.activity_code → activities",
    "submission_attachments.submission_id → submissions",
}


async def run_integrity(dsn: str) -> tuple[Report, float]:
    gateway = TargetGateway(dsn, check_timeout_ms=60_000)
    try:
        dispatcher = Dispatcher(RunContext(gateway=gateway, thresholds=FAST_THRESHOLDS))
        started = time.perf_counter()
        report = await dispatcher.run("integrity")
        elapsed = time.perf_counter() - started
    finally:
        await gateway.close()
    assert isinstance(report, Report), report
    return report, elapsed


def by_name(report: Report) -> dict[str, Finding]:
    found = {f.check: f for f in report.findings}
    assert set(found) == set(ig.FINDINGS), set(found) ^ set(ig.FINDINGS)
    return found


def count(finding: Finding) -> int:
    """The exact count a problem finding leads with; 0 for an ok one."""
    if finding.status is Status.OK:
        return 0
    match = re.match(r"(\d+) ", finding.summary)
    assert match, finding.summary
    return int(match.group(1))


def counts(report: Report) -> dict[str, int]:
    return {name: count(f) for name, f in by_name(report).items() if name != ig.FOREIGN_KEYS}


def assert_clean(report: Report) -> None:
    for name, finding in by_name(report).items():
        assert finding.status is Status.OK, (name, finding.summary)
        assert not finding.hint
    assert all(n == 0 for n in counts(report).values())


async def inject_all(faults: FaultInjector) -> dict[str, int]:
    """Every kind at once, each with its own n; returns the expected counts."""
    await faults.orphan_submissions(3, parent="user")
    await faults.orphan_submissions(4, parent="activity")
    await faults.orphan_ledger_rows(5, parent="user")
    await faults.orphan_ledger_rows(6, parent="activity")
    await faults.orphan_attachments(7)
    await faults.duplicate_learn(8)
    await faults.duplicate_external_events(9)
    await faults.missing_awards(10)
    await faults.extra_awards(11)
    await faults.point_differences(12)
    await faults.negative_totals(2)
    return {
        ig.SUB_NO_USER: 3,
        ig.SUB_NO_ACTIVITY: 4,
        ig.LEDGER_NO_USER: 5,
        ig.LEDGER_NO_ACTIVITY: 6,
        ig.ATTACHMENT_NO_SUBMISSION: 7,
        ig.DUPLICATE_LEARN: 8,
        ig.DUPLICATE_EVENTS: 9,
        ig.MISSING_AWARDS: 10,
        ig.EXTRA_AWARDS: 11,
        # each negative total is made by a correction row, which is also a difference
        ig.POINT_DIFFERENCES: 12 + 2,
        ig.NEGATIVE_TOTALS: 2,
    }


def assert_counts(report: Report, expected: dict[str, int]) -> None:
    assert counts(report) == expected
    found = by_name(report)
    for name in expected:
        finding = found[name]
        assert finding.status in (Status.WARN, Status.CRIT), name
        assert 0 < len(finding.rows) <= ig.SAMPLE, (name, finding.rows)
        # a remedy to run, or a plain statement that none changes ledger history
        assert finding.hint and ("/db " in finding.hint or "no automatic remedy" in finding.hint)
    fk = found[ig.FOREIGN_KEYS]
    assert fk.status is Status.WARN
    for label in ALL_FOREIGN_KEYS:
        assert label in fk.summary


# --- the 200-user fixture -----------------------------------------------------------


async def test_clean_fixture_reports_nothing(leaps_dsn: str) -> None:
    report, _elapsed = await run_integrity(leaps_dsn)
    assert report.title == "Data integrity"
    assert_clean(report)


async def test_every_kind_counted_exactly_together(leaps_dsn: str, faults: FaultInjector) -> None:
    expected = await inject_all(faults)
    report, _elapsed = await run_integrity(leaps_dsn)
    assert_counts(report, expected)
    found = by_name(report)
    assert "(8 extra rows)" in found[ig.DUPLICATE_LEARN].summary
    assert "(9 extra ledger rows)" in found[ig.DUPLICATE_EVENTS].summary
    assert "11 ledger rows" in found[ig.EXTRA_AWARDS].summary
    # orphan samples are the rows themselves
    assert all(r["id"].startswith("orphan_att_") for r in found[ig.ATTACHMENT_NO_SUBMISSION].rows)
    assert all(r["id"].startswith("orphan_led_") for r in found[ig.LEDGER_NO_USER].rows)
    negative = found[ig.NEGATIVE_TOTALS].rows
    assert all(r["total"] == -10 for r in negative)


async def test_each_kind_alone_touches_only_its_own_finding(
    pg: EmbeddedPostgres, leaps_template: str
) -> None:
    kinds: list[tuple[str, Callable[[FaultInjector], Awaitable[object]], set[str]]] = [
        (ig.SUB_NO_USER, lambda f: f.orphan_submissions(3), {"submissions.user_id → users"}),
        (
            ig.LEDGER_NO_ACTIVITY,
            lambda f: f.orphan_ledger_rows(3, parent="activity"),
            {"points_ledger.activity_code → activities"},
        ),
        (
            ig.ATTACHMENT_NO_SUBMISSION,
            lambda f: f.orphan_attachments(3),
            {"submission_attachments.submission_id → submissions"},
        ),
        (ig.DUPLICATE_EVENTS, lambda f: f.duplicate_external_events(3), set()),
        (ig.MISSING_AWARDS, lambda f: f.missing_awards(3), set()),
        (ig.EXTRA_AWARDS, lambda f: f.extra_awards(3), set()),
        (ig.POINT_DIFFERENCES, lambda f: f.point_differences(3), set()),
    ]
    for name, inject, dropped in kinds:
        dsn = pg.create_database(f"integrity_alone_{next(_copies)}", template=leaps_template)
        async with FaultInjector(dsn) as faults:
            await inject(faults)
        report, _elapsed = await run_integrity(dsn)
        got = {k: v for k, v in counts(report).items() if v}
        assert got == {name: 3}, name
        fk = by_name(report)[ig.FOREIGN_KEYS]
        if dropped:
            assert fk.status is Status.WARN
            named = {label for label in ALL_FOREIGN_KEYS if label in fk.summary}
            assert named == dropped
        else:
            assert fk.status is Status.OK


async def test_legacy_orphan_fault_and_missing_points_total(
    leaps_dsn: str, faults: FaultInjector
) -> None:
    await faults.orphaned_rows()
    pairs = await faults.missing_awards(4)
    report, _elapsed = await run_integrity(leaps_dsn)
    assert {k: v for k, v in counts(report).items() if v} == {
        ig.SUB_NO_USER: 1,
        ig.LEDGER_NO_USER: 1,
        ig.ATTACHMENT_NO_SUBMISSION: 1,
        ig.MISSING_AWARDS: 4,
    }
    # the points the report says were never awarded are the approved submissions' worth
    missing = by_name(report)[ig.MISSING_AWARDS]
    assert {(r["user_id"], r["activity_code"]) for r in missing.rows} == set(pairs)
    worth = sum(int(r["expected"]) for r in missing.rows)
    assert f": {worth} points never awarded" in missing.summary


async def test_amplify_keys_follow_the_live_function(leaps_dsn: str, faults: FaultInjector) -> None:
    gateway = TargetGateway(leaps_dsn)
    try:
        assert await gateway.read(ig.amplify_keys) == ("peers_trained", "students_trained")
        await faults.camelcase_quota_function()
        assert await gateway.read(ig.amplify_keys) == ("peersTrained", "studentsTrained")
    finally:
        await gateway.close()
    assert ig.keys_in_source(None) == ig.SNAKE_KEYS
    assert ig.keys_in_source("x := NEW.payload ->> 'studentsTrained';") == ig.CAMEL_KEYS


async def test_replays_are_read_only_where_no_unique_index_rules_them_out(
    leaps_dsn: str, faults: FaultInjector
) -> None:
    # Production's partial unique index: the ledger's event ids need not be read at all.
    report, _elapsed = await run_integrity(leaps_dsn)
    clean = by_name(report)[ig.DUPLICATE_EVENTS]
    assert clean.status is Status.OK
    assert "(unique index points_ledger_external_event_id_key)" in clean.summary
    # A unique index that leaves the replayed copies out (another predicate) proves
    # nothing: the copies must still be found and counted.
    await faults.duplicate_external_events(3)
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute(
            "CREATE UNIQUE INDEX ledger_events_but_copies ON points_ledger (external_event_id)"
            " WHERE id NOT LIKE 'dup%'"
        )
    gateway = TargetGateway(leaps_dsn)
    try:
        assert await gateway.read(ig.events_unique_index) is None
    finally:
        await gateway.close()
    report, _elapsed = await run_integrity(leaps_dsn)
    assert {k: v for k, v in counts(report).items() if v} == {ig.DUPLICATE_EVENTS: 3}


async def test_difference_hidden_by_a_replay_in_the_raw_sum(
    leaps_dsn: str, faults: FaultInjector
) -> None:
    """A replayed award and a correction of the same size cancel in the raw per-user sums,
    which the pass uses to pick the users it unfolds per activity; the pair still
    differs once the replay counts once, so that user must be unfolded all the same."""
    (event,) = await faults.duplicate_external_events(1)
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        # Written past the guard triggers, as damage arrives (session_replication_role).
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
                " created_at, event_time, meta)"
                " SELECT 'cancel_' || id, user_id, activity_code, 'MANUAL', -delta_points,"
                " created_at, event_time, '{}' FROM points_ledger"
                " WHERE external_event_id = %s ORDER BY id LIMIT 1",
                (event,),
            )
    report, _elapsed = await run_integrity(leaps_dsn)
    assert {k: v for k, v in counts(report).items() if v} == {
        ig.DUPLICATE_EVENTS: 1,
        ig.POINT_DIFFERENCES: 1,
    }


# --- the medium fixture -------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def medium_template(pg_dsn_factory: Callable[[str], str]) -> str:
    dsn = pg_dsn_factory("medium")
    await build_fixture(dsn, users=MEDIUM_USERS)
    return str(conninfo_to_dict(dsn)["dbname"])


@pytest.fixture
def medium_dsn(pg: EmbeddedPostgres, medium_template: str) -> str:
    return pg.create_database(f"medium_copy_{next(_copies)}", template=medium_template)


async def test_medium_clean(medium_dsn: str) -> None:
    report, elapsed = await run_integrity(medium_dsn)
    assert_clean(report)
    print(f"integrity on {MEDIUM_USERS} clean users: {elapsed:.3f}s")


async def test_medium_every_kind_counted_exactly(medium_dsn: str) -> None:
    async with FaultInjector(medium_dsn) as faults:
        expected = await inject_all(faults)
    report, elapsed = await run_integrity(medium_dsn)
    assert_counts(report, expected)
    print(f"integrity on {MEDIUM_USERS} users with faults: {elapsed:.3f}s")


# --- over Slack ---------------------------------------------------------------------


def flagged(call: Call) -> dict[str, set[str]]:
    """Check names a posted message shows as CRIT or WARN."""
    found: dict[str, set[str]] = {"CRIT": set(), "WARN": set()}
    for block in call.params.get("blocks", []):
        if block.get("type") != "section":
            continue
        first = block["text"]["text"].splitlines()[0]
        for label in found:
            if f"*{label}" in first:
                found[label].add(first.split(label, 1)[1].strip(" *"))
    return found


async def test_integrity_over_slack(bot: RunningBot, faults: FaultInjector) -> None:
    await faults.orphan_ledger_rows(3)
    await faults.duplicate_learn(2)
    await faults.missing_awards(4)
    resp = await bot.slash("integrity")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=20)
    shown = flagged(call)
    assert shown["CRIT"] == {ig.LEDGER_NO_USER, ig.DUPLICATE_LEARN}
    assert shown["WARN"] == {ig.FOREIGN_KEYS, ig.MISSING_AWARDS}
    text = "\n".join(b["text"]["text"] for b in call.params["blocks"] if b.get("type") == "section")
    assert "3 points_ledger rows point at a user that does not exist" in text
    assert "/db cleanup-orphans points_ledger" in text
    assert "/db dedupe-learn" in text
    assert "/db reconcile-points" in text
    assert "points_ledger.user_id → users" in text


async def test_sharded_pass_gives_exactly_the_findings_of_one_pass(
    leaps_dsn: str, faults: FaultInjector
) -> None:
    """The pass split into ranges of users (`_run_pass`) against the same pass run whole
    in one transaction: every finding equal, samples included, whatever the split, a
    ledger row without a user id too (its piece of its own); and the replays read a few
    heap pages at a time as in one statement. More faults of a kind than SAMPLE, so the
    merge must cut each kind's rows right."""
    await inject_all(faults)
    await faults.missing_awards(ig.SAMPLE + 5)
    await faults.duplicate_external_events(ig.SAMPLE + 3)
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute("ALTER TABLE points_ledger ALTER COLUMN user_id DROP NOT NULL")
        await conn.execute(
            "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
            " event_time) VALUES ('led_no_user_id', NULL, 'LEARN', 'MANUAL', 7, now())"
        )
        await conn.execute("ANALYZE points_ledger")  # the ranges come from its histogram
        ids = [
            r[0] for r in await (await conn.execute("SELECT id FROM users ORDER BY id")).fetchall()
        ]
    gateway = TargetGateway(leaps_dsn, check_timeout_ms=60_000)
    try:
        whole = await gateway.read(ig._pass_findings)
        stats = await gateway.read(
            lambda db: key_stats(db, "points_ledger", "user_id", [("submissions", "user_id")])
        )
        assert not stats.not_null  # the ledger's user_id may now be NULL
        for n in (1, 2, 3):
            split = key_ranges(cut_points(stats.bounds, n), nulls=True)
            assert len(split) == (1 if n == 1 else n + 1), split
            assert await ig._run_pass(gateway, split) == whole, n
        # any split is exact: an empty first range, a bound equal to an id, uneven ranges
        for bounds in ([ids[0]], [ids[len(ids) // 2]], [ids[3], ids[-3]]):
            assert await ig._run_pass(gateway, key_ranges(bounds, nulls=True)) == whole, bounds
        # the replays found a few heap pages a statement, as in one statement
        activities = await gateway.read(lambda db: db.fetch("SELECT code FROM activities"))
        codes = sorted(str(r["code"]) for r in activities)
        in_one = await gateway.read(lambda db: ig._replays(db, codes))
        assert len(in_one[0]) == 9 + ig.SAMPLE + 3
        for pages in (1, 7):
            pieces = await ig.replays_of(gateway, codes, pages)
            assert not isinstance(pieces, Finding)
            assert by_user(pieces[0]) == by_user(in_one[0]), pages  # the excess, any order
            assert pieces[1] == in_one[1], pages  # the sample and totals, in order
        # orphan attachments by ranges of submission ids, as in one statement
        subs = await gateway.read(lambda db: db.fetch("SELECT id FROM submissions ORDER BY id"))
        sub_ids = [str(r["id"]) for r in subs]
        one = await gateway.run_check(ig.ATTACHMENT_NO_SUBMISSION, ig.check_orphan_attachments)
        assert count(one) == 7 and len(one.rows) == 7
        for bounds in ([sub_ids[0]], [sub_ids[len(sub_ids) // 2]], [sub_ids[5], sub_ids[-5]]):
            split = key_ranges(bounds, nulls=True)
            assert await ig.orphan_attachments(gateway, split) == one, bounds
    finally:
        await gateway.close()
    by = {f.check: f for f in whole}
    assert count(by[ig.MISSING_AWARDS]) == 10 + ig.SAMPLE + 5
    assert len(by[ig.MISSING_AWARDS].rows) == ig.SAMPLE
    assert count(by[ig.DUPLICATE_EVENTS]) == 9 + ig.SAMPLE + 3
    assert count(by[ig.LEDGER_NO_USER]) == 5 + 1  # the row without a user id counted once


def by_user(rows: list[dict[str, object]]) -> list[tuple[str, str, str]]:
    return sorted((str(r["user_id"]), str(r["k"]), str(r["pts"])) for r in rows)


def test_merge_cuts_each_kind_to_the_sample_in_order_with_summed_totals() -> None:
    def row(kind: str, user: str, units: int, code: str | None = None) -> dict[str, object]:
        return {
            "kind": kind,
            "user_id": user,
            "activity_code": code,
            "external_event_id": None,
            "n": 1,
            "units": units,
            "rows_total": units * 2,
            "net": -units,
        }

    first = [row("missing", f"u{i:02d}", 12, "LEARN") for i in range(0, 24, 2)][: ig.SAMPLE]
    second = [row("missing", f"u{i:02d}", 12, "LEARN") for i in range(1, 24, 2)][: ig.SAMPLE]
    second.append(row("negative", "z", 1))
    merged = ig.merge_ranges([first, second])
    missing = [r for r in merged if r["kind"] == "missing"]
    assert [r["user_id"] for r in missing] == [f"u{i:02d}" for i in range(ig.SAMPLE)]
    assert {(r["units"], r["rows_total"], r["net"]) for r in missing} == {(24, 48, -24)}
    assert [(r["user_id"], r["units"]) for r in merged if r["kind"] == "negative"] == [("z", 1)]


def test_replay_hashes_out_of_order_are_put_in_order_with_their_tuple_ids() -> None:
    from array import array

    tids = b"".join(
        block.to_bytes(4, "big") + line.to_bytes(2, "big")
        for block, line in ((9, 1), (3, 2), (7, 65535))
    )
    hashes, moved = ig._in_order(array("q", [5, -2, 5]), tids)
    assert list(hashes) == [-2, 5, 5]
    assert [ig._tid(moved, i) for i in range(3)] == ["(3,2)", "(9,1)", "(7,65535)"]
    assert ig._in_order(hashes, moved) == (hashes, moved)
