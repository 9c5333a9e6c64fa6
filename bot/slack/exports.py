"""`/db export …` in Slack and on the console: the CSV streamed to a file, then uploaded.

The CSV goes chunk by chunk into a temporary file on disk and the file is streamed to
Slack's upload URL, so the bot's memory does not grow with the table. (The SDK's
`files_upload_v2` reads the whole file into memory before sending it; its three steps
are done here with the SDK's own calls for the first and last and a streamed POST for
the middle one.) The progress message is edited at most every few seconds, in a task
of its own, so a slow or rate-limited Slack never stalls the read on the database.

One export of each kind at a time: this process keeps who started which and when, and
a session-level advisory lock on the target, held by the export's own connection, says
so to the other replicas (PostgreSQL drops it with the connection, so a crashed export
never blocks the next one). The other replica then names the session holding it and,
from the shared audit trail, who started it.

In a channel with an open incident, the export joins its timeline like a diagnostic:
who started which, then its rows and size or why it failed, so the summary shows what
data left the database during the incident.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import aiohttp
import psycopg
from psycopg import errors as pgerrors
from psycopg.rows import dict_row
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from bot import metrics
from bot.gateway import first_line, normalise_scheme
from bot.incidents.service import IncidentService
from bot.messages import render
from bot.settings import Settings
from bot.state import StateStore
from bot.state.incidents import FirstMilestone
from commands.base import APPLICATION_NAME, Row, UsageError, human_duration, human_size
from commands.export import (
    KINDS,
    USAGE,
    ExportLimits,
    ExportRequest,
    build_query,
    parse,
    stream_csv,
)

log = logging.getLogger(__name__)

# pg_try_advisory_lock(classid, objid): "dbop" and the kind's place in KINDS.
LOCK_CLASS = 0x64626F70
PROGRESS_EVERY_S = 3.0
SLACK_MAX_FILE_BYTES = 1024 * 1024 * 1024  # files.getUploadURLExternal refuses more
UPLOAD_TIMEOUT_S = 600
Progress = Callable[[int], None]


def lock_id(kind: str) -> int:
    return list(KINDS).index(kind) + 1


async def connect(dsn: str, connect_timeout_s: float = 3.0) -> psycopg.AsyncConnection[Any]:
    """The export's own connection, outside the diagnostics' pool: an export holds it
    for minutes, and the pool's few connections belong to the incident's diagnostics."""
    return await psycopg.AsyncConnection.connect(
        normalise_scheme(dsn),
        application_name=APPLICATION_NAME,
        connect_timeout=max(1, round(connect_timeout_s)),
        autocommit=True,
    )


async def claim(conn: psycopg.AsyncConnection[Any], kind: str) -> bool:
    cur = await conn.execute(
        "SELECT pg_try_advisory_lock(%s, %s) AS ok", (LOCK_CLASS, lock_id(kind))
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def lock_holder(conn: psycopg.AsyncConnection[Any], kind: str) -> Row | None:
    """The session holding another replica's export of `kind` (pid and since when)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT a.pid, a.backend_start FROM pg_locks AS l"
            " JOIN pg_stat_activity AS a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND l.classid = %s AND l.objid = %s"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (LOCK_CLASS, lock_id(kind)),
        )
        return await cur.fetchone()


@dataclass(frozen=True)
class Written:
    rows: int
    size: int
    seconds: float


async def write_csv(
    conn: psycopg.AsyncConnection[Any],
    request: ExportRequest,
    out: IO[bytes],
    *,
    limits: ExportLimits | None = None,
    on_progress: Progress | None = None,
) -> Written:
    """Stream the export into `out` (a file; writes go to a thread, disks can be slow)."""
    started = time.perf_counter()
    rows = size = 0
    # Closed here, not by the garbage collector, when writing fails: the caller then closes
    # the connection, which may still be mid-COPY.
    async with contextlib.aclosing(stream_csv(conn, build_query(request), limits)) as chunks:
        async for chunk in chunks:
            await asyncio.to_thread(out.write, chunk.data)
            rows, size = chunk.rows, size + len(chunk.data)
            if on_progress is not None:
                on_progress(rows)
    await asyncio.to_thread(out.flush)
    return Written(rows, size, time.perf_counter() - started)


@dataclass
class Running:
    user: str
    channel: str
    started_at: datetime
    rows: int = 0


@dataclass
class ExportBusy(Exception):
    """Another export of the kind runs; the message says who started it and when."""

    text: str


def _clock(at: datetime) -> str:
    return f"{at.astimezone(UTC):%H:%M:%S} UTC"


