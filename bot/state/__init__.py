"""The bot's own state store (approvals, decisions, audit trail, refresh log, incidents).

Import from here; `bot.state.models` is the schema and stays private to the store.
"""

from bot.state.incidents import (
    HealthSeen,
    Incident,
    IncidentEvent,
    IncidentExists,
    IncidentStore,
)
from bot.state.models import ApprovalState, DecisionKind, IncidentState, RefreshMode, Severity
from bot.state.store import (
    Approval,
    AuditEntry,
    Decision,
    DecisionResult,
    DecisionStatus,
    FinishState,
    InvalidTransition,
    KnownRole,
    NotFound,
    RefreshEntry,
    StateStore,
    StateStoreError,
    make_engine,
    make_state_url,
    migrate,
    open_store,
)

__all__ = [
    "Approval",
    "ApprovalState",
    "AuditEntry",
    "Decision",
    "DecisionKind",
    "DecisionResult",
    "DecisionStatus",
    "FinishState",
    "HealthSeen",
    "Incident",
    "IncidentEvent",
    "IncidentExists",
    "IncidentState",
    "IncidentStore",
    "InvalidTransition",
    "KnownRole",
    "NotFound",
    "RefreshEntry",
    "RefreshMode",
    "Severity",
    "StateStore",
    "StateStoreError",
    "make_engine",
    "make_state_url",
    "migrate",
    "open_store",
]
