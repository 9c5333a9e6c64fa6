"""Renderings keep Slack's limits and say what they left out."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bot import render
from commands.base import Finding, Report, Status
from tests.fakeslack import block_errors

statuses = st.sampled_from(list(Status))
texts = st.text(max_size=4000)
rows = st.lists(
    st.dictionaries(st.sampled_from(["pid", "query", "user"]), st.text(max_size=500), max_size=3),
    max_size=40,
)
findings = st.builds(
    Finding,
    check=st.text(min_size=1, max_size=80),
    status=statuses,
    summary=texts,
    rows=rows,
    hint=st.none() | st.text(max_size=300),
)


@settings(max_examples=60, deadline=None)
@given(found=st.lists(findings, max_size=80))
def test_slack_message_respects_limits(found: list[Finding]) -> None:
    report = Report(title="Database health", target="h:5432/db", findings=found)
    message = render.to_slack(report, table_buttons=True)
    blocks = render.sign_table_buttons(message.blocks_json(), lambda check: "signed." + check * 30)
    assert not block_errors(blocks)
    assert len(blocks) <= render.MAX_BLOCKS
    for block in blocks:
        if block["type"] == "section":
            assert len(block["text"]["text"]) <= render.MAX_SECTION_CHARS
        if block["type"] == "header":
            assert len(block["text"]["text"]) <= render.MAX_HEADER_CHARS
    shown = sum(1 for b in blocks if b["type"] == "section")
    if shown < len(found):
        assert f"{len(found) - shown} more findings not shown" in json.dumps(blocks)


def test_worst_first_everywhere() -> None:
    report = Report(
        title="t",
        target="x",
        findings=[
            Finding(check="a", status=Status.OK, summary="fine"),
            Finding(check="b", status=Status.WARN, summary="hmm"),
            Finding(check="c", status=Status.CRIT, summary="bad"),
            Finding(check="d", status=Status.SKIPPED, summary="timed out"),
        ],
    )
    text = render.to_text(report)
    assert text.index("[CRIT") < text.index("[WARN") < text.index("[SKIPPED") < text.index("[OK")
    data = json.loads(render.to_json(report))
    assert [f["status"] for f in data["findings"]] == ["crit", "warn", "skipped", "ok"]
    assert set(data) == {"title", "target", "findings"}
    assert set(data["findings"][0]) == {"check", "status", "summary", "rows", "hint"}
    assert report.worst is Status.CRIT


def test_cut_tables_offer_the_full_table_button() -> None:
    many = [{"pid": i, "query": "SELECT 1"} for i in range(30)]
    few = [{"pid": i, "query": "SELECT 1"} for i in range(3)]
    report = Report(
        title="t",
        target="x",
        findings=[
            Finding(check="blocked sessions", status=Status.CRIT, summary="30 blocked", rows=many),
            Finding(check="idle in transaction", status=Status.WARN, summary="3", rows=few),
            Finding(check="by user", status=Status.OK, summary="fine", rows=many),
        ],
    )
    message = render.to_slack(report, table_buttons=True)
    blocks = render.sign_table_buttons(message.blocks_json(), lambda check: f"ref:{check}")
    assert "25 more rows" in json.dumps(blocks)
    buttons = [b["accessory"] for b in blocks if "accessory" in b]
    assert buttons == [
        {
            "type": "button",
            "text": {"type": "plain_text", "text": "Full table (30 rows) as CSV", "emoji": True},
            "action_id": render.FULL_TABLE,
            "value": "ref:blocked sessions",
        }
    ]
    assert not any("accessory" in b for b in render.to_slack(report).blocks_json())
    too_long = render.sign_table_buttons(message.blocks_json(), lambda check: "x" * 2001)
    assert not any("accessory" in b for b in too_long)
    csv_text = render.rows_csv(many)
    assert csv_text.count("\n") == 31
    assert render.csv_filename("guard: AMPLIFY quota") == "guard_AMPLIFY_quota.csv"


def test_utc_times_in_summaries_become_slack_dates() -> None:
    summary = "last refreshed by the bot 5m00s ago (plain), at 2026-11-30T07:45:12Z"
    report = Report(
        title="t", target="x", findings=[Finding(check="v", status=Status.OK, summary=summary)]
    )
    slack = json.dumps(render.to_slack(report).blocks_json())
    assert "at <!date^1796024712^{date_short_pretty} {time}|2026-11-30T07:45:12Z>" in slack
    assert "at 2026-11-30T07:45:12Z" in render.to_text(report)
    assert render.plain_dates(render.slack_times(summary)) == summary
