"""Nothing secret leaves the bot: connection strings, query literals, mrkdwn controls."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bot.gateway import MASK, UNPARSEABLE, TargetGateway, describe_target, mask_dsn
from bot.messages import render
from bot.router import Dispatcher, RunContext
from bot.settings import load_settings
from commands.base import Report, Thresholds, redact_literals, shown_queries
from tests.conftest import RunningBot

ROOT = Path(__file__).resolve().parent.parent

# Passwords with everything that breaks hand-written parsers: spaces, quotes, backslashes,
# and the URL delimiters (@ :// ? & = / #), plus non-ASCII.
secrets_ = st.text(
    alphabet=st.sampled_from(list(" '\\@:/?&=#%\"+;$") + list("abcXYZ019") + ["é", "密"]),
    min_size=1,
    max_size=24,
)
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
hosts = st.sampled_from(["db.example.org", "127.0.0.1", "h1,h2", "[::1]"])


def url_userinfo(user: str, password: str, host: str, db: str) -> str:
    return f"postgresql://{quote(user)}:{quote(password, safe='')}@{host}:6543/{db}?sslmode=require"


def url_query(user: str, password: str, host: str, db: str) -> str:
    pw = quote(password, safe="")
    return f"postgresql://{quote(user)}@{host}/{db}?password={pw}&application_name=x"


def url_sslpassword(user: str, password: str, host: str, db: str) -> str:
    pw = quote(password, safe="")
    return f"postgres://{user}@{host}/{db}?sslmode=verify-full&sslpassword={pw}"


def url_both(user: str, password: str, host: str, db: str) -> str:
    pw = quote(password, safe="")
    return f"postgresql://{user}:{pw}@{host}/{db}?password={pw}"


def keywords(user: str, password: str, host: str, db: str) -> str:
    return make_conninfo("", host=host.strip("[]"), user=user, password=password, dbname=db)


def keywords_ssl(user: str, password: str, host: str, db: str) -> str:
    return make_conninfo("", host=host.strip("[]"), dbname=db, sslpassword=password)


def nested(user: str, password: str, host: str, db: str) -> str:
    """libpq expands a dbname that is itself a connection string."""
    return make_conninfo("", dbname=url_userinfo(user, password, host, db))


FORMS = [url_userinfo, url_query, url_sslpassword, url_both, keywords, keywords_ssl, nested]


@given(form=st.sampled_from(FORMS), user=words, password=secrets_, host=hosts, db=words)
@example(form=url_userinfo, user="leaps", password="Pw://", host="db.example.org", db="x")
@example(form=url_query, user="u", password="a&password=b", host="h1,h2", db="d")
@example(form=keywords, user="u", password="it's a \\ secret", host="h", db="d")
def test_mask_dsn_never_shows_a_password_in_any_form(
    form: object, user: str, password: str, host: str, db: str
) -> None:
    assert callable(form)
    dsn = form(user, password, host, db)
    reference = mask_dsn(form(user, "REFERENCE", host, db))
    # A password that is also part of the user or host name is not a secret of the mask's.
    assume(password not in reference and quote(password, safe="") not in reference)
    masked = mask_dsn(dsn)
    assert masked == reference != UNPARSEABLE
    assert password not in masked
    assert quote(password, safe="") not in masked and quote(password) not in masked
    assert MASK in masked
    # The form survives: a URL stays a URL, keywords stay keywords, and it names the same server.
    assert masked.startswith(("postgresql://", "postgres://")) == dsn.startswith("postgres")

    def plain(d: str) -> dict[str, str]:
        secret = (MASK, password, quote(password, safe=""))
        params = {k: str(v) for k, v in conninfo_to_dict(d).items()}
        return {k: v for k, v in params.items() if not any(s in v for s in secret)}

    assert plain(masked) == plain(dsn)
    target = describe_target(dsn)
    assert target == describe_target(form(user, "REFERENCE", host, db)) or password not in target


def test_mask_dsn_query_string_secrets() -> None:
    assert (
        mask_dsn("postgresql://u@h/db?password=hunter2&sslpassword=k3y&application_name=a")
        == "postgresql://u@h/db?password=***&sslpassword=***&application_name=a"
    )
    assert mask_dsn("host=h password=hunter2 sslpassword=k3y") == (
        "password=*** host=h sslpassword=***"
    )


@pytest.mark.parametrize(
    "dsn",
    [
        "host=127.0.0.1 port=9 password=hunter 2secret dbname=x",  # unquoted space
        "host=127.0.0.1 port=9 password='hunter2secret dbname=x",  # unterminated quote
        "postgresql://u:hunter2secret@127.0.0.1:9/x?hunter2secret=1",
    ],
)
async def test_a_broken_dsn_is_never_quoted_back(dsn: str) -> None:
    """libpq's parse errors quote the fragment they choke on: that may be the password."""
    gw = TargetGateway(dsn, connect_timeout_s=1)
    try:
        report = await Dispatcher(RunContext(gw, Thresholds())).run("health")
    finally:
        await gw.close()
    assert isinstance(report, Report)
    shown = render.to_json(report) + render.to_text(report)
    assert "secret" not in shown
    assert "the connection string cannot be parsed" in shown


