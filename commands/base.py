"""The domain vocabulary shared by every command family.

Commands speak in Reports made of Findings and read the target only through the
`Reader` handed to each check, so they know nothing of Slack, pools or settings
files; the bot supplies a `Context` that implements the protocols below.
"""

from __future__ import annotations

import enum
import re
import sys
from array import array
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, Field


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    CRIT = "crit"
    SKIPPED = "skipped"
    ERROR = "error"

    @property
    def severity(self) -> int:
        """Sort key: the worst finding comes first in every rendering."""
        return _SEVERITY[self]


_SEVERITY = {
    Status.CRIT: 0,
    Status.ERROR: 1,
    Status.WARN: 2,
    Status.SKIPPED: 3,
    Status.OK: 4,
}

Row = dict[str, Any]
T = TypeVar("T")

# Shared by bot/ and commands/ (commands never import bot): one definition each.
ROLES = ("PARTICIPANT", "REVIEWER", "ADMIN", "SUPERADMIN")
# Every session the bot opens says so; remedies never signal the bot's own sessions.
APPLICATION_NAME = "dbops-bot"
# Where remedies copy the rows they delete or overwrite, in tables named after the approval.
BACKUP_SCHEMA = "dbops_backup"
# The application's database roles on Supabase (APP_ROLES): whose writes a freeze stops.
DEFAULT_APP_ROLES = ("authenticator", "authenticated", "anon", "service_role")


def role_rank(role: str) -> int:
    """Unknown role names rank lowest, like unknown users."""
    return ROLES.index(role) if role in ROLES else 0


@dataclass(frozen=True)
class LeapsIdentity:
    """A LEAPS user a remedy acts as (DESIGN.md approval rule 8): production's guard
    triggers read it from `app.user_id` / `app.user_role`, and a status change names it as
    reviewer. `via` says how it was chosen, for the plan, the outcome and the audit."""

    user_id: str
    role: str
    via: str = ""

    def describe(self) -> str:
        return f"LEAPS user {self.user_id} ({self.role}" + (f", {self.via})" if self.via else ")")


class Finding(BaseModel):
    check: str
    status: Status
    summary: str
    rows: list[Row] = Field(default_factory=list)
    hint: str | None = None


class Report(BaseModel):
    title: str
    target: str
    findings: list[Finding] = Field(default_factory=list)
    # Remedies the command asks the bot to request on the requester's behalf, each as
    # the text after `/db` (e.g. "recover-users"); each gets its own approval thread.
    # Not part of the report's JSON (`--json` keeps title, target, findings).
    follow_ups: list[str] = Field(default_factory=list, exclude=True)

    def sorted(self) -> Report:
        """A copy with the worst findings first (stable within one status)."""
        ordered = sorted(self.findings, key=lambda f: f.status.severity)
        return self.model_copy(update={"findings": ordered})

    @property
    def worst(self) -> Status:
        if not self.findings:
            return Status.OK
        return min((f.status for f in self.findings), key=lambda s: s.severity)


def human_duration(seconds: float | None) -> str:
    """1m05s, 3h02m: what an engineer reads at a glance in a report."""
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


