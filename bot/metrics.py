"""Prometheus metrics on a registry of the bot's own, served at /metrics.

With several HTTP workers (`WEB_CONCURRENCY` > 1) each is its own process, and a scrape
reaches whichever one the kernel picks: the supervisor then sets
`PROMETHEUS_MULTIPROC_DIR`, every worker writes its samples there, and /metrics adds
up all workers' files (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REGISTRY = CollectorRegistry()

COMMANDS = Counter(
    "dbops_commands_total",
    "Commands handled, by name and outcome",
    ["command", "outcome"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "dbops_command_seconds",
    "Time from receiving a command to its reply being handed to Slack or stdout",
    ["command"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
    registry=REGISTRY,
)
SLACK_ERRORS = Counter(
    "dbops_slack_api_errors_total",
    "Slack Web API calls that failed after retries, by method",
    ["method"],
    registry=REGISTRY,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def exposition() -> bytes:
    if os.environ.get(MULTIPROC_ENV):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged)
    return generate_latest(REGISTRY)
