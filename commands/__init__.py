"""The domain: one module per command family, each registering itself in REGISTRY;
the remedies register themselves in `commands.remedies.REMEDIES`."""

from commands import (
    analytics,
    connections,
    health,
    integrity,
    leaderboard,
    migrations,  # part A: /db migrations
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
    "analytics",
    "connections",
    "health",
    "integrity",
    "leaderboard",
    "migrations",
    "quota",
    "recover",
    "remedies",
    "views",
]