class Reader(Protocol):
    """Read-only access to the target inside one guarded transaction."""

    async def fetch(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[Row]: ...


Check = Callable[[Reader], Awaitable[Finding]]


class Gateway(Protocol):
    """How a command reaches the target: each check in its own read-only transaction.

    A check that times out, lacks privilege or meets a missing object comes back as a
    `skipped` finding; an unexpected failure as an `error` finding. Never raises for
    one check's trouble, so the rest of a report still arrives.
    """

    @property
    def target(self) -> str: ...

    @property
    def dsn_for_display(self) -> str: ...

    async def probe(self) -> Row:
        """Connect once, outside the pool, and return server facts; raises on failure."""
        ...

    async def run_check(self, name: str, check: Check) -> Finding: ...

    async def read(self, fn: Callable[[Reader], Awaitable[T]]) -> T:
        """Run `fn` in a guarded read-only transaction; errors propagate (plans need them)."""
        ...


RefreshRecords = Mapping[str, Mapping[str, Any]]
# The bot's record of its own refreshes, per view (`schema.view` keys; a bare name is
# looked up as well). Each record holds `started_at` (datetime, naive means UTC),
# `finished_at` (None while running or after a failure), `rows` (int | None),
# `error` (str | None) and `mode` ("concurrently" | "plain"). PostgreSQL keeps none.
RefreshLog = Callable[[], Awaitable[RefreshRecords]]
# A Slack user id to the profile e-mail (None when Slack has none or cannot say).
SlackEmail = Callable[[str], Awaitable[str | None]]
# A LEAPS user's role was changed (their e-mail, the new role): the bot replaces the
# cached and stored role of the Slack users it knows by that e-mail on every replica,
# and returns notes where ROLE_MAP or a Slack user group still decides their role.
RoleChanged = Callable[[str, str], Awaitable[list[str]]]


class RefreshJournal(Protocol):
    """Where a refresh remedy records what it runs; `RefreshLog` reads it back.

    Keyed by approval and view, so that whichever process finishes the approval (or
    decides it after a crash) closes the entry the starting process opened.
    """

    async def started(self, view: str, mode: str, *, approval_id: str, actor_id: str) -> None: ...

    async def finished(
        self, view: str, *, approval_id: str, rows: int | None, error: str | None
    ) -> None: ...


@dataclass(frozen=True)
class TableCensus:
    """One table at a baseline: all its rows, and those created at or before the
    baseline's database time by UTC day of creation ("YYYY-MM-DD": rows)."""

    count: int
    days: Mapping[str, int]

    @property
    def upto(self) -> int:
        """The rows created at or before the baseline's database time."""
        return sum(self.days.values())


@dataclass(frozen=True)
class Baseline:
    """The target at one moment, kept by the bot to compare a restore with.

    `db_now` is the target's own `now()` when taken; `tables` its census of users,
    submissions and ledger rows (count and per-day histogram of creation). A baseline
    stored before they existed has neither and is "counts only": a verification against
    it compares totals, which growth can make look whole while rows are gone."""

    taken_at: datetime  # aware, UTC
    counts: Mapping[str, int | None]
    kind: str = "hourly"  # "hourly" (the periodic snapshot) or "verification" (/db recover)
    db_now: datetime | None = None
    tables: Mapping[str, TableCensus] = field(default_factory=dict)
    critical: frozenset[str] | None = None  # health checks critical when taken (None: unknown)
    flagged: str | None = None  # why it is never chosen by default (its counts fell)
    id: int | None = None

    @property
    def counts_only(self) -> bool:
        return self.db_now is None or not self.tables

    @property
    def name(self) -> str:
        """How reports name it: `the 09:00 baseline (2026-12-06 09:00 UTC)`."""
        at = self.taken_at.astimezone(UTC)
        return f"the {at:%H:%M} baseline ({at:%Y-%m-%d %H:%M} UTC)"


class BaselineStore(Protocol):
    """Where baselines live (the bot's state store, never the target: a restore would
    take them along)."""

    async def save(
        self,
        target: str,
        counts: Mapping[str, int | None],
        *,
        kind: str = "hourly",
        now: datetime | None = None,
        db_now: datetime | None = None,
        tables: Mapping[str, TableCensus] | None = None,
        critical: Iterable[str] | None = None,
        flagged: str | None = None,
    ) -> Baseline: ...

    async def latest(
        self,
        target: str,
        *,
        before: datetime | None = None,
        include_flagged: bool = False,
        kind: str = "hourly",
    ) -> Baseline | None:
        """The latest baseline (not after `before`). Flagged ones only when asked: the
        default is the latest unflagged baseline, the one a recovery is measured by."""
        ...

    async def latest_before(
        self, target: str, before: datetime, *, kind: str = "hourly"
    ) -> Baseline | None:
        """The latest baseline not after `before`, flagged or not (`--baseline HH:MM`)."""
        ...


# Called with a clean recovery verification (the incidents part marks full recovery).
RecoveryHook = Callable[["Report"], Awaitable[None]]
# The recovery runbooks of this target the bot is running or ran last, newest first, one
# row per step (for `/db recover --status`); kept in the bot's state store.
RunbookStatus = Callable[[], Awaitable[list[Row]]]
# When the open incident was detected and which one ("incident #3 (data loss)"), or None
# when none is open: what `restore-from-copy --until` defaults to.
IncidentDetection = Callable[[], Awaitable[tuple[datetime, str] | None]]


class Context(Protocol):
    """Everything a command or remedy may use of the bot; read-only to them."""

    @property
    def gateway(self) -> Gateway: ...

    @property
    def thresholds(self) -> Thresholds: ...

    @property
    def allow_superuser_kill(self) -> bool:
        """A bot setting, off by default: superuser sessions are usually the platform's own."""
        ...

    @property
    def refresh_log(self) -> RefreshLog | None:
        """None where the bot has no state store (a one-off console run)."""
        ...

    @property
    def refresh_journal(self) -> RefreshJournal | None: ...

    @property
    def slack_email(self) -> SlackEmail | None:
        """None where there is no Slack client (the console)."""
        ...

    @property
    def baselines(self) -> BaselineStore | None:
        """None where the bot has no state store (a one-off console run)."""
        ...

    @property
    def on_recovery_verified(self) -> RecoveryHook | None:
        """None where nothing listens (no incidents part)."""
        ...

    @property
    def service_identity(self) -> LeapsIdentity | None:
        """Who remedies act as when no approver has a LEAPS staff account (settings)."""
        ...

    @property
    def role_changed(self) -> RoleChanged | None:
        """None where no role resolver listens (a one-off run without the bot's roles)."""
        ...

    @property
    def app_roles(self) -> Sequence[str]:
        """The application's database roles (APP_ROLES), whose writes a freeze stops."""
        ...

    @property
    def bot_roles(self) -> Sequence[str]:
        """The database roles the bot itself logs in as (DATABASE_URL, ADMIN_DATABASE_URL,
        a PostgreSQL STATE_DATABASE_URL): a freeze never sets them read only."""
        ...

    @property
    def recovery_copy(self) -> Gateway | None:
        """A read-only gateway to RECOVERY_DATABASE_URL (a restored copy), or None."""
        ...

    @property
    def runbook_status(self) -> RunbookStatus | None:
        """None where the bot keeps no runbooks (a one-off console run)."""
        ...

    @property
    def incident_detection(self) -> IncidentDetection | None:
        """None where the bot keeps no incidents."""
        ...


class Thresholds(BaseModel):
    """Every limit a diagnostic compares against; settings fill it, the demo lowers it."""

    connections_warn_pct: float = 75.0
    connections_crit_pct: float = 90.0
    long_query_warn_s: float = 60.0
    long_query_crit_s: float = 300.0
    idle_in_tx_warn_s: float = 300.0
    idle_in_tx_crit_s: float = 900.0
    idle_session_warn_s: float = 600.0
    blocked_warn_s: float = 0.0
    blocked_crit_s: float = 60.0
    query_chars: int = 120
    max_rows: int = 20
    # /db recover: a count this far (percent) below its baseline is critical.
    recover_tolerance_pct: float = 0.5
    # Query text from pg_stat_activity can hold `PASSWORD '…'` or personal data: string
    # literals are shown as '…' unless this is on (SHOW_QUERY_LITERALS=true).
    show_query_literals: bool = False
    # /db webhooks: the operators' alert (more than this many Kajabi events waiting
    # unmatched for longer than this), and the age at which an unprocessed one is stuck.
    webhook_unmatched_max: int = 50
    webhook_unmatched_wait_s: float = 900.0
    webhook_stuck_s: float = 3600.0


Diagnose = Callable[[Context, list[str]], Awaitable[Report]]


class UsageError(ValueError):
    """Arguments a command cannot accept; the message is shown to the user as is."""


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    summary: str
    role: str
    diagnose: Diagnose
    aliases: tuple[str, ...] = field(default=())


REGISTRY: dict[str, Command] = {}


def register(
    name: str, usage: str, summary: str, role: str = "REVIEWER", aliases: tuple[str, ...] = ()
) -> Callable[[Diagnose], Diagnose]:
    """Each command family registers its own entry points; the router reads REGISTRY."""

    def decorate(fn: Diagnose) -> Diagnose:
        if name in REGISTRY:
            raise ValueError(f"command {name!r} registered twice")
        REGISTRY[name] = Command(name, usage, summary, role, fn, aliases)
        return fn

    return decorate


ELIDED = "'…'"
# PostgreSQL's lexer: identifiers and keywords (which may hold `$`), dollar-quote tags
# (which may not), and the openers of everything that is not plain code.
_WORD = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
_SPECIAL = re.compile(r"""[A-Za-z_\u0080-\U0010ffff'"$]|--|/\*""")


def _quoted_end(text: str, start: int, quote: str, backslash: bool) -> int:
    """Index after the closing quote (doubled quotes stay inside); len(text) if cut off."""
    i = start + 1
    while i < len(text):
        c = text[i]
        if backslash and c == "\\":
            i += 2
        elif c == quote:
            if text.startswith(quote, i + 1):
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return len(text)


def _block_comment_end(text: str, start: int) -> int:
    depth, i = 0, start
    while i < len(text):
        if text.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(text)


def redact_literals(sql: str) -> str:
    """SQL with every string literal shown as '…': standard, E'' (backslash escapes) and
    dollar-quoted, cut-off ones included (pg_stat_activity text is truncated).

    A small scanner rather than a regex, because a quote inside an identifier or a comment
    must not pair with a literal's opening quote and leave its content outside. A `--`
    comment whose end is unknown (the reports fold newlines into spaces) hides the rest,
    since a literal may follow on the next line. Assumes standard_conforming_strings=on
    (PostgreSQL's default since 9.1): in '…' a backslash is an ordinary character.
    """
    out: list[str] = []
    i = 0
    while True:
        found = _SPECIAL.search(sql, i)
        if found is None:
            out.append(sql[i:])
            return "".join(out)
        start = found.start()
        out.append(sql[i:start])
        c = sql[start]
        if c == "'":
            i = _quoted_end(sql, start, "'", backslash=False)
            out.append(ELIDED)
        elif c == '"':
            i = _quoted_end(sql, start, '"', backslash=False)
            out.append(sql[start:i])
        elif c == "$":
            tag = _DOLLAR_TAG.match(sql, start)
            if tag is None:  # a parameter ($1) or a lone $
                i = start + 1
                out.append("$")
                continue
            close = sql.find(tag.group(), tag.end())
            i = len(sql) if close < 0 else close + len(tag.group())
            out.append(ELIDED)
        elif sql.startswith("--", start):
            newline = sql.find("\n", start)
            if newline < 0:
                out.append("-- …")
                return "".join(out)
            i = newline
            out.append(sql[start:i])
        elif sql.startswith("/*", start):
            i = _block_comment_end(sql, start)
            out.append(sql[start:i])
        else:
            word = _WORD.match(sql, start)
            assert word is not None
            i = word.end()
            if word.group() in ("E", "e") and sql.startswith("'", i):
                i = _quoted_end(sql, i, "'", backslash=True)
                out.append(ELIDED)
            else:
                out.append(word.group())


def shown_queries(rows: list[Row], show_literals: bool, key: str = "query") -> list[Row]:
    """Rows from pg_stat_activity with their query text as a report may show it (in place)."""
    if not show_literals:
        for row in rows:
            if isinstance(row.get(key), str):
                row[key] = redact_literals(row[key])
    return rows


def int8s(packed: bytes) -> array[int]:
    """Signed 8-byte integers in network order (`int8send`'s), as an array."""
    out = array("q")
    out.frombytes(bytes(packed))
    if sys.byteorder == "little":
        out.byteswap()
    return out
