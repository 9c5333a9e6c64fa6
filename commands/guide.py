"""Where each section of the operators' troubleshooting guide lives in `/db`.

The on-call engineer knows the guide by its section headings ("Kajabi Webhook
Failures"); `/db help` answers "which command is that?" from this table. The headings
are kept as references to the guide, in its order; the commands are names the router
finds (diagnostics, remedies, or the bot's own `incident`, with its subcommand), the one
to run first first.
A test keeps every name resolvable and, where the guide is at hand, every heading here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    chapter: str
    heading: str
    commands: tuple[str, ...]


_CONNECTIONS = "Connection Issues"
_MIGRATIONS = "Migration Problems"
_PERFORMANCE = "Performance Issues"
_INTEGRITY = "Data Integrity Problems"
_VIEWS = "Materialized View Issues"
_BUSINESS = "Business Logic Violations"
_AUTH = "Authentication & Authorization"
_WEBHOOKS = "Webhook Integration Issues"
_ANALYTICS = "Analytics & Reporting Problems"
_RECOVERY = "Emergency Recovery"

SECTIONS: tuple[Section, ...] = (
    Section(_CONNECTIONS, "Cannot Connect to Database", ("health", "connections")),
    Section(
        _CONNECTIONS,
        "Connection Pool Issues",
        ("connections", "kill-idle", "cancel", "terminate"),
    ),
    Section(_MIGRATIONS, "Migration Failures", ("migrations", "migration-resolve")),
    Section(_MIGRATIONS, "Schema Drift Issues", ("migrations", "fix-audit-id")),
    Section(
        _PERFORMANCE,
        "Slow Queries",
        ("slow", "indexes", "explain", "create-index", "drop-index"),
    ),
    Section(_PERFORMANCE, "Memory Issues", ("slow", "export")),
    Section(_INTEGRITY, "Orphaned Records", ("integrity", "cleanup-orphans")),
    Section(_INTEGRITY, "Duplicate Data", ("integrity", "dedupe-learn", "dedupe-ledger-events")),
    Section(_INTEGRITY, "Point Calculation Errors", ("integrity", "reconcile-points")),
    Section(_VIEWS, "View Refresh Failures", ("views", "refresh-views")),
    Section(_VIEWS, "Missing View Data", ("views", "analytics", "refresh-views")),
    Section(_BUSINESS, "AMPLIFY Quota Exceeded", ("quota",)),
    Section(_BUSINESS, "Multiple LEARN Submissions", ("integrity", "dedupe-learn")),
    Section(_AUTH, "Role Permission Issues", ("roles", "set-role")),
    Section(_AUTH, "User Synchronization Issues", ("roles", "recover-users")),
    Section(
        _WEBHOOKS,
        "Kajabi Webhook Failures",
        ("webhooks", "reprocess-webhooks", "dedupe-webhooks"),
    ),
    Section(_WEBHOOKS, "Email Matching Issues", ("webhooks", "rematch-emails")),
    Section(
        _ANALYTICS,
        "Leaderboard Inconsistencies",
        ("leaderboard", "refresh-views", "reconcile-points"),
    ),
    Section(_ANALYTICS, "Missing Analytics Data", ("analytics", "refresh-views")),
    Section(_ANALYTICS, "Export Functionality Issues", ("export",)),
    Section(
        _RECOVERY,
        "Complete Database Corruption",
        ("incident start", "freeze-writes", "recover", "recover-runbook", "unfreeze-writes"),
    ),
    Section(
        _RECOVERY, "Point-in-Time Recovery", ("incident start", "recover", "restore-from-copy")
    ),
    Section(
        _RECOVERY,
        "Data Loss Scenarios",
        ("recover", "recover-users", "rematch-kajabi", "recover-learn", "fix-audit-id"),
    ),
    Section(_RECOVERY, "Communication Templates", ("incident template",)),
    Section(_RECOVERY, "Recovery Verification", ("recover",)),
    Section(_RECOVERY, "Contact Information", ("incident assign",)),
    Section(_RECOVERY, "Recovery SLAs", ("incident status",)),
)


def chapters() -> list[tuple[str, list[Section]]]:
    """The sections grouped by chapter, in the guide's order."""
    grouped: dict[str, list[Section]] = {}
    for section in SECTIONS:
        grouped.setdefault(section.chapter, []).append(section)
    return list(grouped.items())


def sections_for(name: str) -> list[Section]:
    """The guide sections a command serves (what `/db help <command>` cites)."""
    return [s for s in SECTIONS if any(c.split()[0] == name for c in s.commands)]


def find_sections(words: str) -> list[Section]:
    """Sections whose heading or chapter contains the words (case-insensitive)."""
    needle = " ".join(words.lower().split())
    return [s for s in SECTIONS if needle in s.heading.lower() or needle in s.chapter.lower()]
