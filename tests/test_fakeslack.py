"""The fake Slack answers the real slack_sdk / Bolt clients the way Slack does.

Other tests trust these answers, so each check drives the fake through the real SDK rather than
through hand-built HTTP requests wherever the SDK has a method for it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.say.async_say import AsyncSay
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import FixedValueRetryIntervalCalculator
from slack_sdk.models.blocks import ActionsBlock, ButtonElement, SectionBlock
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from tests.fakeslack import FakeSlack, make_envelope


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as server:
        yield server


@pytest.fixture
def client(fake: FakeSlack) -> AsyncWebClient:
    return AsyncWebClient(base_url=fake.api_url, token="xoxb-test")


async def test_auth_test_answers_what_bolt_reads(fake: FakeSlack, client: AsyncWebClient) -> None:
    resp = await client.auth_test()
    assert resp["ok"] is True
    assert resp["user_id"] == "UBOT"
    assert resp["team_id"] == "T0001"
    assert resp["bot_id"]
    assert resp["url"].startswith("https://")
    assert fake.api_url == f"http://127.0.0.1:{fake.api_url.split(':')[2].split('/')[0]}/api/"


async def test_post_message_is_recorded_with_blocks_decoded(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    blocks = [
        SectionBlock(text="*plan* ready", block_id="plan"),
        ActionsBlock(elements=[ButtonElement(text="Approve", action_id="approve", value="a1")]),
    ]
    first = await client.chat_postMessage(channel="C123", text="plan", blocks=blocks)
    second = await client.chat_postMessage(channel="C123", text="reply", thread_ts=first["ts"])

    assert first["channel"] == "C123"
    assert first["message"]["blocks"][0]["block_id"] == "plan"
    assert float(second["ts"]) > float(first["ts"])
    assert len(first["ts"].split(".")[1]) == 6

    calls = await fake.wait_for("chat.postMessage", count=2)
    call = calls[0]
    assert call.params["blocks"][1]["elements"][0]["action_id"] == "approve"
    assert call.token == "xoxb-test"
    assert call.headers["Authorization"] == "Bearer xoxb-test"
    assert calls[1].params["thread_ts"] == first["ts"]
    assert fake.message("C123", first["ts"])["reply_count"] == 1  # type: ignore[index]


async def test_form_encoded_json_fields_are_decoded(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "hi"}}]
    await client.api_call(
        "chat.postMessage",
        data={"channel": "C1", "text": "[warn] not json", "blocks": json.dumps(blocks)},
    )
    (call,) = fake.calls_to("chat.postMessage")
    assert call.params["blocks"] == blocks
    assert call.params["text"] == "[warn] not json"


async def test_block_limits_are_enforced_like_slack(client: AsyncWebClient) -> None:
    too_many = [{"type": "section", "text": {"type": "mrkdwn", "text": "x"}}] * 51
    with pytest.raises(SlackApiError) as err:
        await client.chat_postMessage(channel="C1", text="t", blocks=too_many)
    assert err.value.response["error"] == "invalid_blocks"

    too_long = [{"type": "section", "text": {"type": "mrkdwn", "text": "x" * 3001}}]
    with pytest.raises(SlackApiError) as err:
        await client.chat_postMessage(channel="C1", text="t", blocks=too_long)
    assert "3001" in err.value.response["errors"][0]


async def test_ephemeral_messages_cannot_be_updated(client: AsyncWebClient) -> None:
    eph = await client.chat_postEphemeral(channel="C1", user="U1", text="only you")
    with pytest.raises(SlackApiError) as err:
        await client.chat_update(channel="C1", ts=eph["message_ts"], text="edit")
    assert err.value.response["error"] == "message_not_found"

    posted = await client.chat_postMessage(channel="C1", text="v1")
    updated = await client.chat_update(channel="C1", ts=posted["ts"], text="v2")
    assert updated["message"]["text"] == "v2"
    await client.chat_delete(channel="C1", ts=posted["ts"])


async def test_rate_limit_then_success_with_sdk_retry_handler(fake: FakeSlack) -> None:
    client = AsyncWebClient(
        base_url=fake.api_url,
        token="xoxb-test",
        retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)],
    )
    fake.fail_next("chat.postMessage", status=429, retry_after=0)
    resp = await client.chat_postMessage(channel="C1", text="hello")
    assert resp["ok"] is True
    assert [c.status for c in fake.calls_to("chat.postMessage")] == [429, 200]


async def test_rate_limit_without_handler_raises(fake: FakeSlack, client: AsyncWebClient) -> None:
    fake.fail_next("chat.postMessage", retry_after=7)
    with pytest.raises(SlackApiError) as err:
        await client.chat_postMessage(channel="C1", text="hello")
    assert err.value.response.status_code == 429
    assert err.value.response["error"] == "ratelimited"
    assert err.value.response.headers["Retry-After"] in ("7", ["7"])


async def test_server_error_then_success_with_sdk_retry_handler(fake: FakeSlack) -> None:
    handler = AsyncServerErrorRetryHandler(
        max_retry_count=2, interval_calculator=FixedValueRetryIntervalCalculator(0.01)
    )
    client = AsyncWebClient(base_url=fake.api_url, token="xoxb-test", retry_handlers=[handler])
    fake.fail_next("users.info", status=500, times=2)
    fake.add_user("U1", "a@example.com", "alice")
    resp = await client.users_info(user="U1")
    assert resp["user"]["name"] == "alice"
    assert [c.status for c in fake.calls_to("users.info")] == [500, 500, 200]


async def test_a_hung_call_times_out_the_client_and_posts_nothing(fake: FakeSlack) -> None:
    client = AsyncWebClient(base_url=fake.api_url, token="xoxb-test", timeout=1)
    fake.hang_next("chat.postMessage")
    with pytest.raises(TimeoutError):
        await client.chat_postMessage(channel="C1", text="lost")
    resp = await client.chat_postMessage(channel="C1", text="sent")
    assert [c.status for c in fake.calls_to("chat.postMessage")] == [0, 200]
    assert [c.params["text"] for c in fake.answered_ok("chat.postMessage")] == ["sent"]
    assert [m["text"] for m in fake.messages.values()] == ["sent"]
    assert resp["ok"] is True


async def test_a_dropped_connection_is_retried_by_the_sdk_then_raised(fake: FakeSlack) -> None:
    handler = AsyncConnectionErrorRetryHandler(
        max_retry_count=1, interval_calculator=FixedValueRetryIntervalCalculator(0.01)
    )
    client = AsyncWebClient(base_url=fake.api_url, token="xoxb-test", retry_handlers=[handler])
    fake.drop_next("chat.postMessage", times=3)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.chat_postMessage(channel="C1", text="lost")
    resp = await client.chat_postMessage(channel="C1", text="retried")  # the third drop
    assert resp["ok"] is True
    assert [c.status for c in fake.calls_to("chat.postMessage")] == [0, 0, 0, 200]
    assert [m["text"] for m in fake.messages.values()] == ["retried"]


async def test_users_info_and_lookup_by_email(fake: FakeSlack, client: AsyncWebClient) -> None:
    fake.add_user("U42", "Alice@Example.com", "alice")
    info = await client.users_info(user="U42")
    assert info["user"]["profile"]["email"] == "Alice@Example.com"
    found = await client.users_lookupByEmail(email="alice@example.com")
    assert found["user"]["id"] == "U42"
    with pytest.raises(SlackApiError) as err:
        await client.users_info(user="UNOPE")
    assert err.value.response["error"] == "user_not_found"
    with pytest.raises(SlackApiError) as err:
        await client.users_lookupByEmail(email="bob@example.com")
    assert err.value.response["error"] == "users_not_found"


async def test_usergroup_members_as_the_sdk_asks_for_them(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    fake.set_usergroup("S0ONCALL", ["U0A", "U0B"])
    listed = await client.usergroups_users_list(usergroup="S0ONCALL")
    assert listed["users"] == ["U0A", "U0B"]
    (call,) = fake.calls_to("usergroups.users.list")
    assert call.params["usergroup"] == "S0ONCALL"
    assert call.body == b""  # slack_sdk sends it as GET, the group in the query string
    with pytest.raises(SlackApiError) as missing:
        await client.usergroups_users_list(usergroup="S0NOPE")
    assert missing.value.response["error"] == "no_such_subteam"


async def test_files_upload_v2_round_trip(fake: FakeSlack, client: AsyncWebClient) -> None:
    content = "query,calls\nselect 1,42\n"
    resp = await client.files_upload_v2(
        channel="C1", filename="slow.csv", content=content, title="Slow queries"
    )
    file_id = resp["file"]["id"]
    assert fake.uploads[file_id] == content.encode()
    assert resp["file"]["title"] == "Slow queries"
    assert resp["file"]["channels"] == ["C1"]
    assert [c.method for c in fake.calls] == [
        "files.getUploadURLExternal",
        "file_upload",
        "files.completeUploadExternal",
    ]


async def test_channels_and_reactions(fake: FakeSlack, client: AsyncWebClient) -> None:
    created = await client.conversations_create(name="inc-20240101-db-down")
    channel_id = created["channel"]["id"]
    assert created["channel"]["name"] == "inc-20240101-db-down"
    with pytest.raises(SlackApiError) as err:
        await client.conversations_create(name="inc-20240101-db-down")
    assert err.value.response["error"] == "name_taken"
    await client.conversations_invite(channel=channel_id, users=["U1", "U2"])
    info = await client.conversations_info(channel=channel_id)
    assert info["channel"]["num_members"] == 3
    joined = await client.conversations_join(channel=channel_id)
    assert joined["warning"] == "already_in_channel"

    posted = await client.chat_postMessage(channel=channel_id, text="x")
    await client.reactions_add(channel=channel_id, timestamp=posted["ts"], name="eyes")
    with pytest.raises(SlackApiError) as err:
        await client.reactions_add(channel=channel_id, timestamp=posted["ts"], name="eyes")
    assert err.value.response["error"] == "already_reacted"


async def test_views_open_and_expired_trigger(fake: FakeSlack, client: AsyncWebClient) -> None:
    view: dict[str, Any] = {
        "type": "modal",
        "callback_id": "confirm",
        "title": {"type": "plain_text", "text": "Confirm"},
        "blocks": [],
    }
    opened = await client.views_open(trigger_id=fake.trigger_id(), view=view)
    assert opened["view"]["callback_id"] == "confirm"

    stale = fake.trigger_id()
    fake._triggers[stale] -= 5  # as if issued 5 s ago
    with pytest.raises(SlackApiError) as err:
        await client.views_open(trigger_id=stale, view=view)
    assert err.value.response["error"] == "expired_trigger_id"


async def test_unknown_method_and_missing_token(fake: FakeSlack, client: AsyncWebClient) -> None:
    with pytest.raises(SlackApiError) as err:
        await client.api_call("no.suchMethod")
    assert err.value.response.status_code == 200
    assert err.value.response["error"] == "unknown_method"

    anonymous = AsyncWebClient(base_url=fake.api_url)
    with pytest.raises(SlackApiError) as err:
        await anonymous.chat_postMessage(channel="C1", text="x")
    assert err.value.response["error"] == "not_authed"


async def test_response_url_posts_are_recorded(fake: FakeSlack) -> None:
    url = fake.response_url("click-1")
    resp = await AsyncWebhookClient(url).send(text="done", replace_original=True)
    assert resp.status_code == 200
    (call,) = await fake.wait_for("response_url")
    assert call.params == {"text": "done", "replace_original": True}
    assert call.path.endswith("/click-1")


async def test_wait_for_times_out_listing_what_arrived(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    await client.chat_postMessage(channel="C1", text="something else")
    with pytest.raises(AssertionError, match=r"chat.postMessage \[200\]"):
        await fake.wait_for("chat.update", timeout=0.05)
    matched = await fake.wait_for(
        "chat.postMessage", predicate=lambda c: c.params["text"] == "something else"
    )
    assert len(matched) == 1


async def test_socket_endpoint_hello_envelope_and_ack(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    with pytest.raises(SlackApiError) as err:
        await client.apps_connections_open(app_token="xoxb-test")
    assert err.value.response["error"] == "not_allowed_token_type"
    url = (await client.apps_connections_open(app_token="xapp-test"))["url"]
    assert url == fake.socket_url

    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        hello = await ws.receive_json(timeout=2)
        assert hello["type"] == "hello"
        envelope = make_envelope("slash_commands", {"command": "/db", "text": "health"})
        await fake.send_socket_envelope(envelope)
        assert await ws.receive_json(timeout=2) == envelope
        await ws.send_json({"envelope_id": envelope["envelope_id"]})
        ack = await fake.wait_for_socket_ack(envelope["envelope_id"], timeout=2)
    assert ack == {"envelope_id": envelope["envelope_id"]}


async def test_bolt_socket_mode_app_end_to_end(fake: FakeSlack) -> None:
    """Bolt (auth.test, Socket Mode ack, say) runs unmodified against the fake."""
    client = AsyncWebClient(base_url=fake.api_url, token="xoxb-test")
    app = AsyncApp(client=client)

    @app.command("/db")
    async def handle(ack: AsyncAck, say: AsyncSay, command: dict[str, Any]) -> None:
        await ack()
        await say(f"running {command['text']}")

    handler = AsyncSocketModeHandler(app, app_token="xapp-test", web_client=client)
    await handler.connect_async()  # type: ignore[no-untyped-call]
    try:
        payload = {
            "command": "/db",
            "text": "health",
            "team_id": fake.team_id,
            "channel_id": "C9",
            "user_id": "U1",
            "trigger_id": fake.trigger_id(),
            "response_url": fake.response_url(),
        }
        envelope = make_envelope("slash_commands", payload)
        await fake.send_socket_envelope(envelope, timeout=2)
        await fake.wait_for_socket_ack(envelope["envelope_id"], timeout=2)
        (said,) = await fake.wait_for("chat.postMessage", timeout=2)
        assert said.params["channel"] == "C9"
        assert said.params["text"] == "running health"
        assert fake.calls_to("auth.test")
    finally:
        await asyncio.wait_for(handler.close_async(), 2)  # type: ignore[no-untyped-call]
