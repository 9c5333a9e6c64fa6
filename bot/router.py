"""From the text after `/db` to a Report or a short answer, the same for Slack and console.

The router reads the registry that `commands/` fills; adding a command never touches
this file. Identical diagnostics asked within a short window share one run, so a
burst of `/db health` during an incident costs the sick database one set of queries.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import shlex
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import commands  # noqa: F401  (fills the registry)
from commands import guide
from commands.base import (
    DEFAULT_APP_ROLES,
    REGISTRY,
    BaselineStore,
    Command,
    Gateway,
    IncidentDetection,
    LeapsIdentity,
    RecoveryHook,
    RefreshJournal,
    RefreshLog,
    Report,
    RoleChanged,
    RunbookStatus,
    SlackEmail,
    Thresholds,
    UsageError,
)
from commands.incidents import lifecycle as incident
from commands.remedies.base import REMEDIES, Plan, Remedy

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What a command sees of the bot (`commands.base.Context`): the gateway, the limits,
    the settings commands read, and the bot's own records they consult or write."""

    gateway: Gateway
    thresholds: Thresholds
    allow_superuser_kill: bool = False
    refresh_log: RefreshLog | None = None
    refresh_journal: RefreshJournal | None = None
    slack_email: SlackEmail | None = None  # Slack id -> profile e-mail
    service_identity: LeapsIdentity | None = None  # REMEDY_SERVICE_USER_ID / _ROLE
    baselines: BaselineStore | None = None  # the state store's row-count snapshots
    on_recovery_verified: RecoveryHook | None = None  # the incidents part listens here
    role_changed: RoleChanged | None = None  # the role resolver: set-role takes effect now
    app_roles: tuple[str, ...] = DEFAULT_APP_ROLES  # APP_ROLES: whose writes a freeze stops
    recovery_copy: Gateway | None = None  # RECOVERY_DATABASE_URL, read only
    bot_roles: tuple[str, ...] = ()  # the roles the bot logs in as: never frozen
    runbook_status: RunbookStatus | None = None  # the runbooks kept in the state store
    incident_detection: IncidentDetection | None = None  # the open incident's detection


@dataclass
class Answer:
    """A reply that is not a report: help, an unknown command, a usage error."""

    text: str
    outcome: str  # help | unknown | usage | error


@dataclass(frozen=True)
class BotCommand:
    """A command the bot runs itself: it needs the state store and Slack, not only the
    target, so it is not in the domain's REGISTRY. It takes the rest of the text raw
    (free text such as an incident update keeps its quotes and apostrophes)."""

    name: str
    usage: str
    summary: str
    parse: Callable[[str], object]  # raises UsageError; run before the ack as well
    role: str = "PARTICIPANT"  # the diagnostics role applies on top, as for diagnostics


BOT_COMMANDS: dict[str, BotCommand] = {
    incident.NAME: BotCommand(incident.NAME, incident.USAGE, incident.SUMMARY, incident.parse),
}
Result = Report | Answer | Plan
Target = Command | Remedy | BotCommand


def new_error_id() -> str:
    return uuid.uuid4().hex[:8]


def parse(text: str) -> tuple[str, list[str]]:
    try:
        words = shlex.split(text.strip())
    except ValueError as exc:
        raise UsageError(f"cannot read the arguments: {exc}") from None
    if not words:
        return "help", []
    return words[0].lower(), words[1:]


def find(name: str) -> Target | None:
    if name in BOT_COMMANDS:
        return BOT_COMMANDS[name]
    if name in REGISTRY:
        return REGISTRY[name]
    if name in REMEDIES:
        return REMEDIES[name]
    return next((c for c in REGISTRY.values() if name in c.aliases), None)


def usage_of(name: str) -> str | None:
    target = find(name)
    return target.usage if target else None


def help_text(markup: bool = True) -> str:
    """mrkdwn for Slack (escaped where it sends it); `markup=False` for the console."""
    b = (lambda s: f"*{s}*") if markup else str
    lines = [b("`/db` diagnostics") + " (read-only)"]
    for cmd in sorted(REGISTRY.values(), key=lambda c: c.name):
        lines.append(f"• `{cmd.usage}` — {cmd.summary} (role {cmd.role})")
    if REMEDIES:
        lines.append(
            b("`/db` remedies") + " (the plan is posted in a thread; changes wait for approval)"
        )
        for rem in sorted(REMEDIES.values(), key=lambda r: r.name):
            approvers = f"{rem.approvers} x {rem.approver_role}"
            lines.append(f"• `{rem.usage}` — {rem.summary} (approved by {approvers})")
    lines.append("*Incidents*")
    for usage in incident.SUBCOMMANDS.values():
        lines.append(f"• `{usage}`")
    lines.append("• `/db help` — this list; `/db help <command|guide section>` — one of them")
    lines.append(b("The troubleshooting guide") + ", section by section")
    for chapter, sections in guide.chapters():
        cited = " · ".join(
            f"{s.heading}: " + ", ".join(f"`{c}`" for c in s.commands) for s in sections
        )
        lines.append(f"• {chapter} — {cited}")
    return "\n".join(lines)


