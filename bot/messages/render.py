"""One Report, three renderings: Block Kit for Slack, text for the console, JSON for scripts.

Slack limits are respected here, in one place: at most 50 blocks a message and 3000
characters a section; what is cut is counted, and a cut table carries a button that
fetches it whole as CSV. Times in Slack are `<!date>` tokens so every reader sees their
own time zone; the console sees UTC ISO.

Every value from the database or a user passes `esc` on its way into mrkdwn (code spans
included: Slack reads `<!channel>` inside backticks too); plain_text fields and the
console show values as written.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ConfirmObject,
    ContextBlock,
    DividerBlock,
    HeaderBlock,
    MarkdownTextObject,
    SectionBlock,
)

from commands.base import Finding, Report, Row, Status
from commands.remedies.base import Outcome, Plan

MAX_BLOCKS = 50
MAX_SECTION_CHARS = 3000
MAX_HEADER_CHARS = 150
ROWS_IN_MESSAGE = 5
CELL_CHARS = 60
MAX_BUTTON_VALUE = 2000
FULL_TABLE = "dbops_full_table"  # action id of the "Full table as CSV" button

ICON = {
    Status.CRIT: ":red_circle:",
    Status.ERROR: ":x:",
    Status.WARN: ":warning:",
    Status.SKIPPED: ":fast_forward:",
    Status.OK: ":white_check_mark:",
}
LABEL = {s: s.value.upper() for s in Status}


def esc(value: object) -> str:
    """Slack's escaping for text it must not read as controls (`<!channel>`, `<url|text>`)."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unesc(text: str) -> str:
    """The inverse of `esc`, for a console that shows what Slack would."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def utc_iso(value: datetime) -> str:
    """The console's and the fallback's way to write a time: UTC, ISO 8601, to the second."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def slack_date(value: datetime) -> str:
    """A time each Slack reader sees in their own zone; clients that cannot render the
    token show the UTC text after the bar."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    epoch = int(value.timestamp())
    return f"<!date^{epoch}^{{date_short_pretty}} {{time}}|{utc_iso(value)}>"


_DATE_TOKEN = re.compile(r"<!date\^\d+\^[^|>]*\|([^>]*)>")


_UTC_ISO = re.compile(r"\b(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})Z\b")


def slack_times(text: str) -> str:
    """UTC ISO times that commands write in summaries (as `utc_iso` does) become Slack
    date tokens; commands know nothing of Slack, the console keeps the ISO text."""

    def token(match: re.Match[str]) -> str:
        try:
            at = datetime.fromisoformat(match.group(1)).replace(tzinfo=UTC)
        except ValueError:
            return match.group(0)
        return slack_date(at)

    return _UTC_ISO.sub(token, text)


def plain_dates(text: str) -> str:
    """Slack date tokens back to their UTC fallback, for the console."""
    return _DATE_TOKEN.sub(r"\1", text)


@dataclass(frozen=True)
class Markup:
    """How a rendering writes values and emphasis: Slack mrkdwn, or the console's text."""

    slack: bool

    def v(self, value: object) -> str:
        return esc(value) if self.slack else str(value)

    def b(self, text: str) -> str:
        return f"*{text}*" if self.slack else text

    def code(self, text: str) -> str:
        return f"`{text}`" if self.slack else text

    def pre(self, text: str) -> str:
        return f"```{text}```" if self.slack else text

    def when(self, value: datetime) -> str:
        return slack_date(value) if self.slack else utc_iso(value)


MRKDWN = Markup(slack=True)
PLAIN = Markup(slack=False)


@dataclass
class SlackMessage:
    text: str
    blocks: list[Block]
    console: str = ""  # the same message as the console shows it (values as written)

    def blocks_json(self) -> list[dict[str, Any]]:
        return [b.to_dict() for b in self.blocks]


