"""Who may do what: ROLE_MAP, then Slack user groups, then LEAPS `users.role` by Slack e-mail.

The group members, the Slack profile e-mail and the LEAPS lookup each cost a call, so answers
are cached for `ROLE_CACHE_TTL_S`. Every role resolved from a lookup is kept in the state store:
when the target (or Slack) cannot answer, the last role known from within `ROLE_STALE_MAX_S`
still lets a known person diagnose the outage, but a role that could not be checked now never
requests or approves a change. A failed lookup is retried after a short pause, not at once, so
a burst of commands during an outage does not queue on a dead target.

A role change made by the bot (`set-role`) takes effect at once on every replica, though
each keeps its own cache: the change bumps a per-e-mail version in the shared state store
and replaces the kept role of the Slack users whose LEAPS role was read by that e-mail
(`leaps_role_changed`). A resolver notes that version before each LEAPS lookup, and before
it answers from its cache with a role read from LEAPS it reads the version again (one
primary-key read of a small table): when it moved, it looks the role up anew. Reading on
each resolve rather than once per tick costs a read per command, which is small beside the
command itself, and leaves no window in which another replica still answers with the old
role. While the state store cannot answer, the cache is trusted (for at most the TTL) and
the store is not asked again for a short pause, so a sick store never slows every command.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Literal, get_args

from slack_sdk.errors import SlackApiError, SlackClientError

from bot.state import KnownRole, StateStore
from commands.base import ROLES, Gateway, human_duration, role_rank
from commands.roles import role_for_email

if TYPE_CHECKING:  # the Slack stack loads where Slack is served, not for a console run
    from slack_sdk.web.async_client import AsyncWebClient


log = logging.getLogger(__name__)

LOWEST = ROLES[0]
FAILED_LOOKUP_TTL_S = 30.0
# After the LEAPS lookup failed, nobody's role is looked up there for this long: during an
# outage each lookup waits the connect timeout, and people diagnosing should not each pay it.
# Short, because until it is over a role cannot be checked now (no remedy requests).
LEAPS_BACKOFF_S = 10.0
STORE_TIMEOUT_S = 2.0  # the state store is a convenience here, never a reason to hang
# users.info answers that are facts about the user, not failures of Slack.
_NO_SUCH_USER = frozenset({"user_not_found", "user_not_visible"})

# diagnose: read-only commands; request: asking for a remedy; approve: pressing Approve/Reject.
Purpose = Literal["diagnose", "request", "approve"]
# map: ROLE_MAP; group: a Slack user group of ROLE_GROUPS; leaps: LEAPS users.role by e-mail;
# default: looked up everywhere, found nowhere; unavailable: not looked up, nothing known.
RoleSource = Literal["map", "group", "leaps", "default", "unavailable"]
_STORED_SOURCES: tuple[str, ...] = ("group", "leaps", "default")


def allowed(role: str, required: str) -> bool:
    return role_rank(role) >= role_rank(required)


@dataclass(frozen=True)
class ResolvedRole:
    """A role with its provenance, so each caller decides what a stale answer may do."""

    role: str
    source: RoleSource
    resolved_at: datetime
    stale: bool = False  # the last known role: the lookup failed just now
    detail: str | None = None  # the user group that gave the role
    failure: str | None = None  # why the lookup failed just now, if it did

    @classmethod
    def unknown(cls, failure: str) -> ResolvedRole:
        """The lowest role, because nothing could be looked up or remembered."""
        return cls(LOWEST, "unavailable", _now(), failure=failure)

    def counts_for(self, purpose: Purpose) -> bool:
        return not self.stale or purpose == "diagnose"

    def role_for(self, purpose: Purpose) -> str:
        return self.role if self.counts_for(purpose) else LOWEST

    def origin(self) -> str:
        if self.source == "map":
            return "from ROLE_MAP"
        if self.source == "group":
            return f"from the Slack user group {self.detail}"
        if self.source == "leaps":
            return "from the LEAPS users table, by your Slack e-mail"
        if self.source == "default":
            return "not in ROLE_MAP nor a user group; no LEAPS user has your Slack e-mail"
        return f"your role could not be looked up: {self.failure}"

    def describe(self) -> str:
        """The user's role and where it came from, for a refusal."""
        if self.stale:
            when = self.resolved_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
            return (
                f"{self.role}, the last known role from {when} ({self.origin()}); "
                f"it could not be looked up now: {self.failure}"
            )
        return f"{self.role} ({self.origin()})"


def refusal(needed: str, resolved: ResolvedRole, purpose: Purpose) -> str | None:
    """None when `resolved` may do what needs `needed` for this purpose, else the reason."""
    if allowed(resolved.role_for(purpose), needed):
        return None
    if resolved.stale and allowed(resolved.role, needed):
        return (
            f"You need the role {needed}, checked now, for this; yours is "
            f"{resolved.describe()}. A last known role counts for diagnostics only."
        )
    return f"You need the role {needed} for this; yours is {resolved.describe()}."


