"""A fake Slack Web API (plus Socket Mode endpoint) on a random local port.

Tests and benchmarks point the real ``slack_sdk`` / Bolt clients at it (``base_url=fake.api_url``)
so the code under test runs unmodified: every call is recorded as a :class:`Call`, answers have
the shapes real Slack uses, and failures (429 with ``Retry-After``, 5xx, ``ok: false``) can be
injected per method with :meth:`FakeSlack.fail_next`; so can the transport's failures, with
:meth:`FakeSlack.hang_next` (no answer until past the client's timeout) and
:meth:`FakeSlack.drop_next` (the connection closed without an answer). A hung or dropped call
is recorded with ``status`` 0 and no response, and has no effect: nothing is posted.

Where real Slack rejects something a bot commonly gets wrong (more than 50 blocks, a section
over 3000 characters, editing an ephemeral message, a stale ``trigger_id``, a bot token on
``apps.connections.open``) the fake rejects it the same way, so such bugs fail in tests rather
than in an incident. Where Slack's answer depends on workspace state the test did not set up
(unknown channel ids, unknown message timestamps), the fake is lenient unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web
from aiohttp.web_request import FileField

__all__ = ["Call", "FakeSlack", "make_envelope"]

JSONDict = dict[str, Any]
T = TypeVar("T")
Handler = Callable[["Call"], JSONDict]

# Free-text fields are never JSON-decoded even when they happen to start with "[" or "{".
_FREE_TEXT_FIELDS = frozenset(
    {
        "text",
        "initial_comment",
        "title",
        "alt_txt",
        "markdown_text",
        "fallback",
        "name",
        "topic",
        "purpose",
        "query",
        "filename",
        "content",
    }
)
_CHANNEL_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
_MAX_MESSAGE_BLOCKS = 50
_MAX_VIEW_BLOCKS = 100
_TRIGGER_TTL = 3.0
_TS_BASE = 1_700_000_000
HANG_CAP_S = 60.0  # a hung call is answered by nothing; past this its connection is closed


@dataclass
class Call:
    """One request that reached the fake."""

    method: str
    params: dict[str, Any]
    headers: dict[str, str]
    at: float
    path: str = ""
    body: bytes = b""
    status: int = 200
    response: Any = None

    @property
    def token(self) -> str | None:
        """The token the client sent: ``Authorization: Bearer`` first, then a ``token`` field."""
        for key, value in self.headers.items():
            if key.lower() == "authorization" and value.startswith("Bearer "):
                return value[len("Bearer ") :]
        token = self.params.get("token")
        return token if isinstance(token, str) else None

    def summary(self) -> str:
        keys = ("channel", "user", "ts", "text", "name", "users", "trigger_id")
        shown = {k: self.params[k] for k in keys if k in self.params}
        text = shown.get("text")
        if isinstance(text, str) and len(text) > 60:
            shown["text"] = text[:57] + "..."
        return f"{self.method} [{self.status}] {shown}"


@dataclass
class _Failure:
    status: int
    retry_after: int
    error: str | None


@dataclass
class _Stall:
    """A call never answered: ``hang`` keeps the connection open, else it is dropped."""

    hang: bool


@dataclass
class _Upload:
    file: JSONDict
    content: bytes | None = None
    uploaded: bool = False


def make_envelope(
    kind: str, payload: JSONDict, *, envelope_id: str | None = None, retry_attempt: int = 0
) -> JSONDict:
    """A Socket Mode envelope as Slack sends it (slash_commands, interactive, events_api)."""
    return {
        "envelope_id": envelope_id or str(uuid.uuid4()),
        "type": kind,
        "payload": payload,
        "accepts_response_payload": kind in ("slash_commands", "interactive"),
        "retry_attempt": retry_attempt,
        "retry_reason": "" if retry_attempt == 0 else "timeout",
    }


def _err(error: str, **extra: Any) -> JSONDict:
    return {"ok": False, "error": error, **extra}


def _text_of(obj: Any) -> str:
    if isinstance(obj, dict):
        text = obj.get("text")
        return text if isinstance(text, str) else ""
    return ""


def _element_errors(element: Any, pointer: str) -> list[str]:
    errors: list[str] = []
    if not isinstance(element, dict):
        return [f"must be an object [json-pointer:{pointer}]"]
    if element.get("type") == "button":
        if len(_text_of(element.get("text"))) > 75:
            errors.append(f"must be less than 76 characters [json-pointer:{pointer}/text/text]")
        value = element.get("value")
        if isinstance(value, str) and len(value) > 2000:
            errors.append(f"must be less than 2001 characters [json-pointer:{pointer}/value]")
    action_id = element.get("action_id")
    if isinstance(action_id, str) and len(action_id) > 255:
        errors.append(f"must be less than 256 characters [json-pointer:{pointer}/action_id]")
    return errors


def block_errors(blocks: Any, *, max_blocks: int = _MAX_MESSAGE_BLOCKS) -> list[str]:
    """The subset of Slack's Block Kit validation that bots trip over, in Slack's wording."""
    if not isinstance(blocks, list):
        return ["must be an array [json-pointer:/blocks]"]
    errors: list[str] = []
    if len(blocks) > max_blocks:
        errors.append(f"must be less than {max_blocks + 1} items [json-pointer:/blocks]")
    seen_ids: set[str] = set()
    for i, block in enumerate(blocks):
        ptr = f"/blocks/{i}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            errors.append(f"missing required field: type [json-pointer:{ptr}]")
            continue
        block_id = block.get("block_id")
        if isinstance(block_id, str):
            if len(block_id) > 255:
                errors.append(f"must be less than 256 characters [json-pointer:{ptr}/block_id]")
            if block_id in seen_ids:
                errors.append(f"duplicate block_id [json-pointer:{ptr}/block_id]")
            seen_ids.add(block_id)
        kind = block["type"]
        if kind == "section":
            fields = block.get("fields")
            if "text" not in block and not fields:
                errors.append(f"must provide either text or fields [json-pointer:{ptr}]")
            if len(_text_of(block.get("text"))) > 3000:
                errors.append(f"must be less than 3001 characters [json-pointer:{ptr}/text/text]")
            if isinstance(fields, list):
                if len(fields) > 10:
                    errors.append(f"must be less than 11 items [json-pointer:{ptr}/fields]")
                for j, fld in enumerate(fields):
                    if len(_text_of(fld)) > 2000:
                        errors.append(
                            f"must be less than 2001 characters "
                            f"[json-pointer:{ptr}/fields/{j}/text]"
                        )
            if "accessory" in block:
                errors.extend(_element_errors(block["accessory"], f"{ptr}/accessory"))
        elif kind == "header":
            if len(_text_of(block.get("text"))) > 150:
                errors.append(f"must be less than 151 characters [json-pointer:{ptr}/text/text]")
        elif kind in ("context", "actions"):
            limit = 10 if kind == "context" else 25
            elements = block.get("elements")
            if not isinstance(elements, list) or not elements:
                errors.append(f"must provide at least 1 item [json-pointer:{ptr}/elements]")
            else:
                if len(elements) > limit:
                    errors.append(
                        f"must be less than {limit + 1} items [json-pointer:{ptr}/elements]"
                    )
                if kind == "actions":
                    for j, el in enumerate(elements):
                        errors.extend(_element_errors(el, f"{ptr}/elements/{j}"))
    return errors


def _decode_json_fields(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if (
            isinstance(value, str)
            and key not in _FREE_TEXT_FIELDS
            and value.lstrip()[:1] in ("[", "{")
        ):
            try:
                decoded = json.loads(value)
            except ValueError:
                decoded = value
            out[key] = decoded if isinstance(decoded, (dict, list)) else value
        else:
            out[key] = value
    return out


class FakeSlack:
    """Fake Slack Web API. Use ``async with FakeSlack() as fake:`` and ``fake.api_url``."""

    # Called with every recorded call of every instance (the suite-wide leak check).
    observers: ClassVar[list[Callable[[Call], None]]] = []

    def __init__(self, *, bot_user_id: str = "UBOT", team_id: str = "T0001") -> None:
        self.bot_user_id = bot_user_id
        self.team_id = team_id
        self.bot_id = "B0001"
        self.app_id = "A0001"
        self.team_name = "Fake Team"
        self.team_url = "https://fake-team.slack.com/"
        # Unknown channel ids are treated as existing public channels unless this is False.
        self.auto_channels = True
        # Seconds to wait before answering each HTTP request (network latency for benchmarks).
        self.latency = 0.0

        self.calls: list[Call] = []
        self.socket_acks: list[dict[str, Any]] = []
        self.socket_connects = 0
        self.users: dict[str, dict[str, Any]] = {}
        # user group id -> member ids (usergroups.users.list); see set_usergroup.
        self.usergroups: dict[str, list[str]] = {}
        self.channels: dict[str, dict[str, Any]] = {}
        # (channel, ts) -> message, in posting order; chat.update edits and chat.delete removes.
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}
        self.ephemerals: dict[tuple[str, str], dict[str, Any]] = {}
        self.views: dict[str, dict[str, Any]] = {}
        # file id -> uploaded bytes (files_upload_v2 step 2).
        self.uploads: dict[str, bytes] = {}

        self._files: dict[str, _Upload] = {}
        self._failures: dict[str, list[_Failure]] = {}
        self._stalls: dict[str, list[_Stall]] = {}
        self._unhang = asyncio.Event()
        self._overrides: dict[str, Handler] = {}
        self._triggers: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._ts = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._tick = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._handlers: dict[str, Handler] = {
            "api.test": self._api_test,
            "auth.test": self._auth_test,
            "apps.connections.open": self._apps_connections_open,
            "bots.info": self._bots_info,
            "team.info": self._team_info,
            "chat.postMessage": self._chat_post_message,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "chat.update": self._chat_update,
            "chat.delete": self._chat_delete,
            "chat.getPermalink": self._chat_get_permalink,
            "chat.scheduleMessage": self._chat_schedule_message,
            "conversations.info": self._conversations_info,
            "conversations.create": self._conversations_create,
            "conversations.join": self._conversations_join,
            "conversations.invite": self._conversations_invite,
            "conversations.members": self._conversations_members,
            "conversations.history": self._conversations_history,
            "conversations.replies": self._conversations_replies,
            "conversations.open": self._conversations_open,
            "conversations.setTopic": self._conversations_set_topic,
            "conversations.setPurpose": self._conversations_set_purpose,
            "conversations.archive": self._conversations_archive,
            "users.info": self._users_info,
            "users.lookupByEmail": self._users_lookup_by_email,
            "users.list": self._users_list,
            "usergroups.users.list": self._usergroups_users_list,
            "reactions.add": self._reactions_add,
            "reactions.remove": self._reactions_remove,
            "pins.add": self._ok,
            "views.open": self._views_open,
            "views.push": self._views_open,
            "views.update": self._views_update,
            "views.publish": self._views_publish,
            "files.getUploadURLExternal": self._files_get_upload_url,
            "files.completeUploadExternal": self._files_complete_upload,
            "files.info": self._files_info,
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind 127.0.0.1 on a free port chosen by the OS."""
        if self._runner is not None:
            return
        self._tick = asyncio.Event()
        self._unhang = asyncio.Event()
        app = web.Application(client_max_size=100 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._handle_api)
        app.router.add_post("/response/{token}", self._handle_response_url)
        app.router.add_post("/upload/{file_id}", self._handle_upload)
        app.router.add_get("/socket", self._handle_socket)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = int(sock.getsockname()[1])
        await web.SockSite(runner, sock).start()
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._unhang.set()  # hung calls end now
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=1001, message=b"server stopping"), 1.0)
        await runner.cleanup()
        self._port = None

    async def __aenter__(self) -> FakeSlack:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("FakeSlack is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_url(self) -> str:
        """``base_url`` for slack_sdk clients; the SDK ``urljoin``s the method onto it."""
        return f"{self.base_url}/api/"

    @property
    def socket_url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/socket"

    def response_url(self, token: str = "") -> str:
        """A URL to put in a Slack payload's ``response_url``; posts to it are recorded."""
        return f"{self.base_url}/response/{token or uuid.uuid4().hex}"

    def reset(self) -> None:
        """Forget recorded calls, acks and pending failures (workspace state is kept)."""
        self.calls.clear()
        self.socket_acks.clear()
        self._failures.clear()
        self._stalls.clear()

    # ------------------------------------------------------------------ test controls

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    async def wait_for(
        self,
        method: str,
        *,
        count: int = 1,
        timeout: float = 10.0,  # noqa: ASYNC109 - a test's deadline, not an I/O timeout
        predicate: Callable[[Call], bool] | None = None,
    ) -> list[Call]:
        """Wait until ``count`` matching calls arrived; return all matching calls so far."""

        def matching() -> list[Call]:
            return [
                c for c in self.calls if c.method == method and (predicate is None or predicate(c))
            ]

        try:
            return await self._wait_until(lambda: len(matching()) >= count, matching, timeout)
        except TimeoutError:
            arrived = "\n  ".join(c.summary() for c in self.calls) or "(none)"
            raise AssertionError(
                f"expected {count} call(s) to {method}"
                f"{' matching predicate' if predicate else ''} within {timeout}s, "
                f"got {len(matching())}; calls that arrived:\n  {arrived}"
            ) from None

    async def wait_for_socket_ack(
        self,
        envelope_id: str | None = None,
        *,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Wait for the client's ack of ``envelope_id`` (or any message when None)."""

        def found() -> list[dict[str, Any]]:
            return [
                a
                for a in self.socket_acks
                if envelope_id is None or a.get("envelope_id") == envelope_id
            ]

        try:
            acks = await self._wait_until(lambda: bool(found()), found, timeout)
        except TimeoutError:
            raise AssertionError(
                f"no socket ack for envelope {envelope_id!r} within {timeout}s; "
                f"acks received: {self.socket_acks}"
            ) from None
        return acks[0]

    def fail_next(
        self,
        method: str,
        *,
        status: int = 429,
        times: int = 1,
        retry_after: int = 1,
        error: str | None = None,
    ) -> None:
        """Answer the next ``times`` calls to ``method`` with HTTP ``status``.

        429 carries ``Retry-After`` and ``{"ok": false, "error": "ratelimited"}``; 5xx carries
        ``internal_error``; status 200 with ``error`` gives a plain ``ok: false`` answer.
        ``method`` may also be ``"response_url"`` or ``"file_upload"``.
        """
        entry = _Failure(status=status, retry_after=retry_after, error=error)
        self._failures.setdefault(method, []).extend(entry for _ in range(times))

    def hang_next(self, method: str, *, times: int = 1) -> None:
        """Leave the next ``times`` calls to ``method`` unanswered, the connection open, until
        the fake stops (or ``HANG_CAP_S``): the client gives up at its own timeout."""
        self._stalls.setdefault(method, []).extend(_Stall(hang=True) for _ in range(times))

    def drop_next(self, method: str, *, times: int = 1) -> None:
        """Close the connection of the next ``times`` calls to ``method`` without an answer
        (the client sees the server disconnect; slack_sdk retries that a few times)."""
        self._stalls.setdefault(method, []).extend(_Stall(hang=False) for _ in range(times))

    def answered_ok(self, method: str) -> list[Call]:
        """The calls to ``method`` that Slack answered ``ok`` (what really took effect)."""
        return [
            c
            for c in self.calls_to(method)
            if isinstance(c.response, dict) and c.response.get("ok") is True
        ]

    def respond(self, method: str, answer: JSONDict | Handler) -> None:
        """Override the answer to ``method``: a fixed body or a function of the call."""
        if callable(answer):
            self._overrides[method] = answer
        else:
            body = answer
            self._overrides[method] = lambda _call: json.loads(json.dumps(body))

    def add_user(
        self,
        user_id: str,
        email: str | None = None,
        name: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        name = name or user_id.lower()
        profile: dict[str, Any] = {
            "real_name": name,
            "real_name_normalized": name,
            "display_name": name,
            "display_name_normalized": name,
            "team": self.team_id,
        }
        if email is not None:
            profile["email"] = email
        user: dict[str, Any] = {
            "id": user_id,
            "team_id": self.team_id,
            "name": name,
            "real_name": name,
            "deleted": False,
            "is_bot": False,
            "is_admin": False,
            "is_owner": False,
            "tz": "UTC",
            "tz_offset": 0,
            "updated": _TS_BASE,
            "profile": profile,
            **extra,
        }
        self.users[user_id] = user
        return user

    def set_usergroup(self, group_id: str, members: list[str]) -> None:
        """Create the user group or replace its members."""
        self.usergroups[group_id] = list(members)

    def add_channel(
        self,
        channel_id: str,
        name: str | None = None,
        *,
        is_private: bool = False,
        members: list[str] | None = None,
    ) -> dict[str, Any]:
        channel = {
            "id": channel_id,
            "name": name or channel_id.lower(),
            "is_channel": not is_private,
            "is_group": is_private,
            "is_im": False,
            "is_mpim": False,
            "is_private": is_private,
            "is_archived": False,
            "is_general": False,
            "is_shared": False,
            "is_ext_shared": False,
            "is_org_shared": False,
            "created": _TS_BASE,
            "creator": self.bot_user_id,
            "topic": {"value": "", "creator": "", "last_set": 0},
            "purpose": {"value": "", "creator": "", "last_set": 0},
            "context_team_id": self.team_id,
            "members": list(members or []),
        }
        self.channels[channel_id] = channel
        return channel

    def trigger_id(self) -> str:
        """A trigger_id that expires like Slack's (3 s); ``views.open`` then says so."""
        trigger = f"{next(self._ids)}.{_TS_BASE}.{uuid.uuid4().hex[:16]}"
        self._triggers[trigger] = time.monotonic()
        return trigger

    def message(self, channel: str, ts: str) -> dict[str, Any] | None:
        return self.messages.get((channel, ts))

    # ------------------------------------------------------------------ socket mode

    async def send_socket_envelope(
        self,
        envelope: dict[str, Any],
        *,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> None:
        """Send an envelope to the newest open Socket Mode connection (waiting for one)."""
        try:
            ws = (
                await self._wait_until(
                    lambda: bool(self._open_sockets()), self._open_sockets, timeout
                )
            )[-1]
        except TimeoutError:
            raise AssertionError(f"no Socket Mode client connected within {timeout}s") from None
        await ws.send_json(envelope)

    async def disconnect_sockets(self, reason: str = "refresh_requested") -> None:
        """Send Slack's ``disconnect`` message and close every Socket Mode connection."""
        for ws in self._open_sockets():
            with contextlib.suppress(Exception):
                await ws.send_json(
                    {"type": "disconnect", "reason": reason, "debug_info": {"host": "fake"}}
                )
                await asyncio.wait_for(ws.close(code=1000), 1.0)

    async def drop_sockets(self) -> None:
        """Close every Socket Mode connection without Slack's ``disconnect`` message, as a
        network failure or a load balancer would."""
        for ws in self._open_sockets():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=1006), 1.0)

    def _open_sockets(self) -> list[web.WebSocketResponse]:
        return [ws for ws in self._sockets if not ws.closed]

    async def _handle_socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, timeout=1.0)
        await ws.prepare(request)
        self._sockets.append(ws)
        self.socket_connects += 1
        await ws.send_json(
            {
                "type": "hello",
                "num_connections": len(self._open_sockets()),
                "debug_info": {
                    "host": "fake-slack",
                    "build_number": 1,
                    "approximate_connection_time": 18060,
                },
                "connection_info": {"app_id": self.app_id},
            }
        )
        self._notify()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                    except ValueError:
                        data = {"raw": msg.data}
                    self.socket_acks.append(data if isinstance(data, dict) else {"raw": data})
                    ack = Call("socket_ack", {}, {}, time.monotonic(), body=msg.data.encode())
                    for observe in FakeSlack.observers:
                        observe(ack)
                    self._notify()
        finally:
            self._sockets.remove(ws)
            self._notify()
        return ws

    # ------------------------------------------------------------------ HTTP plumbing

    def _notify(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    async def _wait_until(
        self,
        done: Callable[[], bool],
        result: Callable[[], T],
        timeout: float,  # noqa: ASYNC109
    ) -> T:
        async with asyncio.timeout(timeout):
            while not done():
                await self._tick.wait()
        return result()

    async def _read_params(self, request: web.Request) -> tuple[dict[str, Any], bytes]:
        params: dict[str, Any] = dict(request.query)
        body = b""
        if request.content_type == "multipart/form-data":
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, FileField):
                    params[key] = value.file.read()
                else:
                    params[key] = value if isinstance(value, str) else bytes(value)
        else:
            body = await request.read()
            if request.content_type == "application/json" and body:
                decoded = json.loads(body)
                if isinstance(decoded, dict):
                    params.update(decoded)
            elif body:
                params.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        return _decode_json_fields(params), body

    async def _record(
        self,
        request: web.Request,
        method: str,
        answer: Callable[[Call], Awaitable[web.StreamResponse]],
        *,
        parse: bool = True,
    ) -> web.StreamResponse:
        at = time.monotonic()
        if parse:
            params, body = await self._read_params(request)
        else:
            params, body = {}, await request.read()
        call = Call(method, params, dict(request.headers), at, path=request.path, body=body)
        stalls = self._stalls.get(method)
        if stalls:
            return await self._stall(request, call, stalls.pop(0))
        if self.latency:
            await asyncio.sleep(self.latency)
        response: web.StreamResponse
        queue = self._failures.get(method)
        if queue:
            failure = queue.pop(0)
            response = self._failure_response(failure)
        else:
            response = await answer(call)
        call.status = response.status
        if isinstance(response, web.Response) and response.body is not None:
            raw = response.body
            if isinstance(raw, bytes):
                with contextlib.suppress(ValueError):
                    call.response = json.loads(raw) if raw[:1] == b"{" else raw.decode()
        self.calls.append(call)
        for observe in FakeSlack.observers:
            observe(call)
        self._notify()
        return response

    async def _stall(self, request: web.Request, call: Call, stall: _Stall) -> web.Response:
        call.status = 0  # never answered: no response, no effect
        self.calls.append(call)
        for observe in FakeSlack.observers:
            observe(call)
        self._notify()
        if stall.hang:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._unhang.wait(), HANG_CAP_S)
        if request.transport is not None:
            request.transport.close()  # the answer below is never written
        return web.Response(status=500)

    @staticmethod
    def _failure_response(failure: _Failure) -> web.Response:
        if failure.status == 429:
            return web.json_response(
                _err(failure.error or "ratelimited"),
                status=429,
                headers={"Retry-After": str(failure.retry_after)},
            )
        default = "internal_error" if failure.status >= 500 else "fatal_error"
        return web.json_response(_err(failure.error or default), status=failure.status)

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]

        async def answer(call: Call) -> web.StreamResponse:
            handler = self._overrides.get(method) or self._handlers.get(method)
            if handler is None:
                return web.json_response(_err("unknown_method"))
            if call.token is None:
                return web.json_response(_err("not_authed"))
            try:
                return web.json_response(handler(call))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                detail = f"[ERROR] {type(exc).__name__}: {exc}"
                return web.json_response(
                    _err("invalid_arguments", response_metadata={"messages": [detail]})
                )

        return await self._record(request, method, answer)

    async def _handle_response_url(self, request: web.Request) -> web.StreamResponse:
        async def answer(call: Call) -> web.StreamResponse:
            if "blocks" in call.params and block_errors(call.params["blocks"]):
                return web.Response(text="invalid_blocks", status=400)
            if not any(k in call.params for k in ("text", "blocks", "delete_original")):
                return web.Response(text="no_text", status=400)
            return web.json_response({"ok": True})

        return await self._record(request, "response_url", answer)

    async def _handle_upload(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]

        async def answer(call: Call) -> web.StreamResponse:
            upload = self._files.get(file_id)
            if upload is None:
                return web.Response(text="file not found", status=404)
            content = call.body
            if request.content_type == "multipart/form-data":
                content = next((v for v in call.params.values() if isinstance(v, bytes)), b"")
            upload.content = content
            upload.uploaded = True
            upload.file["size"] = len(content)
            self.uploads[file_id] = content
            call.params["file_id"] = file_id
            return web.Response(text=f"OK - {len(content)}")

        multipart = request.content_type == "multipart/form-data"
        return await self._record(request, "file_upload", answer, parse=multipart)

    # ------------------------------------------------------------------ helpers for handlers

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):08d}"

    def _new_ts(self) -> str:
        micros = next(self._ts) * 100
        return f"{_TS_BASE + micros // 1_000_000}.{micros % 1_000_000:06d}"

    def _channel(self, channel_id: Any) -> dict[str, Any] | None:
        if not isinstance(channel_id, str) or not channel_id:
            return None
        if channel_id in self.channels:
            return self.channels[channel_id]
        name = channel_id.removeprefix("#")
        for channel in self.channels.values():
            if channel["name"] == name:
                return channel
        if self.auto_channels and channel_id[0] in "CGD" and channel_id[1:].isalnum():
            return self.add_channel(channel_id)
        return None

    def _resolve_post_channel(self, channel_id: Any) -> str | None:
        """Posting to a user id opens the DM, as Slack does."""
        if isinstance(channel_id, str) and channel_id[:1] in ("U", "W") and len(channel_id) > 1:
            return "D" + channel_id[1:]
        channel = self._channel(channel_id)
        return None if channel is None else str(channel["id"])

    def _public_channel(self, channel: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in channel.items() if k != "members"}
        members: list[str] = channel["members"]
        out["is_member"] = self.bot_user_id in members
        out["num_members"] = len(members)
        return out

    def _bot_message(self, call: Call, ts: str) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "type": "message",
            "subtype": "bot_message",
            "text": call.params.get("text", ""),
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "app_id": self.app_id,
            "team": self.team_id,
            "ts": ts,
        }
        for key in ("blocks", "attachments", "thread_ts", "metadata"):
            if key in call.params:
                msg[key] = call.params[key]
        return msg

    @staticmethod
    def _content_errors(call: Call) -> JSONDict | None:
        params = call.params
        if not any(params.get(k) for k in ("text", "blocks", "attachments")):
            return _err("no_text")
        text = params.get("text")
        if isinstance(text, str) and len(text) > 40000:
            return _err("msg_too_long")
        if "blocks" in params:
            errors = block_errors(params["blocks"])
            if errors:
                return _err(
                    "invalid_blocks",
                    errors=errors,
                    response_metadata={"messages": [f"[ERROR] {e}" for e in errors]},
                )
        return None

    # ------------------------------------------------------------------ method handlers

    def _ok(self, call: Call) -> JSONDict:
        return {"ok": True}

    def _api_test(self, call: Call) -> JSONDict:
        return {"ok": True, "args": {k: v for k, v in call.params.items() if k != "token"}}

    def _auth_test(self, call: Call) -> JSONDict:
        return {
            "ok": True,
            "url": self.team_url,
            "team": self.team_name,
            "user": "dbops-bot",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _apps_connections_open(self, call: Call) -> JSONDict:
        if not (call.token or "").startswith("xapp-"):
            return _err("not_allowed_token_type")
        return {"ok": True, "url": self.socket_url}

    def _bots_info(self, call: Call) -> JSONDict:
        return {
            "ok": True,
            "bot": {
                "id": self.bot_id,
                "deleted": False,
                "name": "dbops-bot",
                "updated": _TS_BASE,
                "app_id": self.app_id,
                "user_id": self.bot_user_id,
                "icons": {},
            },
        }

    def _team_info(self, call: Call) -> JSONDict:
        return {
            "ok": True,
            "team": {
                "id": self.team_id,
                "name": self.team_name,
                "domain": "fake-team",
                "url": self.team_url,
            },
        }

    def _chat_post_message(self, call: Call) -> JSONDict:
        channel = self._resolve_post_channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found")
        problem = self._content_errors(call)
        if problem is not None:
            return problem
        ts = self._new_ts()
        message = self._bot_message(call, ts)
        thread_ts = call.params.get("thread_ts")
        if thread_ts:
            parent = self.messages.get((channel, str(thread_ts)))
            if parent is not None:
                parent["reply_count"] = parent.get("reply_count", 0) + 1
                parent["latest_reply"] = ts
                parent.setdefault("thread_ts", parent["ts"])
        self.messages[(channel, ts)] = message
        return {"ok": True, "channel": channel, "ts": ts, "message": message}

    def _chat_post_ephemeral(self, call: Call) -> JSONDict:
        channel = self._resolve_post_channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found")
        if not call.params.get("user"):
            return _err("user_not_in_channel")
        problem = self._content_errors(call)
        if problem is not None:
            return problem
        ts = self._new_ts()
        message = self._bot_message(call, ts)
        message["user_visible_to"] = call.params["user"]
        self.ephemerals[(channel, ts)] = message
        return {"ok": True, "message_ts": ts}

    def _chat_update(self, call: Call) -> JSONDict:
        channel = self._resolve_post_channel(call.params.get("channel"))
        ts = str(call.params.get("ts", ""))
        if channel is None:
            return _err("channel_not_found")
        if not ts or (channel, ts) in self.ephemerals:
            return _err("message_not_found")
        if not any(k in call.params for k in ("text", "blocks", "attachments")):
            return _err("no_text")
        if "blocks" in call.params:
            problem = self._content_errors(call)
            if problem is not None and problem["error"] != "no_text":
                return problem
        message = self.messages.get((channel, ts)) or self._bot_message(call, ts)
        for key in ("text", "blocks", "attachments", "metadata"):
            if key in call.params:
                message[key] = call.params[key]
        message["edited"] = {"user": self.bot_user_id, "ts": self._new_ts()}
        if (channel, ts) in self.messages:
            self.messages[(channel, ts)] = message
        return {
            "ok": True,
            "channel": channel,
            "ts": ts,
            "text": message.get("text", ""),
            "message": message,
        }

    def _chat_delete(self, call: Call) -> JSONDict:
        channel = self._resolve_post_channel(call.params.get("channel"))
        ts = str(call.params.get("ts", ""))
        if channel is None:
            return _err("channel_not_found")
        if not ts or (channel, ts) in self.ephemerals:
            return _err("message_not_found")
        self.messages.pop((channel, ts), None)
        return {"ok": True, "channel": channel, "ts": ts}

    def _chat_get_permalink(self, call: Call) -> JSONDict:
        channel = str(call.params.get("channel", ""))
        ts = str(call.params.get("message_ts", ""))
        link = f"{self.team_url}archives/{channel}/p{ts.replace('.', '')}"
        return {"ok": True, "channel": channel, "permalink": link}

    def _chat_schedule_message(self, call: Call) -> JSONDict:
        channel = self._resolve_post_channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found")
        problem = self._content_errors(call)
        if problem is not None:
            return problem
        post_at = int(call.params.get("post_at", 0))
        return {
            "ok": True,
            "channel": channel,
            "scheduled_message_id": self._new_id("Q"),
            "post_at": post_at,
            "message": self._bot_message(call, self._new_ts()),
        }

    def _conversations_info(self, call: Call) -> JSONDict:
        channel = self._channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found")
        return {"ok": True, "channel": self._public_channel(channel)}

    def _conversations_create(self, call: Call) -> JSONDict:
        name = call.params.get("name")
        if not isinstance(name, str) or not name:
            return _err("invalid_name_required")
        if len(name) > 80:
            return _err("invalid_name_maxlength")
        if not _CHANNEL_NAME_RE.match(name):
            return _err("invalid_name_specials")
        if any(c["name"] == name for c in self.channels.values()):
            return _err("name_taken")
        is_private = str(call.params.get("is_private", "false")).lower() in ("true", "1")
        channel = self.add_channel(
            self._new_id("G" if is_private else "C"),
            name,
            is_private=is_private,
            members=[self.bot_user_id],
        )
        channel["created"] = int(time.time())
        return {"ok": True, "channel": self._public_channel(channel)}

    def _conversations_join(self, call: Call) -> JSONDict:
        channel = self._channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found")
        if channel["is_archived"]:
            return _err("is_archived")
        answer: JSONDict = {"ok": True}
        if self.bot_user_id in channel["members"]:
            answer["warning"] = "already_in_channel"
            answer["response_metadata"] = {"warnings": ["already_in_channel"]}
        else:
            channel["members"].append(self.bot_user_id)
        answer["channel"] = self._public_channel(channel)
        return answer

    def _conversations_invite(self, call: Call) -> JSONDict:
        channel = self._channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found")
        raw = call.params.get("users", "")
        users = raw if isinstance(raw, list) else [u for u in str(raw).split(",") if u]
        if not users:
            return _err("no_user")
        for user in users:
            if user == self.bot_user_id:
                return _err("cant_invite_self")
            if user[:1] not in ("U", "W"):
                return _err("user_not_found")
            if user in channel["members"]:
                return _err(
                    "already_in_channel",
                    errors=[{"user": user, "ok": False, "error": "already_in_channel"}],
                )
        channel["members"].extend(users)
        return {"ok": True, "channel": self._public_channel(channel)}

    def _conversations_members(self, call: Call) -> JSONDict:
        channel = self._channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found")
        return {
            "ok": True,
            "members": list(channel["members"]),
            "response_metadata": {"next_cursor": ""},
        }

    def _conversations_history(self, call: Call) -> JSONDict:
        channel = self._resolve_post_channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found")
        top = [
            m
            for (ch, ts), m in self.messages.items()
            if ch == channel and m.get("thread_ts", ts) == ts
        ]
        limit = int(call.params.get("limit", 100))
        return {
            "ok": True,
            "messages": list(reversed(top))[:limit],
            "has_more": len(top) > limit,
            "response_metadata": {"next_cursor": ""},
        }

    def _conversations_replies(self, call: Call) -> JSONDict:
        channel = self._resolve_post_channel(call.params.get("channel"))
        ts = str(call.params.get("ts", ""))
        if channel is None:
            return _err("channel_not_found")
        if (channel, ts) not in self.messages:
            return _err("thread_not_found")
        thread = [
            m
            for (ch, mts), m in self.messages.items()
            if ch == channel and (mts == ts or m.get("thread_ts") == ts)
        ]
        return {
            "ok": True,
            "messages": thread,
            "has_more": False,
            "response_metadata": {"next_cursor": ""},
        }

    def _conversations_open(self, call: Call) -> JSONDict:
        users = [u for u in str(call.params.get("users", "")).split(",") if u]
        if not users:
            return _err("users_list_not_supplied")
        return {"ok": True, "channel": {"id": "D" + users[0][1:]}}

    def _set_channel_text(self, call: Call, field_name: str) -> JSONDict:
        channel = self._channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found")
        value = str(call.params.get(field_name, ""))
        channel[field_name] = {
            "value": value,
            "creator": self.bot_user_id,
            "last_set": int(time.time()),
        }
        return {"ok": True, "channel": self._public_channel(channel)}

    def _conversations_set_topic(self, call: Call) -> JSONDict:
        return self._set_channel_text(call, "topic")

    def _conversations_set_purpose(self, call: Call) -> JSONDict:
        return self._set_channel_text(call, "purpose")

    def _conversations_archive(self, call: Call) -> JSONDict:
        channel = self._channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found")
        if channel["is_archived"]:
            return _err("already_archived")
        channel["is_archived"] = True
        return {"ok": True}

    def _users_info(self, call: Call) -> JSONDict:
        user = self.users.get(str(call.params.get("user", "")))
        if user is None:
            return _err("user_not_found")
        return {"ok": True, "user": user}

    def _users_lookup_by_email(self, call: Call) -> JSONDict:
        email = str(call.params.get("email", "")).lower()
        for user in self.users.values():
            if str(user["profile"].get("email", "")).lower() == email and email:
                return {"ok": True, "user": user}
        return _err("users_not_found")

    def _users_list(self, call: Call) -> JSONDict:
        return {
            "ok": True,
            "members": list(self.users.values()),
            "response_metadata": {"next_cursor": ""},
        }

    def _usergroups_users_list(self, call: Call) -> JSONDict:
        members = self.usergroups.get(str(call.params.get("usergroup", "")))
        if members is None:
            return _err("no_such_subteam")
        return {"ok": True, "users": list(members)}

    def _reaction_target(self, call: Call) -> tuple[JSONDict | None, dict[str, Any] | None]:
        name = call.params.get("name")
        if not name:
            return _err("invalid_name"), None
        channel = self._resolve_post_channel(call.params.get("channel"))
        if channel is None:
            return _err("channel_not_found"), None
        key = (channel, str(call.params.get("timestamp", "")))
        if key in self.ephemerals:
            return _err("message_not_found"), None
        return None, self.messages.get(key)

    def _reactions_add(self, call: Call) -> JSONDict:
        problem, message = self._reaction_target(call)
        if problem is not None:
            return problem
        if message is not None:
            name = call.params["name"]
            reactions: list[dict[str, Any]] = message.setdefault("reactions", [])
            entry = next((r for r in reactions if r["name"] == name), None)
            if entry is None:
                reactions.append({"name": name, "users": [self.bot_user_id], "count": 1})
            elif self.bot_user_id in entry["users"]:
                return _err("already_reacted")
            else:
                entry["users"].append(self.bot_user_id)
                entry["count"] += 1
        return {"ok": True}

    def _reactions_remove(self, call: Call) -> JSONDict:
        problem, message = self._reaction_target(call)
        if problem is not None:
            return problem
        if message is not None:
            reactions = message.get("reactions", [])
            entry = next((r for r in reactions if r["name"] == call.params["name"]), None)
            if entry is None or self.bot_user_id not in entry["users"]:
                return _err("no_reaction")
            entry["users"].remove(self.bot_user_id)
            entry["count"] -= 1
            if not entry["count"]:
                reactions.remove(entry)
        return {"ok": True}

    def _view_object(self, view: Any, view_id: str | None = None) -> JSONDict | None:
        if not isinstance(view, dict):
            return None
        view_id = view_id or self._new_id("V")
        return {
            "id": view_id,
            "team_id": self.team_id,
            "type": view.get("type", "modal"),
            "title": view.get("title"),
            "submit": view.get("submit"),
            "close": view.get("close"),
            "blocks": view.get("blocks", []),
            "private_metadata": view.get("private_metadata", ""),
            "callback_id": view.get("callback_id", ""),
            "external_id": view.get("external_id", ""),
            "state": {"values": {}},
            "hash": f"{_TS_BASE}.{uuid.uuid4().hex[:8]}",
            "clear_on_close": bool(view.get("clear_on_close", False)),
            "notify_on_close": bool(view.get("notify_on_close", False)),
            "root_view_id": view_id,
            "previous_view_id": None,
            "app_id": self.app_id,
            "bot_id": self.bot_id,
        }

    def _check_view(self, view: Any) -> JSONDict | None:
        if not isinstance(view, dict):
            return _err("invalid_arguments")
        errors = block_errors(view.get("blocks", []), max_blocks=_MAX_VIEW_BLOCKS)
        if errors:
            return _err(
                "invalid_arguments",
                response_metadata={"messages": [f"[ERROR] {e}" for e in errors]},
            )
        return None

    def _views_open(self, call: Call) -> JSONDict:
        trigger = call.params.get("trigger_id")
        if not trigger:
            return _err("invalid_arguments")
        issued = self._triggers.pop(str(trigger), None)
        if issued is not None and time.monotonic() - issued > _TRIGGER_TTL:
            return _err("expired_trigger_id")
        problem = self._check_view(call.params.get("view"))
        if problem is not None:
            return problem
        view = self._view_object(call.params["view"])
        assert view is not None
        self.views[view["id"]] = view
        return {"ok": True, "view": view}

    def _views_update(self, call: Call) -> JSONDict:
        view_id = call.params.get("view_id")
        if not view_id:
            external = call.params.get("external_id")
            view_id = next(
                (v["id"] for v in self.views.values() if external and v["external_id"] == external),
                None,
            )
        if not view_id or view_id not in self.views:
            return _err("not_found")
        problem = self._check_view(call.params.get("view"))
        if problem is not None:
            return problem
        view = self._view_object(call.params["view"], str(view_id))
        assert view is not None
        self.views[view["id"]] = view
        return {"ok": True, "view": view}

    def _views_publish(self, call: Call) -> JSONDict:
        if not call.params.get("user_id"):
            return _err("invalid_arguments")
        problem = self._check_view(call.params.get("view"))
        if problem is not None:
            return problem
        view = self._view_object(call.params["view"])
        assert view is not None
        self.views[view["id"]] = view
        return {"ok": True, "view": view}

    def _files_get_upload_url(self, call: Call) -> JSONDict:
        filename = call.params.get("filename")
        length = call.params.get("length")
        if not filename or length in (None, ""):
            return _err("invalid_arguments")
        file_id = self._new_id("F")
        self._files[file_id] = _Upload(
            file={
                "id": file_id,
                "created": int(time.time()),
                "timestamp": int(time.time()),
                "name": filename,
                "title": filename,
                "mimetype": "",
                "filetype": "",
                "user": self.bot_user_id,
                "user_team": self.team_id,
                "size": int(length),
                "is_external": False,
                "url_private": f"{self.base_url}/files/{file_id}/{filename}",
                "permalink": f"{self.team_url}files/{self.bot_user_id}/{file_id}/{filename}",
                "channels": [],
                "groups": [],
                "ims": [],
                "shares": {},
            }
        )
        return {"ok": True, "upload_url": f"{self.base_url}/upload/{file_id}", "file_id": file_id}

    def _files_complete_upload(self, call: Call) -> JSONDict:
        entries = call.params.get("files")
        if not isinstance(entries, list) or not entries:
            return _err("invalid_arguments")
        channel_param = call.params.get("channel_id") or call.params.get("channels")
        channels = [c for c in str(channel_param or "").split(",") if c]
        out: list[dict[str, Any]] = []
        for entry in entries:
            upload = self._files.get(str(entry.get("id")) if isinstance(entry, dict) else "")
            if upload is None or not upload.uploaded:
                return _err("file_not_found")
            if entry.get("title"):
                upload.file["title"] = entry["title"]
            for channel in channels:
                key = (
                    "groups"
                    if channel.startswith("G")
                    else ("ims" if channel.startswith("D") else "channels")
                )
                upload.file[key].append(channel)
                share = {"ts": self._new_ts(), "channel_name": channel}
                if call.params.get("thread_ts"):
                    share["thread_ts"] = call.params["thread_ts"]
                upload.file["shares"].setdefault("public", {}).setdefault(channel, []).append(share)
            out.append(upload.file)
        return {"ok": True, "files": out}

    def _files_info(self, call: Call) -> JSONDict:
        upload = self._files.get(str(call.params.get("file", "")))
        if upload is None:
            return _err("file_not_found")
        return {"ok": True, "file": upload.file}
