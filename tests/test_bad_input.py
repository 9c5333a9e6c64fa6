"""Hostile and broken input into the running bot: any `/db` text, any button payload.

Hypothesis writes the requests; each one is signed and sent over HTTP to one real
service (started once for the module, against its own copy of the LEAPS fixture).
Every request must get HTTP 200, log no error, change nothing, and, where the bot can
know whom to tell, answer that person plainly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.approvals.engine import APPROVE, REJECT
from bot.embedded_pg import EmbeddedPostgres
from tests.conftest import RunningBot, bot_settings, running_bot
from tests.fakeslack import Call, FakeSlack
from tests.slackreq import signed_headers, slash_body
from tests.test_approvals import Victims, button_value, request

REQUESTER, ADMIN, STRANGER = "U0REQ", "U0ADMIN", "U0NOBODY"
ROLES = {REQUESTER: "REVIEWER", ADMIN: "ADMIN"}
CHANNEL = "C0INCIDENT"
WATCHED_LOGGERS = ("bot", "commands", "slack_bolt", "slack_sdk", "aiohttp")
DATA_FINGERPRINT = """
SELECT md5(string_agg(t, '|' ORDER BY t)) FROM (
  SELECT 'u' || u::text AS t FROM users u
  UNION ALL SELECT 's' || s::text FROM submissions s
  UNION ALL SELECT 'l' || l::text FROM points_ledger l) AS rows
"""
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_ids = itertools.count()


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in WATCHED_LOGGERS:
            self.records.append(record)


@dataclass
class Fuzz:
    bot: RunningBot
    dsn: str
    victims: Victims
    victim_pids: set[int]
    value: str  # the genuine button value of a pending approval
    message_ts: str
    approval_id: str
    errors: ErrorRecords
    fingerprint: str
    seen: list[int] = field(default_factory=list)


async def fingerprint(dsn: str) -> str:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute(DATA_FINGERPRINT)).fetchone()
        return str(row[0] if row else "")


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def fuzz(pg: EmbeddedPostgres, leaps_template: str) -> AsyncIterator[Fuzz]:
    """One bot for the whole module, with one pending kill-idle approval to tamper with."""
    dsn = pg.create_database(f"leaps_fuzz_{next(_ids)}", template=leaps_template)
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    victims = Victims(dsn)
    try:
        async with FakeSlack() as fake:
            pids = set(await victims.open(2))
            await asyncio.sleep(0.3)
            settings_ = bot_settings(dsn, fake, role_map=ROLES)
            async with running_bot(settings_, fake) as bot:
                plan = await request(bot, "kill-idle 0", user=REQUESTER)
                value = button_value(plan)
                assert plan.response is not None
                before = await fingerprint(dsn)
                yield Fuzz(
                    bot=bot,
                    dsn=dsn,
                    victims=victims,
                    victim_pids=pids,
                    value=value,
                    message_ts=str(plan.response["ts"]),
                    approval_id=value.partition(".")[0],
                    errors=errors,
                    fingerprint=before,
                )
                await nothing_changed(bot, victims, pids)
            assert await fingerprint(dsn) == before
    finally:
        logging.getLogger().removeHandler(errors)
        await victims.close()


async def nothing_changed(bot: RunningBot, victims: Victims, pids: set[int]) -> None:
    assert await victims.alive() == pids
    assert bot.service.store is not None
    actions = {e.action for e in await bot.service.store.audit_trail(limit=2000)}
    forbidden = {"remedy.executed", "remedy.failed", "approval.claimed", "approval.approved"}
    assert not actions & forbidden, actions & forbidden
    assert "approval.rejected" not in actions


async def settle(bot: RunningBot) -> None:
    for _ in range(600):
        if len(bot.service.tracker) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the bot's background work did not finish")


async def post(bot: RunningBot, body: str, headers: dict[str, str] | None = None) -> int:
    resp = await bot.http.post(
        f"{bot.url}/slack/events", data=body.encode(), headers=headers or signed_headers(body)
    )
    await resp.read()
    return resp.status


def new_errors(fz: Fuzz) -> list[str]:
    fresh = fz.errors.records[len(fz.seen) :]
    fz.seen.extend(range(len(fresh)))
    return [f"{r.name}: {r.getMessage()}" for r in fresh]


# -- /db text -----------------------------------------------------------------------------

COMMAND_WORDS = [
    "help", "health", "connections", "views", "integrity", "quota", "kill-idle", "cancel",
    "terminate", "refresh-views", "cleanup-orphans", "dedupe-learn", "reconcile-points",
    "dedupe-ledger-events", "roles", "set-role", "indexes", "create-index", "drop-index",
    "HEALTH", "nonsense",
]  # fmt: skip
slack_ids = st.text("UCWGDT0123456789ABXYZ", min_size=0, max_size=12)
mentions = st.one_of(
    st.just("<@>"),
    st.just("<#>"),
    st.builds(lambda u, n: f"<@{u}|{n}>", slack_ids, st.text(max_size=12)),
    st.builds(lambda u: f"<@{u}>", slack_ids),
    st.builds(lambda c: f"<#{c}>", slack_ids),
    st.builds(lambda c, n: f"<#{c}|{n}>", slack_ids, st.text(max_size=8)),
    st.sampled_from(["<!channel>", "<!here>", "<!subteam^S01|@oncall>", "<mailto:a@b.c|a@b.c>"]),
)
junk = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
quoting = st.sampled_from(['"', "'", '"open', "it's", '""', "\\", "`x`", "```", "%", "%s", "{0}"])
huge = st.builds(
    lambda piece, n: piece * n,
    st.sampled_from(["a", "é", "'", " ", "<@U1>", "\u202e", "0"]),
    st.integers(1_000, 12_000),
)
argument = st.one_of(junk, mentions, quoting, st.integers().map(str), huge)
command_texts = st.builds(
    lambda word, args, sep: sep.join([word, *args]),
    st.one_of(st.sampled_from(COMMAND_WORDS), junk, mentions),
    st.lists(argument, max_size=4),
    st.sampled_from([" ", "  ", "\t", "\n", " \x00 "]),
)


def answers_to(fake: FakeSlack, user: str, token: str) -> list[Call]:
    """Replies through the command's response_url, or posted to `user` (when there is one)."""

    def to_user(c: Call) -> bool:
        posted = c.method in ("chat.postEphemeral", "chat.postMessage")
        return bool(user) and posted and c.params.get("user") == user

    return [
        c
        for c in fake.calls
        if c.status == 200 and (c.path.endswith(f"/response/{token}") or to_user(c))
    ]


