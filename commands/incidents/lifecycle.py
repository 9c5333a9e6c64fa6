"""`/db incident …`: the pure half (arguments, SLA arithmetic, timeline and header text).

The bot keeps incidents in its state store and speaks to Slack (`bot/incidents/service.py`);
everything here is a function of its inputs, so the arithmetic an operator would
otherwise do by hand at 3 a.m. is tested without either.

SLA clocks all run from detection (`--since`, else the watchdog's first critical
finding, else the start): detection is met when the incident is declared, response by
the first human command or update, communication by the first update or template
posted, resolution by `resolve`, full recovery by `recovered` or a clean recovery
verification.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from commands.base import Finding, Report, Status, UsageError, human_duration
from commands.incidents import comms as incident_comms
from commands.incidents.comms import Summary, Template

NAME = "incident"
USAGE = (
    "/db incident start <title> [sev1|sev2|sev3] [--channel] [--since HH:MM|ISO] | update <text> | "
    "status | assign @user | resolve | recovered | reopen | timeline | template user|tech | "
    "summary [--file]"
)
SUMMARY = "open an incident here (or in a new channel), keep its timeline and SLA clocks"
SUBCOMMANDS: dict[str, str] = {
    "start": "/db incident start <title> [sev1|sev2|sev3] [--channel] [--since HH:MM|ISO]",
    "update": "/db incident update <text>",
    "status": "/db incident status",
    "assign": "/db incident assign @user",
    "resolve": "/db incident resolve",
    "recovered": "/db incident recovered",
    "reopen": "/db incident reopen",
    "timeline": "/db incident timeline",
    **incident_comms.SUBCOMMANDS,
}
Severity = Literal["sev1", "sev2", "sev3"]
DEFAULT_SEVERITY: Severity = "sev2"
SEVERITY_LABEL = {"sev1": "SEV1 (critical)", "sev2": "SEV2 (major)", "sev3": "SEV3 (minor)"}
CHANNEL_PREFIX = "inc"
MAX_CHANNEL_NAME = 80  # Slack's limit
_MENTION = re.compile(r"^<@([UW][A-Z0-9]+)(?:\|[^>]*)?>$")
_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,}$")
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
SINCE_FORMS = "HH:MM (UTC) or ISO 8601 with a zone (2026-12-06T09:50+08:00)"


# -- arguments ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    title: str
    severity: Severity
    new_channel: bool
    # When the problem was detected: a UTC wall-clock time (HH:MM, the latest such moment
    # not in the future), or an ISO 8601 moment with its zone.
    since: time | datetime | None


@dataclass(frozen=True)
class Update:
    text: str


@dataclass(frozen=True)
class Assign:
    user_id: str


@dataclass(frozen=True)
class Simple:
    verb: Literal["status", "resolve", "recovered", "reopen", "timeline"]


IncidentRequest = Start | Update | Assign | Simple | Template | Summary


def _words(text: str) -> list[str]:
    # An apostrophe in a title ("can't log in") is not a quoting mistake.
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def parse(text: str) -> IncidentRequest:
    """The text after `/db incident`, raw (free text keeps its quotes and apostrophes)."""
    verb, _, rest = text.strip().partition(" ")
    verb, rest = verb.lower(), rest.strip()
    if verb in ("", "help"):
        raise UsageError("which incident command? " + ", ".join(SUBCOMMANDS))
    if verb == "start":
        return _parse_start(rest)
    if verb == "update":
        if not rest:
            raise UsageError("`update` needs the text to post")
        return Update(rest)
    if verb == "assign":
        words = rest.split()
        if len(words) != 1:
            raise UsageError("`assign` takes one person: a Slack mention")
        return Assign(parse_user(words[0]))
    if verb in ("status", "resolve", "recovered", "reopen", "timeline"):
        if rest:
            raise UsageError(f"`{verb}` takes no arguments")
        return Simple(verb)  # type: ignore[arg-type]
    if verb in incident_comms.SUBCOMMANDS:
        return incident_comms.parse(verb, rest)
    raise UsageError(f"unknown incident command `{verb}`; one of " + ", ".join(SUBCOMMANDS))


def _parse_start(rest: str) -> Start:
    words = _words(rest)
    severity: Severity | None = None
    new_channel = False
    since: time | datetime | None = None
    title: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        low = word.lower()
        if low in ("sev1", "sev2", "sev3"):
            if severity is not None:
                raise UsageError("give the severity once")
            severity = low  # type: ignore[assignment]
        elif low == "--channel":
            new_channel = True
        elif low == "--since" or low.startswith("--since="):
            value = word.partition("=")[2]
            if not value:
                i += 1
                if i >= len(words):
                    raise UsageError(f"`--since` needs a time: {SINCE_FORMS}")
                value = words[i]
            since = parse_since(value)
        elif low.startswith("--"):
            raise UsageError(f"unknown option `{word}`")
        else:
            title.append(word)
        i += 1
    if not title:
        raise UsageError("`start` needs a title")
    return Start(" ".join(title), severity or DEFAULT_SEVERITY, new_channel, since)


def parse_hhmm(value: str) -> time:
    match = _HHMM.match(value.strip())
    if not match:
        raise UsageError(f"`--since {value}`: give a time as HH:MM (UTC)")
    return time(int(match.group(1)), int(match.group(2)), tzinfo=UTC)


def parse_since(value: str) -> time | datetime:
    """`--since`: HH:MM (UTC), or ISO 8601 with a zone (`2026-12-06T09:50+08:00`, `…Z`).
    An ISO time without a zone is refused: whose clock would it be?"""
    text = value.strip()
    if _HHMM.match(text):
        return parse_hhmm(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"`--since {value}`: give {SINCE_FORMS}") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise UsageError(
            f"`--since {value}` has no zone: add one (`+08:00`, `Z`), or give HH:MM (UTC)"
        )
    return moment.astimezone(UTC)


def parse_user(word: str) -> str:
    """A Slack mention (`<@U123>` or `<@U123|name>`) or a bare user id."""
    match = _MENTION.match(word)
    if match:
        return match.group(1)
    if _USER_ID.match(word):
        return word
    raise UsageError(f"`{word}` is not a Slack user: mention them (@name)")


def since_datetime(since: time | datetime, now: datetime) -> datetime:
    """HH:MM: the latest moment at that UTC wall-clock time not after now (yesterday if
    needed). An ISO moment as given; `UsageError` if it is in the future."""
    if isinstance(since, datetime):
        if since > now:
            raise UsageError(
                f"`--since {since:%Y-%m-%d %H:%M} UTC` is in the future "
                f"(now {now.astimezone(UTC):%Y-%m-%d %H:%M} UTC): detection cannot be later "
                "than now"
            )
        return since.astimezone(UTC)
    at = datetime.combine(now.astimezone(UTC).date(), since.replace(tzinfo=None), tzinfo=UTC)
    return at if at <= now else at - timedelta(days=1)


def channel_name(title: str, day: datetime, suffix: int = 0) -> str:
    """`inc-YYYYMMDD-<slug>`: lowercase ASCII, digits, hyphens, at most 80 characters."""
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_title.lower()).strip("-") or "incident"
    tail = f"-{suffix}" if suffix else ""
    head = f"{CHANNEL_PREFIX}-{day:%Y%m%d}-"
    slug = slug[: MAX_CHANNEL_NAME - len(head) - len(tail)].rstrip("-")
    return f"{head}{slug}{tail}"


# -- SLA clocks -----------------------------------------------------------------------------

Milestone = Literal["detection", "response", "communication", "resolution", "recovery"]
MILESTONES: tuple[Milestone, ...] = (
    "detection",
    "response",
    "communication",
    "resolution",
    "recovery",
)
LABELS: dict[Milestone, str] = {
    "detection": "Detection",
    "response": "Response",
    "communication": "Communication",
    "resolution": "Resolution",
    "recovery": "Full recovery",
}
ClockStatus = Literal["met", "missed", "running", "overdue"]


class SlaTargets(BaseModel):
    """The operators' recovery SLAs, from detection (settings `SLA__RESPONSE_S=1800` …)."""

    detection_s: float = Field(default=15 * 60, gt=0)
    response_s: float = Field(default=30 * 60, gt=0)
    communication_s: float = Field(default=60 * 60, gt=0)
    resolution_s: float = Field(default=4 * 3600, gt=0)
    recovery_s: float = Field(default=8 * 3600, gt=0)
    # One reminder to the commander when this share of a target has elapsed unmet.
    remind_at: float = Field(default=0.8, gt=0, lt=1)

    def target_s(self, milestone: Milestone) -> float:
        return float(getattr(self, f"{milestone}_s"))


