"""The domain: one module per command family, each registering itself in REGISTRY;
the remedies register themselves in `commands.remedies.REMEDIES`."""

from commands import (
    analytics,
    connections,
    export,  # part G: /db export
    health,
    indexes,  # part C: /db indexes
    integrity,
    leaderboard,
    migrations,  # part A: /db migrations
    performance,  # part B: /db slow, /db explain
    quota,
    recover,
    remedies,
    roles,  # part E: /db roles
    views,
    webhooks,  # part D: /db webhooks
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
    "export",
    "health",
    "indexes",
    "integrity",
    "leaderboard",
    "migrations",
    "performance",
    "quota",
    "recover",
    "remedies",
    "roles",
    "views",
    "webhooks",
]
