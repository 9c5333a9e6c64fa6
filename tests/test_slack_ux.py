"""Slack that reads well, over signed HTTP into the real bot: the full-table button, the
approval's parent message, the approver group mention, the confirm dialog on data-destroying
remedies, `<!date>` times and remedies with nothing to do."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from io import StringIO
from typing import Any

import pytest_asyncio

from bot.messages import render
from bot.messages.notify import ConsoleNotifier
from commands.base import Report
from commands.fixture.faults import FaultInjector
from tests.conftest import RunningBot, bot_settings, running_bot
from tests.fakeslack import Call, FakeSlack
from tests.slackreq import action_body, signed_headers
from tests.test_approvals import (
    ADMIN,
    ADMIN2,
    CHANNEL,
    REQUESTER,
    ROLES,
    Victims,
    audit_actions,
    button_value,
    press,
    request,
    settle,
)

ASKER, OUTSIDER = "U0ALICE", "U0NOBODY"
IDLE_SESSIONS = 8  # more than a message shows (render.ROWS_IN_MESSAGE)
GROUP = "S0ONCALL"


@pytest_asyncio.fixture(loop_scope="session")
async def victims(leaps_dsn: str) -> AsyncIterator[Victims]:
    v = Victims(leaps_dsn)
    yield v
    await v.close()


def table_button(call: Call, check: str) -> dict[str, Any]:
    """The full-table button of one finding in a posted report."""
    for block in call.params.get("blocks", []):
        accessory = block.get("accessory")
        if accessory and block["text"]["text"].split("\n")[0].endswith(f"{check}*"):
            return dict(accessory)
    raise AssertionError(f"no full-table button on {check}")


async def click(bot: RunningBot, value: str, *, user: str, channel: str, message_ts: str) -> None:
    body = action_body(
        action_id=render.FULL_TABLE,
        value=value,
        user=user,
        channel=channel,
        message_ts=message_ts,
        response_url=bot.fake.response_url(user),
    )
    resp = await bot.http.post(f"{bot.url}/slack/events", data=body, headers=signed_headers(body))
    await resp.read()
    assert resp.status == 200


def uploaded_csv(fake: FakeSlack, complete: Call) -> list[dict[str, str]]:
    (entry,) = complete.params["files"]
    content = fake.uploads[entry["id"]].decode()
    return list(csv.DictReader(io.StringIO(content)))


async def idle_in_transaction(faults: FaultInjector, n: int) -> set[str]:
    pids = {str(await faults.idle_in_transaction()) for _ in range(n)}
    await asyncio.sleep(1.2)  # past the lowered idle-in-transaction thresholds
    return pids


def whispers(fake: FakeSlack) -> list[str]:
    return [str(c.params.get("text", "")) for c in fake.calls_to("chat.postEphemeral")]


# --- the full table ---------------------------------------------------------------------


async def test_full_table_of_an_in_channel_report_goes_to_its_thread(
    leaps_dsn: str, fake_slack: FakeSlack, faults: FaultInjector
) -> None:
    pids = await idle_in_transaction(faults, IDLE_SESSIONS)
    settings = bot_settings(
        leaps_dsn,
        fake_slack,
        incident_channels=[CHANNEL],
        role_map={ASKER: "REVIEWER", ADMIN: "ADMIN", OUTSIDER: "PARTICIPANT"},
        diagnostics_role="REVIEWER",
    )
    async with running_bot(settings, fake_slack) as bot:
        await bot.slash("health", channel=CHANNEL, user=ASKER)
        (report,) = await fake_slack.wait_for("chat.postMessage", timeout=15)
        assert f"{IDLE_SESSIONS - render.ROWS_IN_MESSAGE} more rows" in json.dumps(
            report.params["blocks"]
        )
        button = table_button(report, "idle in transaction")
        assert button["text"]["text"] == f"Full table ({IDLE_SESSIONS} rows) as CSV"
        report_ts = str(report.response["ts"])

        # someone else in the channel without the diagnostics role: refused
        await click(bot, button["value"], user=OUTSIDER, channel=CHANNEL, message_ts=report_ts)
        await settle(bot)
        assert any("You need the role REVIEWER" in t for t in whispers(fake_slack))
        assert not fake_slack.calls_to("files.completeUploadExternal")

        # another on-call engineer may fetch it: the reply was in channel
        await click(bot, button["value"], user=ADMIN, channel=CHANNEL, message_ts=report_ts)
        (complete,) = await fake_slack.wait_for("files.completeUploadExternal", timeout=15)
        await settle(bot)
        assert complete.params["channel_id"] == CHANNEL
        assert complete.params["thread_ts"] == report_ts
        assert "idle in transaction" in complete.params["initial_comment"]
        assert {r["pid"] for r in uploaded_csv(fake_slack, complete)} == pids
        assert not fake_slack.calls_to("conversations.open")

        # the channel refuses the file (bot not a member): the clicker gets it by DM
        fake_slack.fail_next("files.completeUploadExternal", status=200, error="not_in_channel")
        await click(bot, button["value"], user=ADMIN, channel=CHANNEL, message_ts=report_ts)
        await fake_slack.wait_for("files.completeUploadExternal", count=3, timeout=15)
        await settle(bot)
    dm = fake_slack.calls_to("files.completeUploadExternal")[-1]
    assert dm.params["channel_id"] == "D" + ADMIN[1:]
    assert {r["pid"] for r in uploaded_csv(fake_slack, dm)} == pids


async def test_full_table_of_an_ephemeral_report_goes_to_a_dm(
    bot: RunningBot, faults: FaultInjector
) -> None:
    pids = await idle_in_transaction(faults, IDLE_SESSIONS)
    await bot.slash("health", channel="C0GENERAL", user=ASKER)
    (report,) = await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    value = table_button(report, "idle in transaction")["value"]
    bot.fake.reset()

    await click(bot, value, user=ASKER, channel="C0GENERAL", message_ts="")
    (complete,) = await bot.fake.wait_for("files.completeUploadExternal", timeout=15)
    await settle(bot)
    (opened,) = bot.fake.calls_to("conversations.open")
    assert opened.params["users"] == ASKER
    assert complete.params["channel_id"] == "D" + ASKER[1:]
    assert {r["pid"] for r in uploaded_csv(bot.fake, complete)} == pids
    assert any("in your DM" in t for t in whispers(bot.fake))


async def test_tampered_or_borrowed_full_table_buttons_are_refused(
    bot: RunningBot, faults: FaultInjector
) -> None:
    await idle_in_transaction(faults, IDLE_SESSIONS)
    await bot.slash("health", channel="C0GENERAL", user=ASKER)
    (report,) = await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    value = table_button(report, "idle in transaction")["value"]
    mac, _, payload = value.partition(".")
    forged = mac + "." + payload.replace('"health"', '"integrity"')
    bot.fake.reset()

    await click(bot, forged, user=ASKER, channel="C0GENERAL", message_ts="")
    await click(bot, value, user=ASKER, channel="C0ELSEWHERE", message_ts="")
    await click(bot, value, user="U0BOB", channel="C0GENERAL", message_ts="")  # not his reply
    await settle(bot)
    assert whispers(bot.fake).count("This button is not valid here.") == 3
    assert (await audit_actions(bot)).count("payload.tampered") == 3
    assert not bot.fake.calls_to("files.getUploadURLExternal")
    assert not bot.fake.calls_to("conversations.open")


# --- approvals: parent message, group mention, confirm, dates, nothing to do -------------


def parent_of(fake: FakeSlack) -> Call:
    (parent,) = [c for c in fake.calls_to("chat.postMessage") if not c.params.get("thread_ts")]
    return parent


async def parent_update(fake: FakeSlack, parent: Call) -> Call:
    ts = str(parent.response["ts"])
    (update,) = await fake.wait_for(
        "chat.update", timeout=15, predicate=lambda c: c.params.get("ts") == ts
    )
    return update


@pytest_asyncio.fixture(loop_scope="session")
async def gbot(leaps_dsn: str, fake_slack: FakeSlack) -> AsyncIterator[RunningBot]:
    settings = bot_settings(
        leaps_dsn, fake_slack, role_map=ROLES, role_groups={GROUP: "ADMIN", "S0READ": "REVIEWER"}
    )
    async with running_bot(settings, fake_slack) as bot:
        yield bot


async def test_parent_mentions_the_approver_group_and_shows_the_outcome(
    gbot: RunningBot, victims: Victims
) -> None:
    await victims.open(3)
    await asyncio.sleep(0.3)
    plan = await request(gbot, "kill-idle 0")
    parent = parent_of(gbot.fake)
    assert f"<!subteam^{GROUP}>" in parent.params["text"]
    assert "<!subteam^S0READ>" not in parent.params["text"]
    assert "<!date^" in parent.params["text"]
    await press(gbot, plan, ADMIN)
    await settle(gbot)
    update = await parent_update(gbot.fake, parent)
    text = str(update.params["text"])
    assert ":white_check_mark: done <!date^" in text
    assert f"approved by <@{ADMIN}>" in text and "affected 3" in text
    plan_text = json.dumps(gbot.fake.message(CHANNEL, str(plan.response["ts"])))
    assert re.search(rf"approved by <@{ADMIN}> \(<!date\^\d+\^", plan_text)  # decided at
    assert "<!subteam^" not in text  # nobody is needed any more
    assert gbot.fake.message(CHANNEL, str(parent.response["ts"]))["text"] == text  # type: ignore[index]


async def test_parent_shows_rejection(gbot: RunningBot, victims: Victims) -> None:
    await victims.open(1)
    await asyncio.sleep(0.3)
    plan = await request(gbot, "kill-idle 0")
    parent = parent_of(gbot.fake)
    await press(gbot, plan, ADMIN2, "dbops_reject")
    await settle(gbot)
    text = str((await parent_update(gbot.fake, parent)).params["text"])
    assert ":no_entry_sign: rejected <!date^" in text and f"by <@{ADMIN2}>" in text


async def test_parent_shows_expiry(leaps_dsn: str, fake_slack: FakeSlack, victims: Victims) -> None:
    settings = bot_settings(leaps_dsn, fake_slack, role_map=ROLES, approval_ttl_s=0.5)
    async with running_bot(settings, fake_slack) as bot:
        await victims.open(1)
        await asyncio.sleep(0.3)
        plan = await request(bot, "kill-idle 0")
        parent = parent_of(fake_slack)
        assert "<!subteam^" not in parent.params["text"]  # no ROLE_GROUPS set
        await asyncio.sleep(0.8)
        await press(bot, plan, ADMIN)
        await settle(bot)
        text = str((await parent_update(fake_slack, parent)).params["text"])
    assert ":alarm_clock: expired" in text


async def test_parent_shows_failure_with_its_reason(
    gbot: RunningBot, victims: Victims, leaps_dsn: str
) -> None:
    """A session the plan counted is gone at execution: drift aborts, the channel says why."""
    await victims.open(2)
    await asyncio.sleep(0.3)
    plan = await request(gbot, "kill-idle 0")
    parent = parent_of(gbot.fake)
    await victims.close()
    await asyncio.sleep(0.3)
    await press(gbot, plan, ADMIN)
    await settle(gbot)
    text = str((await parent_update(gbot.fake, parent)).params["text"])
    assert re.search(r":(x|no_entry): (failed|aborted) <!date\^", text), text
    assert "drift" in text or "nothing was changed" in text


async def test_approve_on_a_data_destroying_remedy_asks_to_confirm(
    gbot: RunningBot, faults: FaultInjector
) -> None:
    await faults.orphan_submissions(3)
    plan = await request(gbot, "cleanup-orphans submissions")
    (actions,) = [b for b in plan.params["blocks"] if b["type"] == "actions"]
    approve, reject = actions["elements"]
    confirm = approve["confirm"]
    assert confirm["style"] == "danger"
    assert "3 rows" in confirm["title"]["text"]
    assert "*3* rows" in confirm["text"]["text"] and "dbops_backup" in confirm["text"]["text"]
    assert "confirm" not in reject


async def test_kill_idle_approve_has_no_confirm_and_times_are_slack_dates(
    gbot: RunningBot, victims: Victims
) -> None:
    await victims.open(1)
    await asyncio.sleep(0.3)
    plan = await request(gbot, "kill-idle 0")
    (actions,) = [b for b in plan.params["blocks"] if b["type"] == "actions"]
    assert "confirm" not in actions["elements"][0]
    assert gbot.service.store is not None
    approval = await gbot.service.store.get_approval(button_value(plan).split(".")[0])
    assert approval is not None
    epoch = int(approval.expires_at.timestamp())
    iso = approval.expires_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    token = f"<!date^{epoch}^{{date_short_pretty}} {{time}}|{iso}>"
    assert f"expires {token}" in json.dumps(plan.params["blocks"]).replace("\\", "")
    assert "UTC" not in json.dumps(plan.params["blocks"]).replace(iso, "")


async def test_nothing_to_do_tells_only_the_requester(gbot: RunningBot) -> None:
    resp = await gbot.slash("cleanup-orphans", channel=CHANNEL, user=REQUESTER)
    assert resp.status == 200
    (note,) = await gbot.fake.wait_for("chat.postEphemeral", timeout=15)
    await settle(gbot)
    assert note.params["user"] == REQUESTER
    assert note.params["text"].startswith("`/db cleanup-orphans`: nothing to do: no orphaned rows")
    assert not gbot.fake.calls_to("chat.postMessage")
    actions = await audit_actions(gbot)
    assert "remedy.nothing_to_do" in actions and "approval.requested" not in actions


async def test_console_shows_utc_iso_times() -> None:
    at = datetime(2026, 11, 30, 7, 45, 12, tzinfo=UTC)
    token = render.slack_date(at)
    assert (
        token
        == f"<!date^{int(at.timestamp())}^{{date_short_pretty}} {{time}}|2026-11-30T07:45:12Z>"
    )
    out = StringIO()
    await ConsoleNotifier(out).update_request("console", "console.1", f"done {token}")
    assert out.getvalue() == "done 2026-11-30T07:45:12Z\n"


async def test_refresh_times_in_views_are_slack_dates(gbot: RunningBot) -> None:
    """The refresh log's UTC time reaches Slack as a date token, the console as ISO."""
    await request(gbot, "refresh-views")  # every view is concurrently refreshable: runs at once
    await settle(gbot)
    gbot.fake.reset()
    await gbot.slash("views", channel=CHANNEL, user=REQUESTER)
    (report,) = await gbot.fake.wait_for("chat.postEphemeral", timeout=15)
    text = json.dumps(report.params["blocks"])
    assert re.search(r"last refreshed by the bot [^\"]*, at <!date\^\d+\^", text), text
    assert not re.search(r"\d{2}:\d{2}:\d{2}Z(?!>)", text), "a UTC time outside a date token"
    assert gbot.service.store is not None
    log = (await gbot.service.store.last_refreshes()).values()
    finished = max(e.finished_at for e in log if e.finished_at is not None)
    assert render.slack_date(finished) in text

    console = await gbot.service.dispatcher.run("views")
    assert isinstance(console, Report)
    assert render.utc_iso(finished) in render.to_text(console)