@dataclass(frozen=True)
class Milestones:
    """When each milestone was reached (None: not yet); all aware UTC."""

    detected_at: datetime
    started_at: datetime
    responded_at: datetime | None
    communicated_at: datetime | None
    resolved_at: datetime | None
    recovered_at: datetime | None

    def reached(self, milestone: Milestone) -> datetime | None:
        return {
            "detection": self.started_at,
            "response": self.responded_at,
            "communication": self.communicated_at,
            "resolution": self.resolved_at,
            "recovery": self.recovered_at,
        }[milestone]


@dataclass(frozen=True)
class SlaClock:
    milestone: Milestone
    target_s: float
    due_at: datetime
    reached_at: datetime | None
    elapsed_s: float  # to the milestone if reached, else to now
    status: ClockStatus
    remind: bool  # unmet and past the reminder share of its target

    @property
    def label(self) -> str:
        return LABELS[self.milestone]

    @property
    def left_s(self) -> float:
        return self.target_s - self.elapsed_s


def sla_clocks(times: Milestones, targets: SlaTargets, now: datetime) -> list[SlaClock]:
    clocks = []
    start = times.detected_at
    for milestone in MILESTONES:
        target = targets.target_s(milestone)
        reached = times.reached(milestone)
        elapsed = max(0.0, ((reached or now) - start).total_seconds())
        status: ClockStatus
        if reached is not None:
            status = "met" if elapsed <= target else "missed"
        else:
            status = "running" if elapsed <= target else "overdue"
        clocks.append(
            SlaClock(
                milestone=milestone,
                target_s=target,
                due_at=start + timedelta(seconds=target),
                reached_at=reached,
                elapsed_s=elapsed,
                status=status,
                remind=reached is None and elapsed >= targets.remind_at * target,
            )
        )
    return clocks


