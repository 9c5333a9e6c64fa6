"""The domain: one module per command family, each registering itself in REGISTRY;
the remedies register themselves in `commands.remedies.REMEDIES`."""

from commands import connections, health, integrity, quota, recover, remedies, views
from commands import performance as performance  # /db slow, /db explain
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
    "quota",
    "recover",
    "remedies",
    "views",
]
