"""Renderings keep Slack's limits and say what they left out."""

from __future__ import annotations

import asyncio
import io
import json
import re
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.messages import render
from bot.messages.notify import ConsoleNotifier
from commands.base import Finding, Report, Status
from commands.remedies.base import Outcome, Plan, PlanStep
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


# --- values are data, not markup ------------------------------------------------------------

CONTROLS = ["<!channel>", "<!here>", "<http://evil.example|click>", "<@U0ADMIN>", "a & b", "x>y"]
hostile = st.lists(
    st.sampled_from([*CONTROLS, "count(*)", "SELECT t.*", "`", "*bold*", " "]), max_size=6
).map("".join)


def mrkdwn_texts(message: render.SlackMessage) -> list[str]:
    """Every text Slack reads as mrkdwn: section and context texts, and the fallback."""
    texts = [message.text]
    for block in message.blocks_json():
        if block["type"] == "section":
            texts.append(block["text"]["text"])
        if block["type"] == "context":
            texts += [e["text"] for e in block["elements"] if e.get("type") == "mrkdwn"]
    return texts


def assert_no_controls(text: str, allowed: str = r"(?!)") -> None:
    """No `<…>` Slack would act on (except the bot's own `allowed` ones), no bare `&`."""
    rest = re.sub(allowed, "", text)
    assert "<" not in rest and ">" not in rest, text
    assert re.fullmatch(r"([^&]|&(amp|lt|gt);)*", rest, re.DOTALL), text


@settings(max_examples=60, deadline=None)
@given(check=hostile, summary=hostile, hint=hostile, cell_=hostile, target=hostile)
def test_report_values_never_become_slack_controls(
    check: str, summary: str, hint: str, cell_: str, target: str
) -> None:
    report = Report(
        title="Database health",
        target=target,
        findings=[
            Finding(
                check=check or "c",
                status=Status.WARN,
                summary=summary,
                hint=hint or None,
                rows=[{"app": cell_, "query": cell_}],
            )
        ],
    )
    for text in mrkdwn_texts(render.to_slack(report)):
        assert_no_controls(text)


def test_channel_ping_and_links_are_shown_escaped() -> None:
    report = Report(
        title="Connections",
        target="h:5432/leaps",
        findings=[
            Finding(
                check="sessions",
                status=Status.CRIT,
                summary="app <!channel> holds 3 & more",
                rows=[{"app": "<!channel>", "query": "SELECT '…' /* <http://evil|click> */"}],
                hint="cancel one with `/db cancel <pid>`",
            )
        ],
    )
    shown = json.dumps(render.to_slack(report).blocks_json())
    assert "app &lt;!channel&gt; holds 3 &amp; more" in shown
    assert "&lt;http://evil|click&gt;" in shown and "<http" not in shown
    assert "`/db cancel &lt;pid&gt;`" in shown
    text = render.to_text(report)
    assert "<!channel>" in text and "<http://evil|click>" in text and "&lt;" not in text


def hostile_plan(value: str) -> tuple[Plan, Outcome]:
    plan = Plan(
        remedy="kill-idle",
        args=[value],
        title=f"Terminate {value}",
        summary=f"sessions of {value}",
        steps=[
            PlanStep(sql="SELECT t.*, count(*) FROM t WHERE app = %s", params=[value], note=value)
        ],
        targets=[{"pid": 1, "app": value}],
        count=1,
        backup=value,
        warnings=[value],
    )
    outcome = Outcome(
        ok=False, summary=f"failed: {value}", error=f"ERROR {value}", rows=[{"app": value}],
        offers=[f"terminate {value}"], backup_table=value, affected=1,
    )  # fmt: skip
    return plan, outcome


def approval(plan: Plan, outcome: Outcome | None, state: str = "pending") -> render.SlackMessage:
    return render.approval_message(
        approval_id="a1b2",
        plan=plan,
        state=state,
        requester_id="U0REQ",
        needed=1,
        approver_role="ADMIN",
        approved_by=["U0ANN"],
        expires_at=datetime(2026, 1, 1, 12, 0, tzinfo=UTC),
        outcome=outcome,
        limits="one transaction",
        button_value="v",
    )


DATE_TOKEN = r"<!date\^\d+\^\{date_short_pretty\} \{time\}\|[0-9TZ:-]+>"  # the bot's own times


@settings(max_examples=40, deadline=None)
@given(value=hostile, state=st.sampled_from(["pending", "failed", "done"]))
def test_approval_message_escapes_every_value_but_keeps_its_mentions(
    value: str, state: str
) -> None:
    plan, outcome = hostile_plan(value)
    message = approval(plan, outcome, state)
    for text in mrkdwn_texts(message):
        # the bot's own mentions (requester, approvers) stay controls, on purpose
        assert_no_controls(text, allowed=r"<@U0(REQ|ANN)>|" + DATE_TOKEN)
    assert "<@U0ANN>" in json.dumps(message.blocks_json())


def test_console_shows_sql_and_values_as_written() -> None:
    plan, outcome = hostile_plan("<!channel>")
    message = approval(plan, outcome, "failed")
    assert "SELECT t.*, count(*) FROM t" in message.console
    assert "Terminate <!channel>" in message.console and "&lt;" not in message.console
    out = io.StringIO()
    asyncio.run(ConsoleNotifier(out).post_plan("console", "1", message))
    assert "-- <!channel>\nSELECT t.*, count(*) FROM t WHERE app = %s;" in out.getvalue()
    assert "failed: <!channel>" in out.getvalue()
    plain = render.plan_text(plan, m=render.PLAIN)
    assert plain.splitlines()[0] == "Terminate <!channel>"
    assert "*" not in plain.replace("count(*)", "").replace("t.*", "")
    slack = render.plan_text(plan)
    assert slack.splitlines()[0] == "*Terminate &lt;!channel&gt;*"