CLOCK_ICON: dict[ClockStatus, str] = {
    "met": ":white_check_mark:",
    "missed": ":x:",
    "running": ":hourglass_flowing_sand:",
    "overdue": ":rotating_light:",
}


def _minutes(seconds: float) -> str:
    """Whole minutes (a header edited every second helps nobody)."""
    return human_duration(max(0, int(seconds) // 60 * 60)) if seconds >= 60 else "<1m"


def clock_line(clock: SlaClock) -> str:
    target = human_duration(clock.target_s)
    if clock.status == "met":
        what = f"met in {_minutes(clock.elapsed_s)}"
    elif clock.status == "missed":
        what = f"missed: took {_minutes(clock.elapsed_s)}"
    elif clock.status == "running":
        what = f"{_minutes(clock.left_s)} left (due {clock.due_at:%H:%M} UTC)"
    else:
        what = f"OVERDUE by {_minutes(-clock.left_s)} (was due {clock.due_at:%H:%M} UTC)"
    return f"{CLOCK_ICON[clock.status]} *{clock.label}* (target {target}): {what}"


def reminder_text(clock: SlaClock, commander_id: str) -> str:
    share = clock.elapsed_s / clock.target_s
    return (
        f"{who(commander_id)} :alarm_clock: *{clock.label}* SLA: {_minutes(clock.elapsed_s)} of "
        f"{human_duration(clock.target_s)} elapsed ({share:.0%}), due {clock.due_at:%H:%M} UTC."
    )


# -- timeline -------------------------------------------------------------------------------


class TimelineEntry(Protocol):
    @property
    def at(self) -> datetime: ...

    @property
    def kind(self) -> str: ...

    @property
    def actor_id(self) -> str: ...

    @property
    def text(self) -> str: ...


def who(actor_id: str) -> str:
    """A person is mentioned; the bot, the watchdog and the console are named."""
    return f"<@{actor_id}>" if _USER_ID.match(actor_id) else actor_id


def timeline_lines(events: Iterable[TimelineEntry]) -> list[str]:
    """One line per event, oldest first: `HH:MM  who  text` (a date when it changes)."""
    lines: list[str] = []
    day = None
    for event in events:
        at = event.at.astimezone(UTC)
        if at.date() != day:
            day = at.date()
            lines.append(f"*{day:%Y-%m-%d}* (UTC)")
        lines.append(f"`{at:%H:%M}` {who(event.actor_id)} {event.text}")
    return lines


def worst_findings(report: Report, limit: int = 3) -> list[Finding]:
    """The findings a timeline keeps of a report: the worst few that are not ok."""
    bad = [f for f in report.sorted().findings if f.status not in (Status.OK, Status.SKIPPED)]
    return bad[:limit]


def command_text(command: str, report: Report, findings: Sequence[Finding]) -> str:
    text = f"ran `/db {command}`: {report.worst.value.upper()}"
    if findings:
        text += " — " + "; ".join(f"{f.check}: {escape(f.summary)}" for f in findings)
    return text


def escape(text: str) -> str:
    """Slack's rule for text it must not read as controls (values from the database)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
