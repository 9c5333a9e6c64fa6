"""A pytest plugin: no configured secret may appear in anything the bot said during the run.

One test cannot prove that a password never leaks: a log line in an error path, a Slack
message from a remedy, a CLI traceback can each carry it. So the whole session collects
what left the bot (every request the fake Slack received, every log record, the output of
every CLI run and bot process the tests started) and, at the end, fails the session if a
secret the tests configured (the test PostgreSQL password, the Slack signing secret, the
tokens) occurs in any of it. The report names where it was found, never the secret.

Loaded by tests/conftest.py (`pytest_plugins`); `-p tests.leakcheck` loads it elsewhere.

Under pytest-xdist (`make test` runs the suite in worker processes, each with its own
PostgreSQL server and its own secrets), every worker checks what it collected against what it
knows at the end of its session and hands the findings to the controller
(`workeroutput`), which reports once for the whole run and fails it on any leak.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest

from tests.fakeslack import Call, FakeSlack
from tests.slackreq import SIGNING_SECRET

# Token values the tests configure (bot_settings, the bot processes, Socket Mode).
TEST_TOKENS = ("xoxb-test-token", "xoxb-test", "xapp-test", "xapp-1-test")


@dataclass
class LeakCollector:
    secrets: dict[str, str] = field(default_factory=dict)  # secret -> what it is
    texts: list[tuple[str, str]] = field(default_factory=list)  # (where, text)

    def secret(self, value: str, name: str) -> None:
        """A value that must never appear (and its percent-encoded form)."""
        if value:
            self.secrets[value] = name
            self.secrets.setdefault(quote(value, safe=""), f"{name} (percent-encoded)")

    def collect(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if text:
            self.texts.append((where, text))

    def found(self) -> Counter[tuple[str, str]]:
        """How often each secret (by name) occurs in each place."""
        found: Counter[tuple[str, str]] = Counter()
        for where, text in self.texts:
            for value, name in self.secrets.items():
                if value in text:
                    found[(name, where)] += 1
        return found

    def leaks(self) -> list[str]:
        """One line per (secret, place), naming both but showing neither value."""
        return _lines(self.found())

    def summary(self) -> dict[str, Any]:
        """What a worker hands the controller: counts, kinds of sources, digests of the
        secrets (to count distinct ones across workers) and the findings, never a value."""
        return {
            "texts": len(self.texts),
            "kinds": sorted({_kind(where) for where, _ in self.texts}),
            "secrets": sorted(_digest(value) for value in self.secrets),
            "found": [[name, where, n] for (name, where), n in sorted(self.found().items())],
        }


def _kind(where: str) -> str:
    return where.split(" (")[0]


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _lines(found: Counter[tuple[str, str]]) -> list[str]:
    return [f"{name} found in {where} ({n}x)" for (name, where), n in sorted(found.items())]


COLLECTOR = LeakCollector()


def secret(value: str, name: str) -> None:
    COLLECTOR.secret(value, name)


def collect(where: str, text: str | bytes) -> None:
    COLLECTOR.collect(where, text)


def _call_text(call: Call) -> str:
    """What the bot sent in one request: raw body and decoded parameters (not the headers,
    where the bot token belongs)."""
    params = {
        k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        for k, v in call.params.items()
        if k != "token"
    }
    return call.body.decode("utf-8", "replace") + "\n" + json.dumps(params, default=str)


def _on_call(call: Call) -> None:
    COLLECTOR.collect(f"fake Slack {call.method} request", _call_text(call))


class _Handler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)  # message with its arguments, plus any traceback
        except Exception:  # a broken log call must not break the test it happens in
            text = f"{record.msg!r} {record.args!r}"
        COLLECTOR.collect(f"log record of {record.name} ({record.pathname}:{record.lineno})", text)


_handler = _Handler()


def pytest_configure(config: pytest.Config) -> None:
    root = logging.getLogger()
    root.addHandler(_handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    FakeSlack.observers.append(_on_call)
    secret(SIGNING_SECRET, "the Slack signing secret")
    for token in TEST_TOKENS:
        secret(token, "a Slack token")


def pytest_unconfigure(config: pytest.Config) -> None:
    logging.getLogger().removeHandler(_handler)
    if _on_call in FakeSlack.observers:
        FakeSlack.observers.remove(_on_call)


# Findings handed over by the xdist workers that finished (controller side).
_WORKER_SUMMARIES: list[dict[str, Any]] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist (controller): a worker finished; keep what its leak check found."""
    summary = getattr(node, "workeroutput", {}).get("leakcheck")
    if summary is not None:
        _WORKER_SUMMARIES.append(summary)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: Any) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller reports for the run
        workeroutput["leakcheck"] = COLLECTOR.summary()
        return
    texts = len(COLLECTOR.texts)
    kinds = {_kind(where) for where, _ in COLLECTOR.texts}
    secrets = {_digest(value) for value in COLLECTOR.secrets}
    found = COLLECTOR.found()
    for summary in _WORKER_SUMMARIES:
        texts += summary["texts"]
        kinds.update(summary["kinds"])
        secrets.update(summary["secrets"])
        for name, where, n in summary["found"]:
            found[(name, where)] += n
    leaks = _lines(found)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not leaks:
        if reporter is not None:
            n = len(_WORKER_SUMMARIES)
            workers = f" from {n} worker{'s' if n > 1 else ''}" if n else ""
            reporter.write_sep(
                "-",
                f"leak check: {texts} texts ({len(kinds)} sources){workers} clean of "
                f"{len(secrets)} secrets",
            )
        return
    lines = ["secrets leaked (the session fails):", *(f"  {line}" for line in leaks)]
    if reporter is not None:
        reporter.write_sep("=", "leak check", red=True)
        for line in lines:
            reporter.write_line(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
