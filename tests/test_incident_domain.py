"""The pure half of incidents: arguments, SLA arithmetic, timeline text."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

import pytest

from commands.base import Finding, Report, Status, UsageError
from commands.incidents.lifecycle import (
    Assign,
    Milestones,
    Simple,
    SlaTargets,
    Start,
    Update,
    channel_name,
    clock_line,
    command_text,
    parse,
    reminder_text,
    since_datetime,
    sla_clocks,
    timeline_lines,
    worst_findings,
)

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("start Leaderboard empty", Start("Leaderboard empty", "sev2", False, None)),
        (
            "start Users can't log in SEV1 --channel --since 08:45",
            Start("Users can't log in", "sev1", True, time(8, 45, tzinfo=UTC)),
        ),
        ('start "sev3 is a word here" sev3', Start("sev3 is a word here", "sev3", False, None)),
        ("start x --since=7:05", Start("x", "sev2", False, time(7, 5, tzinfo=UTC))),
        (
            "update We're restoring from the 08:00 backup",
            Update("We're restoring from the 08:00 backup"),
        ),
        ("assign <@U0BOB|bob>", Assign("U0BOB")),
        ("assign <@W0BOB>", Assign("W0BOB")),
        ("STATUS", Simple("status")),
        ("timeline", Simple("timeline")),
    ],
)
def test_parse(text: str, expected: object) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "which incident command"),
        ("start", "needs a title"),
        ("start x sev1 sev2", "severity once"),
        ("start x --since", "needs a time"),
        ("start x --since 25:00", "HH:MM"),
        ("start x --force", "unknown option `--force`"),
        ("update", "needs the text"),
        ("assign bob", "not a Slack user"),
        ("assign <@U1> <@U2>", "one person"),
        ("resolve now", "takes no arguments"),
        ("close", "unknown incident command `close`"),
    ],
)
def test_parse_refuses(text: str, error: str) -> None:
    with pytest.raises(UsageError, match=error):
        parse(text)


def test_since_is_the_latest_such_time_not_in_the_future() -> None:
    assert since_datetime(time(8, 50, tzinfo=UTC), T0) == T0 - timedelta(minutes=10)
    assert since_datetime(time(9, 0, tzinfo=UTC), T0) == T0
    # 23:50 at 09:00 means last night.
    assert since_datetime(time(23, 50, tzinfo=UTC), T0) == T0 - timedelta(hours=9, minutes=10)


def test_since_takes_iso_8601_with_a_zone() -> None:
    """`--since` keeps HH:MM (UTC) and takes ISO 8601 with a zone; an ISO time without a
    zone is refused (whose clock?), one in the future too."""
    (start,) = [parse("start DB down --since 2026-11-30T16:50+08:00")]
    assert isinstance(start, Start) and start.title == "DB down"
    assert start.since == datetime(2026, 11, 30, 8, 50, tzinfo=UTC)
    assert since_datetime(start.since, T0) == T0 - timedelta(minutes=10)
    z = parse("start x --since=2026-11-29T23:05Z")
    assert isinstance(z, Start) and z.since == datetime(2026, 11, 29, 23, 5, tzinfo=UTC)
    hhmm = parse("start x --since 08:50")
    assert isinstance(hhmm, Start) and hhmm.since == time(8, 50, tzinfo=UTC)
    with pytest.raises(UsageError, match="has no zone"):
        parse("start x --since 2026-11-30T08:50")
    with pytest.raises(UsageError, match="ISO 8601 with a zone"):
        parse("start x --since yesterday")
    with pytest.raises(UsageError, match="is in the future"):
        since_datetime(datetime(2026, 11, 30, 9, 1, tzinfo=UTC), T0)
    assert since_datetime(T0, T0) == T0  # now is not the future


def test_channel_names_follow_slack_rules() -> None:
    assert channel_name("DB down!", T0) == "inc-20261130-db-down"
    assert channel_name("Ünïcode — Ledger drift", T0, 2) == "inc-20261130-unicode-ledger-drift-2"
    assert channel_name("!!!", T0) == "inc-20261130-incident"
    long = channel_name("word " * 40, T0, 3)
    assert len(long) <= 80 and long.endswith("-3") and "--" not in long


def times(**reached: timedelta) -> Milestones:
    return Milestones(
        detected_at=T0,
        started_at=T0 + reached.get("started", timedelta()),
        responded_at=T0 + reached["responded"] if "responded" in reached else None,
        communicated_at=T0 + reached["communicated"] if "communicated" in reached else None,
        resolved_at=T0 + reached["resolved"] if "resolved" in reached else None,
        recovered_at=T0 + reached["recovered"] if "recovered" in reached else None,
    )


def test_sla_clocks_met_missed_running_overdue_and_the_reminder_share() -> None:
    ms = times(started=timedelta(minutes=20), responded=timedelta(minutes=25))
    now = T0 + timedelta(minutes=50)
    clocks = {c.milestone: c for c in sla_clocks(ms, SlaTargets(), now)}
    assert clocks["detection"].status == "missed" and clocks["detection"].elapsed_s == 1200
    assert clocks["response"].status == "met" and not clocks["response"].remind
    comm = clocks["communication"]
    assert comm.status == "running" and comm.left_s == 600 and comm.remind  # 83 %
    assert clocks["resolution"].status == "running" and not clocks["resolution"].remind
    assert clocks["recovery"].due_at == T0 + timedelta(hours=8)
    later = {c.milestone: c for c in sla_clocks(ms, SlaTargets(), T0 + timedelta(minutes=61))}
    assert later["communication"].status == "overdue" and later["communication"].remind
    lines = [clock_line(later[m]) for m in ("detection", "response", "communication")]
    assert lines == [
        ":x: *Detection* (target 15m00s): missed: took 20m00s",
        ":white_check_mark: *Response* (target 30m00s): met in 25m00s",
        ":rotating_light: *Communication* (target 1h00m): OVERDUE by 1m00s (was due 10:00 UTC)",
    ]
    assert clock_line(clocks["resolution"]) == (
        ":hourglass_flowing_sand: *Resolution* (target 4h00m): 3h10m left (due 13:00 UTC)"
    )


def test_the_reminder_share_is_a_setting() -> None:
    targets = SlaTargets(response_s=600, remind_at=0.5)
    clocks = {c.milestone: c for c in sla_clocks(times(), targets, T0 + timedelta(minutes=5))}
    assert clocks["response"].remind
    assert reminder_text(clocks["response"], "U0CMD") == (
        "<@U0CMD> :alarm_clock: *Response* SLA: 5m00s of 10m00s elapsed (50%), due 09:10 UTC."
    )


@dataclass
class Entry:
    at: datetime
    kind: str
    actor_id: str
    text: str


def test_timeline_lines_mention_people_and_mark_days() -> None:
    lines = timeline_lines(
        [
            Entry(T0, "started", "U0ALICE", "incident started"),
            Entry(T0 + timedelta(hours=15, minutes=7), "reminder", "bot", "reminded"),
        ]
    )
    assert lines == [
        "*2026-11-30* (UTC)",
        "`09:00` <@U0ALICE> incident started",
        "*2026-12-01* (UTC)",
        "`00:07` bot reminded",
    ]


def test_a_command_keeps_its_worst_findings_escaped() -> None:
    report = Report(
        title="Database health",
        target="db",
        findings=[
            Finding(check="a", status=Status.OK, summary="fine"),
            Finding(check="b", status=Status.WARN, summary="slow <script>"),
            Finding(check="c", status=Status.CRIT, summary="down & out"),
            Finding(check="d", status=Status.SKIPPED, summary="no privilege"),
        ],
    )
    worst = worst_findings(report)
    assert [f.check for f in worst] == ["c", "b"]
    assert command_text("health", report, worst) == (
        "ran `/db health`: CRIT — c: down &amp; out; b: slow &lt;script&gt;"
    )