def cell(value: Any, limit: int = CELL_CHARS) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.1f}"
    elif isinstance(value, datetime):
        text = utc_iso(value) if value.tzinfo else value.isoformat(timespec="seconds")
    elif isinstance(value, list | tuple):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cut(text: str, limit: int) -> str:
    """Cut to the limit, saying how much was left out."""
    if len(text) <= limit:
        return text
    note = f"… ({len(text) - limit} more characters)"
    return text[: limit - len(note)] + note


def rows_table(rows: list[Row], limit: int = ROWS_IN_MESSAGE) -> str:
    """A fixed-width table of the first rows, for a code block or the console."""
    shown = rows[:limit]
    if not shown:
        return ""
    columns = list(dict.fromkeys(k for r in shown for k in r))
    cells = [[cell(r.get(c)) for c in columns] for r in shown]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    if len(rows) > limit:
        lines.append(f"… {len(rows) - limit} more rows")
    return "\n".join(lines)


def rows_csv(rows: list[Row]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: cell(v, 10_000) for k, v in r.items()})
    return buf.getvalue()


def _table_cut(f: Finding, shown_whole: bool) -> bool:
    return bool(f.rows) and f.status not in (Status.OK, Status.SKIPPED) and not shown_whole


def _full_table_button(f: Finding) -> ButtonElement:
    return ButtonElement(
        text=f"Full table ({len(f.rows)} rows) as CSV", action_id=FULL_TABLE, value=f.check
    )


def _finding_section(f: Finding, table_buttons: bool = False) -> SectionBlock:
    summary = slack_times(esc(f.summary))
    text = f"{ICON[f.status]} *{LABEL[f.status]}  {esc(f.check)}*\n{summary}"
    if f.hint:
        text += f"\n_next:_ {slack_times(esc(f.hint))}"
    table = esc(rows_table(f.rows)) if f.status not in (Status.OK, Status.SKIPPED) else ""
    shown_whole = len(f.rows) <= ROWS_IN_MESSAGE
    if table:
        room = MAX_SECTION_CHARS - len(text) - 10
        if room > 200:
            shown_whole = shown_whole and len(table) <= room
            text += "\n```" + cut(table, room) + "```"
        else:
            shown_whole = False
    button = _full_table_button(f) if table_buttons and _table_cut(f, shown_whole) else None
    return SectionBlock(
        text=MarkdownTextObject(text=cut(text, MAX_SECTION_CHARS)), accessory=button
    )


def _tally(report: Report) -> str:
    counts = Counter(f.status for f in report.findings)
    return ", ".join(f"{counts[s]} {s.value}" for s in Status if counts[s]) or "no findings"


def to_slack(report: Report, table_buttons: bool = False) -> SlackMessage:
    """With `table_buttons`, a cut table gets a "Full table as CSV" button whose value is
    the check's name: one rendering serves every asker, and the caller puts its own signed
    reference in each copy (`sign_table_buttons`). Without, the cut is only counted."""
    report = report.sorted()
    blocks: list[Block] = [
        HeaderBlock(text=cut(f"{report.title}: {report.worst.value.upper()}", MAX_HEADER_CHARS)),
        ContextBlock(
            elements=[MarkdownTextObject(text=f"`{esc(report.target)}` · {_tally(report)}")]
        ),
        DividerBlock(),
    ]
    room = MAX_BLOCKS - len(blocks) - 1  # keep one for the "left out" note
    shown = report.findings[:room]
    blocks += [_finding_section(f, table_buttons) for f in shown]
    left = len(report.findings) - len(shown)
    if left:
        blocks.append(
            ContextBlock(elements=[MarkdownTextObject(text=f"… {left} more findings not shown")])
        )
    fallback = f"{report.title} of {report.target}: {report.worst.value.upper()} ({_tally(report)})"
    return SlackMessage(text=esc(fallback), blocks=blocks)