def help_answer(words: list[str], markup: bool = True) -> Answer:
    """`/db help [what]`: the whole list, or one command or guide section."""
    return help_for(words, markup) if words else Answer(help_text(markup), "help")


def help_for(words: list[str], markup: bool = True) -> Answer:
    """`/db help <command>`: its usage, who may run and approve it, and the guide sections
    it serves; `/db help <words of a guide heading>`: those sections and their commands."""
    b = (lambda s: f"*{s}*") if markup else str
    phrase = " ".join(words)
    target = find(phrase.lower()) if len(words) == 1 else None
    if target is not None:
        lines = [f"`{target.usage}` — {target.summary}"]
        if isinstance(target, Remedy):
            approvers = f"{target.approvers} x {target.approver_role}"
            lines.append(f"requested by {target.role} or above, approved by {approvers}")
        else:
            lines.append(f"role {target.role} or above")
        for section in guide.sections_for(target.name):
            lines.append(f"guide: {section.chapter} → {section.heading}")
        return Answer("\n".join(lines), "help")
    sections = guide.find_sections(phrase)
    if not sections:
        return Answer(
            f"no command or guide section called `{phrase}`.\n"
            "Type `/db help` for every command and section.",
            "unknown",
        )
    lines = []
    for section in sections:
        lines.append(b(f"{section.chapter} → {section.heading}"))
        for name in section.commands:
            usage = usage_of(name.split()[0])
            lines.append(f"• `/db {name}`" + (f" — `{usage}`" if usage else ""))
    return Answer("\n".join(lines), "help")


def unknown_text(name: str) -> str:
    names = [*REGISTRY, *REMEDIES, *BOT_COMMANDS, "help"]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    text = f"unknown command `{name}`."
    usage = usage_of(close[0]) if close else None
    if close and usage:
        text += f" Did you mean `{close[0]}`? Usage: `{usage}`"
    elif close:
        text += " Did you mean `help`?"
    return text + "\nType `/db help` for every command."


def preflight(text: str) -> Answer | tuple[Target, list[str]]:
    """Everything that can be answered without the database, cheap enough to run before ack."""
    head, _, rest = text.strip().partition(" ")
    bot_command = BOT_COMMANDS.get(head.lower())
    if bot_command is not None:
        try:
            bot_command.parse(rest)
        except UsageError as exc:
            return Answer(f"{exc}\nUsage: `{bot_command.usage}`", "usage")
        return bot_command, [rest.strip()]
    try:
        name, args = parse(text)
    except UsageError as exc:
        return Answer(str(exc), "usage")
    if name == "help":
        return help_answer(args)
    cmd = find(name)
    if cmd is None:
        return Answer(unknown_text(name), "unknown")
    return cmd, args


@dataclass
class _Shared:
    task: asyncio.Task[Report]
    finished_at: float | None = None


def _mark_finished(shared: _Shared, _task: asyncio.Task[Report]) -> None:
    shared.finished_at = time.monotonic()


@dataclass
class Dispatcher:
    ctx: RunContext
    coalesce_s: float = 2.0
    _shared: dict[tuple[str, tuple[str, ...]], _Shared] = field(default_factory=dict)
    runs: Counter[str] = field(default_factory=Counter)  # diagnostics really started

    async def run(self, text: str) -> Result:
        pre = preflight(text)
        if isinstance(pre, Answer):
            return pre
        return await self.run_command(*pre)

    async def run_command(self, cmd: Target, args: list[str]) -> Result:
        if isinstance(cmd, BotCommand):
            return Answer(
                f"`{cmd.name}` keeps state: run it in Slack, or from the console with `--user`",
                "usage",
            )
        try:
            if isinstance(cmd, Remedy):
                return await cmd.plan(self.ctx, args)  # dry run: the plan, read-only
            return await self._diagnose(cmd, args)
        except UsageError as exc:
            return Answer(f"{exc}\nUsage: `{cmd.usage}`", "usage")

    async def _diagnose(self, cmd: Command, args: list[str]) -> Report:
        key = (cmd.name, tuple(args))
        now = time.monotonic()
        for stale in [
            k
            for k, v in self._shared.items()
            if v.finished_at is not None and now - v.finished_at > self.coalesce_s
        ]:
            del self._shared[stale]
        shared = self._shared.get(key)
        fresh = shared is not None and (
            shared.finished_at is None or now - shared.finished_at <= self.coalesce_s
        )
        if shared is None or not fresh:
            task = asyncio.ensure_future(cmd.diagnose(self.ctx, args))
            self.runs[cmd.name] += 1
            shared = _Shared(task)
            self._shared[key] = shared
            task.add_done_callback(partial(_mark_finished, shared))
        return await asyncio.shield(shared.task)
