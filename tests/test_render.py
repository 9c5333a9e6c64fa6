"""Renderings keep Slack's limits and say what they left out."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bot import render
from commands.base import Finding, Report, Status

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
    message = render.to_slack(report)
    blocks = message.blocks_json()
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


def test_big_tables_go_as_csv_and_are_counted_in_the_message() -> None:
    many = [{"pid": i, "query": "SELECT 1"} for i in range(30)]
    report = Report(
        title="t",
        target="x",
        findings=[
            Finding(check="blocked sessions", status=Status.CRIT, summary="30 blocked", rows=many)
        ],
    )
    message = render.to_slack(report)
    assert "25 more rows" in json.dumps(message.blocks_json())
    ((name, content),) = message.files
    assert name == "blocked_sessions.csv"
    assert content.count("\n") == 31
