"""`/db export`: over signed HTTP into the real bot, the CSV uploaded to the fake Slack is
parsed back and compared with the table, read here with its own SQL."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg.rows import dict_row

from bot.gateway import TargetGateway
from bot.router import Answer, Dispatcher, RunContext
from commands import export as export_module
from commands.base import Report, Status, Thresholds, UsageError
from commands.export import KINDS, ExportLimits, build_query, parse, stream_csv
from commands.fixture.faults import FaultInjector
from tests.conftest import RunningBot, bot_settings, running_bot
from tests.fakeslack import Call, FakeSlack
from tests.test_cli import bot_cli

CHANNEL = "C0INCIDENT"  # replies go in channel here: the file goes to the progress thread
ASKER, OTHER = "U0ALICE", "U0001"

# The oracle: each kind's rows as the test reads them, keyed by the row's identity.
TABLE_SQL = {
    "leaderboard": (
        "user_id",
        "SELECT user_id, handle, name, school, cohort, total_points, public_submissions,"
        " last_activity_at FROM leaderboard_totals WHERE last_activity_at >= %(since)s",
    ),
    "submissions": (
        "id",
        "SELECT id, user_id, activity_code, status::text, visibility::text, payload,"
        " reviewer_id, review_note, created_at, updated_at, approval_org_timezone"
        " FROM submissions WHERE created_at >= %(since)s",
    ),
    "ledger": (
        "id",
        "SELECT id, user_id, activity_code, source::text, delta_points, external_source,"
        " external_event_id, created_at, event_time, meta"
        " FROM points_ledger WHERE event_time >= %(since)s",
    ),
}
EPOCH = datetime(1970, 1, 1)


async def table(dsn: str, kind: str, since: date | None = None) -> dict[str, dict[str, Any]]:
    key, query = TABLE_SQL[kind]
    start = datetime.combine(since, datetime.min.time()) if since else EPOCH
    bound = start if kind == "submissions" else start.replace(tzinfo=UTC)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, {"since": bound})
            return {str(r[key]): r for r in await cur.fetchall()}


def same(text: str, value: Any) -> bool:
    """A CSV field read back equals the table's value."""
    if value is None:
        return text == ""
    if isinstance(value, datetime):
        expected = value if value.tzinfo else value.replace(tzinfo=UTC)  # naive columns: UTC
        return datetime.fromisoformat(text) == expected
    if isinstance(value, dict | list):
        return bool(json.loads(text) == value)
    if isinstance(value, int):
        return int(text) == value
    return text == str(value)


def assert_matches(content: bytes, rows: dict[str, dict[str, Any]], kind: str) -> None:
    reader = csv.DictReader(io.StringIO(content.decode()))
    assert tuple(reader.fieldnames or ()) == KINDS[kind].column_names
    got = list(reader)
    key = TABLE_SQL[kind][0]
    assert len(got) == len(rows)
    assert {r[key] for r in got} == set(rows)
    for line in got:
        row = rows[line[key]]
        wrong = {c: (line[c], row[c]) for c in row if not same(line[c], row[c])}
        assert not wrong, f"{kind} {line[key]}: {wrong}"


def leftovers() -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob("dbops-export-*"))


def told(fake: FakeSlack, user: str) -> list[str]:
    """What the user was told privately (the command's response_url)."""
    return [str(c.params.get("text", "")) for c in fake.calls_to("response_url") if user in c.path]


async def settle(bot: RunningBot) -> None:
    for _ in range(600):
        if len(bot.service.tracker) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the bot's background work did not finish")


def uploaded(fake: FakeSlack, complete: Call) -> bytes:
    (entry,) = complete.params["files"]
    return fake.uploads[entry["id"]]


def progress_of(fake: FakeSlack, user: str = ASKER) -> Call:
    return next(
        c
        for c in fake.calls_to("chat.postMessage")
        if "/db export" in str(c.params.get("text")) and f"<@{user}>" in str(c.params["text"])
    )


