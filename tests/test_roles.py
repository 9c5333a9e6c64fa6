"""Roles: the configured map first, then LEAPS `users.role` through the Slack profile
e-mail (case-insensitive, cached), unknown users the lowest role."""

from __future__ import annotations

import psycopg

from tests.conftest import bot_settings, running_bot
from tests.fakeslack import FakeSlack


async def leaps_email(dsn: str, role: str) -> str:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            'SELECT email FROM users WHERE role = %s::"Role" ORDER BY id LIMIT 1', (role,)
        )
        row = await cur.fetchone()
        assert row is not None, f"the fixture has no {role}"
        return str(row[0])


async def test_roles_from_slack_email_map_and_default(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    reviewer_email = await leaps_email(leaps_dsn, "REVIEWER")
    fake_slack.add_user("U0MAILREV", email=reviewer_email.upper())  # case must not matter
    fake_slack.add_user("U0STRANGER", email="nobody@example.org")
    settings = bot_settings(
        leaps_dsn, fake_slack, diagnostics_role="REVIEWER", role_map={"U0MAPPED": "ADMIN"}
    )
    async with running_bot(settings, fake_slack) as bot:
        assert bot.service.roles is not None
        assert await bot.service.roles.role_of("U0MAILREV") == "REVIEWER"
        assert await bot.service.roles.role_of("U0MAILREV") == "REVIEWER"
        assert len(fake_slack.calls_to("users.info")) == 1  # cached
        assert await bot.service.roles.role_of("U0STRANGER") == "PARTICIPANT"
        assert await bot.service.roles.role_of("U0GHOST") == "PARTICIPANT"  # users.info fails
        assert await bot.service.roles.role_of("U0MAPPED") == "ADMIN"
        assert not [c for c in fake_slack.calls_to("users.info") if c.params["user"] == "U0MAPPED"]

        await bot.slash("health", user="U0MAILREV")
        await fake_slack.wait_for("chat.postEphemeral", timeout=15)
        await bot.slash("health", user="U0STRANGER")
        (refused,) = await fake_slack.wait_for("response_url", timeout=10)
        assert "You need the role REVIEWER" in refused.params["text"]
        assert "yours is PARTICIPANT" in refused.params["text"]
