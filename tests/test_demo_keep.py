"""`python -m bot demo --keep` as a new user runs it (what `make run ARGS='demo --keep'`
does): it names every fault it injected, section by section, prints the DATABASE_URL of its
PostgreSQL with the faults still in place, `python -m bot run "health"` reports against it
from another process, and Ctrl-C stops the demo and its PostgreSQL within seconds. (One
demo run carries all of it: each run builds a PostgreSQL cluster and the fixture.)"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests import leakcheck

ROOT = Path(__file__).resolve().parent.parent
DEMO_LIMIT_S = 180.0  # the whole demo until the DSN is printed, on a busy machine
STOP_LIMIT_S = 10.0  # "within seconds"


def new_user_env() -> dict[str, str]:
    """A shell with nothing of the bot's configured (no Slack, no database)."""
    keep = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR", "PG_BIN")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env |= {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return env


def exported(line: str) -> dict[str, str]:
    """The variables of the printed `export A='…' B=… ` line, as the shell reads them."""
    words = shlex.split(line.strip().removeprefix("export "))
    return dict(word.split("=", 1) for word in words)


async def read_until_export(out: asyncio.StreamReader, seen: list[str]) -> dict[str, str]:
    while True:
        raw = await out.readline()
        if not raw:
            raise AssertionError("the demo ended without printing DATABASE_URL:\n" + "".join(seen))
        line = raw.decode("utf-8", "replace")
        seen.append(line)
        if line.strip().startswith("export DATABASE_URL="):
            return exported(line)


def refused(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return False
    except psycopg.OperationalError:
        return True


def assert_every_fault_named(out: str) -> None:
    """The demo's findings: the five faults of its final health report, and the later
    sections of the guide, each with the fault the demo injected for it."""
    flagged = [line for line in out.splitlines() if line.startswith(("[CRIT", "[WARN"))]
    text = "\n".join(flagged)
    for check, detail in [
        ("idle in transaction", "idle in transaction"),
        ("blocked sessions", "←"),
        ("materialized views", "leaderboard_totals"),
        ("migrations", "failed"),
        ("guard: AMPLIFY quota trigger", "disabled"),
        # the later sections of the guide, each with the fault the demo injected for it
        ("webhooks: unmatched backlog (alert)", "alert above 50"),
        ("webhooks: NO_USER_FOUND with a matching user", "2 NO_USER_FOUND events match"),
        ("webhooks: duplicate payloads", "2 payloads received more than once"),
        ("invalid roles", "MODERATOR"),
        ("duplicate indexes", "submissions_user_id_copy_idx"),
        ("recommended indexes", "points_ledger(user_id, created_at DESC)"),
        ("leaderboard_totals: vs ledger", "stale"),
    ]:
        line = next((ln for ln in flagged if f"] {check}:" in ln), None)
        assert line is not None, f"{check} not flagged in:\n{text}"
        assert detail in line, line
    # `/db slow` reads pg_stat_statements where Supabase keeps it (the demo creates it there)
    assert "] top statements: 20 costliest statements of this database" in out
    assert "(extensions.pg_stat_statements)" in out
    # act two, the emergency recovery: a freeze health reports, then one runbook restoring
    # from the copy and lifting the freeze
    assert "═══ Emergency recovery" in out and "═══ End of the emergency recovery" in out
    assert "did not end as planned" not in out
    assert "[CRIT   ] writes frozen: writes frozen since" in out
    assert "1. restore-from-copy: " in out and "6. unfreeze-writes" in out
    assert "done: 6 of 6 steps done" in out
    assert "[OK     ] writes frozen: writes are not frozen" in out


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl-C is SIGINT")
async def test_demo_names_every_fault_and_keeps_its_database_until_ctrl_c() -> None:
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "demo",
        "--keep",
        cwd=ROOT,
        env=new_user_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    seen: list[str] = []
    try:
        assert demo.stdout is not None
        variables = await asyncio.wait_for(read_until_export(demo.stdout, seen), DEMO_LIMIT_S)
        assert_every_fault_named("".join(seen))
        dsn = variables["DATABASE_URL"]
        assert "REMEDY_SERVICE_USER_ID" in variables  # looked up before the blocking chain
        run = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "run",
            "health",
            cwd=ROOT,
            env=new_user_env() | variables,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(run.communicate(), 60)
        report = out.decode()
        assert run.returncode == 0, err.decode()
        port = urlsplit(dsn).port
        assert f"reachability: connected to 127.0.0.1:{port}/leaps" in report
        # the demo's faults are still there: the blocking chain it injected on `users`
        assert "blocked sessions" in report and "users" in report, report
        assert "disabled" in report  # the quota trigger
        state_url = variables["STATE_DATABASE_URL"]
        run_dir = Path(state_url.removeprefix("sqlite:///")).parent
        assert run_dir.is_dir()

        demo.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = await asyncio.wait_for(demo.communicate(), STOP_LIMIT_S)
        seen.append(rest.decode("utf-8", "replace"))
        assert demo.returncode == 0, "".join(seen)
        assert "Traceback" not in "".join(seen)
        assert refused(dsn), "the demo's PostgreSQL still accepts connections"
        assert not run_dir.exists(), f"{run_dir} was left behind"
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
            sys.stderr.write("".join(seen))
        leakcheck.collect("output of python -m bot demo --keep", "".join(seen))
