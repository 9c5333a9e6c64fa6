"""Signed Slack requests, built the way Slack builds them, for tests and benchmarks."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlencode

from slack_sdk.signature import SignatureVerifier

SIGNING_SECRET = "test-signing-secret"  # a test fixture, not a credential


def slash_body(
    text: str,
    *,
    channel: str = "C0GENERAL",
    user: str = "U0ALICE",
    response_url: str = "http://127.0.0.1:9/response/none",
    command: str = "/db",
) -> str:
    return urlencode(
        {
            "token": "legacy-token-unused",
            "team_id": "T0001",
            "team_domain": "leaps",
            "channel_id": channel,
            "channel_name": "incident",
            "user_id": user,
            "user_name": user.lower(),
            "command": command,
            "text": text,
            "api_app_id": "A0DBOPS",
            "response_url": response_url,
            "trigger_id": "1337.42.abcd",
        }
    )


def signed_headers(
    body: str, *, secret: str = SIGNING_SECRET, timestamp: int | None = None
) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    assert signature is not None
    return {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": signature,
    }


def action_body(
    *,
    action_id: str,
    value: str,
    user: str,
    channel: str,
    message_ts: str,
    response_url: str = "http://127.0.0.1:9/response/none",
    block_id: str = "approval",
    state: dict[str, Any] | None = None,
    message_text: str = "plan",
) -> str:
    """A block_actions payload as Slack posts it when a button is pressed (with the
    message's input values in `state`, as Slack adds them, when given)."""
    payload: dict[str, Any] = {
        "type": "block_actions",
        "team": {"id": "T0001", "domain": "leaps"},
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "T0001"},
        "api_app_id": "A0DBOPS",
        "token": "legacy-token-unused",
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel},
        "trigger_id": "1337.42.efgh",
        "channel": {"id": channel, "name": "incident"},
        "message": {"type": "message", "ts": message_ts, "text": message_text},
        "response_url": response_url,
        "actions": [
            {
                "action_id": action_id,
                "block_id": block_id,
                "value": value,
                "type": "button",
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }
    if state is not None:
        payload["state"] = state
    return urlencode({"payload": json.dumps(payload)})
