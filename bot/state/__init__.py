"""The bot's own state store (approvals, decisions, audit trail, refresh log).

Import from here; `bot.state.models` is the schema and stays private to the store.
"""

from bot.state.models import ApprovalState, DecisionKind, RefreshMode
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
    "InvalidTransition",
    "KnownRole",
    "NotFound",
    "RefreshEntry",
    "RefreshMode",
    "StateStore",
    "StateStoreError",
    "make_engine",
    "make_state_url",
    "migrate",
    "open_store",
]
