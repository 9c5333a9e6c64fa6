"""Leftovers of the last round, each over the real Slack path: an approver's refusal names
where the role came from (and since when, for a last known one); a burst of commands by one
never-seen person costs one role lookup; the two button signers share one keyed MAC."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from tests.conftest import bot_settings, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import REQUESTER, Victims, button_value, press, request, settle
from tests.test_roles import leaps_email

# --- 1. an approver's refusal names the role's origin ------------------------------------


async def test_an_approver_refusal_names_where_the_role_came_from(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    reviewer_email = await leaps_email(leaps_dsn, "REVIEWER")
    fake_slack.add_user("U0LEAPSREV", email=reviewer_email)
    fake_slack.add_user("U0STALE", email="stale@example.org")
    fake_slack.set_usergroup("S0READ", ["U0GRPREV"])
    fake_slack.set_usergroup("S0ONCALL", [])  # U0STALE was on call, is no more known to be
    settings = bot_settings(
        leaps_dsn,
        fake_slack,
        diagnostics_role="REVIEWER",
        role_map={REQUESTER: "REVIEWER", "U0MAPREV": "REVIEWER"},
        role_groups={"S0ONCALL": "ADMIN", "S0READ": "REVIEWER"},
    )
    victims = Victims(leaps_dsn)
    try:
        async with running_bot(settings, fake_slack) as bot:
            store = bot.service.store
            assert store is not None
            since = datetime.now(UTC) - timedelta(hours=3)
            await store.remember_role(
                "U0STALE", role="ADMIN", source="group", detail="S0ONCALL", at=since
            )
            await victims.open(1)
            await asyncio.sleep(0.3)
            plan = await request(bot, "kill-idle 0")
            approval_id = button_value(plan).split(".")[0]

            origins = {
                "U0MAPREV": "(from ROLE_MAP)",
                "U0GRPREV": "(from the Slack user group S0READ)",
                "U0LEAPSREV": "(from the LEAPS users table, by your Slack e-mail)",
            }
            for user in origins:
                await press(bot, plan, user)
            await settle(bot)
            # Slack cannot say now who U0STALE is: the last known role answers, for diagnostics
            fake_slack.fail_next("users.info", status=500, times=3)
            await press(bot, plan, "U0STALE")
            await settle(bot)

            told = {
                str(c.params["user"]): str(c.params.get("text", ""))
                for c in fake_slack.calls_to("chat.postEphemeral")
            }
            for user, origin in origins.items():
                assert told[user] == (
                    f"You cannot approve `{approval_id}`: it needs the role ADMIN, "
                    f"yours is REVIEWER {origin}."
                ), told[user]
            assert told["U0STALE"] == (
                f"You cannot approve `{approval_id}`: it needs the role ADMIN, checked now; "
                f"yours is ADMIN, the last known role from {since:%Y-%m-%d %H:%M} UTC "
                "(from the Slack user group S0ONCALL); it could not be looked up now: Slack "
                "did not answer users.info. A last known role counts for diagnostics only."
            ), told["U0STALE"]

            approval = await store.get_approval(approval_id)
            assert approval is not None and approval.state == "pending"
            trail = await store.audit_trail(approval_id)
            refused = {e.actor_id: e.detail for e in trail if e.action == "approval.refused"}
            assert refused["U0STALE"]["role"] == "PARTICIPANT"  # what counted: not the stale one
            assert "the last known role from" in refused["U0STALE"]["role_origin"]
    finally:
        await victims.close()