def approval_refusal(needed: str, resolved: ResolvedRole, doing: str) -> str | None:
    """None when `resolved` may approve or reject (`doing`), else the reason: like
    `refusal`, the role's origin and, for a last known role, since when, so the approver
    knows whether to fix ROLE_MAP, a user group, LEAPS, or wait for the lookup."""
    if allowed(resolved.role_for("approve"), needed):
        return None
    if resolved.stale and allowed(resolved.role, needed):
        return (
            f"You cannot {doing}: it needs the role {needed}, checked now; yours is "
            f"{resolved.describe()}. A last known role counts for diagnostics only."
        )
    return f"You cannot {doing}: it needs the role {needed}, yours is {resolved.describe()}."


class _Unavailable(Exception):
    """A source could not answer now (as opposed to answering "no role")."""


@dataclass(frozen=True)
class _Cached:
    """A resolved role, until when it is trusted, and for a role read from LEAPS the
    e-mail it was read by and that e-mail's role-change version seen before the read
    (None: not known, so the first successful read of the version looks it up anew)."""

    resolved: ResolvedRole
    until: float
    email: str | None = None
    version: int | None = None


@dataclass
class _Lookup:
    """One user's resolution under way, and how many commands wait for it."""

    task: asyncio.Future[ResolvedRole]
    waiters: int = 0


