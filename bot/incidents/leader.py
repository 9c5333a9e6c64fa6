"""Which process runs the watchdog: one leader among the replicas sharing a state store.

PostgreSQL: a session-level advisory lock held on a dedicated connection to the state
database (not a pooled one: returned to a pool, a session lock would outlive its owner's
interest in it). The lock lives as long as that connection, so when the leader dies,
even by `kill -9`, PostgreSQL drops the lock with the connection and the next follower
to try (every interval) takes over. SQLite: the state file is local, so the processes
sharing it share a machine; an exclusive `flock` on a file beside it elects one of them
(a single process is simply the leader).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import psycopg
from sqlalchemy.engine import make_url

from bot.state.store import DEFAULT_STATE_PATH, make_state_url

log = logging.getLogger(__name__)

# pg_try_advisory_lock key of the watchdog leader ("dbops-wd" in ASCII; the migration lock
# is another key).
LEADER_LOCK_KEY = int.from_bytes(b"dbops-wd", "big")
PING_TIMEOUT_S = 5.0


class Leadership(Protocol):
    leader: bool  # as of the last `hold`

    async def hold(self) -> bool:
        """True while this process is the leader; tries to become it when it is not."""
        ...

    async def release(self) -> None: ...


class PgAdvisoryLeadership:
    def __init__(self, dsn: str, key: int = LEADER_LOCK_KEY) -> None:
        self._dsn = dsn
        self._key = key
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.leader = False

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                autocommit=True,
                application_name="dbops-bot leader",
                connect_timeout=5,
                # A leader cut off from the state store must be noticed by the server too,
                # or its lock would outlive it for the kernel's two hours.
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        return self._conn

    async def hold(self) -> bool:
        try:
            conn = await self._connection()
            if self.leader:
                await asyncio.wait_for(conn.execute("SELECT 1"), PING_TIMEOUT_S)
                return True
            cur = await asyncio.wait_for(
                conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)), PING_TIMEOUT_S
            )
            row = await cur.fetchone()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if self.leader:
                log.warning("watchdog leadership lost: state store connection failed (%s)", exc)
            await self._drop()
            return False
        self.leader = bool(row and row[0])
        if self.leader:
            log.info("this process is the watchdog leader (pid %d)", os.getpid())
        return self.leader

    async def _drop(self) -> None:
        self.leader = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def release(self) -> None:
        """Closing the connection ends the session, and with it the lock."""
        await self._drop()


class FileLeadership:
    """An exclusive, non-blocking `flock`: the kernel drops it when the process dies."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._fd: int | None = None
        self.leader = False

    async def hold(self) -> bool:
        if self._path is None:
            self.leader = True  # an in-memory store belongs to this process alone
            return True
        if self._fd is not None:
            return True
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        self.leader = True
        log.info("this process is the watchdog leader (pid %d)", os.getpid())
        return True

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        self.leader = False
        if fd is not None:
            os.close(fd)  # closing drops the flock


def leadership_for(state_database_url: str | None) -> Leadership:
    """The election that fits the state store: its PostgreSQL, or its SQLite file."""
    url = make_url(make_state_url(state_database_url, DEFAULT_STATE_PATH))
    if url.get_backend_name() == "postgresql":
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        return PgAdvisoryLeadership(dsn)
    if url.database in (None, "", ":memory:"):
        return FileLeadership(None)
    return FileLeadership(Path(f"{url.database}.leader"))
