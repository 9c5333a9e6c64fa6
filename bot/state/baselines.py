"""The baselines of `/db recover` on the state store (`commands.base.BaselineStore`).

In the bot's own database, never the target's: a restore of the target must not take
the figures it is compared with along. Kept `keep_days` (7); older ones go as new ones
are saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from bot.state.models import BASELINE_KINDS, BaselineRow
from bot.state.store import StateStore
from commands.base import Baseline

KEEP_DAYS = 7.0


class StoreBaselines:
    def __init__(self, store: StateStore, keep_days: float = KEEP_DAYS) -> None:
        self._sessions = async_sessionmaker(store.engine, expire_on_commit=False)
        self.keep = timedelta(days=keep_days)

    async def save(
        self,
        target: str,
        counts: Mapping[str, int | None],
        *,
        kind: str = "hourly",
        now: datetime | None = None,
    ) -> Baseline:
        if kind not in BASELINE_KINDS:
            raise ValueError(f"kind must be one of {BASELINE_KINDS}, not {kind!r}")
        taken_at = now or datetime.now(UTC)
        async with self._sessions() as session, session.begin():
            session.add(
                BaselineRow(target=target, kind=kind, taken_at=taken_at, counts=dict(counts))
            )
            await session.execute(
                delete(BaselineRow).where(BaselineRow.taken_at < taken_at - self.keep)
            )
        return Baseline(taken_at=taken_at, counts=dict(counts), kind=kind)

    async def latest_before(
        self, target: str, before: datetime, *, kind: str = "hourly"
    ) -> Baseline | None:
        stmt = (
            select(BaselineRow)
            .where(
                BaselineRow.target == target,
                BaselineRow.kind == kind,
                BaselineRow.taken_at <= before,
            )
            .order_by(BaselineRow.taken_at.desc(), BaselineRow.id.desc())
            .limit(1)
        )
        async with self._sessions() as session:
            row = (await session.scalars(stmt)).first()
        if row is None:
            return None
        return Baseline(taken_at=row.taken_at, counts=dict(row.counts), kind=row.kind)

    async def all(self, target: str, *, kind: str = "hourly") -> list[Baseline]:
        stmt = (
            select(BaselineRow)
            .where(BaselineRow.target == target, BaselineRow.kind == kind)
            .order_by(BaselineRow.taken_at, BaselineRow.id)
        )
        async with self._sessions() as session:
            rows = (await session.scalars(stmt)).all()
        return [Baseline(taken_at=r.taken_at, counts=dict(r.counts), kind=r.kind) for r in rows]
