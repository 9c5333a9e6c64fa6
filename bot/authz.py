"""Who may do what: the configured map first, then LEAPS `users.role` by Slack e-mail.

The Slack profile e-mail costs a `users.info` call and the LEAPS lookup a query, so
the answer is cached for `ROLE_CACHE_TTL_S`; a failed lookup is cached briefly and
counts as the lowest role (never as a higher one).
"""

from __future__ import annotations

import logging
import time
from functools import partial

from slack_sdk.errors import SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from commands.base import ROLES, Gateway, role_rank
from commands.roles import role_for_email

log = logging.getLogger(__name__)

LOWEST = ROLES[0]
FAILED_LOOKUP_TTL_S = 30.0


def allowed(role: str, required: str) -> bool:
    return role_rank(role) >= role_rank(required)


class RoleResolver:
    def __init__(
        self,
        role_map: dict[str, str],
        client: AsyncWebClient | None,
        gateway: Gateway,
        ttl_s: float = 300.0,
    ) -> None:
        self._map = role_map
        self._client = client
        self._gateway = gateway
        self._ttl = ttl_s
        self._cache: dict[str, tuple[str, float]] = {}
        self._emails: dict[str, tuple[str | None, float]] = {}

    async def role_of(self, user_id: str) -> str:
        if user_id in self._map:
            return self._map[user_id]
        hit = self._cache.get(user_id)
        if hit and hit[1] > time.monotonic():
            return hit[0]
        role, ttl = await self._lookup(user_id)
        self._cache[user_id] = (role, time.monotonic() + ttl)
        return role

    async def email_of(self, user_id: str) -> str | None:
        """The Slack profile e-mail of `user_id` (None when Slack has none or failed),
        cached like roles so `/db quota @user` and authorization share one users.info."""
        hit = self._emails.get(user_id)
        if hit and hit[1] > time.monotonic():
            return hit[0]
        email, ttl = await self._fetch_email(user_id)
        self._emails[user_id] = (email, time.monotonic() + ttl)
        return email

    async def _fetch_email(self, user_id: str) -> tuple[str | None, float]:
        if self._client is None:  # the console has no Slack profiles
            return None, self._ttl
        try:
            info = await self._client.users_info(user=user_id)
            email = (info.get("user") or {}).get("profile", {}).get("email")
        except SlackClientError as exc:
            log.warning("users.info for %s failed: %s", user_id, exc)
            return None, FAILED_LOOKUP_TTL_S
        return (str(email) if email else None), self._ttl

    async def _lookup(self, user_id: str) -> tuple[str, float]:
        if self._client is None:  # the console: the configured map is all there is
            return LOWEST, self._ttl
        email = await self.email_of(user_id)
        if not email:
            # as long as the e-mail answer is kept: short after a failed users.info
            left = self._emails[user_id][1] - time.monotonic()
            return LOWEST, max(0.0, min(self._ttl, left))
        try:
            role = await self._gateway.read(partial(role_for_email, email))
        except Exception as exc:  # the target may be the thing that is sick
            log.warning("LEAPS role lookup for %s failed: %s", user_id, exc)
            return LOWEST, FAILED_LOOKUP_TTL_S
        return (role if role in ROLES else LOWEST), self._ttl
