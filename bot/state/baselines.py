"""The baselines of `/db recover` on the state store (`commands.base.BaselineStore`).

In the bot's own database, never the target's: a restore of the target must not take
the figures it is compared with along. Kept `keep_days` (7); older ones go as new ones
are saved. Rows stored before revision 0007 have no database time nor census: they load
as "counts only" baselines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from bot.state.models import BASELINE_KINDS, BaselineRow
from bot.state.store import StateStore
from commands.base import Baseline, TableCensus

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
        db_now: datetime | None = None,
        tables: Mapping[str, TableCensus] | None = None,
        critical: Iterable[str] | None = None,
        flagged: str | None = None,
    ) -> Baseline:
        if kind not in BASELINE_KINDS:
            raise ValueError(f"kind must be one of {BASELINE_KINDS}, not {kind!r}")
        taken_at = now or datetime.now(UTC)
        row = BaselineRow(
            target=target,
            kind=kind,
            taken_at=taken_at,
            counts=dict(counts),
            db_now=db_now,
            tables=None
            if tables is None
            else {k: {"count": t.count, "days": dict(t.days)} for k, t in tables.items()},
            critical=None if critical is None else sorted(set(critical)),
            flagged=flagged,
        )
        async with self._sessions() as session, session.begin():
            session.add(row)
            await session.execute(
                delete(BaselineRow).where(BaselineRow.taken_at < taken_at - self.keep)
            )
        return _baseline(row)

    async def latest(
        self,
        target: str,
        *,
        before: datetime | None = None,
        include_flagged: bool = False,
        kind: str = "hourly",
    ) -> Baseline | None:
        """The latest baseline (not after `before`); the latest unflagged one unless
        `include_flagged`."""
        stmt = select(BaselineRow).where(BaselineRow.target == target, BaselineRow.kind == kind)
        if before is not None:
            stmt = stmt.where(BaselineRow.taken_at <= before)
        if not include_flagged:
            stmt = stmt.where(BaselineRow.flagged.is_(None))
        stmt = stmt.order_by(BaselineRow.taken_at.desc(), BaselineRow.id.desc()).limit(1)
        async with self._sessions() as session:
            row = (await session.scalars(stmt)).first()
        return None if row is None else _baseline(row)

    async def latest_before(
        self, target: str, before: datetime, *, kind: str = "hourly"
    ) -> Baseline | None:
        """The latest baseline not after `before`, flagged or not (`--baseline HH:MM`)."""
        return await self.latest(target, before=before, include_flagged=True, kind=kind)

    async def all(self, target: str, *, kind: str = "hourly") -> list[Baseline]:
        stmt = (
            select(BaselineRow)
            .where(BaselineRow.target == target, BaselineRow.kind == kind)
            .order_by(BaselineRow.taken_at, BaselineRow.id)
        )
        async with self._sessions() as session:
            rows = (await session.scalars(stmt)).all()
        return [_baseline(r) for r in rows]


def _baseline(row: BaselineRow) -> Baseline:
    tables: dict[str, TableCensus] = {}
    for key, value in (row.tables or {}).items():
        if isinstance(value, Mapping):
            tables[str(key)] = _census(value)
    return Baseline(
        taken_at=row.taken_at,
        counts=dict(row.counts),
        kind=row.kind,
        db_now=row.db_now,
        tables=tables,
        critical=None if row.critical is None else frozenset(str(c) for c in row.critical),
        flagged=row.flagged,
        id=row.id,
    )


def _census(value: Mapping[str, Any]) -> TableCensus:
    days = value.get("days") or {}
    return TableCensus(
        count=int(value.get("count") or 0),
        days={str(d): int(n) for d, n in days.items()} if isinstance(days, Mapping) else {},
    )