@dataclass
class SlackExports:
    """The Slack side of `/db export`: refusal, progress message, file, result."""

    settings: Settings
    client: AsyncWebClient
    store: Callable[[], StateStore | None] = lambda: None
    incidents: Callable[[], IncidentService | None] = lambda: None
    limits: ExportLimits = field(default_factory=ExportLimits)
    progress_every_s: float = PROGRESS_EVERY_S
    running: dict[str, Running] = field(default_factory=dict)

    async def handle(
        self, args: list[str], *, user: str, channel: str, tell: Callable[[str], Awaitable[None]]
    ) -> str:
        """Run one export for `user` asked in `channel`; `tell` answers them privately.
        The outcome is the metrics label."""
        try:
            request = parse(args)
        except UsageError as exc:
            await tell(f"{render.esc(str(exc))}\nUsage: `/db {render.esc(USAGE)}`")
            return "usage"
        kind = request.kind.name
        mine = self.running.get(kind)
        if mine is not None:
            await tell(self._busy_text(kind, mine.user, mine.started_at, mine.rows))
            return "refused"
        entry = Running(user, channel, datetime.now(UTC))
        self.running[kind] = entry  # no await since the check: one task wins
        try:
            return await self._export(request, entry, tell)
        finally:
            del self.running[kind]

    def _busy_text(self, kind: str, who: str | None, since: datetime | None, rows: int) -> str:
        by = f"<@{render.esc(who)}>" if who else "someone on another replica of the bot"
        at = f" at {_clock(since)}" if since else ""
        so_far = f" ({rows:,} rows so far)" if rows else ""
        return (
            f"An export of `{kind}` is already running, started by {by}{at}{so_far}. "
            "One export of each kind runs at a time: its file will be posted in its thread; "
            "try again when it is done."
        )

    async def _elsewhere(self, conn: psycopg.AsyncConnection[Any], kind: str) -> str:
        """Who holds the lock on another replica: the session from the target, the person
        from the shared audit trail when it has the start."""
        since: datetime | None = None
        with contextlib.suppress(psycopg.Error):
            holder = await lock_holder(conn, kind)
            if holder is not None:
                since = holder["backend_start"]
        who: str | None = None
        store = self.store()
        if store is not None:
            with contextlib.suppress(Exception):
                for entry in reversed(await store.audit_trail(limit=200)):
                    if entry.action == "export.started" and entry.detail.get("kind") == kind:
                        if since is None or entry.at >= since - timedelta(seconds=5):
                            who, since = entry.actor_id, entry.at
                        break
        return self._busy_text(kind, who, since, 0)

    async def _audit(self, action: str, entry: Running, detail: dict[str, Any]) -> None:
        store = self.store()
        if store is None:
            return
        try:
            await store.audit(action, actor_id=entry.user, channel_id=entry.channel, detail=detail)
        except Exception:
            log.exception("could not audit %s", action)

    async def _timeline(
        self,
        entry: Running,
        text: str,
        detail: dict[str, Any],
        reaches: tuple[FirstMilestone, ...] = (),
    ) -> None:
        """The channel's open incident, if any, gets the step; a timeline that cannot be
        written never costs the export (as for diagnostics)."""
        service = self.incidents()
        if service is None:
            return
        try:
            event = await service.store.add_event_in(
                entry.channel,
                kind="export",
                actor_id=entry.user,
                text=text,
                at=service.now(),
                detail=detail,
                reaches=reaches,
            )
            if event is not None:
                await service.refresh_header(event.incident_id)
        except Exception:
            log.exception("could not add an export to the incident timeline of %s", entry.channel)

    async def _export(
        self, request: ExportRequest, entry: Running, tell: Callable[[str], Awaitable[None]]
    ) -> str:
        kind = request.kind.name
        assert self.settings.database_url is not None
        try:
            conn = await connect(self.settings.database_url, self.settings.connect_timeout_s)
        except psycopg.Error as exc:
            why = f"cannot reach the database ({render.esc(first_line(exc))})"
            await tell(f"Export of `{kind}` not started: {why}.")
            await self._timeline(
                entry,
                f"`/db export {render.esc(request.describe())}` not started: {why}",
                {"kind": kind, "since": _since(request), "reason": first_line(exc)},
            )
            return "error"
        try:
            if not await claim(conn, kind):
                await tell(await self._elsewhere(conn, kind))
                return "refused"
            return await self._export_claimed(conn, request, entry, tell)
        finally:
            await conn.close()  # releases the advisory lock with the session

    async def _export_claimed(
        self,
        conn: psycopg.AsyncConnection[Any],
        request: ExportRequest,
        entry: Running,
        tell: Callable[[str], Awaitable[None]],
    ) -> str:
        asked = f"`/db export {render.esc(request.describe())}`"
        by = f"<@{entry.user}>"
        try:
            posted = await self.client.chat_postMessage(
                channel=entry.channel, text=f"{asked} by {by}: exporting… 0 rows so far"
            )
        except SlackClientError as exc:
            metrics.SLACK_ERRORS.labels("chat.postMessage").inc()
            await tell(
                f"Export of `{request.kind.name}` not started: cannot post in this channel "
                f"({render.esc(_reason(exc))}). Invite the bot, or ask in a channel it is in."
            )
            return "error"
        ts = str(posted.get("ts", ""))
        channel = str(posted.get("channel") or entry.channel)
        progress = _Progress(
            self.client, channel, ts, f"{asked} by {by}", entry, self.progress_every_s
        )
        await self._audit(
            "export.started", entry, {"kind": request.kind.name, "since": _since(request)}
        )
        await self._timeline(
            entry,
            f"started {asked}",
            {"kind": request.kind.name, "since": _since(request), "ts": ts},
            ("responded",),
        )
        fd, name = tempfile.mkstemp(prefix=f"dbops-export-{request.kind.name}-", suffix=".csv")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    written = await write_csv(
                        conn, request, out, limits=self.limits, on_progress=progress.rows
                    )
                except psycopg.Error as exc:
                    return await self._failed(progress, tell, entry, request, _db_reason(exc))
                except OSError as exc:  # the temporary file: a full or read-only disk
                    why = f"the temporary file could not be written ({exc.strerror or exc})"
                    return await self._failed(progress, tell, entry, request, why)
            await progress.settle()
            if written.size > SLACK_MAX_FILE_BYTES:
                return await self._failed(
                    progress,
                    tell,
                    entry,
                    request,
                    f"{human_size(written.size)} is more than Slack takes (1 GB); "
                    f"use --since, or `python -m bot export {request.kind.name} --out FILE`",
                )
            filename = request.filename(entry.started_at)
            comment = (
                f"{asked}: {written.rows:,} rows, {human_size(written.size)}, "
                f"as of {render.slack_date(entry.started_at)}"
            )
            try:
                await upload_file(
                    self.client,
                    path,
                    filename=filename,
                    channel=channel,
                    thread_ts=ts,
                    comment=comment,
                )
            except (SlackClientError, aiohttp.ClientError, TimeoutError) as exc:
                metrics.SLACK_ERRORS.labels("files.upload").inc()
                return await self._failed(
                    progress, tell, entry, request, f"Slack refused the upload ({_reason(exc)})"
                )
            await progress.final(
                f"{asked} by {by}: done, {written.rows:,} rows, {human_size(written.size)} "
                f"in {human_duration(written.seconds)}; the file is in this thread."
            )
            finished = {
                "kind": request.kind.name,
                "since": _since(request),
                "rows": written.rows,
                "bytes": written.size,
            }
            await self._audit("export.finished", entry, finished)
            await self._timeline(
                entry,
                f"{asked} done: {written.rows:,} rows, {human_size(written.size)} in "
                f"{human_duration(written.seconds)}; the file is in its thread",
                {**finished, "seconds": round(written.seconds, 3), "ts": ts},
            )
            return "ok"
        except asyncio.CancelledError:  # the bot is stopping: say so, then stop
            await self._failed(progress, tell, entry, request, "the bot stopped during it")
            raise
        except Exception:
            error_id = uuid.uuid4().hex[:8]
            log.exception("export of %s failed (error id %s)", request.kind.name, error_id)
            why = f"an internal error (error id {error_id})"
            return await self._failed(progress, tell, entry, request, why)
        finally:
            await progress.settle()
            await asyncio.to_thread(path.unlink, missing_ok=True)

    async def _failed(
        self,
        progress: _Progress,
        tell: Callable[[str], Awaitable[None]],
        entry: Running,
        request: ExportRequest,
        why: str,
    ) -> str:
        """One clear message: on the progress message, else privately."""
        asked = render.esc(request.describe())
        text = f"`/db export {asked}` failed: {render.esc(why)}. Nothing was uploaded."
        await self._audit("export.failed", entry, {"kind": request.kind.name, "reason": why})
        await self._timeline(
            entry,
            f"`/db export {asked}` failed: {render.esc(why)}",
            {
                "kind": request.kind.name,
                "since": _since(request),
                "reason": why,
                "rows": entry.rows,
            },
        )
        if not await progress.final(text):
            metrics.SLACK_ERRORS.labels("chat.update").inc()
            await tell(text)
        return "error"


