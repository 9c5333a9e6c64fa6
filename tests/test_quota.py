"""`/db quota`: resolving a user every way Slack and people name them, and the AMPLIFY
week against the live quota rule, on a real fixture database with real faults."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from bot.gateway import TargetGateway
from bot.router import Answer, Dispatcher, RunContext
from commands import quota as quota_module
from commands.base import Finding, Report, Status, Thresholds
from commands.fixture.faults import FaultInjector
from commands.quota import keys_required, live_limits, other_spelling
from tests.conftest import RunningBot
from tests.test_health_e2e import section_texts


@pytest_asyncio.fixture(loop_scope="session")
async def dispatcher(leaps_dsn: str) -> AsyncIterator[Dispatcher]:
    gateway = TargetGateway(leaps_dsn)
    await gateway.open()
    try:
        yield Dispatcher(RunContext(gateway, Thresholds()), coalesce_s=0.0)
    finally:
        await gateway.close()


async def rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description is not None else []


async def report_of(d: Dispatcher, text: str) -> Report:
    result = await d.run(text)
    assert isinstance(result, Report), result
    return result


def finding(report: Report, check: str) -> Finding:
    (found,) = [f for f in report.findings if f.check == check]
    return found


async def amplify_user(dsn: str) -> tuple[str, str, int, int]:
    """A participant with AMPLIFY submissions this week: (handle, email, peers, students),
    the sums counted here independently of the bot."""
    (row,) = await rows(
        dsn,
        "SELECT u.handle, u.email, sum((s.payload->>'peers_trained')::int)::int,"
        " sum((s.payload->>'students_trained')::int)::int"
        " FROM users u JOIN submissions s ON s.user_id = u.id AND s.activity_code = 'AMPLIFY'"
        " WHERE s.created_at >= (now() AT TIME ZONE 'UTC') - interval '7 days'"
        "   AND u.email <> lower(u.email)"
        " GROUP BY u.handle, u.email ORDER BY u.handle LIMIT 1",
    )
    return str(row[0]), str(row[1]), int(row[2]), int(row[3])


async def quiet_user(dsn: str) -> tuple[str, str]:
    """A participant with no AMPLIFY submission at all: (id, handle)."""
    (row,) = await rows(
        dsn,
        "SELECT id, handle FROM users u WHERE role = 'PARTICIPANT' AND NOT EXISTS"
        " (SELECT 1 FROM submissions s WHERE s.user_id = u.id AND s.activity_code = 'AMPLIFY')"
        " ORDER BY id LIMIT 1",
    )
    return str(row[0]), str(row[1])


async def add_amplify(
    dsn: str, user_id: str, payloads: list[dict[str, Any]], age_h: float = 1.0
) -> None:
    """Snake_case payloads as the application writes them; camelCase ones as older
    versions did, before the payload CHECK existed (see FaultInjector.legacy_amplify)."""
    legacy = [p for p in payloads if "peers_trained" not in p]
    if legacy:
        async with FaultInjector(dsn) as inj:
            await inj.legacy_amplify(user_id, legacy, age_hours=age_h)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for payload in (p for p in payloads if "peers_trained" in p):
            await conn.execute(
                "INSERT INTO submissions (id, user_id, activity_code, status, payload,"
                " created_at, updated_at) VALUES (%s, %s, 'AMPLIFY', 'PENDING', %s,"
                " (now() AT TIME ZONE 'UTC') - make_interval(secs => %s * 3600),"
                " (now() AT TIME ZONE 'UTC') - make_interval(secs => %s * 3600))",
                (f"qt_{uuid.uuid4().hex[:12]}", user_id, json.dumps(payload), age_h, age_h),
            )


# --- the rule, parsed from function source ----------------------------------------


def test_limits_are_read_from_function_source() -> None:
    source = """
      add_peers := coalesce((NEW.payload ->> 'peersTrained')::integer, 0);
      SELECT sum((s.payload->>'studentsTrained')::integer) INTO week_students FROM s;
      IF week_peers + add_peers > 75 THEN RAISE EXCEPTION 'Peer training limit exceeded';
      END IF;
      IF (week_students + add_students) >= 301 THEN RAISE EXCEPTION 'x'; END IF;
    """
    assert live_limits(source) == {"peers": 75, "students": 300}
    assert live_limits("RAISE 'Student training limit exceeded (% > 120)'") == {"students": 120}
    assert other_spelling("peers_trained") == "peersTrained"
    assert other_spelling("studentsTrained") == "students_trained"


AMPLIFY_CHECK = (
    "CHECK (((activity_code <> 'AMPLIFY'::text) OR\nCASE\n    WHEN ((jsonb_typeof((payload ->"
    " 'peers_trained'::text)) = 'number'::text) AND ((payload ->> 'students_trained'::text) ~"
    " '^[0-9]{1,9}$'::text)) THEN (((payload ->> 'peers_trained'::text))::integer <= 50)\n"
    "    ELSE false\nEND))"
)


def test_what_a_check_constraint_proves_about_the_payload_keys() -> None:
    """A CHECK passes a row whose expression is NULL: only an expression that is false
    without the key proves the key is there; any other shape proves nothing."""
    assert keys_required(AMPLIFY_CHECK) == {"peers_trained", "students_trained"}
    guard = "CHECK (((activity_code <> 'AMPLIFY'::text) OR {}))"
    assert keys_required(guard.format("(payload ->> 'peersTrained'::text) IS NOT NULL")) == {
        "peersTrained"
    }
    unproven = [
        # NULL without the key, so the row passes
        "(jsonb_typeof((payload -> 'peers_trained'::text)) = 'number'::text)",
        "CASE WHEN (payload ? 'peers_trained'::text) THEN true ELSE true END",
        "CASE WHEN (payload ? 'peers_trained'::text) THEN true END",
        "((payload ? 'peers_trained'::text) OR (payload ? 'peersTrained'::text))",
        "((payload -> 'peers_trained'::text) IS NOT NULL) OR true",
        "CASE WHEN (x = 1) THEN true WHEN (payload ? 'peers_trained'::text) THEN true"
        " ELSE false END",
    ]
    for rest in unproven:
        assert keys_required(guard.format(rest)) == frozenset(), rest
    assert keys_required(AMPLIFY_CHECK.replace("'AMPLIFY'", "'LEARN'")) == frozenset()
    assert keys_required("CHECK ((payload ? 'peers_trained'::text))") == frozenset()


# --- resolving the user ------------------------------------------------------------


async def test_quota_by_handle_reports_totals_limits_and_trigger(
    leaps_dsn: str, dispatcher: Dispatcher
) -> None:
    handle, _email, peers, students = await amplify_user(leaps_dsn)
    report = await report_of(dispatcher, f"quota @{handle.upper()}")
    q = finding(report, "AMPLIFY quota")
    assert q.status is Status.OK
    assert f"`{handle}`" in q.summary
    assert f"peers {peers}/50 ({50 - peers} left)" in q.summary
    assert f"students {students}/200 ({200 - students} left)" in q.summary
    assert "limits read from public.check_amplify_quota()" in q.summary
    assert q.rows and {"id", "status", "created_at", "peers", "students"} <= set(q.rows[0])
    assert finding(report, "quota trigger").status is Status.OK
    keys = finding(report, "payload keys")
    assert keys.status is Status.OK
    assert "`peers_trained` / `students_trained` (snake_case)" in keys.summary
    assert "the validated CHECK constraint chk_amplify_payload requires it" in keys.summary
    assert report.worst is Status.OK


async def test_quota_by_email_ignores_case(leaps_dsn: str, dispatcher: Dispatcher) -> None:
    handle, email, peers, _students = await amplify_user(leaps_dsn)
    assert email != email.lower()  # stored mixed case, asked lower case
    report = await report_of(dispatcher, f"quota {email.lower()}")
    assert f"`{handle}`" in finding(report, "AMPLIFY quota").summary
    swapped = await report_of(dispatcher, f"quota {email.swapcase()}")
    assert f"peers {peers}/50" in finding(swapped, "AMPLIFY quota").summary
    mailto = await report_of(dispatcher, f"quota <mailto:{email}|{email}>")
    assert f"`{handle}`" in finding(mailto, "AMPLIFY quota").summary


async def test_quota_by_slack_mention_end_to_end(bot: RunningBot, leaps_dsn: str) -> None:
    handle, email, peers, _students = await amplify_user(leaps_dsn)
    bot.fake.add_user("U0BOB", email=email.upper(), name="bob")
    resp = await bot.slash("quota <@U0BOB|bob>")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    text = "\n".join(section_texts(call))
    assert f"`{handle}`" in text
    assert f"peers {peers}/50" in text
    assert any(c.params.get("user") == "U0BOB" for c in bot.fake.calls_to("users.info"))


async def test_mention_without_slack_is_explained(dispatcher: Dispatcher) -> None:
    report = await report_of(dispatcher, "quota <@U0NOBODY>")
    user = finding(report, "user")
    assert user.status is Status.WARN
    assert "no Slack client" in user.summary


async def test_unknown_user_gets_closest_handles(leaps_dsn: str, dispatcher: Dispatcher) -> None:
    handle, _email, _p, _s = await amplify_user(leaps_dsn)
    typo = handle[:2] + handle[3:]  # one letter dropped
    report = await report_of(dispatcher, f"quota {typo}")
    user = finding(report, "user")
    assert user.status is Status.WARN
    assert f"no LEAPS user with handle `{typo}`" in user.summary
    assert user.rows[0]["handle"] == handle
    assert f"`{handle}`" in user.summary
    assert finding(report, "quota trigger").status is Status.OK


async def test_usage_errors(dispatcher: Dispatcher) -> None:
    for text in ("quota", "quota a b", "quota <#C123|general>"):
        answer = await dispatcher.run(text)
        assert isinstance(answer, Answer) and answer.outcome == "usage", text


# --- the week against the limits -----------------------------------------------------


async def test_near_quota_warns_and_over_quota_is_crit(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    user_id, handle = await quiet_user(leaps_dsn)
    await add_amplify(leaps_dsn, user_id, [{"peers_trained": 42, "students_trained": 10}])
    near = finding(await report_of(dispatcher, f"quota {handle}"), "AMPLIFY quota")
    assert near.status is Status.WARN
    assert "peers 42/50 (8 left)" in near.summary

    await faults.disable_quota_trigger()  # the trigger would refuse going over
    await add_amplify(leaps_dsn, user_id, [{"peers_trained": 20, "students_trained": 5}])
    await rows(leaps_dsn, "ALTER TABLE submissions ENABLE TRIGGER trg_check_amplify_quota")
    report = await report_of(dispatcher, f"quota {handle}")
    over = finding(report, "AMPLIFY quota")
    assert over.status is Status.CRIT
    assert "peers 62/50 (*12 over*)" in over.summary
    assert "students 15/200 (185 left)" in over.summary
    assert len(over.rows) == 2
    assert finding(report, "quota trigger").status is Status.OK


async def test_disabled_trigger_is_crit(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    handle, _email, _p, _s = await amplify_user(leaps_dsn)
    await faults.disable_quota_trigger()
    report = await report_of(dispatcher, f"quota {handle}")
    trigger = finding(report, "quota trigger")
    assert trigger.status is Status.CRIT
    assert "trg_check_amplify_quota on submissions is disabled" in trigger.summary
    assert finding(report, "AMPLIFY quota").status is Status.OK
    assert report.findings[0] is trigger  # worst first


async def test_camelcase_function_disagrees_with_snake_case_data(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    handle, _email, peers, _students = await amplify_user(leaps_dsn)
    await faults.camelcase_quota_function()
    ((total,),) = await rows(
        leaps_dsn, "SELECT count(*) FROM submissions WHERE activity_code = 'AMPLIFY'"
    )
    report = await report_of(dispatcher, f"quota {handle}")
    keys = finding(report, "payload keys")
    assert keys.status is Status.CRIT
    assert "reads `peersTrained` / `studentsTrained` (camelCase)" in keys.summary
    assert f"{total} of {total} AMPLIFY payloads in the database use only" in keys.summary
    assert "`peers_trained` / `students_trained`" in keys.summary
    assert "the trigger undercounts" in keys.summary
    q = finding(report, "AMPLIFY quota")
    assert f"peers {peers}/50" in q.summary and "the trigger sees 0" in q.summary


async def test_camelcase_payloads_of_one_user_are_reported(
    leaps_dsn: str, dispatcher: Dispatcher, faults: FaultInjector
) -> None:
    user_id, handle = await quiet_user(leaps_dsn)
    await faults.disable_quota_trigger()
    await add_amplify(
        leaps_dsn,
        user_id,
        [
            {"peersTrained": 30, "studentsTrained": 100},
            {"peersTrained": 25, "studentsTrained": 20},
            {"peers_trained": 4, "students_trained": 6},
        ],
    )
    await rows(leaps_dsn, "ALTER TABLE submissions ENABLE TRIGGER trg_check_amplify_quota")
    report = await report_of(dispatcher, f"quota {handle}")
    keys = finding(report, "payload keys")
    assert keys.status is Status.CRIT
    assert f"2 of 3 AMPLIFY payloads of `{handle}` use only `peersTrained`" in keys.summary
    assert "2 of " in keys.summary and "payloads in the database use only" in keys.summary
    assert "the trigger undercounts" in keys.summary
    q = finding(report, "AMPLIFY quota")
    assert q.status is Status.CRIT  # 59 peers stored, the trigger sees 4
    assert "peers 59/50 (*9 over*; the trigger sees 4)" in q.summary
    assert "students 126/200 (74 left; the trigger sees 6)" in q.summary


async def test_dropped_trigger_is_crit(leaps_dsn: str, dispatcher: Dispatcher) -> None:
    handle, _email, _p, _s = await amplify_user(leaps_dsn)
    await rows(leaps_dsn, "DROP TRIGGER trg_check_amplify_quota ON submissions")
    report = await report_of(dispatcher, f"quota {handle}")
    trigger = finding(report, "quota trigger")
    assert trigger.status is Status.CRIT
    assert "no trigger calls check_amplify_quota()" in trigger.summary
    assert report.worst is Status.CRIT


async def test_slack_user_not_in_leaps_gets_closest_handles(
    leaps_dsn: str, dispatcher: Dispatcher
) -> None:
    handle, email, _p, _s = await amplify_user(leaps_dsn)
    local, _, _domain = email.partition("@")

    async def profile_email(user_id: str) -> str | None:
        return {"U0GONE": f"{local}@another-school.example"}.get(user_id)

    dispatcher.ctx.slack_email = profile_email
    report = await report_of(dispatcher, "quota <@U0GONE|gone>")
    user = finding(report, "user")
    assert user.status is Status.WARN
    assert f"no LEAPS user with <@U0GONE> ({local}@another-school.example)" in user.summary
    assert user.rows[0]["handle"] == handle
    empty = finding(await report_of(dispatcher, "quota <@U0NOMAIL>"), "user")
    assert "shows no e-mail" in empty.summary


async def test_old_camelcase_payloads_only_warn(
    leaps_dsn: str, dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CHECK is NOT VALID over them, so it proves nothing: the rows are counted, here
    a page at a time (one statement each), and every one is found once."""
    user_id, handle = await quiet_user(leaps_dsn)
    await add_amplify(leaps_dsn, user_id, [{"peersTrained": 5, "studentsTrained": 9}], age_h=240)
    ((total, pages),) = await rows(
        leaps_dsn,
        "SELECT count(*), count(DISTINCT (ctid::text::point)[0]) FROM submissions"
        " WHERE activity_code = 'AMPLIFY'",
    )
    assert pages > 3  # the AMPLIFY rows span several of the ranges counted
    monkeypatch.setattr(quota_module, "PIECE_PAGES", 1)
    report = await report_of(dispatcher, f"quota {handle}")
    keys = finding(report, "payload keys")
    assert keys.status is Status.WARN
    assert f"1 of 1 AMPLIFY payloads of `{handle}` use only `peersTrained`" in keys.summary
    assert f"1 of {total} AMPLIFY payloads in the database use only" in keys.summary
    assert "(0 in the last 7 days)" in keys.summary
    assert "today's quota is not affected" in keys.summary
    assert finding(report, "AMPLIFY quota").status is Status.OK
