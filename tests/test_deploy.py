"""How the bot is deployed: the image's state volume, Socket Mode's health server, and
/metrics adding up every HTTP worker. The bot runs as `python -m bot`, as in the image."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests import leakcheck
from tests.botproc import free_port, output_file, wait_healthy
from tests.fakeslack import FakeSlack, make_envelope
from tests.slackreq import SIGNING_SECRET, signed_headers, slash_body

ROOT = Path(__file__).resolve().parent.parent


# -- the image ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in logical]


def env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for kind, args in instructions:
        if kind == "ENV":
            env.update(part.partition("=")[::2] for part in shlex.split(args) if "=" in part)
    return env


def test_dockerfile_keeps_state_in_a_volume_the_unprivileged_user_owns() -> None:
    steps = dockerfile_instructions()
    kinds = [k for k, _ in steps]
    env = env_of(steps)

    state_url = env["STATE_DATABASE_URL"]
    assert state_url.startswith("sqlite:////"), state_url
    state_dir = str(Path(state_url.removeprefix("sqlite:///")).parent)

    volume_at = kinds.index("VOLUME")
    volumes = json.loads(steps[volume_at][1])
    assert state_dir in volumes

    user = steps[kinds.index("USER")][1].split(":")[0]
    assert user not in ("root", "0")
    assert kinds.index("USER") > volume_at
    # The directory is made and handed to that user before VOLUME (later changes are lost).
    setup = " ".join(args for kind, args in steps[:volume_at] if kind == "RUN")
    assert re.search(rf"mkdir -p {re.escape(state_dir)}\b", setup)
    owner = re.search(rf"chown (\S+) {re.escape(state_dir)}\b", setup)
    assert owner is not None and owner.group(1).split(":")[0] in (user, "dbops")
    assert f"--uid {user}" in setup or user == "dbops"

    # The health check asks /healthz on $PORT, which Socket Mode serves too (test below).
    health = steps[kinds.index("HEALTHCHECK")][1]
    assert "/healthz" in health and "PORT" in health


# -- bot processes ------------------------------------------------------------------------


def bot_env(fake: FakeSlack, target_dsn: str, state_dir: str, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "PROMETHEUS_"))}
    return {
        **keep,
        "SLACK_BOT_TOKEN": "xoxb-test",
        "SLACK_API_URL": fake.api_url,
        "DATABASE_URL": target_dsn,
        "STATE_DATABASE_URL": f"sqlite:///{state_dir}/state.sqlite3",
        "DIAGNOSTICS_ROLE": "PARTICIPANT",
        # every command's own role is enforced: the users these tests diagnose as are REVIEWERs
        "ROLE_MAP": json.dumps(dict.fromkeys(("U0SOCK", "U0NONROOT"), "REVIEWER")),
        "LOG_LEVEL": "WARNING",
        **extra,
    }


@asynccontextmanager
async def bot_process(args: list[str], env: dict[str, str], port: int) -> AsyncIterator[str]:
    with output_file(f"output of python -m bot {args[0]}") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", *args, cwd=ROOT, env=env, stdout=out, stderr=out
        )
        async with _running(proc, port) as url:
            yield url


@asynccontextmanager
async def _running(proc: asyncio.subprocess.Process, port: int) -> AsyncIterator[str]:
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc, limit_s=30)
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def fetch(url: str) -> tuple[int, str]:
    """A GET on a new connection, so that each lands on whichever worker the kernel picks."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.get(url) as resp,
    ):
        return resp.status, await resp.text()


def commands_total(exposition: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "dbops_commands"
        for sample in family.samples
        if sample.name == "dbops_commands_total"
    )