def sign_table_buttons(
    blocks: list[dict[str, Any]], sign: Callable[[str], str]
) -> list[dict[str, Any]]:
    """Put `sign(check)` in each full-table button of rendered blocks (fresh dicts from
    `blocks_json`); a button whose value would pass Slack's limit is dropped."""
    for block in blocks:
        button = block.get("accessory")
        if isinstance(button, dict) and button.get("action_id") == FULL_TABLE:
            value = sign(str(button.get("value", "")))
            if len(value) > MAX_BUTTON_VALUE:
                del block["accessory"]
            else:
                button["value"] = value
    return blocks


def csv_filename(check: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", check).strip("_") + ".csv"


def to_text(report: Report) -> str:
    report = report.sorted()
    out = [
        f"{report.title} — {report.target} — {report.worst.value.upper()} ({_tally(report)})",
        "",
    ]
    for f in report.findings:
        out.append(f"[{LABEL[f.status]:7}] {f.check}: {f.summary}")
        if f.status not in (Status.OK, Status.SKIPPED) and f.rows:
            out += ["          " + line for line in rows_table(f.rows, 10).splitlines()]
        if f.hint:
            out.append(f"          next: {f.hint}")
    return "\n".join(out) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def to_json(report: Report) -> str:
    """The Report model as JSON, with database values (timestamps, decimals) made plain."""
    data = report.sorted().model_dump(mode="python")
    return json.dumps(data, default=_json_default, indent=2) + "\n"


def error_text(message: str) -> SlackMessage:
    return SlackMessage(
        text=message,
        blocks=[SectionBlock(text=MarkdownTextObject(text=cut(esc(message), 3000)))],
        console=message,
    )


STATE_LINE = {
    "pending": ":hourglass_flowing_sand: *waiting for approval*",
    "executing": ":gear: *executing*",
    "done": ":white_check_mark: *done*",
    "failed": ":x: *failed*",
    "aborted": ":no_entry: *aborted*",
    "rejected": ":no_entry_sign: *rejected*",
    "expired": ":alarm_clock: *expired*",
    "cancelled": ":heavy_multiplication_x: *cancelled*",
}
CONSOLE_STATE_LINE = {
    "pending": "waiting for approval",
    "executing": "executing",
    "done": "done",
    "failed": "FAILED",
    "aborted": "aborted",
    "rejected": "rejected",
    "expired": "expired",
    "cancelled": "cancelled",
}


def plan_text(plan: Plan, limits: str = "", m: Markup = MRKDWN, not_tried: str = "") -> str:
    """The plan as an engineer reviews it: what, how many, the exact SQL, backup, limits,
    what the database said when the change was tried and rolled back (or why it was not
    tried: `not_tried`), and who writes LEAPS's audit rows."""
    lines = [
        m.b(m.v(plan.title)),
        m.v(plan.summary),
        f"rows/objects counted now: {m.b(str(plan.count))}",
    ]
    if plan.tolerance:
        lines[-1] += f" (tolerance ±{plan.tolerance})"
    lines.append(f"backup: {m.v(plan.backup or 'nothing is deleted or overwritten')}")
    if limits or plan.limits:
        lines.append(f"limits: {m.v(limits or plan.limits)}")  # the executor's includes the plan's
    if plan.preflight is not None:
        tried = plan.preflight
        icon = ""
        if m.slack:
            icon = ":white_check_mark: " if tried.status == "accepted" else ":warning: "
        lines.append(f"{icon}tried before approval: {m.v(tried.describe())}")
        if tried.identity:
            lines.append(f"tried as: {m.v(tried.identity)}")
    elif not_tried:
        lines.append(f"not tried before approval: {m.v(not_tried)}")
    if plan.audit:
        lines.append(f"audit: {m.v(plan.audit)}")
    lines += [f"{':warning: ' if m.slack else 'warning: '}{m.v(w)}" for w in plan.warnings]
    return "\n".join(lines)


def steps_text(plan: Plan) -> str:
    parts = []
    for step in plan.steps:
        params = f"\n-- params: {json.dumps(step.params, default=str)}" if step.params else ""
        note = f"-- {step.note}\n" if step.note else ""
        parts.append(f"{note}{step.sql.strip()};{params}")
    return "\n".join(parts)


def approval_message(
    *,
    approval_id: str,
    plan: Plan,
    state: str,
    requester_id: str,
    needed: int,
    approver_role: str,
    approved_by: list[str],
    expires_at: datetime,
    outcome: Outcome | None,
    limits: str,
    button_value: str,
    decided_at: Mapping[str, datetime] | None = None,
    changed_at: datetime | None = None,
    destroys_data: bool = False,
    not_tried: str = "",
) -> SlackMessage:
    """The plan message of an approval thread, rendered anew on every change of state.

    `decided_at` gives each approver's time, `changed_at` the time the approval reached a
    state other than pending; `destroys_data` puts a confirmation dialog on Approve;
    `not_tried` says why a remedy never preflighted was not tried before approval.
    """
    times = decided_at or {}

    def sections(m: Markup) -> list[str]:
        """The message's sections, for Slack (escaped mrkdwn) or the console (as written)."""
        mention = (lambda u: f"<@{esc(u)}>") if m.slack else str
        who = ", ".join(
            f"{mention(u)} ({m.when(times[u])})" if u in times else mention(u) for u in approved_by
        )
        status = STATE_LINE.get(state, state) if m.slack else CONSOLE_STATE_LINE.get(state, state)
        if state == "pending":
            status += (
                f": {max(0, needed - len(approved_by))} more of {needed} approver(s) with role "
                f"{m.v(approver_role)} (not {mention(requester_id)}); expires "
                f"{m.when(expires_at)}"
            )
            if who:
                status += f"; approved by {who}"
        else:
            if changed_at is not None:
                status += f" {m.when(changed_at)}"
            if who:
                status += f" (approved by {who})"
        if outcome is not None:
            status += f"\n{m.v(outcome.summary)}"
            if outcome.affected or outcome.backed_up:
                status += f"\naffected {outcome.affected}; backed up {outcome.backed_up}"
                if outcome.backup_table:
                    status += f" into {m.code(m.v(outcome.backup_table))}"
            if outcome.error and outcome.error not in outcome.summary:
                status += f"\ndatabase said: {m.code(m.v(cut(outcome.error, 500)))}"
            if outcome.offers:
                status += "\nnext: " + ", ".join(m.code(m.v(f"/db {o}")) for o in outcome.offers)
        room = MAX_SECTION_CHARS - 6
        texts = [
            cut(status, MAX_SECTION_CHARS),
            cut(plan_text(plan, limits, m, not_tried), MAX_SECTION_CHARS),
        ]
        if plan.targets:
            texts.append(m.pre(cut(m.v(rows_table(plan.targets, 15)), room)))
        texts.append(m.pre(cut(m.v(steps_text(plan)), room)))
        if outcome is not None and outcome.rows:
            texts.append(m.pre(cut(m.v(rows_table(outcome.rows, 15)), room)))
        return texts

    blocks: list[Block] = [
        HeaderBlock(text=cut(f"Approval {approval_id}: {plan.title}", MAX_HEADER_CHARS)),
        *(SectionBlock(text=MarkdownTextObject(text=t)) for t in sections(MRKDWN)),
    ]
    if state == "pending":
        blocks.append(
            ActionsBlock(
                block_id=f"approval:{approval_id}",
                elements=[
                    ButtonElement(
                        text="Approve",
                        action_id="dbops_approve",
                        value=button_value,
                        style="primary",
                        confirm=destroy_confirm(plan) if destroys_data else None,
                    ),
                    ButtonElement(
                        text="Reject", action_id="dbops_reject", value=button_value, style="danger"
                    ),
                ],
            )
        )
    text = f"Approval {approval_id}: {plan.title} — {state}"
    console = "\n".join([f"Approval {approval_id}: {plan.title}", *sections(PLAIN)])
    return SlackMessage(text=esc(text), blocks=blocks, console=console)


def runbook_step_message(head: str, plan: Plan, limits: str = "") -> SlackMessage:
    """A runbook step's own plan, posted in the runbook's thread before the step runs:
    `head` (which step, its plan's hash, its bound; as written, escaped here), then the
    plan as an approval shows it (what, rows, SQL, what the try said), without buttons:
    the runbook's approval covers it."""

    def sections(m: Markup) -> list[str]:
        room = MAX_SECTION_CHARS - 6
        texts = [
            cut(m.v(head), MAX_SECTION_CHARS),
            cut(plan_text(plan, limits, m), MAX_SECTION_CHARS),
        ]
        if plan.targets:
            texts.append(m.pre(cut(m.v(rows_table(plan.targets, 15)), room)))
        texts.append(m.pre(cut(m.v(steps_text(plan)), room)))
        return texts

    blocks: list[Block] = [SectionBlock(text=MarkdownTextObject(text=t)) for t in sections(MRKDWN)]
    return SlackMessage(text=esc(head), blocks=blocks, console="\n".join(sections(PLAIN)))


def destroy_confirm(plan: Plan) -> ConfirmObject:
    """Approve on a data-destroying remedy asks once more, naming what goes and how much."""
    backup = esc(plan.backup or "no backup is taken")
    text = (
        f"This deletes or overwrites *{plan.count}* rows: {esc(plan.summary)}\n"
        f"Backup: {backup}. Approve?"
    )
    return ConfirmObject(
        title=cut(f"Delete or overwrite {plan.count} rows?", 100),
        text=MarkdownTextObject(text=cut(text, 300)),
        confirm="Approve",
        deny="Cancel",
        style="danger",
    )


PARENT_LINE = {
    "done": ":white_check_mark: done",
    "failed": ":x: failed",
    "aborted": ":no_entry: aborted",
    "rejected": ":no_entry_sign: rejected",
    "expired": ":alarm_clock: expired",
    "cancelled": ":heavy_multiplication_x: cancelled",
}


def approval_parent(
    *,
    approval_id: str,
    plan: Plan,
    requester_id: str,
    command: str,
    needed: int,
    expires_at: datetime,
    mention_groups: list[str],
    state: str = "pending",
    changed_at: datetime | None = None,
    approved_by: list[str] | None = None,
    rejected_by: list[str] | None = None,
    outcome: Outcome | None = None,
) -> str:
    """The channel message a plan's thread hangs from: who asks for what, whom it waits
    for, and once final the outcome, so the channel reads it without opening the thread.
    Slack mrkdwn (values escaped); the console turns it back with `unesc`/`plain_dates`."""
    verb = "runs" if needed == 0 else "requests"
    lines = [
        f"<@{esc(requester_id)}> {verb} `{esc(command)}` — {esc(plan.title)}"
        f" (approval `{approval_id}`)"
    ]
    if state == "pending":
        if needed:
            groups = " ".join(f"<!subteam^{esc(g)}>" for g in mention_groups)
            wait = f"waiting for {needed} approver(s); expires {slack_date(expires_at)}"
            lines.append(f"{groups} {wait}" if groups else wait)
        return "\n".join(lines)
    final = PARENT_LINE.get(state, state)
    if changed_at is not None:
        final += f" {slack_date(changed_at)}"
    if state == "rejected" and rejected_by:
        final += " by " + ", ".join(f"<@{esc(u)}>" for u in rejected_by)
    elif approved_by:
        final += " (approved by " + ", ".join(f"<@{esc(u)}>" for u in approved_by) + ")"
    if outcome is not None:
        final += f": {esc(outcome.summary)}"
        if outcome.affected or outcome.backed_up:
            final += f" (affected {outcome.affected}, backed up {outcome.backed_up})"
        if outcome.error and outcome.error not in outcome.summary:
            final += f"; database said: `{esc(cut(outcome.error, 300))}`"
    lines.append(final)
    return "\n".join(lines)
