"""The incident summary: posted on resolve and on demand, and as a Markdown file.

One `Facts` renders two ways: Block Kit for the channel (a monospace SLA table, since
Slack has no tables in sections) and Markdown for the post-mortem, with the whole
timeline. Both say the same things in the same order.
"""

from __future__ import annotations

from datetime import UTC

from slack_sdk.models.blocks import (
    Block,
    ContextBlock,
    HeaderBlock,
    MarkdownTextObject,
    SectionBlock,
)

from bot.incidents.facts import Facts, Metric, Verification, hhmm, pct_text
from bot.incidents.views import DETECTED_BY, STATE_LABEL
from bot.messages.render import MAX_HEADER_CHARS, MAX_SECTION_CHARS, SlackMessage, cut, esc, unesc
from commands.base import human_duration
from commands.incidents.lifecycle import SEVERITY_LABEL, SlaClock, timeline_lines, who
from commands.recover import days_text

RESULT = {"met": "met", "missed": "MISSED", "running": "open", "overdue": "OVERDUE"}


def sla_rows(f: Facts) -> list[tuple[str, str, str, str]]:
    """(milestone, target, actual, result): actual is from detection to the milestone,
    or the time elapsed so far when it is not reached."""
    rows = []
    for clock in f.clocks:
        rows.append(
            (clock.label, human_duration(clock.target_s), _actual(clock), RESULT[clock.status])
        )
    return rows


def _actual(clock: SlaClock) -> str:
    if clock.reached_at is not None:
        return f"{human_duration(clock.elapsed_s)} ({hhmm(clock.reached_at)})"
    return f"not yet ({human_duration(clock.elapsed_s)} so far)"


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("Milestone", "Target", "Actual", "Result")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]
    return "```\n" + "\n".join(lines) + "\n```"


def impact_lines(v: Verification | None) -> list[str]:
    """mrkdwn lines of the data impact."""
    if v is None:
        return ["No recovery verification in this incident yet (`/db recover`)."]
    if v.baseline_at is None or not v.compared:
        return [f"Verified {hhmm(v.at)}, but without a baseline to compare with."]
    notes = []
    if v.counts_only:
        notes.append("counts only: growth can hide a loss")
    if v.flagged:
        notes.append(f"a flagged baseline: {esc(v.flagged)}")
    lines = [
        f"Verified {hhmm(v.at)} against the {hhmm(v.baseline_at)} baseline"
        + (" (clean)" if v.clean else " (not clean)")
        + (f" ({'; '.join(notes)})" if notes else "")
        + ":"
    ]
    for m in v.compared:
        lines.append(f"• {esc(m.label)}: {metric_text(m)}")
    return lines


def metric_text(m: Metric) -> str:
    """`60 % (30 of 50 created by the baseline, 20 missing, created 2026-12-01 (20); 60 in
    all now)`, or for a counts-only or advisory count `95 % (190 of 200)`."""
    now = f"{m.now:,}" if m.now is not None else "?"
    was = f"{m.baseline:,}" if m.baseline is not None else "?"
    if m.total is None:  # counts only, or approved submissions
        fewer = ""
        if m.advisory and m.baseline is not None and m.now is not None and m.now < m.baseline:
            fewer = f", {m.baseline - m.now:,} fewer: revocations are not called a loss"
        lost = f", {m.lost:,} missing" if m.lost else ""
        return f"{pct_text(m.pct)} ({now} of {was}{lost}{fewer})"
    lost = ""
    if m.lost:
        lost = f", {m.lost:,} missing"
        if m.lost_by_day:
            lost += ", " + days_text(m.lost_by_day)
    return (
        f"{pct_text(m.pct)} ({now} of {was} created by the baseline{lost}; {m.total:,} in all now)"
    )


