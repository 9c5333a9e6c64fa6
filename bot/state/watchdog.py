"""The watchdog's memory: the last alerting status of each health check.

Kept in the state store rather than in the process, so that a restart or a new leader
does not post a problem that was already posted, and does post one that was not: a check
is `alerted` only once Slack answered ok to its critical alert. Every move is a conditional write
(compare-and-set on the old status): should two processes ever both act as leader,
only one of them wins each move, and only the winner posts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot.state.models import WatchdogCheckRow
from bot.state.store import StateStore, _utc

CheckStatus = Literal["ok", "warn", "crit"]


@dataclass(frozen=True, slots=True)
class CheckState:
    check: str
    status: CheckStatus
    summary: str
    changed_at: datetime
    seen_at: datetime
    alerted: bool = False  # the last alert Slack accepted was the critical one

    @property
    def unannounced(self) -> bool:
        """Its crossing into or out of critical has not been posted yet."""
        return (self.status == "crit") != self.alerted


class WatchdogStore:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def checks(self) -> dict[str, CheckState]:
        async with self._store._tx(write=False) as session:
            rows = (await session.scalars(select(WatchdogCheckRow))).all()
        return {
            r.check: CheckState(
                r.check,
                r.status,  # type: ignore[arg-type]
                r.summary,
                r.changed_at,
                r.seen_at,
                r.alerted,
            )
            for r in rows
        }

    async def move(
        self,
        check: str,
        old: CheckStatus | None,
        new: CheckStatus,
        *,
        summary: str,
        at: datetime,
    ) -> bool:
        """Move `check` from `old` (None: never seen) to `new`; True for the one caller
        whose write landed. What was alerted stays: `mark_alerted` moves it once posted."""
        when = _utc(at)
        async with self._store._tx() as session:
            if old is None:
                values = {
                    "check": check,
                    "status": new,
                    "summary": summary,
                    "changed_at": when,
                    "seen_at": when,
                }
                if self._store.engine.dialect.name == "postgresql":
                    pg = pg_insert(WatchdogCheckRow).values(values)
                    stmt = pg.on_conflict_do_nothing(index_elements=["check"]).returning(
                        WatchdogCheckRow.check
                    )
                else:
                    lite = sqlite_insert(WatchdogCheckRow).values(values)
                    stmt = lite.on_conflict_do_nothing(index_elements=["check"]).returning(
                        WatchdogCheckRow.check
                    )
                return (await session.execute(stmt)).first() is not None
            moved = await session.execute(
                update(WatchdogCheckRow)
                .where(WatchdogCheckRow.check == check, WatchdogCheckRow.status == old)
                .values(status=new, summary=summary, changed_at=when, seen_at=when)
                .returning(WatchdogCheckRow.check)
                .execution_options(synchronize_session=False)
            )
            return moved.first() is not None

    async def mark_alerted(self, check: str, status: CheckStatus) -> bool:
        """Slack answered ok to the alert about `check` being `status` (critical, or back
        from it): only now is it announced. False when the status moved meanwhile."""
        async with self._store._tx() as session:
            moved = await session.execute(
                update(WatchdogCheckRow)
                .where(WatchdogCheckRow.check == check, WatchdogCheckRow.status == status)
                .values(alerted=status == "crit")
                .returning(WatchdogCheckRow.check)
                .execution_options(synchronize_session=False)
            )
            return moved.first() is not None
