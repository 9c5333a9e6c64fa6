"""The remedy contract itself: self-registration of the package's modules, and a
fingerprint that binds the whole plan and survives the state store's JSON round trip."""

from __future__ import annotations

import json
import pkgutil
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import commands.remedies
from commands.remedies.base import REMEDIES, LockScope, Plan, PlanStep


def test_every_module_of_the_package_is_imported_and_registers_its_own() -> None:
    modules = {m.name for m in pkgutil.iter_modules(commands.remedies.__path__)}
    owners = {r.plan.__module__.rsplit(".", 1)[-1] for r in REMEDIES.values()}
    assert owners <= modules
    assert {"refresh", "sessions", "orphans", "learn", "ledger"} <= owners
    assert sorted(REMEDIES) == [
        "cancel",
        "cleanup-orphans",
        "create-index",
        "dedupe-learn",
        "dedupe-ledger-events",
        "dedupe-webhooks",
        "drop-index",
        "fix-audit-id",
        "freeze-writes",
        "kill-idle",
        "migration-resolve",
        "reconcile-points",
        "recover-learn",
        "recover-runbook",
        "recover-users",
        "refresh-views",
        "rematch-emails",
        "rematch-kajabi",
        "reprocess-webhooks",
        "restore-from-copy",
        "set-role",
        "terminate",
        "unfreeze-writes",
    ]


def _plan() -> Plan:
    return Plan(
        remedy="kill-idle",
        args=["5"],
        title="t",
        summary="s",
        steps=[PlanStep(sql="SELECT pg_terminate_backend(%s)", params=[42])],
        targets=[
            {"pid": 42, "since": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "n": Decimal("1.5")}
        ],
        count=1,
        locks=LockScope(relations=["points_ledger"]),
        data={"pids": [42]},
    )


def test_fingerprint_is_the_same_for_the_stored_copy() -> None:
    plan = _plan()
    stored = json.loads(json.dumps(plan.model_dump(mode="json")))  # what the store keeps
    assert Plan.model_validate(stored).fingerprint() == plan.fingerprint()


def test_fingerprint_binds_sql_params_count_targets_locks_and_data() -> None:
    base = _plan().fingerprint()
    changes: list[dict[str, Any]] = [
        {"steps": [PlanStep(sql="SELECT pg_terminate_backend(%s)", params=[43])]},
        {"steps": [PlanStep(sql="SELECT pg_cancel_backend(%s)", params=[42])]},
        {"count": 2},
        {"targets": [{"pid": 43}]},
        {"locks": LockScope(relations=["submissions"])},
        {"data": {"pids": [43]}},
    ]
    for change in changes:
        assert _plan().model_copy(update=change).fingerprint() != base, change


ROW_WRITERS = {
    "dedupe-learn",
    "reconcile-points",
    "cleanup-orphans",
    "dedupe-ledger-events",
    "dedupe-webhooks",
    "rematch-kajabi",
    "rematch-emails",
    "reprocess-webhooks",
    "recover-users",
    "recover-learn",
    "restore-from-copy",
    "set-role",
    "migration-resolve",
}


def test_every_row_writing_remedy_is_tried_first_and_every_other_says_why_not() -> None:
    """DESIGN.md rule 10: the remedies whose apply is one transaction of DML on LEAPS rows
    are preflighted on a sample when large; the others say what their plan checked."""
    tried = {name for name, r in REMEDIES.items() if r.preflight}
    assert tried == ROW_WRITERS
    assert all(REMEDIES[name].sample is not None for name in tried)
    assert all(r.not_tried for name, r in REMEDIES.items() if name not in tried)