@FUZZ
@given(text=command_texts, user=st.one_of(st.just(STRANGER), slack_ids), channel=slack_ids)
async def test_any_command_text_is_answered_and_changes_nothing(
    fuzz: Fuzz, text: str, user: str, channel: str
) -> None:
    bot = fuzz.bot
    token = f"t{next(_ids)}"
    user = STRANGER if user in ROLES else user  # the pending approval's people stay out
    body = slash_body(text, channel=channel, user=user, response_url=bot.fake.response_url(token))
    assert await post(bot, body) == 200
    await settle(bot)
    answers = answers_to(bot.fake, user, token)
    assert answers, f"no answer to /db {text[:80]!r}"
    said = " ".join(str(c.params.get("text", "")) for c in answers)
    assert said.strip() and "Something went wrong" not in said, said[:300]
    assert new_errors(fuzz) == []
    await nothing_changed(bot, fuzz.victims, fuzz.victim_pids)


# -- button payloads ----------------------------------------------------------------------

WRONG_TYPES = st.one_of(
    st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=2),
    st.booleans(), st.just({}),
)  # fmt: skip
PAYLOAD_KEYS = ["type", "user", "channel", "container", "message", "actions", "response_url"]


@dataclass
class Click:
    payload: str
    user: str
    channel: str
    answerable: bool  # one of our buttons, well formed: the presser must be told why not


