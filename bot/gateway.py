"""The only road to the target database for diagnostics.

Every check gets its own pooled connection and its own `READ ONLY` transaction with
`statement_timeout`, `lock_timeout` and `application_name` set for that transaction,
so a slow or locked catalog cannot stall the bot and nothing a check runs can write.
A check's own trouble (timeout, privilege, missing object) becomes a `skipped`
finding; the report still arrives with the other checks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import psycopg
from psycopg import errors as pgerr
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from bot.settings import Settings
from commands.base import APPLICATION_NAME, Check, Finding, Reader, Row, Status

T = TypeVar("T")

log = logging.getLogger(__name__)


_PROBE_SQL = """
SELECT current_setting('server_version') AS server_version,
       version() AS version,
       current_database() AS database,
       current_user AS "user",
       extract(epoch FROM now() - pg_postmaster_start_time())::bigint AS uptime_s,
       pg_is_in_recovery() AS in_recovery,
       inet_server_addr()::text AS server_addr
"""


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(dsn: str) -> bool:
    """URL form (`scheme://…`) as opposed to libpq's `key=value` form."""
    return _URL.match(dsn) is not None


MASK = "***"
UNPARSEABLE = "<unparseable connection string>"

# libpq marks its secret options with dispchar "*" (password, sslpassword, oauth_client_secret);
# the SCRAM keys are debug options ("D") but are credentials all the same.
SECRET_KEYS = frozenset(
    o.keyword.decode()
    for o in pq.Conninfo.get_defaults()
    if o.dispchar == b"*" or o.keyword in (b"scram_client_key", b"scram_server_key")
) | {"password", "sslpassword"}


def mask_dsn(dsn: str) -> str:
    """The DSN with every secret libpq knows replaced by ***, in the form it was given.

    libpq itself parses the string (URLs included, query parameters too), so what is masked
    is what the driver would have sent; the masked string is parsed again and must name the
    same server with no secret left, else only a placeholder is shown.
    """
    try:
        params = conninfo_to_dict(dsn)
        masked = _mask_url(dsn) if is_url(dsn) else _mask_keywords(params)
        again = conninfo_to_dict(masked)
    except (psycopg.ProgrammingError, ValueError):
        return UNPARSEABLE
    for key, value in params.items():
        if key in SECRET_KEYS:
            expected: object = MASK
        elif key == "dbname" and _holds_conninfo(str(value)):
            expected = mask_dsn(str(value))
        else:
            expected = value
        if again.get(key) != expected:
            return UNPARSEABLE
    return masked


def _holds_conninfo(value: str) -> bool:
    """libpq expands a `dbname` that is itself a connection string (with its password)."""
    return is_url(value) or "=" in value


def _mask_value(key: str, value: str | int | None) -> str | int | None:
    if key in SECRET_KEYS:
        return MASK
    if key == "dbname" and _holds_conninfo(str(value)):
        return mask_dsn(str(value))
    return value


def _mask_keywords(params: dict[str, Any]) -> str:
    return make_conninfo("", **{k: _mask_value(k, v) for k, v in params.items()})


def _mask_url(dsn: str) -> str:
    """Mask in place, cutting the URL where libpq does (fe-connect.c, conninfo_uri_parse)."""
    scheme, _, rest = dsn.partition("://")
    at = re.search(r"[@/]", rest)
    if at is not None and at.group() == "@":
        user, colon, _ = rest[: at.start()].partition(":")
        rest = f"{user}:{MASK}{rest[at.start() :]}" if colon else rest
    base, question, query = rest.partition("?")
    if not question:
        return f"{scheme}://{base}"
    pairs = []
    for pair in query.split("&"):
        key, equals, value = pair.partition("=")
        if equals and unquote(key) in SECRET_KEYS:
            value = MASK
        elif equals and unquote(key) == "dbname" and _holds_conninfo(unquote(value)):
            value = quote(mask_dsn(unquote(value)), safe="")
        pairs.append(f"{key}{equals}{value}")
    return f"{scheme}://{base}?{'&'.join(pairs)}"


def describe_target(dsn: str) -> str:
    """host:port/dbname, the way the report names its target (never a password)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return UNPARSEABLE
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    dbname = str(params.get("dbname") or params.get("user") or "?")
    if _holds_conninfo(dbname):
        dbname = mask_dsn(dbname)
    return f"{host}:{port}/{dbname}"


def normalise_scheme(dsn: str) -> str:
    """libpq accepts both schemes; the linter reports `postgres://`, the driver need not care."""
    return "postgresql://" + dsn[len("postgres://") :] if dsn.startswith("postgres://") else dsn


def explain_db_error(exc: BaseException) -> tuple[Status, str]:
    """Map an exception from one check to the status and the one line the user sees."""
    if isinstance(exc, pgerr.QueryCanceled):
        return Status.SKIPPED, "timed out (statement_timeout)"
    if isinstance(exc, pgerr.LockNotAvailable):
        return Status.SKIPPED, "waited too long for a lock (lock_timeout)"
    if isinstance(exc, pgerr.InsufficientPrivilege):
        return Status.SKIPPED, f"lacks privilege: {first_line(exc)}"
    if isinstance(
        exc,
        pgerr.UndefinedTable
        | pgerr.UndefinedColumn
        | pgerr.UndefinedFunction
        | pgerr.UndefinedObject,
    ):
        return Status.SKIPPED, f"missing object: {first_line(exc)}"
    if isinstance(exc, PoolTimeout | TimeoutError):
        return Status.SKIPPED, "no database connection within the time limit"
    if isinstance(exc, psycopg.OperationalError):
        return Status.ERROR, f"database connection failed: {first_line(exc)}"
    if isinstance(exc, psycopg.Error):
        return Status.ERROR, f"database error: {first_line(exc)}"
    return Status.ERROR, f"internal error in check: {type(exc).__name__}"


_CONNINFO_ERROR = re.compile(r"connection info string|URI|connection option")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    if _CONNINFO_ERROR.search(line):
        # libpq quotes the piece it could not parse, which may be part of a password.
        line = re.sub(r'"([^"]*)"', lambda m: m[0] if m[1] == "=" else '"…"', line)
    return line


class _TxReader:
    """The `Reader` handed to a check: queries inside the check's own transaction."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    async def fetch(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[Row]:
        async with self._conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params or None)
            if cur.description is None:
                return []
            return await cur.fetchall()