def _db_reason(exc: psycopg.Error) -> str:
    """The database's own words, and what to do about the usual ones."""
    why = f"the database refused it: {first_line(exc)}"
    if isinstance(exc, pgerrors.QueryCanceled):
        return why + " (export less with --since)"
    if isinstance(exc, pgerrors.LockNotAvailable):
        return why + " (a session holds the table exclusively: see /db connections)"
    if isinstance(exc, pgerrors.ObjectNotInPrerequisiteState):
        return why + " (/db refresh-views populates it)"
    return why


def _since(request: ExportRequest) -> str | None:
    return request.since.isoformat() if request.since else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SlackApiError):
        return str(exc.response.get("error", exc.response.status_code))
    return first_line(exc) if str(exc) else type(exc).__name__


@dataclass
class _Progress:
    """The progress message: edited in the background at most every PROGRESS_EVERY_S."""

    client: AsyncWebClient
    channel: str
    ts: str
    head: str
    entry: Running
    every_s: float
    last: float = field(default_factory=time.monotonic)
    task: asyncio.Task[bool] | None = None

    def rows(self, rows: int) -> None:
        self.entry.rows = rows
        now = time.monotonic()
        if now - self.last < self.every_s or (self.task is not None and not self.task.done()):
            return
        self.last = now
        self.task = asyncio.ensure_future(
            self._update(f"{self.head}: exporting… {rows:,} rows so far")
        )

    async def settle(self) -> None:
        if self.task is not None:
            await self.task

    async def final(self, text: str) -> bool:
        await self.settle()
        return await self._update(text)

    async def _update(self, text: str) -> bool:
        try:
            await self.client.chat_update(channel=self.channel, ts=self.ts, text=text)
            return True
        except Exception as exc:  # a progress line is never worth the export
            log.warning("could not update the export's progress (%s)", _reason(exc))
            return False


