"""The command line as a user meets it: real processes, real exit codes, real output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from commands.base import Status
from tests import leakcheck
from tests.conftest import fresh_state_url

ROOT = Path(__file__).resolve().parent.parent


def bot_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("SLACK_", "DATABASE_URL", "ADMIN_DATABASE", "STATE_DATABASE", "THRESHOLDS")
        )
        and k != "PORT"
    }
    clean.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    leakcheck.collect(f"output of python -m bot {args[0]}", done.stdout + done.stderr)
    return done


def test_run_health_prints_the_text_report(leaps_dsn: str) -> None:
    done = bot_cli("run", "health", env={"DATABASE_URL": leaps_dsn})
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("Database health — 127.0.0.1:")
    assert "[OK     ] reachability: connected to" in done.stdout
    assert "[OK     ] guard: AMPLIFY quota trigger" in done.stdout


def test_run_health_json_is_the_report_model(leaps_dsn: str) -> None:
    with psycopg.connect(leaps_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE submissions DISABLE TRIGGER trg_check_amplify_quota")
    done = bot_cli("run", "health", "--json", env={"DATABASE_URL": leaps_dsn})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"title", "target", "findings"}
    assert report["target"].endswith("/" + leaps_dsn.rsplit("/", 1)[1])
    statuses = {s.value for s in Status}
    for finding in report["findings"]:
        assert set(finding) == {"check", "status", "summary", "rows", "hint"}
        assert finding["status"] in statuses
    assert report["findings"][0] == {
        **report["findings"][0],
        "check": "guard: AMPLIFY quota trigger",
        "status": "crit",
    }


def test_password_never_printed() -> None:
    dsn = "postgres://leaps:s3cr3t-Pa55@127.0.0.1:9/leaps"
    leakcheck.secret("s3cr3t-Pa55", "a test DSN's password")
    done = bot_cli("run", "health", "--json", env={"DATABASE_URL": dsn})
    assert done.returncode == 0
    assert "s3cr3t-Pa55" not in done.stdout + done.stderr
    report = json.loads(done.stdout)
    lint = next(f for f in report["findings"] if f["check"] == "connection string")
    assert lint["status"] == "warn"
    assert "postgres://leaps:***@127.0.0.1:9/leaps" in lint["summary"]
    assert "postgresql://" in lint["summary"]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["run", "health"], {}, "DATABASE_URL is not set"),
        (["serve"], {"DATABASE_URL": "postgresql://x@h/d"}, "SLACK_BOT_TOKEN is not set"),
        (
            ["serve"],
            {"DATABASE_URL": "postgresql://x@h/d", "SLACK_BOT_TOKEN": "xoxb-1"},
            "SLACK_SIGNING_SECRET is not set",
        ),
        (["socket"], {"SLACK_BOT_TOKEN": "xoxb-1"}, "SLACK_APP_TOKEN is not set"),
        (["run", "health"], {"PORT": "eighty"}, "PORT is invalid"),
        (
            ["run", "health"],
            {"THRESHOLDS__LONG_QUERY_WARN_S": "soon"},
            "THRESHOLDS__LONG_QUERY_WARN_S is invalid",
        ),
        (["run", "health"], {"SLACK_API_URL": "slack.example"}, "SLACK_API_URL is invalid"),
    ],
)
def test_bad_settings_give_one_line_and_exit_2(
    args: list[str], env: dict[str, str], message: str
) -> None:
    done = bot_cli(*args, env=env, timeout=20)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr


def test_unknown_command_on_the_console(leaps_dsn: str) -> None:
    done = bot_cli("run", "helth", env={"DATABASE_URL": leaps_dsn})
    assert done.returncode == 2
    assert "unknown command `helth`" in done.stderr
    assert "`health`" in done.stderr


# `python -m bot demo`: its findings and its database are checked on one `demo --keep` run,
# in tests/test_demo_keep.py.


async def test_console_approval_flow(leaps_dsn: str, tmp_path: Path) -> None:
    """The demo's way through a remedy: request, refused self-approval, approval, done."""
    from tests.test_approvals import Victims

    victims = Victims(leaps_dsn)
    try:
        pids = await victims.open(2)
        env = {
            "DATABASE_URL": leaps_dsn,
            "STATE_DATABASE_URL": f"sqlite:///{tmp_path}/state.sqlite3",
            "ROLE_MAP": json.dumps({"U0ONCALL": "REVIEWER", "U0LEAD": "ADMIN"}),
        }
        asked = bot_cli("run", "kill-idle 0", "--user", "U0ONCALL", env=env)
        assert asked.returncode == 0, asked.stderr
        approval_id = asked.stdout.split("approval ")[-1].split()[0]
        assert approval_id.startswith("apv-")
        for pid in pids:
            assert str(pid) in asked.stdout
        own = bot_cli("approve", approval_id, "--user", "U0ONCALL", env=env)
        assert "cannot approve your own request" in own.stdout
        assert await victims.alive() == set(pids)
        done = bot_cli("approve", approval_id, "--user", "U0LEAD", env=env)
        assert done.returncode == 0, done.stderr
        assert "done" in done.stdout
        assert await victims.alive() == set()
        again = bot_cli("approve", approval_id, "--user", "U0LEAD", env=env)
        assert "already done" in again.stdout
    finally:
        await victims.close()


async def test_console_approval_prints_sql_as_written(leaps_dsn: str) -> None:
    """`*` in SQL is SQL, not mrkdwn emphasis: `SELECT t.*` and `count(*)` print whole."""
    from commands.fixture.faults import FaultInjector

    async with FaultInjector(leaps_dsn) as faults:
        await faults.orphan_attachments(2)
    env = {
        "DATABASE_URL": leaps_dsn,
        "STATE_DATABASE_URL": fresh_state_url(),  # a copy of the migrated template
        "ROLE_MAP": json.dumps({"U0LEAD": "ADMIN"}),
    }
    asked = bot_cli("run", "cleanup-orphans", "--user", "U0LEAD", env=env)
    assert asked.returncode == 0, asked.stderr
    assert "SELECT t.* FROM" in asked.stdout
