"""LEAPS roles: who a Slack user is in the LEAPS `users` table, matched by e-mail."""

from __future__ import annotations

from commands.base import LeapsIdentity, Reader

_ROLE_BY_EMAIL_SQL = """
SELECT role::text AS role FROM users WHERE lower(email) = lower(%s) ORDER BY role DESC LIMIT 1
"""


async def role_for_email(email: str, db: Reader) -> str | None:
    """The LEAPS role of the user with this e-mail (case-insensitive), or None."""
    rows = await db.fetch(_ROLE_BY_EMAIL_SQL, (email,))
    return str(rows[0]["role"]) if rows else None


_IDENTITY_BY_EMAIL_SQL = """
SELECT id, role::text AS role FROM users WHERE lower(email) = lower(%s)
ORDER BY role DESC, id LIMIT 1
"""


async def identity_for_email(email: str, db: Reader) -> LeapsIdentity | None:
    """The LEAPS user with this e-mail (case-insensitive; the highest role if several
    share it), or None."""
    rows = await db.fetch(_IDENTITY_BY_EMAIL_SQL, (email,))
    return LeapsIdentity(str(rows[0]["id"]), str(rows[0]["role"])) if rows else None
