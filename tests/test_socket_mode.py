"""Socket Mode: the same Bolt app over a WebSocket, against the fake's socket endpoint."""

from __future__ import annotations

import asyncio

from bot.slack.server import connect_socket, slack_bot
from tests.conftest import bot_settings
from tests.fakeslack import FakeSlack, make_envelope


async def test_slash_command_over_socket_mode(leaps_dsn: str, fake_slack: FakeSlack) -> None:
    settings = bot_settings(leaps_dsn, fake_slack, slack_app_token="xapp-1-test")
    async with slack_bot(settings) as bot:
        handler = await connect_socket(bot, "xapp-1-test")
        try:
            opened = fake_slack.calls_to("apps.connections.open")
            assert opened and opened[0].token == "xapp-1-test"
            envelope = make_envelope(
                "slash_commands",
                {
                    "command": "/db",
                    "text": "health",
                    "user_id": "U0SOCKET",
                    "channel_id": "C0SOCKET",
                    "team_id": "T0001",
                    "response_url": fake_slack.response_url("socket"),
                },
            )
            await fake_slack.send_socket_envelope(envelope)
            ack = await fake_slack.wait_for_socket_ack(str(envelope["envelope_id"]))
            assert ack["envelope_id"] == envelope["envelope_id"]
            (call,) = await fake_slack.wait_for("chat.postEphemeral", timeout=15)
            assert call.params["user"] == "U0SOCKET"
            assert any("reachability" in str(b) for b in call.params["blocks"])

            unknown = make_envelope(
                "slash_commands",
                {
                    "command": "/db",
                    "text": "nonsense",
                    "user_id": "U0SOCKET",
                    "channel_id": "C0SOCKET",
                },
            )
            await fake_slack.send_socket_envelope(unknown)
            answer = await fake_slack.wait_for_socket_ack(str(unknown["envelope_id"]))
            assert "unknown command `nonsense`" in str(answer.get("payload"))
        finally:
            await handler.close_async()  # type: ignore[no-untyped-call]
            await asyncio.sleep(0)
