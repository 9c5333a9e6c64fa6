"""Incidents in Block Kit: the pinned header, the timeline, and App Home.

Kept apart from `bot.messages.render` (reports and plans); the same limits apply: 50 blocks a
message (100 a Home tab), 3000 characters a section, what is cut is counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime

from slack_sdk.models.blocks import (
    Block,
    ContextBlock,
    DividerBlock,
    HeaderBlock,
    MarkdownTextObject,
    SectionBlock,
)
from slack_sdk.models.views import View

from bot.messages.render import MAX_HEADER_CHARS, MAX_SECTION_CHARS, SlackMessage, cut, unesc
from bot.state import Approval, HealthSeen, Incident, IncidentEvent
from commands.incidents.lifecycle import (
    SEVERITY_LABEL,
    Milestones,
    SlaClock,
    SlaTargets,
    clock_line,
    escape,
    sla_clocks,
    timeline_lines,
    who,
)

MAX_TIMELINE_LINES = 200
MAX_HOME_BLOCKS = 100
STATE_LABEL = {
    "open": ":fire: OPEN",
    "reopened": ":fire: REOPENED",
    "resolved": ":large_green_circle: RESOLVED (recovery pending)",
    "recovered": ":white_check_mark: RECOVERED",
}
DETECTED_BY = {"since": "--since", "watchdog": "watchdog", "start": "incident start"}


def milestones(incident: Incident) -> Milestones:
    return Milestones(
        detected_at=incident.detected_at,
        started_at=incident.started_at,
        responded_at=incident.responded_at,
        communicated_at=incident.communicated_at,
        resolved_at=incident.resolved_at,
        recovered_at=incident.recovered_at,
    )


def clocks_of(incident: Incident, targets: SlaTargets, now: datetime) -> list[SlaClock]:
    return sla_clocks(milestones(incident), targets, now)


def _md(text: str) -> MarkdownTextObject:
    return MarkdownTextObject(text=cut(text, MAX_SECTION_CHARS))


def header_message(incident: Incident, targets: SlaTargets, now: datetime) -> SlackMessage:
    """The pinned header: what, how bad, who leads, and every SLA clock."""
    clocks = clocks_of(incident, targets, now)
    title = f"Incident #{incident.id}: {incident.title}"
    facts = (
        f"*State:* {STATE_LABEL[incident.state]}    "
        f"*Severity:* {SEVERITY_LABEL[incident.severity]}    "
        f"*Commander:* {who(incident.commander_id)}"
    )
    since = (
        f"Detected {incident.detected_at:%Y-%m-%d %H:%M} UTC "
        f"(by {DETECTED_BY[incident.detected_by]}) · started {incident.started_at:%H:%M} UTC "
        f"by {who(incident.created_by)}"
    )
    overdue = [c.label for c in clocks if c.status == "overdue"]
    blocks: list[Block] = [
        HeaderBlock(text=cut(unesc(title), MAX_HEADER_CHARS)),  # plain text: no entities
        SectionBlock(text=_md(facts)),
        SectionBlock(text=_md("\n".join(clock_line(c) for c in clocks))),
        ContextBlock(elements=[_md(since + " · `/db incident status|update|timeline`")]),
    ]
    text = f"{title} [{incident.state}, {incident.severity}]"
    if overdue:
        text += " OVERDUE: " + ", ".join(overdue)
    return SlackMessage(text=text, blocks=blocks)


def digest(message: SlackMessage) -> str:
    raw = json.dumps([message.text, message.blocks_json()], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def timeline_message(incident: Incident, events: Sequence[IncidentEvent]) -> SlackMessage:
    """The whole timeline in sections of at most 3000 characters; the oldest lines are
    dropped (and counted) past `MAX_TIMELINE_LINES`."""
    lines = timeline_lines(events)
    dropped = max(0, len(lines) - MAX_TIMELINE_LINES)
    lines = lines[dropped:]
    title = f"Timeline of incident #{incident.id}: {incident.title}"
    blocks: list[Block] = [HeaderBlock(text=cut(unesc(title), MAX_HEADER_CHARS))]
    if dropped:
        blocks.append(ContextBlock(elements=[_md(f"… {dropped} earlier lines not shown")]))
    chunk: list[str] = []
    for line in lines:
        line = cut(line, MAX_SECTION_CHARS - 10)
        if sum(len(x) + 1 for x in chunk) + len(line) > MAX_SECTION_CHARS - 10:
            blocks.append(SectionBlock(text=_md("\n".join(chunk))))
            chunk = []
        chunk.append(line)
    if chunk:
        blocks.append(SectionBlock(text=_md("\n".join(chunk))))
    if len(blocks) > 50:
        left = len(blocks) - 49
        note = ContextBlock(elements=[_md(f"… {left} sections not shown")])
        blocks = [*blocks[:1], note, *blocks[-48:]]
    return SlackMessage(text=f"{title}: {len(events)} events", blocks=blocks)


def home_view(
    incidents: Sequence[Incident],
    approvals: Sequence[Approval],
    health: HealthSeen | None,
    targets: SlaTargets,
    now: datetime,
) -> View:
    """App Home: open incidents with their clocks, pending approvals, the latest health."""
    blocks: list[Block] = [HeaderBlock(text="Open incidents")]
    if not incidents:
        blocks.append(SectionBlock(text=_md("No open incident. :sunny:")))
    for incident in incidents[:15]:
        clocks = clocks_of(incident, targets, now)
        head = (
            f"*#{incident.id} {incident.title}* in <#{incident.channel_id}> — "
            f"{STATE_LABEL[incident.state]}, {incident.severity}, "
            f"commander {who(incident.commander_id)}"
        )
        blocks.append(SectionBlock(text=_md(head + "\n" + "\n".join(map(clock_line, clocks)))))
    if len(incidents) > 15:
        blocks.append(ContextBlock(elements=[_md(f"… {len(incidents) - 15} more incidents")]))
    blocks += [DividerBlock(), HeaderBlock(text="Pending approvals")]
    lines = [
        f"`{a.id}` `{a.remedy}` in <#{a.channel_id}> by {who(a.requester_id)}, "
        f"needs {a.needed_approvals} x {a.approver_role}, expires {a.expires_at:%H:%M} UTC"
        for a in approvals[:20]
    ]
    if len(approvals) > 20:
        lines.append(f"… {len(approvals) - 20} more")
    blocks.append(SectionBlock(text=_md("\n".join(lines) or "None.")))
    blocks += [DividerBlock(), HeaderBlock(text="Latest health")]
    if health is None:
        blocks.append(SectionBlock(text=_md("No `/db health` seen yet.")))
    else:
        worst = "\n".join(
            f"• *{escape(str(f.get('status', '?'))).upper()}* {escape(str(f.get('check', '')))}:"
            f" {escape(str(f.get('summary', '')))}"
            for f in health.findings
        )
        blocks.append(
            SectionBlock(
                text=_md(
                    f"*{health.worst.upper()}* at {health.at:%Y-%m-%d %H:%M} UTC "
                    f"(by {who(health.actor_id)} in <#{health.channel_id}>)\n" + worst
                )
            )
        )
    return View(type="home", blocks=blocks[:MAX_HOME_BLOCKS])
