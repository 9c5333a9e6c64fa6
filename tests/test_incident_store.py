"""The incident tables on SQLite and PostgreSQL: the races the database settles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from bot.clock import ManualClock
from bot.state import IncidentExists, IncidentStore, StateStore, open_store

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite3'}"
    factory: Callable[[str], str] = request.getfixturevalue("pg_dsn_factory")
    return factory("incstate")


@pytest_asyncio.fixture(loop_scope="session")
async def store(state_url: str) -> AsyncIterator[StateStore]:
    async with await open_store(state_url) as opened:
        yield opened


async def start(incidents: IncidentStore, channel: str = "C0INC", title: str = "x") -> int:
    made = await incidents.open_incident(
        channel_id=channel,
        title=title,
        severity="sev2",
        commander_id="U0ALICE",
        created_by="U0ALICE",
        started_at=T0,
        detected_at=T0,
        detected_by="start",
    )
    return made.id


async def test_one_active_incident_per_channel_even_when_racing(state_url: str) -> None:
    first, second = await open_store(state_url), await open_store(state_url)
    try:
        a, b = IncidentStore(first), IncidentStore(second)
        results = await asyncio.gather(
            *(start(x, title=f"t{i}") for i, x in enumerate([a, b, a, b])),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, int)]
        lost = [r for r in results if isinstance(r, IncidentExists)]
        assert len(won) == 1 and len(lost) == 3, results
        active = await a.active_in("C0INC")
        assert active is not None and active.id == won[0]
        # Another channel is free; a recovered incident frees its channel.
        assert await start(b, channel="C0OTHER") != won[0]
        recovered = await a.change(
            active,
            from_states=("open", "reopened", "resolved"),
            values={"state": "recovered", "recovered_at": T0, "resolved_at": T0},
            event=("recovered", "U0ALICE", "recovered", {}),
            at=T0,
        )
        assert recovered is not None and recovered.state == "recovered"
        again = await start(a)
        assert again != won[0]
        # Reopening the old one now would make two: refused by the index.
        with pytest.raises(IncidentExists):
            await a.change(
                recovered,
                from_states=("resolved", "recovered"),
                values={"state": "reopened"},
                event=("reopened", "U0ALICE", "reopened", {}),
                at=T0,
            )
    finally:
        await first.close()
        await second.close()


async def test_first_response_is_set_once_and_events_keep_order(store: StateStore) -> None:
    incidents = IncidentStore(store)
    incident_id = await start(incidents)
    for minutes, who in [(5, "U0BOB"), (9, "U0CAROL")]:
        await incidents.add_event(
            incident_id,
            kind="command",
            actor_id=who,
            text="/db health",
            at=T0 + timedelta(minutes=minutes),
            reaches=("responded",),
        )
    assert await incidents.add_event_in("C0NONE", kind="x", actor_id="U", text="", at=T0) is None
    got = await incidents.get(incident_id)
    assert got is not None and got.responded_at == T0 + timedelta(minutes=5)
    assert got.communicated_at is None
    kinds = [(e.kind, e.actor_id) for e in await incidents.timeline(incident_id)]
    assert kinds == [("started", "U0ALICE"), ("command", "U0BOB"), ("command", "U0CAROL")]


async def test_a_reminder_is_claimed_once_across_engines(state_url: str) -> None:
    first, second = await open_store(state_url), await open_store(state_url)
    try:
        a, b = IncidentStore(first), IncidentStore(second)
        incident_id = await start(a)
        claims = await asyncio.gather(
            *(
                x.claim_reminder(incident_id, "response", 0, at=T0, claimer=f"p{i}")
                for i, x in enumerate([a, b] * 5)
            )
        )
        assert claims.count(True) == 1
        # The next epoch (after a reopen) reminds again, once.
        assert await b.claim_reminder(incident_id, "response", 1, at=T0, claimer="p")
        assert not await a.claim_reminder(incident_id, "response", 1, at=T0, claimer="p")
    finally:
        await first.close()
        await second.close()


async def test_audited_approval_steps_join_the_channel_incident(store: StateStore) -> None:
    incidents = IncidentStore.attach(store, ManualClock(T0 + timedelta(minutes=3)))
    incident_id = await start(incidents)
    approval = await store.create_approval(
        remedy="kill-idle",
        args=[],
        requester_id="U0BOB",
        requester_name="bob",
        channel_id="C0INC",
        plan={"count": 3},
        plan_hash="h",
        needed_approvals=1,
        approver_role="ADMIN",
        ttl_s=900,
    )
    await store.audit(
        "approval.requested",
        actor_id="U0BOB",
        approval_id=approval.id,
        channel_id="C0INC",
        detail={"remedy": "kill-idle", "count": 3},
    )
    await store.audit(
        "remedy.executed",
        actor_id="U0CAROL",
        approval_id=approval.id,
        channel_id="C0INC",
        detail={"affected": 3, "summary": "3 sessions ended"},
    )
    await store.audit(
        "remedy.failed",
        actor_id="U0CAROL",
        approval_id=approval.id,
        detail={"error": "relation <!channel> & co"},
    )
    await store.audit("approval.claimed", actor_id="U0CAROL", approval_id=approval.id)
    await store.audit("approval.requested", actor_id="U0BOB", channel_id="C0ELSEWHERE")
    events = await incidents.timeline(incident_id)
    assert [(e.kind, e.actor_id) for e in events] == [
        ("started", "U0ALICE"),
        ("approval", "U0BOB"),
        ("remedy", "U0CAROL"),
        ("remedy", "U0CAROL"),
    ]
    assert events[3].text == "`kill-idle` failed: relation &lt;!channel&gt; &amp; co"
    assert events[1].text == "requested `kill-idle` (3 rows planned)"
    assert events[2].text.startswith("`kill-idle` done: 3 rows changed")
    got = await incidents.get(incident_id)
    assert got is not None and got.responded_at == T0 + timedelta(minutes=3)


async def test_header_edit_is_claimed_by_one(store: StateStore) -> None:
    incidents = IncidentStore(store)
    incident_id = await start(incidents)
    await incidents.set_header(incident_id, header_ts="1.0", digest="a")
    claims = await asyncio.gather(
        *(incidents.claim_header_edit(incident_id, old="a", new="b") for _ in range(4))
    )
    assert claims.count(True) == 1
    got = await incidents.get(incident_id)
    assert got is not None and got.header_digest == "b" and got.header_ts == "1.0"


async def test_detection_is_the_current_critical_spell_of_the_problem_at_hand(
    store: StateStore,
) -> None:
    """A check critical for 20 hours, clean, then critical again: detection is the start
    of the new spell. Another check critical for 20 hours does not backdate a new one's
    incident when the incident is about the new one."""
    incidents = IncidentStore(store)

    async def run(at: datetime, *critical: str) -> None:
        await incidents.note_health(
            channel_id="C0OPS",
            actor_id="watchdog",
            worst="crit" if critical else "ok",
            findings=[{"check": c, "status": "crit", "summary": "x"} for c in critical],
            at=at,
            critical=critical,
        )

    since = T0 - timedelta(hours=24)
    for hours in range(20, 0, -1):  # views critical every hour for 20 hours
        await run(T0 - timedelta(hours=hours), "views")
    await run(T0 - timedelta(minutes=30))  # all clean
    await run(T0 - timedelta(minutes=10), "views")
    await run(T0 - timedelta(minutes=5), "views")
    assert await incidents.first_critical_since(since) == T0 - timedelta(minutes=10)
    assert await incidents.critical_spells(since) == {"views": T0 - timedelta(minutes=10)}

    # quota critical for 20 hours throughout; views turns critical now
    for hours in range(20, 0, -1):
        await run(T0 + timedelta(hours=1) - timedelta(hours=hours), "quota")
    await run(T0 + timedelta(hours=1), "quota", "views")
    later = T0 + timedelta(hours=1)
    spells = await incidents.critical_spells(later - timedelta(hours=24))
    assert spells == {"quota": T0 - timedelta(hours=19), "views": later}
    # the watchdog dates the incident by the checks that turned critical
    assert await incidents.first_critical_since(later - timedelta(hours=24), ["views"]) == later
    # a person's start: every check critical now (the earliest spell), never before the
    # last run in which they were all clean
    assert await incidents.first_critical_since(later - timedelta(hours=24)) == spells["quota"]
    # nothing critical in the latest run: no detection from the watchdog
    await run(later + timedelta(minutes=1))
    assert await incidents.first_critical_since(later - timedelta(hours=24)) is None


async def test_last_recovered_at(store: StateStore) -> None:
    incidents = IncidentStore(store)
    assert await incidents.last_recovered_at() is None
    made = await start(incidents)
    incident = await incidents.get(made)
    assert incident is not None
    at = T0 + timedelta(hours=2)
    await incidents.change(
        incident,
        from_states=("open",),
        values={"state": "recovered", "recovered_at": at, "resolved_at": at},
        event=("recovered", "U0ALICE", "fully recovered", {}),
        at=at,
    )
    assert await incidents.last_recovered_at() == at
