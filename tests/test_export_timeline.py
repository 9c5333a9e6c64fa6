"""`/db export` in a channel with an open incident joins its timeline, as diagnostics do:
who started which export, then its rows and size (equal to the uploaded file) or why it
failed. An export in a channel without an open incident leaves no trace in any timeline."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest_asyncio

from bot.incidents.service import IncidentService
from bot.state import Incident, IncidentEvent
from tests.conftest import RunningBot, bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.test_export import ASKER, OTHER, progress_of, settle, table, uploaded

CHANNEL = "C0EXPINC"


@pytest_asyncio.fixture(loop_scope="session")
async def ebot(leaps_dsn: str, fake_slack: FakeSlack) -> AsyncIterator[RunningBot]:
    settings = bot_settings(leaps_dsn, fake_slack, incident_channels=[CHANNEL])
    async with running_bot(settings, fake_slack) as running:
        yield running


def service(bot: RunningBot) -> IncidentService:
    assert bot.service.incidents is not None
    return bot.service.incidents


async def run(bot: RunningBot, text: str, user: str = ASKER) -> None:
    resp = await bot.slash(text, channel=CHANNEL, user=user)
    assert resp.status == 200
    await settle(bot)


async def incident_of(bot: RunningBot) -> Incident:
    incident = await service(bot).store.active_in(CHANNEL)
    assert incident is not None
    return incident


async def exports_in(bot: RunningBot, incident: Incident) -> list[IncidentEvent]:
    return [e for e in await service(bot).store.timeline(incident.id) if e.kind == "export"]


async def test_an_export_joins_the_open_incident_with_its_rows_and_size(
    ebot: RunningBot, leaps_dsn: str
) -> None:
    await run(ebot, "export submissions")  # no incident yet: no timeline to join
    await run(ebot, "incident start Ledger totals wrong")
    incident = await incident_of(ebot)
    assert incident.responded_at is None and await exports_in(ebot, incident) == []
    ebot.fake.calls.clear()

    await run(ebot, "export ledger", user=OTHER)
    (complete,) = ebot.fake.calls_to("files.completeUploadExternal")
    size = len(uploaded(ebot.fake, complete))
    rows = len(await table(leaps_dsn, "ledger"))
    started, done = await exports_in(ebot, incident)
    assert (started.actor_id, done.actor_id) == (OTHER, OTHER)
    assert started.text == "started `/db export ledger`" and started.detail["kind"] == "ledger"
    assert done.detail["rows"] == rows and done.detail["bytes"] == size
    assert f"`/db export ledger` done: {rows:,} rows, " in done.text
    assert done.detail["ts"] == progress_of(ebot.fake, OTHER).response["ts"]
    # a person exporting data is a response to the incident, like running a diagnostic
    assert (await incident_of(ebot)).responded_at == started.at

    await run(ebot, "incident timeline")
    (posted,) = [
        c
        for c in ebot.fake.calls_to("chat.postMessage")
        if "Timeline of incident" in str(c.params.get("text"))
    ]
    shown = json.dumps(posted.params["blocks"])
    assert f"<@{OTHER}> started `/db export ledger`" in shown
    assert f"<@{OTHER}> `/db export ledger` done: {rows:,} rows" in shown


async def test_a_failed_export_says_why_in_the_timeline(ebot: RunningBot) -> None:
    await run(ebot, "incident start Exports failing")
    incident = await incident_of(ebot)
    ebot.fake.fail_next("file_upload", status=500, times=1, retry_after=0, error="x")
    await run(ebot, "export ledger --since 2025-01-01")
    started, failed = await exports_in(ebot, incident)
    assert started.text == "started `/db export ledger since 2025-01-01`"
    assert failed.actor_id == ASKER
    assert failed.text == (
        "`/db export ledger since 2025-01-01` failed: Slack refused the upload (upload_http_500)"
    )
    assert failed.detail["reason"] == "Slack refused the upload (upload_http_500)"
    assert failed.detail["since"] == "2025-01-01" and failed.detail["rows"] > 0