async def upload_file(
    client: AsyncWebClient,
    path: Path,
    *,
    filename: str,
    channel: str,
    thread_ts: str | None,
    comment: str,
) -> None:
    """`files_upload_v2`'s three steps, the file streamed from disk in the second."""
    size = (await asyncio.to_thread(path.stat)).st_size
    url = await client.files_getUploadURLExternal(filename=filename, length=size)
    upload_url, file_id = str(url["upload_url"]), str(url["file_id"])
    timeout = aiohttp.ClientTimeout(total=UPLOAD_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        with path.open("rb") as body:
            async with http.post(
                upload_url,
                data=body,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            ) as resp:
                if resp.status != 200:
                    raise SlackClientError(f"upload_http_{resp.status}")
    await client.files_completeUploadExternal(
        files=[{"id": file_id, "title": filename}],
        channel_id=channel,
        thread_ts=thread_ts,
        initial_comment=comment,
    )


async def export_from_console(settings: Settings, args: list[str], out: str) -> int:
    """`python -m bot export KIND [--since DATE] [--out FILE|-]`: the same stream, to a
    file (written beside it, then renamed, so a failed export leaves no partial file) or
    to stdout. Progress goes to stderr."""
    try:
        request = parse(args)
    except UsageError as exc:
        print(f"{exc}\nUsage: python -m bot {USAGE} [--out FILE|-]", file=sys.stderr)
        return 2
    settings.require("database_url")
    assert settings.database_url is not None

    def progress(rows: int) -> None:
        print(f"\r{rows:,} rows", end="", file=sys.stderr, flush=True)

    conn = await connect(settings.database_url, settings.connect_timeout_s)
    try:
        if not await claim(conn, request.kind.name):
            print(f"an export of {request.kind.name} is already running", file=sys.stderr)
            return 1
        async with _destination(out) as target:
            written = await write_csv(conn, request, target, on_progress=progress)
    except psycopg.Error as exc:
        print(f"\nexport failed: {first_line(exc)}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    print(
        f"\r{written.rows:,} rows, {human_size(written.size)} in {human_duration(written.seconds)}",
        file=sys.stderr,
    )
    return 0


@contextlib.asynccontextmanager
async def _destination(out: str) -> AsyncIterator[IO[bytes]]:
    if out == "-":
        yield sys.stdout.buffer
        return
    final = Path(out)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent or None)
    try:
        with os.fdopen(fd, "wb") as target:
            yield target
        os.replace(name, final)
    finally:
        await asyncio.to_thread(Path(name).unlink, missing_ok=True)
