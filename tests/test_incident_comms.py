"""Incident templates and the summary over real Slack plumbing: signed commands and clicks
into the running bot, the fake Slack Web API, a real target and state store, and the
incident clock moved by the test."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import pytest

from bot.incidents import templates
from bot.incidents.comms import record_verification
from bot.incidents.facts import last_verification, verification_from_report
from commands.base import Finding, Report, Status
from tests import test_incidents
from tests.conftest import RunningBot, bot_settings, fresh_state_url, running_bot
from tests.fakeslack import Call, FakeSlack
from tests.slackreq import action_body, signed_headers
from tests.test_approvals import ADMIN, REQUESTER, Victims, plan_message, press, settle
from tests.test_incidents import (
    ALICE,
    CHANNEL,
    T0,
    active,
    blocks_text,
    clock_of,
    command,
    posts_in,
    service,
    told,
)

USERS_CHANNEL = "C0USERS"
ibot, idle = test_incidents.ibot, test_incidents.idle  # the incident bot and idle sessions


def recover_report(baseline_at: str = "2026-11-30T08:00:00+00:00") -> Report:
    """A verification in the shape `/db recover` reports it (branch `recover`,
    commands/recover.py: `baseline` and `count: <label>` findings with their rows)."""

    def count(metric: str, label: str, was: int, now: int) -> Finding:
        pct = round(100.0 * now / was, 2)
        return Finding(
            check=f"count: {label}",
            status=Status.OK if now >= was else Status.CRIT,
            summary=f"{label} {pct} % of the 08:00 count ({now:,} of {was:,})",
            rows=[{"metric": metric, "baseline": was, "now": now, "pct": pct}],
        )

    return Report(
        title="Recovery verification",
        target="leaps@127.0.0.1",
        findings=[
            Finding(
                check="baseline",
                status=Status.OK,
                summary="compared with the 08:00 baseline",
                rows=[{"taken_at": baseline_at, "users": 1000}],
            ),
            count("users", "users", 1000, 1000),
            count("submissions", "submissions", 5000, 4890),
            count("ledger_rows", "ledger rows", 8000, 7900),
        ],
    )


def preview_of(bot: RunningBot) -> Call:
    previews = [
        c
        for c in bot.fake.calls_to("chat.postMessage")
        if any(
            b.get("type") == "actions" and b.get("block_id") == templates.PICK_BLOCK
            for b in c.params.get("blocks", [])
        )
    ]
    assert previews, "no template preview was posted"
    return previews[-1]


async def press_post(bot: RunningBot, preview: Call, user: str, target: str | None) -> None:
    """The "Post to channel…" button, with the picker's choice in `state.values` as Slack
    sends it."""
    button = next(
        e
        for b in preview.params["blocks"]
        if b.get("type") == "actions"
        for e in b["elements"]
        if e.get("action_id") == templates.POST
    )
    ts = str(preview.response["ts"]) if preview.response else ""
    picked = {"type": "conversations_select", "selected_conversation": target}
    body = action_body(
        action_id=templates.POST,
        value=str(button["value"]),
        user=user,
        channel=CHANNEL,
        message_ts=ts,
        response_url=bot.fake.response_url(user),
        block_id=templates.PICK_BLOCK,
        state={"values": {templates.PICK_BLOCK: {templates.PICK: picked}}},
        message_text="preview",
    )
    resp = await bot.http.post(f"{bot.url}/slack/events", data=body, headers=signed_headers(body))
    await resp.read()
    assert resp.status == 200
    await settle(bot)


async def test_a_template_renders_with_the_measured_figures(ibot: RunningBot) -> None:
    await command(ibot, "incident start Submissions lost sev1")
    clock_of(ibot).advance(minutes=40)
    recorded = await record_verification(service(ibot), CHANNEL, ALICE, recover_report())
    assert recorded
    clock_of(ibot).advance(minutes=5)
    await command(ibot, "incident template tech")
    preview = preview_of(ibot)
    incident = await active(ibot)
    assert preview.params.get("thread_ts") == incident.header_ts  # in the incident thread
    text = blocks_text(preview)
    assert "Duration:* 45m00s so far" in text  # detection at T0, now T0+45m
    assert "Affected:* 110 submissions, 100 ledger rows" in text
    # The baseline is from 08:00, detection 09:00: writes in between may be lost.
    assert "Data-loss window:* up to 1h00m (writes between 08:00 and 09:00 UTC)" in text
    assert "users: 100 %" in text and "submissions: 97.8 %" in text
    assert "ledger rows: 98.8 %" in text
    assert f"On call:* <@{ALICE}>" in text
    assert "`/db recover` again" in text  # next steps: the verification was not clean
    assert "{{" not in text and "undefined" not in text
    # The summary reads the same verification for its data impact and follow-ups.
    await command(ibot, "incident summary")
    summary = blocks_text(posts_in(ibot.fake, CHANNEL, "Summary of incident #")[-1])
    assert "Verified 09:40 UTC against the 08:00 UTC baseline (not clean)" in summary
    assert "submissions: 97.8 % (4,890 of 5,000, 110 missing)" in summary
    assert "last recovery verification not clean: submissions 97.8 %, ledger rows 98.8 %" in summary


async def test_a_missing_value_is_refused_by_name_and_nothing_is_posted(
    ibot: RunningBot,
) -> None:
    await command(ibot, "incident start Leaderboard empty")
    before = len(ibot.fake.calls_to("chat.postMessage"))
    await command(ibot, "incident template user")
    await command(ibot, "incident template tech")
    await ibot.fake.wait_for("response_url", count=2)
    said = told(ibot.fake)
    assert any("`user.md.j2` needs `baseline_at`" in t for t in said), said
    assert any("`tech.md.j2` needs `affected`" in t for t in said), said
    assert any("run `/db recover` here" in t for t in said)
    # No preview, nothing posted anywhere.
    assert len(ibot.fake.calls_to("chat.postMessage")) == before


def test_the_override_directory_wins_and_values_are_escaped(tmp_path: Path) -> None:
    (tmp_path / "tech.md.j2").write_text("Ours: {{ title }} for {{ on_call }}\n")
    values = {"title": "<!channel> & co", "on_call": "<@U1>"}
    assert (
        templates.render("tech", values, tmp_path)
        == "Ours: &lt;!channel&gt; &amp; co for &lt;@U1&gt;\n"
    )
    # The other template still comes from the package, and refuses what it lacks.
    with pytest.raises(templates.MissingValue) as missing:
        templates.render("user", values, tmp_path)
    assert missing.value.name == "recovered"
    with pytest.raises(templates.MissingValue) as missing:
        templates.render("tech", {"title": "x"}, tmp_path)
    assert missing.value.name == "on_call"


def test_the_recover_report_is_read_as_a_verification() -> None:
    v = verification_from_report(recover_report(), T0)
    assert v is not None and v.baseline_at is not None
    assert v.baseline_at.hour == 8 and not v.clean
    assert [(m.name, m.pct, m.lost) for m in v.metrics] == [
        ("users", 100.0, 0),
        ("submissions", 97.8, 110),
        ("ledger_rows", 98.75, 100),
    ]
    other = Report(title="Health", target="x", findings=[])
    assert verification_from_report(other, T0) is None


async def test_posting_from_the_preview_records_the_communication_once(ibot: RunningBot) -> None:
    fake = ibot.fake
    await command(ibot, "incident start Points wrong sev2")
    await record_verification(service(ibot), CHANNEL, ALICE, recover_report())
    await command(ibot, "incident template user")
    preview = preview_of(ibot)
    clock_of(ibot).advance(minutes=25)
    await press_post(ibot, preview, ALICE, None)
    assert any(
        "Choose a channel" in c.params.get("text", "") for c in fake.calls_to("chat.postEphemeral")
    )
    assert not posts_in(fake, USERS_CHANNEL)
    await press_post(ibot, preview, ALICE, USERS_CHANNEL)
    await press_post(ibot, preview, ALICE, USERS_CHANNEL)  # a double click
    posted = posts_in(fake, USERS_CHANNEL)
    assert len(posted) == 1
    text = blocks_text(posted[0])
    assert "submissions: 97.8 % back" in text and "Send again the evidence" in text
    assert "already posted" in fake.calls_to("chat.postEphemeral")[-1].params["text"]
    incident = await active(ibot)
    assert incident.communicated_at == T0 + timedelta(minutes=25)
    assert incident.responded_at == T0 + timedelta(minutes=25)
    events = await service(ibot).store.timeline(incident.id)
    posts = [e for e in events if e.kind == "template"]
    assert [(e.actor_id, e.text) for e in posts] == [
        (ALICE, f"posted the user notification to <#{USERS_CHANNEL}>")
    ]
    assert posts[0].detail["ts"] == posted[0].response["ts"] if posted[0].response else False
    noted = posts_in(fake, CHANNEL, f"<@{ALICE}> posted the user notification to <#{USERS_CHANNEL}")
    assert len(noted) == 1 and noted[0].params.get("thread_ts") == incident.header_ts


def sla_table(call: Call) -> dict[str, list[str]]:
    section = next(b for b in call.params["blocks"] if "*SLAs*" in json.dumps(b))
    lines = section["text"]["text"].split("```")[1].strip().splitlines()[1:]
    return {line[:14].strip(): line[14:].split() for line in lines}


async def test_the_summary_of_a_scripted_incident(ibot: RunningBot, idle: Victims) -> None:
    fake, clock = ibot.fake, clock_of(ibot)
    await command(ibot, "incident start Connections exhausted sev1", user=REQUESTER)
    clock.advance(minutes=5)
    await command(ibot, "health", user=REQUESTER)
    clock.advance(minutes=15)
    await command(ibot, "incident update killing idle sessions", user=REQUESTER)
    await idle.open(2)
    await asyncio.sleep(0.3)
    await command(ibot, "kill-idle 0", user=REQUESTER)
    await press(ibot, plan_message(fake), ADMIN, channel=CHANNEL)
    await settle(ibot)
    clock.set(T0 + timedelta(hours=3))
    await command(ibot, "incident resolve", user=REQUESTER)
    summaries = posts_in(fake, CHANNEL, "Summary of incident #")
    assert len(summaries) == 1  # posted by itself on resolve
    table = sla_table(summaries[0])
    assert table["Detection"][-1] == "met"
    assert table["Response"][:2] == ["30m00s", "5m00s"] and table["Response"][-1] == "met"
    assert table["Communication"][:2] == ["1h00m", "20m00s"]
    assert table["Communication"][-1] == "met"
    assert table["Resolution"][:2] == ["4h00m", "3h00m"] and table["Resolution"][-1] == "met"
    assert table["Full recovery"][-1] == "open"
    text = blocks_text(summaries[0])
    assert "1 requested, 1 done, 2 rows changed" in text
    assert (
        f"`kill-idle`, requested by <@{REQUESTER}> (2 rows planned), approved by <@{ADMIN}>, "
        "done: 2 rows changed" in text
    )
    assert "SLA Full recovery open" in text
    assert "No recovery verification in this incident yet" in text
    assert "2 of 5" not in text and "4 of 5 SLAs met" in summaries[0].params["text"]

    # On demand, with the post-mortem file.
    await command(ibot, "incident summary --file", user=REQUESTER)
    assert len(posts_in(fake, CHANNEL, "Summary of incident #")) == 2
    uploads = list(fake.uploads.values())
    assert len(uploads) == 1
    markdown = uploads[-1].decode()
    assert markdown.startswith("# Incident #")
    assert "| Response | 30m00s | 5m00s (09:05 UTC) | met |" in markdown
    assert "| Full recovery | 8h00m | not yet (3h00m so far) | open |" in markdown
    timeline = markdown.split("## Timeline")[1]
    incident = await active(ibot)
    events = await service(ibot).store.timeline(incident.id)
    assert f"({len(events)} events, UTC)" in timeline
    for event in events:
        assert (
            event.text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") in timeline
        )
    assert "`09:20` <@U0REQ> update: killing idle sessions" in timeline
    completes = fake.calls_to("files.completeUploadExternal")
    assert completes and completes[-1].params.get("channel_id") == CHANNEL


def test_the_console_prints_the_summary_on_resolve_and_the_file() -> None:
    from tests.test_cli import bot_cli

    env = {
        "DATABASE_URL": "postgresql://127.0.0.1:9/none",  # incidents need no target
        "STATE_DATABASE_URL": fresh_state_url(),  # a copy of the migrated template
        "ROLE_MAP": json.dumps({"U0ONCALL": "REVIEWER"}),
    }

    def run(text: str) -> str:
        done = bot_cli("run", text, "--user", "U0ONCALL", env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("incident start Console drill sev3")
    run("incident update We're on it")
    refused = run("incident template tech")
    assert "tech.md.j2 needs affected" in refused
    resolved = run("incident resolve")
    assert "Summary of incident #1: Console drill" in resolved
    assert "Communication" in resolved and "Full recovery" in resolved
    file = run("incident summary --file")
    assert "# Incident #1: Console drill" in file and "## Timeline (3 events, UTC)" in file
    assert "update: We're on it" in file.split("## Timeline")[1]


async def test_an_override_is_previewed_and_a_broken_one_is_refused(
    ibot: RunningBot, tmp_path: Path
) -> None:
    comms = ibot.service.comms
    assert comms is not None
    comms.template_dir = tmp_path  # as TEMPLATE_DIR would set it
    (tmp_path / "user.md.j2").write_text("Ours: {{ title }}, {{ duration }} so far\n")
    (tmp_path / "tech.md.j2").write_text("Broken: {{ title \n")
    await command(ibot, "incident start Override <drill>")
    clock_of(ibot).advance(minutes=3)
    await command(ibot, "incident template user")
    text = blocks_text(preview_of(ibot))
    assert "Ours: Override &lt;drill&gt;, 3m00s so far" in text
    await command(ibot, "incident template tech")
    await ibot.fake.wait_for("response_url", count=2)
    assert any("`tech.md.j2` cannot be rendered" in t for t in told(ibot.fake))


async def test_a_real_recover_feeds_the_templates_and_the_summary(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    """`/db recover` in the incident channel: its verification joins the timeline, and the
    tech alert and the summary read their figures from it."""
    channel = "C0RECOVERED"
    settings = bot_settings(leaps_dsn, fake_slack, role_map={ALICE: "REVIEWER"}, coalesce_s=0)
    async with running_bot(settings, fake_slack) as bot:
        incidents, comms = bot.service.incidents, bot.service.comms
        assert incidents is not None and comms is not None
        assert await bot.service.take_baseline()  # the healthy state, before the incident
        await command(bot, "incident start Restore drill sev2", channel=channel)
        incident = await incidents.store.active_in(channel)
        assert incident is not None
        await command(bot, "incident resolve", channel=channel)  # a clean one closes only then
        await command(bot, "recover", channel=channel)
        events = await incidents.store.timeline(incident.id)
        verification = last_verification(events)
        assert verification is not None and verification.clean
        assert {m.name: m.pct for m in verification.metrics}["users"] == 100.0
        done = await incidents.store.get(incident.id)
        assert done is not None and done.state == "recovered"  # the clean verification
        text = await comms.render(done, "tech")
        assert "Recovery complete" in text and "• users: 100 %" in text
        assert "no rows missing against the" in text
        summary = (await comms.summary(done, file=False)).message
        assert "(clean)" in blocks_text_of(summary.blocks_json())


def blocks_text_of(blocks: list[dict[str, object]]) -> str:
    return json.dumps(blocks)