def test_unparseable_dsn_shows_a_placeholder_never_the_string() -> None:
    for bad in ("postgresql://u:hunter2@h/db?x", "host=h password='hunter2", "hunter2 junk"):
        assert mask_dsn(bad) == UNPARSEABLE
        assert describe_target(bad) == UNPARSEABLE


# --- query literals -------------------------------------------------------------------------

MARK = "§"  # in every secret, nowhere in the SQL around it
literal_bodies = st.text(alphabet=st.sampled_from(list("ab $'\"\\\n\t-*/;E§é")), max_size=20).map(
    lambda s: s + MARK
)
tags = st.sampled_from(["", "x", "tag", "_t1", "é"])
around = st.lists(
    st.sampled_from(
        [
            "SELECT",
            "x$y$",
            "t.*",
            "count(*)",
            "$1",
            "::text",
            ",",
            "(",
            ")",
            "=",
            "1",
            '"it\'s"',
            '"a""b"',
            "/* don't */",
            "/* /* nested' */ */",
            "-- it's\n",
            "E",
            "'other'",
            "E'x\\''",
            "$q$plain$q$",
            "U&'d\\0061t'",
            "\n",
            " ",
        ]
    ),
    max_size=8,
).map(" ".join)


def as_literal(kind: str, body: str, tag: str) -> str:
    if kind == "standard":
        return "'" + body.replace("'", "''") + "'"
    if kind == "escape":
        return "E'" + body.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"${tag}${body}${tag}$"


@given(
    kind=st.sampled_from(["standard", "escape", "dollar"]),
    body=literal_bodies,
    tag=tags,
    before=around,
    after=around,
)
@example(kind="standard", body="hunter2" + MARK, tag="", before="ALTER ROLE x PASSWORD", after="")
@example(kind="escape", body="\\'§", tag="", before='"a\'b"', after="'x'")
@example(kind="dollar", body="$x$§", tag="", before="x$y$", after="")
def test_no_secret_survives_in_any_literal_form(
    kind: str, body: str, tag: str, before: str, after: str
) -> None:
    assume(kind != "dollar" or f"${tag}$" not in body)
    query = f"{before} {as_literal(kind, body, tag)} {after}"
    shown = redact_literals(query)
    assert MARK not in shown
    # As the reports fetch it: whitespace folded, then cut at any length.
    folded = re.sub(r"\s+", " ", query)
    for cut in range(len(folded) + 1):
        assert MARK not in redact_literals(folded[:cut])


def test_redaction_keeps_the_sql_around_literals() -> None:
    assert redact_literals("ALTER ROLE app PASSWORD 'hunter2'") == "ALTER ROLE app PASSWORD '…'"
    assert (
        redact_literals("SELECT t.*, count(*) FROM \"it's\" t WHERE a = $1 AND b = E'x\\'y'")
        == "SELECT t.*, count(*) FROM \"it's\" t WHERE a = $1 AND b = '…'"
    )
    assert redact_literals("SELECT $f$a$$b$f$, 'it''s' /* c's */") == "SELECT '…', '…' /* c's */"
    assert redact_literals("SELECT 1 -- who's\nSELECT 'x'") == "SELECT 1 -- who's\nSELECT '…'"
    assert redact_literals("SELECT 1 -- who's SELECT 'x'") == "SELECT 1 -- …"
    assert redact_literals("INSERT INTO t VALUES ('cut off") == "INSERT INTO t VALUES ('…'"