async def test_socket_mode_serves_healthz_and_metrics(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as state_dir:
        env = bot_env(fake_slack, leaps_dsn, state_dir, SLACK_APP_TOKEN="xapp-1-test")
        async with bot_process(["socket", "--port", str(port), "--host", "127.0.0.1"], env, port):
            url = f"http://127.0.0.1:{port}"
            status, body = await fetch(f"{url}/healthz")
            assert status == 200 and json.loads(body)["status"] == "ok"
            await fake_slack.wait_for("apps.connections.open", timeout=15)
            envelope = make_envelope(
                "slash_commands",
                {
                    "command": "/db",
                    "text": "health",
                    "user_id": "U0SOCK",
                    "channel_id": "C0SOCK",
                    "team_id": "T0001",
                    "response_url": fake_slack.response_url("sock"),
                },
            )
            await fake_slack.send_socket_envelope(envelope)
            await fake_slack.wait_for_socket_ack(str(envelope["envelope_id"]), timeout=15)
            await fake_slack.wait_for("chat.postEphemeral", timeout=20)
            for _ in range(100):
                status, text = await fetch(f"{url}/metrics")
                if commands_total(text) == 1:
                    break
                await asyncio.sleep(0.1)
            assert status == 200 and commands_total(text) == 1, text[:500]
            assert 'dbops_commands_total{command="health"' in text


async def test_metrics_add_up_across_http_workers(leaps_dsn: str, fake_slack: FakeSlack) -> None:
    """N commands over two workers: every scrape says N, whichever worker answers it."""
    n = 30
    port = free_port()
    with tempfile.TemporaryDirectory() as state_dir:
        env = bot_env(fake_slack, leaps_dsn, state_dir, SLACK_SIGNING_SECRET=SIGNING_SECRET)
        args = ["serve", "--workers", "2", "--port", str(port), "--host", "127.0.0.1"]
        async with bot_process(args, env, port) as url:
            pids: set[int] = set()
            for _ in range(300):  # the second worker may still be starting
                pids.add(int(json.loads((await fetch(f"{url}/healthz"))[1])["pid"]))
                if len(pids) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(pids) == 2, "both workers should answer on the shared port"
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as http:
                for i in range(n):
                    body = slash_body(
                        "help", user=f"U0M{i:03d}", response_url=fake_slack.response_url(f"m{i}")
                    )
                    async with http.post(
                        f"{url}/slack/events", data=body, headers=signed_headers(body)
                    ) as resp:
                        assert resp.status == 200
            await fake_slack.wait_for("response_url", count=n, timeout=20)
            totals = [commands_total((await fetch(f"{url}/metrics"))[1]) for _ in range(12)]
            assert totals == [n] * 12, totals


# -- running as an unprivileged user ------------------------------------------------------

# The interpreter of this virtualenv may live where only root can read (/root/.pyenv): it
# starts as root, imports the bot, and drops to the unprivileged user before `main()`, so
# everything the bot does at run time (migrations, the state file, serving) is done as it.
# (Alembic too: the bot imports it only when a migration is due.)
DROP_PRIVILEGES = """
import os, sys
import aiosqlite, sqlalchemy.dialects.sqlite.aiosqlite, alembic.command, alembic.config
import bot.console.cli, bot.slack.server, bot.state.store, commands
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([]); os.setgid(gid); os.setuid(uid)
sys.exit(bot.console.cli.main(sys.argv[3:]))
"""


def unprivileged_command(args: list[str], data_dir: Path, app_dir: Path) -> list[str]:
    if os.geteuid() != 0:
        app_dir.chmod(0o555)  # an image's /app: readable, not writable
        return [sys.executable, "-m", "bot", *args]
    import pwd

    nobody = pwd.getpwnam("nobody")
    os.chown(data_dir, nobody.pw_uid, nobody.pw_gid)
    return [sys.executable, "-c", DROP_PRIVILEGES, str(nobody.pw_uid), str(nobody.pw_gid), *args]


async def test_bot_runs_unprivileged_with_state_in_its_volume(
    leaps_dsn: str, fake_slack: FakeSlack
) -> None:
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        app_dir, data_dir = Path(tmp, "app"), Path(tmp, "data")
        os.mkdir(app_dir)
        os.mkdir(data_dir, mode=0o700)
        os.chmod(tmp, 0o755)
        port = free_port()
        args = ["serve", "--port", str(port), "--host", "127.0.0.1"]
        command = unprivileged_command(args, data_dir, app_dir)
        env = {
            **bot_env(fake_slack, leaps_dsn, str(data_dir), SLACK_SIGNING_SECRET=SIGNING_SECRET),
            "PYTHONPATH": str(ROOT),
            "WEB_CONCURRENCY": "1",
        }
        del env["STATE_DATABASE_URL"]

        # Today's default (a file in the working directory) cannot work in a read-only /app.
        proc = await asyncio.create_subprocess_exec(
            *command, cwd=app_dir, env=env, stderr=asyncio.subprocess.PIPE
        )
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
        leakcheck.collect("output of a bot process in a read-only app directory", err)
        assert proc.returncode != 0, "the bot wrote its state into the read-only app directory"
        assert b"unable to open database file" in err or b"Permission denied" in err

        # The image's setting: the state file in the volume the user owns.
        env["STATE_DATABASE_URL"] = f"sqlite:///{data_dir}/dbops-state.sqlite3"
        out = stack.enter_context(output_file("output of a bot process in the image's layout"))
        proc = await asyncio.create_subprocess_exec(
            *command, cwd=app_dir, env=env, stdout=out, stderr=out
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_healthy(url, proc, limit_s=30)
            body = slash_body("health", user="U0NONROOT", response_url=fake_slack.response_url())
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{url}/slack/events", data=body, headers=signed_headers(body)) as resp,
            ):
                assert resp.status == 200
            (reply,) = await fake_slack.wait_for("chat.postEphemeral", timeout=20)
            assert "reachability" in json.dumps(reply.params.get("blocks"))
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 20)
        state = os.stat(data_dir / "dbops-state.sqlite3")
        assert state.st_uid == os.stat(data_dir).st_uid
        assert state.st_uid != 0 or os.geteuid() != 0  # written by the unprivileged user
        assert os.listdir(app_dir) == []