@pytest_asyncio.fixture(loop_scope="session")
async def ebot(leaps_dsn: str, fake_slack: FakeSlack) -> AsyncIterator[RunningBot]:
    settings = bot_settings(leaps_dsn, fake_slack, incident_channels=[CHANNEL])
    async with running_bot(settings, fake_slack) as running:
        yield running


# --- domain -------------------------------------------------------------------------------


def test_parse_accepts_kinds_and_since_and_refuses_the_rest() -> None:
    assert parse(["LEDGER"]).kind.name == "ledger"
    assert parse(["ledger", "--since", "2025-03-01"]).since == date(2025, 3, 1)
    assert parse(["submissions", "--since=2025-03-01"]).since == date(2025, 3, 1)
    for bad in (
        [],
        ["users"],
        ["ledger", "--since"],
        ["ledger", "--since", "2025-13-01"],
        ["ledger", "--since", "yesterday"],
        ["ledger", "--since", "2999-01-01"],
        ["ledger", "--since", "2025-01-01", "--since", "2025-01-02"],
        ["ledger", "--until", "2025-01-01"],
    ):
        with pytest.raises(UsageError):
            parse(bad)


async def test_the_console_command_counts_what_it_would_export(
    leaps_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = TargetGateway(leaps_dsn)
    try:
        dispatcher = Dispatcher(RunContext(gateway, Thresholds()))
        report = await dispatcher.run("export ledger")
        bad = await dispatcher.run("export ledger --since 2025-02-30")
        monkeypatch.setattr(export_module, "EXACT_COUNT_MAX", 10)  # a big table, then
        estimated = await dispatcher.run("export ledger --since 2001-01-01")
    finally:
        await gateway.close()
    assert isinstance(report, Report)
    (finding,) = report.findings
    assert finding.status is Status.OK
    assert finding.summary.startswith(f"{len(await table(leaps_dsn, 'ledger'))} rows")
    assert isinstance(bad, Answer) and bad.outcome == "usage"
    assert isinstance(estimated, Report)
    assert re.match(
        r"about [\d,]+ rows \(the planner's estimate, not counted\) to export",
        (estimated.findings[0].summary),
    )


async def one_copy(dsn: str, args: list[str]) -> bytes:
    """The export as one COPY statement, with the export's session settings."""
    query = build_query(parse(args))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET TimeZone = 'UTC'")
        await conn.execute("SET DateStyle = 'ISO, YMD'")
        async with conn.cursor() as cur, cur.copy(query.copy, query.params or None) as copy:
            return b"".join([bytes(data) async for data in copy])


async def paged(dsn: str, args: list[str], page_rows: int) -> tuple[bytes, int, int]:
    """(the CSV, its rows, its pages) as the export streams it, in small chunks."""
    limits = ExportLimits(page_rows=page_rows, chunk_bytes=512)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        chunks = [c async for c in stream_csv(conn, build_query(parse(args)), limits)]
    return b"".join(c.data for c in chunks), chunks[-1].rows, chunks[-1].page


async def test_big_tables_go_a_page_at_a_time_and_equal_one_copy(leaps_dsn: str) -> None:
    """Keyset pages of a few rows, across ties of the time column and a value holding a
    newline and quotes, make the file one COPY makes; so does the one COPY taken where
    the time column may be NULL (no keyset then)."""
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
            " event_time, meta)"
            " SELECT 'tie_' || g, u.id, 'LEARN', 'MANUAL', 0, '2026-01-02 03:04:05.678901+00',"
            " jsonb_build_object('note', E'two\\nlines, \"quoted\"')"
            " FROM (SELECT id FROM users ORDER BY id LIMIT 1) AS u, generate_series(1, 9) AS g"
        )
    for args, kind, since in (
        (["ledger"], "ledger", None),
        (["submissions"], "submissions", None),
        (["ledger", "--since", "2026-01-02"], "ledger", date(2026, 1, 2)),
    ):
        expected = len(await table(leaps_dsn, kind, since))
        data, rows, pages = await paged(leaps_dsn, args, page_rows=7)
        assert data == await one_copy(leaps_dsn, args), args
        assert rows == expected and pages == expected // 7 + 1, args
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute("ALTER TABLE points_ledger ALTER COLUMN event_time DROP NOT NULL")
    data, _rows, pages = await paged(leaps_dsn, ["ledger"], page_rows=7)
    assert data == await one_copy(leaps_dsn, ["ledger"]) and pages == 1