class RoleResolver:
    def __init__(
        self,
        role_map: dict[str, str],
        client: AsyncWebClient | None,
        gateway: Gateway,
        ttl_s: float = 300.0,
        *,
        role_groups: dict[str, str] | None = None,
        stale_max_s: float = 86_400.0,
        store: StateStore | None = None,
    ) -> None:
        self._map = role_map
        self._groups = role_groups or {}
        self._client = client
        self._gateway = gateway
        self._ttl = ttl_s
        self._stale_max_s = stale_max_s
        self.store = store  # set once the state store is open; roles work without it
        self._cache: dict[str, _Cached] = {}
        self._emails: dict[str, tuple[str | None, str | None, float]] = {}
        self._members: dict[str, tuple[frozenset[str] | None, str | None, float]] = {}
        self._member_locks: dict[str, asyncio.Lock] = {}
        self._inflight: dict[str, _Lookup] = {}
        self._leaps_down_until = 0.0
        self._store_down_until = 0.0

    async def role_of(self, user_id: str, purpose: Purpose = "approve") -> str:
        """The role that counts for `purpose`: a stale role only for diagnostics."""
        return (await self.resolve(user_id)).role_for(purpose)

    async def resolve(self, user_id: str) -> ResolvedRole:
        if user_id in self._map:
            return ResolvedRole(self._map[user_id], "map", _now())
        hit = self._cache.get(user_id)
        if hit and hit.until > time.monotonic() and not await self._changed_since(hit):
            return hit.resolved
        # A burst of commands by someone not yet cached waits for one lookup, not one each:
        # users.info and the LEAPS query are paid once, and a failure is shared, not retried.
        lookup = self._inflight.get(user_id)
        if lookup is None:
            lookup = _Lookup(asyncio.ensure_future(self._resolve_now(user_id)))
            self._inflight[user_id] = lookup
            lookup.task.add_done_callback(partial(self._landed, user_id, lookup))
        lookup.waiters += 1
        try:
            # shielded: one waiter cancelled (its command's task) leaves the lookup to the rest
            return await asyncio.shield(lookup.task)
        except asyncio.CancelledError:
            if lookup.waiters == 1:  # the last one (shutdown): nobody is left to answer
                lookup.task.cancel()
                self._landed(user_id, lookup, None)  # a later command starts afresh
            raise
        finally:
            lookup.waiters -= 1

    def _landed(self, user_id: str, lookup: _Lookup, _: object) -> None:
        if self._inflight.get(user_id) is lookup:
            del self._inflight[user_id]

    async def _resolve_now(self, user_id: str) -> ResolvedRole:
        email: str | None = None
        version: int | None = None
        try:
            resolved, email, version = await self._lookup(user_id)
        except _Unavailable as exc:
            level = logging.WARNING if self._client is not None else logging.DEBUG
            log.log(level, "role of %s: %s", user_id, exc)
            resolved = await self._last_known(user_id, str(exc))
            ttl = min(self._ttl, FAILED_LOOKUP_TTL_S)
        else:
            await self._remember(user_id, resolved, email, version)
            ttl = self._ttl
        self._cache[user_id] = _Cached(resolved, time.monotonic() + ttl, email, version)
        return resolved

    async def email_of(self, user_id: str) -> str | None:
        """The Slack profile e-mail of `user_id` (None when Slack has none or failed),
        cached like roles so `/db quota @user` and authorization share one users.info."""
        try:
            return await self._email(user_id)
        except _Unavailable:
            return None

    # --- the sources, in order --------------------------------------------------------

    async def _lookup(self, user_id: str) -> tuple[ResolvedRole, str | None, int | None]:
        """The role, and for one read from LEAPS the e-mail (lower case) and the version
        of its role changes read before the LEAPS lookup (so a change committed after
        the lookup read the old role is seen by the version moving)."""
        if self._client is None:
            raise _Unavailable("the console knows only ROLE_MAP")
        group = await self._group_role(user_id)
        if group is not None:
            return ResolvedRole(group[0], "group", _now(), detail=group[1]), None, None
        email = await self._email(user_id)
        if not email:
            return ResolvedRole(LOWEST, "default", _now()), None, None
        key = email.strip().lower()
        if time.monotonic() < self._leaps_down_until:
            raise _Unavailable("the LEAPS database did not answer")
        version = await self._change_version(key)
        try:
            role = await self._gateway.read(partial(role_for_email, email))
        except Exception as exc:  # the target may be the thing that is sick
            log.debug("LEAPS role lookup for %s failed", user_id, exc_info=exc)
            self._leaps_down_until = time.monotonic() + LEAPS_BACKOFF_S
            raise _Unavailable("the LEAPS database did not answer") from exc
        if role not in ROLES:
            return ResolvedRole(LOWEST, "default", _now()), key, version
        return ResolvedRole(role, "leaps", _now()), key, version

    async def _group_role(self, user_id: str) -> tuple[str, str] | None:
        """The highest role among the configured groups the user is in, with that group."""
        if not self._groups:
            return None
        groups = list(self._groups.items())
        members = await asyncio.gather(*(self._group_members(g) for g, _ in groups))
        mine = [(role, g) for (g, role), m in zip(groups, members, strict=True) if user_id in m]
        return max(mine, key=lambda rg: role_rank(rg[0])) if mine else None

    async def _group_members(self, group: str) -> frozenset[str]:
        # One usergroups.users.list per group and TTL, however many commands arrive at once.
        lock = self._member_locks.setdefault(group, asyncio.Lock())
        async with lock:
            hit = self._members.get(group)
            if not hit or hit[2] <= time.monotonic():
                hit = await self._fetch_members(group)
                self._members[group] = hit
        members, failure, _ = hit
        if members is None:
            raise _Unavailable(failure or "Slack did not answer")
        return members

    async def _fetch_members(self, group: str) -> tuple[frozenset[str] | None, str | None, float]:
        assert self._client is not None
        try:
            answer = await self._client.usergroups_users_list(usergroup=group)
        except SlackClientError as exc:
            log.warning("usergroups.users.list %s failed: %s", group, exc)
            failure = f"Slack did not list the user group {group}"
            return None, failure, time.monotonic() + FAILED_LOOKUP_TTL_S
        users = frozenset(str(u) for u in answer.get("users") or [])
        return users, None, time.monotonic() + self._ttl

    async def _email(self, user_id: str) -> str | None:
        hit = self._emails.get(user_id)
        if not hit or hit[2] <= time.monotonic():
            hit = await self._fetch_email(user_id)
            self._emails[user_id] = hit
        email, failure, _ = hit
        if failure:
            raise _Unavailable(failure)
        return email

    async def _fetch_email(self, user_id: str) -> tuple[str | None, str | None, float]:
        if self._client is None:  # the console has no Slack profiles
            return None, None, time.monotonic() + self._ttl
        try:
            info = await self._client.users_info(user=user_id)
        except SlackApiError as exc:
            if exc.response.get("error") in _NO_SUCH_USER:
                return None, None, time.monotonic() + self._ttl
            log.warning("users.info for %s failed: %s", user_id, exc)
            return None, "Slack did not answer users.info", time.monotonic() + FAILED_LOOKUP_TTL_S
        except SlackClientError as exc:
            log.warning("users.info for %s failed: %s", user_id, exc)
            return None, "Slack did not answer users.info", time.monotonic() + FAILED_LOOKUP_TTL_S
        email = (info.get("user") or {}).get("profile", {}).get("email")
        return (str(email) if email else None), None, time.monotonic() + self._ttl

    # --- the last known role ----------------------------------------------------------

    async def _remember(
        self, user_id: str, resolved: ResolvedRole, email: str | None, version: int | None
    ) -> None:
        if self.store is None:
            return
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await self.store.remember_role(
                    user_id,
                    role=resolved.role,
                    source=resolved.source,
                    detail=resolved.detail,
                    at=resolved.resolved_at,
                    email=email,
                    seen_version=version,
                )
        except Exception as exc:  # roles must keep working while the state store is sick
            log.warning("could not keep the role of %s in the state store: %s", user_id, exc)

    # --- role changes made by the bot -------------------------------------------------

    async def _change_version(self, email: str) -> int | None:
        """The version of the role changes of `email` in the state store; None when there
        is no store or it cannot answer now (then it is not asked again for a while)."""
        if self.store is None or time.monotonic() < self._store_down_until:
            return None
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                return await self.store.role_change_version(email)
        except Exception as exc:
            log.warning("could not read the role changes of %s: %s", email, exc)
            self._store_down_until = time.monotonic() + LEAPS_BACKOFF_S
            return None

    async def _changed_since(self, hit: _Cached) -> bool:
        """Whether a set-role (on any replica) changed the LEAPS role a cached answer was
        read by since it was cached. Only roles read by an e-mail depend on it; while
        the store cannot say, the cache is trusted until its TTL."""
        if hit.email is None or hit.resolved.stale:
            return False
        now = await self._change_version(hit.email)
        return now is not None and now != hit.version

    async def leaps_role_changed(self, email: str, role: str) -> list[str]:
        """The bot changed the LEAPS role of the user with this e-mail to `role` (a
        set-role that landed). Forgets this replica's cached roles read by that e-mail,
        bumps the change version every other replica checks before answering from its
        cache, and replaces the kept (last known) role of the Slack users whose role came
        from it. Returns what still decides such a person's role over LEAPS: ROLE_MAP or
        a Slack user group (the Slack user found by the e-mail, and by the kept rows)."""
        key = email.strip().lower()
        notes: list[str] = []
        for user_id, cached in list(self._cache.items()):
            if cached.email == key:
                del self._cache[user_id]
        slack_ids: set[str] = set()
        if self.store is not None:
            try:
                async with asyncio.timeout(STORE_TIMEOUT_S):
                    _, known = await self.store.leaps_role_changed(key, role)
                slack_ids |= {k.user_id for k in known}
            except Exception as exc:
                log.warning("could not record the role change of %s: %s", email, exc)
                notes.append(
                    "the state store could not record the change, so other replicas may "
                    f"answer with the old role for up to {human_duration(self._ttl)}"
                )
        slack_ids |= {u for u, (mail, _, _) in self._emails.items() if mail and mail.lower() == key}
        slack_ids |= await self._slack_ids_by_email(email)
        for user_id in sorted(slack_ids):
            if user_id in self._map:
                notes.append(
                    f"ROLE_MAP gives Slack user {user_id} the role {self._map[user_id]}, "
                    f"which still wins over the new LEAPS role {role} in the bot"
                )
                continue
            try:
                group = await self._group_role(user_id)
            except _Unavailable as exc:
                notes.append(
                    f"whether a Slack user group decides the role of Slack user {user_id} "
                    f"could not be checked: {exc}"
                )
                continue
            if group is not None:
                notes.append(
                    f"the Slack user group {group[1]} gives Slack user {user_id} the role "
                    f"{group[0]}, which still wins over the new LEAPS role {role} in the bot"
                )
        return notes

    async def _slack_ids_by_email(self, email: str) -> set[str]:
        """The Slack user with this profile e-mail (users.lookupByEmail), if Slack says."""
        if self._client is None:
            return set()
        try:
            answer = await self._client.users_lookupByEmail(email=email)
        except SlackApiError as exc:
            if exc.response.get("error") not in {"users_not_found", *_NO_SUCH_USER}:
                log.warning("users.lookupByEmail failed: %s", exc)
            return set()
        except SlackClientError as exc:
            log.warning("users.lookupByEmail failed: %s", exc)
            return set()
        found = (answer.get("user") or {}).get("id")
        return {str(found)} if found else set()

    async def _last_known(self, user_id: str, failure: str) -> ResolvedRole:
        known = await self._stored(user_id)
        oldest = _now() - timedelta(seconds=self._stale_max_s)
        if known is None or known.resolved_at < oldest or known.source not in _STORED_SOURCES:
            window = _window(self._stale_max_s)
            return ResolvedRole.unknown(
                f"{failure}, and no role of yours is known from the last {window}"
            )
        source: RoleSource = next(s for s in get_args(RoleSource) if s == known.source)
        return ResolvedRole(
            known.role if known.role in ROLES else LOWEST,
            source,
            known.resolved_at,
            stale=True,
            detail=known.detail,
            failure=failure,
        )

    async def _stored(self, user_id: str) -> KnownRole | None:
        if self.store is None:
            return None
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                return await self.store.known_role(user_id)
        except Exception as exc:
            log.warning("could not read the last known role of %s: %s", user_id, exc)
            return None


def _now() -> datetime:
    return datetime.now(UTC)


def _window(seconds: float) -> str:
    """ROLE_STALE_MAX_S as people say it: "24 h" rather than "1d00h"."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    return human_duration(seconds)
