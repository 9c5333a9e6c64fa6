"""The domain: one module per command family, each registering itself in REGISTRY;
the remedies register themselves in `commands.remedies.REMEDIES`."""

from commands import (
    connections,
    health,
    integrity,
    migrations,  # part A: /db migrations
    performance,  # part B: /db slow, /db explain
    quota,
    recover,
    remedies,
    views,
)
from commands.base import REGISTRY, Command, Finding, Report, Status

__all__ = [
    "REGISTRY",
    "Command",
    "Finding",
    "Report",
    "Status",
    "connections",
    "health",
    "integrity",
    "migrations",
    "performance",
    "quota",
    "recover",
    "remedies",
    "views",
]