def test_literals_shown_when_the_setting_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    query = "UPDATE users SET email = 'ann@example.org'"
    assert shown_queries([{"query": query}], False) == [{"query": "UPDATE users SET email = '…'"}]
    assert shown_queries([{"query": query}], True) == [{"query": query}]
    assert not load_settings(_env_file=None).thresholds.show_query_literals
    monkeypatch.setenv("SHOW_QUERY_LITERALS", "true")
    assert load_settings(_env_file=None).thresholds.show_query_literals


# --- the suite-wide leak check can fail a session -------------------------------------------

INNER_TEST = """
import logging
from tests import leakcheck

def test_logs_a_dsn():
    leakcheck.secret("hunter2-inner", "the inner PostgreSQL password")
    logging.getLogger("bot.inner").warning("connecting to %s", {dsn!r})
"""


def inner_session(tmp_path: Path, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A pytest session of its own with the leak check. Hypothesis's plugin is left out:
    the inner test has no use for it, and its import is most of a session's CPU (xdist's
    workers inherit the `-p no:`)."""
    (tmp_path / "test_inner.py").write_text(INNER_TEST.format(dsn=dsn))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.leakcheck", "-p", "no:cacheprovider",
         "-p", "no:hypothesispytest", *args, "test_inner.py"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_a_leaked_password_fails_the_whole_session(tmp_path: Path) -> None:
    leaked = inner_session(tmp_path, "postgresql://u:hunter2-inner@h/db")
    assert "1 passed" in leaked.stdout  # the test itself passed ...
    assert leaked.returncode == pytest.ExitCode.TESTS_FAILED  # ... the session did not
    assert "the inner PostgreSQL password found in log record of bot.inner" in leaked.stdout
    assert "hunter2-inner" not in leaked.stdout + leaked.stderr
    masked = inner_session(tmp_path, mask_dsn("postgresql://u:hunter2-inner@h/db"))
    assert masked.returncode == 0, masked.stdout


def test_a_leak_in_an_xdist_worker_fails_the_whole_run(tmp_path: Path) -> None:
    """`make test` runs the suite in xdist workers: a secret one worker learnt and leaked
    is found there and fails the run the controller reports."""
    leaked = inner_session(tmp_path, "postgresql://u:hunter2-inner@h/db", "-n", "1")
    assert "1 passed" in leaked.stdout
    assert leaked.returncode == pytest.ExitCode.TESTS_FAILED
    assert "the inner PostgreSQL password found in log record of bot.inner" in leaked.stdout
    assert "hunter2-inner" not in leaked.stdout + leaked.stderr
    masked = inner_session(tmp_path, mask_dsn("postgresql://u:hunter2-inner@h/db"), "-n", "1")
    assert masked.returncode == 0, masked.stdout
    assert "from 1 worker clean of" in masked.stdout


# --- end to end: what reaches Slack from the database ---------------------------------------


async def test_database_values_reach_slack_escaped_and_literals_elided(
    bot: RunningBot, leaps_dsn: str
) -> None:
    """A session named `<!channel>` and a query holding a link and a password literal."""
    sessions = [
        await psycopg.AsyncConnection.connect(leaps_dsn, application_name=app)
        for app in ("<!channel>", "innocent")
    ]
    try:
        await sessions[0].execute("SELECT 1")
        await sessions[1].execute("/* <http://evil.example|click> */ SELECT 'hunter2-literal'")
        await asyncio.sleep(1.2)  # idle in transaction beyond FAST_THRESHOLDS
        await bot.slash("connections")
        (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=15)
    finally:
        for conn in sessions:
            await conn.close()
    sent = call.body.decode() + json.dumps(call.params)
    assert "&lt;!channel&gt;" in sent and "<!channel>" not in sent
    assert "&lt;http://evil.example|click&gt;" in sent and "<http" not in sent
    assert "hunter2-literal" not in sent
    assert "SELECT '…'" in json.dumps(call.params, ensure_ascii=False)
