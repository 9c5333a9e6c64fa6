"""Who an approved remedy acts as in LEAPS (DESIGN.md approval rule 8), and who its
preflight acts as before anyone approved it (rule 10).

Production's guard triggers read `app.user_id` / `app.user_role` and refuse status
changes without a staff role, so a remedy acts as a person the application would let do
it: an approver's own LEAPS account (the LEAPS user whose e-mail is the approver's Slack
profile e-mail), when it holds a staff role; else the configured service identity; else
an approver's LEAPS account without one, so the guard's own refusal is what people see.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial

from bot.access.roles import RoleResolver
from commands.base import Gateway, LeapsIdentity
from commands.guards import STAFF_ROLES, account_holding
from commands.roles import identity_for_email

log = logging.getLogger(__name__)

BOT_ACTOR = "bot"  # the engine's own actor id (start-up recovery): no Slack profile


async def _leaps_account(
    slack_id: str, roles: RoleResolver, gateway: Gateway
) -> tuple[str | None, LeapsIdentity | None]:
    """The Slack user's profile e-mail and the LEAPS account it matches, or None where
    there is none, the bot itself asks, or the target cannot answer."""
    email = await roles.email_of(slack_id) if slack_id != BOT_ACTOR else None
    if not email:
        return email, None
    try:
        return email, await gateway.read(partial(identity_for_email, email))
    except Exception as exc:  # the target may be the thing that is sick
        log.warning("LEAPS identity lookup for %s failed: %s", slack_id, exc)
        return email, None


async def acting_identity(
    approvers: list[str],
    roles: RoleResolver,
    gateway: Gateway,
    service: LeapsIdentity | None,
) -> LeapsIdentity | None:
    """The identity for one execution; `approvers` in order of preference (the one whose
    click set it going first). None when nobody can be named."""
    unprivileged: LeapsIdentity | None = None
    for slack_id in dict.fromkeys(approvers):
        email, found = await _leaps_account(slack_id, roles, gateway)
        if found is None:
            continue
        found = replace(found, via=f"the LEAPS account of approver <@{slack_id}> ({email})")
        if found.role in STAFF_ROLES:
            return found
        unprivileged = unprivileged or found
    return service or unprivileged


async def preflight_identity(
    requester: str, role: str, roles: RoleResolver, gateway: Gateway
) -> LeapsIdentity | None:
    """Who a preflight acts as: `app.user_role` the approver role `role` (the try asks
    what the approvers could do), and as the reviewer the requester's LEAPS account when
    it holds a staff role, else one LEAPS account holding `role`, picked read-only. So a
    REVIEWER can request what an ADMIN approves. None when no account can be named (the
    try then sets `app.user_role` alone)."""
    _, found = await _leaps_account(requester, roles, gateway)
    if found is not None and found.role in STAFF_ROLES:
        return LeapsIdentity(
            found.user_id,
            role,
            f"the requester <@{requester}>'s own LEAPS account, a {found.role}",
        )
    picked = await gateway.read(partial(account_holding, role=role))
    if picked is None:
        return None
    return LeapsIdentity(
        picked,
        role,
        f"picked read-only as one LEAPS account holding {role}: the requester has no "
        "LEAPS account with a staff role",
    )
