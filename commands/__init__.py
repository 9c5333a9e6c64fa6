"""The domain: one module per command family, each registering itself in REGISTRY;
the remedies register themselves in `commands.remedies.REMEDIES`."""

from commands import (
    connections,
    export,  # part G: /db export
    health,
    integrity,
    migrations,  # part A: /db migrations
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
    "connections",
    "export",
    "health",
    "integrity",
    "migrations",
    "quota",
    "recover",
    "remedies",
    "roles",
    "views",
    "webhooks",
]