class TargetGateway:
    def __init__(
        self,
        dsn: str,
        *,
        check_timeout_ms: int = 5000,
        lock_timeout_ms: int = 1000,
        connect_timeout_s: float = 3.0,
        pool_max_size: int = 4,
    ) -> None:
        self._raw_dsn = dsn
        self._dsn = normalise_scheme(dsn)
        self.check_timeout_ms = check_timeout_ms
        self.lock_timeout_ms = lock_timeout_ms
        self.connect_timeout_s = connect_timeout_s
        self._pool = AsyncConnectionPool(
            self._dsn,
            min_size=1,
            max_size=pool_max_size,
            open=False,
            kwargs={
                "application_name": APPLICATION_NAME,
                "connect_timeout": max(1, round(connect_timeout_s)),
                "autocommit": False,
            },
            configure=self._configure,
            # A restarted target leaves dead connections in the pool: test each one as it is
            # handed out, so the first command after an outage is not answered with them.
            check=AsyncConnectionPool.check_connection,
            reconnect_timeout=0,
            name="dbops-target",
        )
        self._opened = False
        try:
            conninfo_to_dict(self._dsn)
            self._dsn_error: str | None = None
        except psycopg.ProgrammingError as exc:
            self._dsn_error = f"the connection string cannot be parsed ({first_line(exc)})"

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.set_read_only(True)

    @property
    def target(self) -> str:
        return describe_target(self._dsn)

    @property
    def dsn_for_display(self) -> str:
        return mask_dsn(self._raw_dsn)

    def _check_dsn(self) -> None:
        """Fail before libpq sees a broken DSN: its messages quote fragments of it."""
        if self._dsn_error is not None:
            raise psycopg.ProgrammingError(self._dsn_error)

    async def open(self) -> None:
        self._check_dsn()
        if not self._opened:
            await self._pool.open(wait=False)
            self._opened = True

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()
            self._opened = False

    async def probe(self) -> Row:
        """Connect outside the pool so the user sees the driver's own reason on failure."""
        self._check_dsn()
        started = time.perf_counter()
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                self._dsn,
                application_name=APPLICATION_NAME,
                connect_timeout=max(1, round(self.connect_timeout_s)),
                autocommit=True,
            ),
            timeout=self.connect_timeout_s + 1,
        )
        try:
            connect_ms = (time.perf_counter() - started) * 1000
            await conn.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                (str(self.check_timeout_ms),),
            )
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(_PROBE_SQL)
                row = await cur.fetchone()
        finally:
            await conn.close()
        assert row is not None
        row["connect_ms"] = round(connect_ms, 1)
        return row

    async def run_check(self, name: str, check: Check) -> Finding:
        await self.open()
        try:
            async with asyncio.timeout(self.check_timeout_ms / 1000 + self.connect_timeout_s + 1):
                return await self._run_in_transaction(check)
        except Exception as exc:  # one check's trouble must not sink the report
            status, reason = explain_db_error(exc)
            if status is Status.ERROR and not isinstance(exc, psycopg.Error):
                log.exception("check %s failed", name)
            return Finding(check=name, status=status, summary=reason)

    async def read(self, fn: Callable[[Reader], Awaitable[T]]) -> T:
        await self.open()
        async with asyncio.timeout(self.check_timeout_ms / 1000 + self.connect_timeout_s + 1):
            return await self._run_in_transaction(fn)

    async def _run_in_transaction(self, check: Callable[[Reader], Awaitable[T]]) -> T:
        async with self._pool.connection(timeout=self.connect_timeout_s) as conn:
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('statement_timeout', %s, true),"
                    " set_config('lock_timeout', %s, true),"
                    " set_config('application_name', %s, true)",
                    (str(self.check_timeout_ms), str(self.lock_timeout_ms), APPLICATION_NAME),
                )
                return await check(_TxReader(conn))


def gateway_from_settings(settings: Settings, dsn: str | None = None) -> TargetGateway:
    """The target gateway with the configured limits (`dsn` overrides DATABASE_URL)."""
    if dsn is None:
        settings.require("database_url")
    return TargetGateway(
        dsn or settings.database_url or "",
        check_timeout_ms=settings.check_timeout_ms,
        lock_timeout_ms=settings.lock_timeout_ms,
        connect_timeout_s=settings.connect_timeout_s,
        pool_max_size=settings.pool_max_size,
    )