@st.composite
def clicks(draw: st.DrawFn, value: str, message_ts: str) -> Click:
    """A button payload tampered in at least one way that must stop it.

    `mode` picks the tampering that is guaranteed (so no draw can be a genuine approval
    by the admin); every other field is genuine or tampered at random.
    """
    mode = draw(st.sampled_from(["value", "channel", "ts", "user"]))
    approval_id, _, mac = value.partition(".")
    tampered_value = st.one_of(
        st.builds(lambda m: f"{approval_id}.{m}", st.text("0123456789abcdef", max_size=30)),
        st.builds(lambda a: f"{a}.{mac}", st.text(max_size=20)),
        st.just(approval_id),
        st.just(""),
        st.just(value + "."),
        st.just(value.upper()),
        junk,
    ).filter(lambda v: v != value)
    other_channel = st.one_of(slack_ids, st.just("")).filter(lambda c: c != CHANNEL)
    other_ts = st.one_of(st.just(""), st.just("1700000000.000001"), junk).filter(
        lambda t: t != message_ts
    )
    unauthorized = st.one_of(st.just(STRANGER), slack_ids).filter(lambda u: u not in ROLES)

    val = draw(tampered_value) if mode == "value" else draw(st.just(value) | tampered_value)
    channel = draw(other_channel) if mode == "channel" else draw(st.just(CHANNEL) | other_channel)
    ts = draw(other_ts) if mode == "ts" else draw(st.just(message_ts) | other_ts)
    if mode == "user":
        user = draw(unauthorized)
    else:
        user = draw(st.sampled_from([ADMIN, REQUESTER]) | unauthorized)
    if user == REQUESTER and mode == "user":
        user = STRANGER
    action_id = draw(st.sampled_from([APPROVE, REJECT]) | st.text(max_size=20))
    payload: dict[str, Any] = {
        "type": "block_actions",
        "team": {"id": "T0001", "domain": "leaps"},
        "user": {"id": user, "username": user.lower(), "team_id": "T0001"},
        "api_app_id": "A0DBOPS",
        "container": {"type": "message", "message_ts": ts, "channel_id": channel},
        "trigger_id": "1337.42.efgh",
        "channel": {"id": channel, "name": "incident"},
        "message": {"type": "message", "ts": ts, "text": "plan"},
        "response_url": "http://127.0.0.1:9/response/click",
        "actions": [
            {
                "action_id": action_id,
                "block_id": "approval",
                "value": val,
                "type": "button",
                "action_ts": "1700000000.000002",
            }
        ],
    }
    structural = False
    for key in draw(st.lists(st.sampled_from(PAYLOAD_KEYS), max_size=3, unique=True)):
        structural = True
        if draw(st.booleans()):
            del payload[key]
        else:
            payload[key] = draw(WRONG_TYPES)
    if draw(st.integers(0, 9)) == 0:
        structural = True
        payload["actions"] = [{"action_id": APPROVE, "value": draw(WRONG_TYPES)}]
    encoded = json.dumps(payload)
    shape = draw(st.integers(0, 19))
    if shape == 0:
        structural, encoded = True, draw(junk)  # not JSON at all
    elif shape == 1:
        structural, encoded = True, encoded[: draw(st.integers(0, len(encoded) - 1))]
    elif shape == 2:
        structural, encoded = True, json.dumps(draw(WRONG_TYPES))
    answerable = not structural and action_id in (APPROVE, REJECT)
    return Click(urlencode({"payload": encoded}), user, channel, answerable)


@FUZZ
@given(data=st.data())
async def test_any_button_payload_is_refused_safely(fuzz: Fuzz, data: st.DataObject) -> None:
    bot = fuzz.bot
    click = data.draw(clicks(fuzz.value, fuzz.message_ts))
    before = len(bot.fake.calls_to("chat.postEphemeral"))
    assert await post(bot, click.payload) == 200
    await settle(bot)
    assert new_errors(fuzz) == []
    await nothing_changed(bot, fuzz.victims, fuzz.victim_pids)
    assert bot.service.store is not None
    approval = await bot.service.store.get_approval(fuzz.approval_id)
    assert approval is not None and approval.state == "pending"
    if click.answerable and click.user and click.channel:
        told = [
            c
            for c in bot.fake.calls_to("chat.postEphemeral")[before:]
            if c.params.get("user") == click.user
        ]
        assert told, "the person who pressed was not told why nothing happened"
        text = str(told[-1].params.get("text", ""))
        assert "Something went wrong" not in text and text.strip()


@pytest.mark.parametrize("kind", ["slash", "button"])
async def test_bad_signature_is_refused_with_401(fuzz: Fuzz, kind: str) -> None:
    bot = fuzz.bot
    body = (
        slash_body("kill-idle 0", channel=CHANNEL, user=ADMIN)
        if kind == "slash"
        else urlencode({"payload": json.dumps({"type": "block_actions", "actions": []})})
    )
    forged = signed_headers(body, secret="not-the-secret")
    stale = signed_headers(body, timestamp=1_600_000_000)
    assert await post(bot, body, forged) == 401
    assert await post(bot, body, stale) == 401
    await settle(bot)
    await nothing_changed(bot, fuzz.victims, fuzz.victim_pids)
    assert await fingerprint(fuzz.dsn) == fuzz.fingerprint