def _facts_line(f: Facts) -> str:
    inc = f.incident
    resolved = f"resolved {hhmm(inc.resolved_at)}" if inc.resolved_at else "not resolved"
    return (
        f"*State:* {STATE_LABEL[inc.state]}    *Severity:* {SEVERITY_LABEL[inc.severity]}    "
        f"*Commander:* {who(inc.commander_id)}\n"
        f"*Duration:* {human_duration(f.duration_s)}{'' if inc.resolved_at else ' so far'} "
        f"(detected {hhmm(inc.detected_at)} by {DETECTED_BY[inc.detected_by]}, "
        f"started {hhmm(inc.started_at)}, {resolved})"
    )


def _actions_lines(f: Facts) -> list[str]:
    if not f.actions:
        return ["No remedy was requested in this incident."]
    changed = sum(a.affected or 0 for a in f.actions)
    done = sum(1 for a in f.actions if a.outcome == "done")
    head = f"{len(f.actions)} requested, {done} done, {changed:,} rows changed:"
    return [head, *(f"• {a.line()}" for a in f.actions)]


def _md(text: str) -> MarkdownTextObject:
    return MarkdownTextObject(text=cut(text, MAX_SECTION_CHARS))


def summary_message(f: Facts) -> SlackMessage:
    inc = f.incident
    title = f"Summary of incident #{inc.id}: {inc.title}"
    follow = f.follow_ups()
    blocks: list[Block] = [
        HeaderBlock(text=cut(unesc(title), MAX_HEADER_CHARS)),
        SectionBlock(text=_md(_facts_line(f))),
        SectionBlock(text=_md("*SLAs* (from detection)\n" + _table(sla_rows(f)))),
        SectionBlock(text=_md("*Actions*\n" + "\n".join(_actions_lines(f)))),
        SectionBlock(text=_md("*Data impact*\n" + "\n".join(impact_lines(f.verification)))),
        SectionBlock(
            text=_md(
                "*Open follow-ups*\n" + ("\n".join(f"• {x}" for x in follow) if follow else "None.")
            )
        ),
        ContextBlock(
            elements=[
                _md(
                    f"{len(f.events)} timeline events · `/db incident timeline` · "
                    "`/db incident summary --file` for the post-mortem file"
                )
            ]
        ),
    ]
    met = sum(1 for c in f.clocks if c.status == "met")
    text = f"{title}: {met} of {len(f.clocks)} SLAs met, {len(follow)} open follow-ups"
    return SlackMessage(text=text, blocks=blocks)


def _plain(text: str) -> str:
    """mrkdwn to Markdown: entities back to characters, *bold* to **bold**."""
    return unesc(text)


def summary_markdown(f: Facts) -> str:
    """The post-mortem file: the summary and the whole timeline."""
    inc = f.incident
    out = [f"# Incident #{inc.id}: {inc.title}", ""]
    out += [_plain(line).replace("*", "**") + "  " for line in _facts_line(f).split("\n")]
    out += ["", "## SLAs (from detection)", "", "| Milestone | Target | Actual | Result |"]
    out += ["|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in sla_rows(f)]
    out += ["", "## Actions", ""]
    out += [_plain(x).replace("• ", "- ") for x in _actions_lines(f)]
    out += ["", "## Data impact", ""]
    out += [_plain(x).replace("• ", "- ") for x in impact_lines(f.verification)]
    out += ["", "## Open follow-ups", ""]
    out += [f"- {_plain(x).replace('*', '**')}" for x in f.follow_ups()] or ["None."]
    out += ["", f"## Timeline ({len(f.events)} events, UTC)", ""]
    for line in timeline_lines(f.events):
        if line.startswith("*"):
            out += ["", f"### {line.strip('*').removesuffix('* (UTC)')}", ""]
        else:
            out.append(f"- {_plain(line)}")
    out += ["", f"_Generated {f.now.astimezone(UTC):%Y-%m-%d %H:%M} UTC by dbops-bot._", ""]
    return "\n".join(out)