# --- Slack --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
async def test_each_kind_is_uploaded_to_the_thread_and_equals_the_table(
    ebot: RunningBot, leaps_dsn: str, kind: str
) -> None:
    before = leftovers()
    await ebot.slash(f"export {kind}", channel=CHANNEL, user=ASKER)
    (complete,) = await ebot.fake.wait_for("files.completeUploadExternal", timeout=30)
    await settle(ebot)
    progress = progress_of(ebot.fake)
    assert complete.params["channel_id"] == CHANNEL
    assert complete.params["thread_ts"] == progress.response["ts"]
    rows = await table(leaps_dsn, kind)
    assert len(rows) > 0
    assert_matches(uploaded(ebot.fake, complete), rows, kind)
    final = ebot.fake.calls_to("chat.update")[-1]
    assert final.params["ts"] == progress.response["ts"]
    done = rf"done, {len(rows):,} rows, \d+ (B|kB|MB) in [\dhms]+; the file is in this thread\."
    assert re.search(done, str(final.params["text"])), final.params["text"]
    assert f"{len(rows):,} rows" in complete.params["initial_comment"]
    assert leftovers() == before


@pytest.mark.parametrize("kind", ["ledger", "submissions", "leaderboard"])
async def test_since_keeps_only_rows_from_that_date(
    ebot: RunningBot, leaps_dsn: str, kind: str
) -> None:
    everything = await table(leaps_dsn, kind)
    column = {"ledger": "event_time", "submissions": "created_at"}.get(kind, "last_activity_at")
    days = sorted(r[column].date() for r in everything.values())
    since = days[len(days) // 2]
    expected = await table(leaps_dsn, kind, since)
    assert 0 < len(expected) < len(everything)  # the filter has something to do

    await ebot.slash(f"export {kind} --since {since.isoformat()}", channel=CHANNEL, user=ASKER)
    (complete,) = await ebot.fake.wait_for("files.completeUploadExternal", timeout=30)
    await settle(ebot)
    assert_matches(uploaded(ebot.fake, complete), expected, kind)
    assert f"since-{since.isoformat()}" in complete.params["files"][0]["title"]


async def test_progress_message_counts_rows_while_it_runs(ebot: RunningBot, leaps_dsn: str) -> None:
    exports = ebot.slack.exports
    exports.limits = ExportLimits(chunk_bytes=4096)  # many chunks from the small fixture
    exports.progress_every_s = 0.0  # an update whenever the previous one is done
    await ebot.slash("export ledger", channel=CHANNEL, user=ASKER)
    await ebot.fake.wait_for("files.completeUploadExternal", timeout=30)
    await settle(ebot)
    ts = progress_of(ebot.fake).response["ts"]
    updates = [str(c.params["text"]) for c in ebot.fake.calls_to("chat.update")]
    assert all(c.params["ts"] == ts for c in ebot.fake.calls_to("chat.update"))
    running = [t for t in updates if "rows so far" in t]
    assert running, updates
    counts = [int(t.rsplit("exporting… ", 1)[1].split(" ")[0].replace(",", "")) for t in running]
    total = len(await table(leaps_dsn, "ledger"))
    assert counts == sorted(counts) and 0 < counts[0] < total
    assert f"done, {total:,} rows" in updates[-1]


async def export_waiting_for_lock(dsn: str) -> None:
    """Until the bot's export session waits for the lock the test holds."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(300):
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbops-bot'"
                " AND wait_event_type = 'Lock' AND query LIKE 'COPY%%'"
            )
            row = await cur.fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the export never waited for the lock")


async def test_a_second_export_of_a_kind_is_refused_here_and_on_another_replica(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    settings = bot_settings(leaps_dsn, fake_slack, incident_channels=[CHANNEL])
    # The first export must wait: the test holds the ledger exclusively until it is done.
    async with (
        await psycopg.AsyncConnection.connect(leaps_dsn) as holder,
        running_bot(settings, fake_slack) as bot,
        running_bot(settings, fake_slack) as replica,  # same state store, own process state
    ):
        await holder.execute("LOCK TABLE points_ledger IN ACCESS EXCLUSIVE MODE")
        bot.slack.exports.limits = ExportLimits(lock_timeout_ms=120_000)
        await bot.slash("export ledger", channel=CHANNEL, user=ASKER)
        await export_waiting_for_lock(leaps_dsn)

        await bot.slash("export ledger", channel=CHANNEL, user=OTHER)
        await replica.slash("export ledger --since 2025-01-01", channel=CHANNEL, user=OTHER)
        await bot.slash("export submissions", channel=CHANNEL, user=OTHER)  # another kind
        await fake_slack.wait_for("files.completeUploadExternal", timeout=30)
        await settle(replica)
        for _ in range(100):
            if len(told(fake_slack, OTHER)) >= 2:
                break
            await asyncio.sleep(0.05)
        # here from the process's own record, on the replica from the advisory lock and
        # the shared audit trail
        refusals = told(fake_slack, OTHER)
        assert len(refusals) == 2
        for text in refusals:
            assert "An export of `ledger` is already running, started by <@U0ALICE> at" in text
        assert not [
            c
            for c in fake_slack.calls_to("chat.postMessage")
            if f"<@{OTHER}>" in str(c.params.get("text")) and "ledger" in str(c.params.get("text"))
        ]

        await holder.rollback()  # the first export goes on
        await fake_slack.wait_for("files.completeUploadExternal", count=2, timeout=30)
        await settle(bot)
        # done: the next export of the kind runs, on either replica
        await replica.slash("export ledger", channel=CHANNEL, user=OTHER)
        await fake_slack.wait_for("files.completeUploadExternal", count=3, timeout=30)
        await settle(replica)
    contents = [
        uploaded(fake_slack, c) for c in fake_slack.calls_to("files.completeUploadExternal")
    ]
    ledger = await table(leaps_dsn, "ledger")
    assert_matches(contents[1], ledger, "ledger")
    assert_matches(contents[2], ledger, "ledger")


@pytest.mark.parametrize(
    ("method", "status", "reason"),
    [
        ("file_upload", 500, "upload_http_500"),
        ("files.getUploadURLExternal", 429, "ratelimited"),
        ("files.completeUploadExternal", 200, "not_in_channel"),
    ],
)
async def test_a_refused_upload_says_so_once_and_leaves_no_file(
    ebot: RunningBot, method: str, status: int, reason: str
) -> None:
    before = leftovers()
    # 429s are retried twice by the client's handler: the third refusal is the answer
    times = 3 if status == 429 else 1
    ebot.fake.fail_next(method, status=status, times=times, retry_after=0, error=reason)
    await ebot.slash("export submissions", channel=CHANNEL, user=ASKER)
    await ebot.fake.wait_for(
        "chat.update", predicate=lambda c: "failed" in str(c.params.get("text")), timeout=30
    )
    await settle(ebot)
    final = ebot.fake.calls_to("chat.update")[-1]
    assert final.params["ts"] == progress_of(ebot.fake).response["ts"]
    assert f"failed: Slack refused the upload ({reason}). Nothing was uploaded." in str(
        final.params["text"]
    )
    completed = ebot.fake.calls_to("files.completeUploadExternal")
    assert not [c for c in completed if isinstance(c.response, dict) and c.response.get("ok")]
    assert leftovers() == before
    assert not told(ebot.fake, ASKER)  # one message: the progress message says it


async def test_bad_arguments_get_the_usage_and_nothing_runs(ebot: RunningBot) -> None:
    await ebot.slash("export ledger --since 2025-02-30", channel=CHANNEL, user=ASKER)
    await ebot.slash("export <!channel>", channel=CHANNEL, user=ASKER)
    await ebot.fake.wait_for("response_url", count=2, timeout=15)
    await settle(ebot)
    texts = told(ebot.fake, ASKER)
    assert any("'2025-02-30' is not a date (YYYY-MM-DD)" in t and "Usage" in t for t in texts)
    assert any("&lt;!channel&gt;" in t for t in texts)
    assert not any("<!channel>" in t for t in texts)
    assert not ebot.fake.calls_to("chat.postMessage")


async def test_exports_need_the_reviewer_role(ebot: RunningBot) -> None:
    await ebot.slash("export ledger", channel=CHANNEL, user="U0NOBODY")
    await ebot.fake.wait_for("response_url", timeout=15)
    await settle(ebot)
    assert any("REVIEWER" in t for t in told(ebot.fake, "U0NOBODY"))
    assert not ebot.fake.calls_to("chat.postMessage")


async def test_outside_reply_channels_the_export_goes_to_a_dm(
    bot: RunningBot, leaps_dsn: str
) -> None:
    await bot.slash("export leaderboard", channel="C0GENERAL", user=ASKER)
    (complete,) = await bot.fake.wait_for("files.completeUploadExternal", timeout=30)
    await settle(bot)
    dm = "D" + ASKER[1:]
    assert complete.params["channel_id"] == dm
    assert progress_of(bot.fake).params["channel"] == dm
    assert any("in your DM" in t for t in told(bot.fake, ASKER))
    assert_matches(
        uploaded(bot.fake, complete), await table(leaps_dsn, "leaderboard"), "leaderboard"
    )


async def test_python_m_bot_export_writes_the_csv_to_stdout(leaps_dsn: str) -> None:
    everything = await table(leaps_dsn, "ledger")
    days = sorted(r["event_time"].date() for r in everything.values())
    since = days[len(days) // 2]
    done = await asyncio.to_thread(
        bot_cli, "export", "ledger", "--since", since.isoformat(), env={"DATABASE_URL": leaps_dsn}
    )
    assert done.returncode == 0, done.stderr
    assert_matches(done.stdout.encode(), await table(leaps_dsn, "ledger", since), "ledger")
    bad = await asyncio.to_thread(
        bot_cli, "export", "ledger", "--since", "soon", env={"DATABASE_URL": leaps_dsn}
    )
    assert bad.returncode == 2 and "is not a date" in bad.stderr


async def test_an_unpopulated_leaderboard_fails_with_the_database_reason_and_the_fix(
    ebot: RunningBot, faults: FaultInjector
) -> None:
    await faults.unpopulated_view("leaderboard_totals")
    await ebot.slash("export leaderboard", channel=CHANNEL, user=ASKER)
    await ebot.fake.wait_for(
        "chat.update", predicate=lambda c: "failed" in str(c.params.get("text")), timeout=30
    )
    await settle(ebot)
    text = str(ebot.fake.calls_to("chat.update")[-1].params["text"])
    assert "has not been populated" in text and "/db refresh-views populates it" in text
    assert not ebot.fake.calls_to("files.getUploadURLExternal")


async def test_a_bot_stopping_mid_export_says_so_and_leaves_no_file(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    before = leftovers()
    settings = bot_settings(leaps_dsn, fake_slack, incident_channels=[CHANNEL])
    async with await psycopg.AsyncConnection.connect(leaps_dsn) as holder:
        await holder.execute("LOCK TABLE points_ledger IN ACCESS EXCLUSIVE MODE")
        async with running_bot(settings, fake_slack) as bot:
            bot.slack.exports.limits = ExportLimits(lock_timeout_ms=120_000)
            await bot.slash("export ledger", channel=CHANNEL, user=ASKER)
            await export_waiting_for_lock(leaps_dsn)
        # the bot has stopped (its tracker cancelled the export after its grace period)
        final = fake_slack.calls_to("chat.update")[-1]
        assert final.params["ts"] == progress_of(fake_slack).response["ts"]
        assert "failed: the bot stopped during it. Nothing was uploaded." in final.params["text"]
        assert not fake_slack.calls_to("files.getUploadURLExternal")
        assert leftovers() == before
        cur = await holder.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbops-bot'"
            " AND query LIKE 'COPY%%' AND state <> 'idle'"
        )
        assert await cur.fetchone() == (0,)  # its session went with it
