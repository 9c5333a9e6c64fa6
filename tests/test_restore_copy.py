"""restore-from-copy (issue 15, part 2): a copy database made before the damage on the
same test server, whose TimeZone and DateStyle differ from production's; the damage
deletes users with their submissions and ledger rows, changes and adds rows, deletes a
user on purpose (audited), lets a new user take a lost user's e-mail and a new award a
lost award's external_event_id, and fills a kept user's hour so that the rate limit
refuses one of their lost submissions at restore. The plan's classes and counts are
exact; the apply brings back every lost row but the refused one, keeps changed and new
rows, and reports the refusal with its guard; both audit variants."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from bot.approvals.executor import Executor
from bot.embedded_pg import EmbeddedPostgres
from bot.gateway import TargetGateway
from bot.router import RunContext
from commands import rowdiff
from commands.base import LeapsIdentity, UsageError
from commands.recover import recover
from commands.remedies.base import REMEDIES, Execution, Plan
from commands.remedies.restore import RESTORE_NAME, RestoreData
from tests.conftest import FAST_THRESHOLDS, bot_settings, make_audit_variant, running_bot
from tests.fakeslack import FakeSlack
from tests.test_approvals import ADMIN, ADMIN2, CHANNEL, ROLES, message_text, press, request, settle

_n = itertools.count()
RESTORE = REMEDIES[RESTORE_NAME]
# Tables whose rows belong to a user (by these columns), for the expected sets.
OWNED = {
    "submissions": ("user_id",),
    "points_ledger": ("user_id",),
    "earned_badges": ("user_id",),
    "learn_tag_grants": ("user_id",),
    "referral_events": ("referrer_user_id", "referred_user_id"),
}


async def q(
    dsn: str, query: LiteralString | bytes | sql.Composed, params: tuple[Any, ...] = ()
) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.cursor(row_factory=dict_row).execute(query, params)
        return await cur.fetchall() if cur.description else []


async def keys(dsn: str, table: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT {}::text FROM {}").format(
                sql.Identifier("code" if table in ("activities", "badges") else "id"),
                sql.Identifier(table),
            )
        )
        return {str(r[0]) for r in await cur.fetchall()}


async def owned(dsn: str, user: str) -> dict[str, set[str]]:
    """Every row of `user` (and their submissions' attachments) in the copy."""
    out: dict[str, set[str]] = {"users": {user}}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for table, cols in OWNED.items():
            cond = sql.SQL(" OR ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in cols)
            cur = await conn.execute(
                sql.SQL("SELECT id FROM {} WHERE {}").format(sql.Identifier(table), cond),
                (user,) * len(cols),
            )
            out[table] = {str(r[0]) for r in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT a.id FROM submission_attachments a JOIN submissions s ON s.id = a.submission_id"
            " WHERE s.user_id = %s",
            (user,),
        )
        out["submission_attachments"] = {str(r[0]) for r in await cur.fetchall()}
    return out


def merge(*parts: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in parts:
        for t, ks in p.items():
            out.setdefault(t, set()).update(ks)
    return out


@dataclass
class Scenario:
    prod: str
    copy: str
    lost: dict[str, set[str]]  # rows to come back
    deleted: dict[str, set[str]]
    superseded: dict[str, set[str]]
    refused: str  # the submission the rate limit refuses
    changed_users: list[str]
    new_users: list[str]
    reviewer: str  # a lost user whose role is REVIEWER
    copy_keys: dict[str, set[str]] = field(default_factory=dict)


async def damaged(pg: EmbeddedPostgres, template: str) -> Scenario:
    n = next(_n)
    prod_name, copy_name = f"rst_prod_{n}", f"rst_copy_{n}"
    prod = pg.create_database(prod_name, template=template)
    # Unreferred users with submissions but no attachments, none of whom referred anyone.
    users = await q(
        prod,
        "SELECT u.id, u.role::text AS role FROM users u WHERE u.role = 'PARTICIPANT'"
        " AND NOT EXISTS (SELECT 1 FROM users x WHERE x.referred_by_user_id = u.id)"
        " AND EXISTS (SELECT 1 FROM submissions s WHERE s.user_id = u.id)"
        " ORDER BY md5(u.id)",
    )
    l1, l2, l3, d, r, c1, c2 = [str(u["id"]) for u in users if u["role"] == "PARTICIPANT"][:7]
    reviewer = l1
    async with await psycopg.AsyncConnection.connect(prod) as conn:  # a lost REVIEWER
        await conn.execute("SELECT set_config('app.user_role', 'ADMIN', true)")
        await conn.execute("UPDATE users SET role = 'REVIEWER' WHERE id = %s", (l1,))
        await conn.commit()
    (s_row,) = await q(
        prod,
        "SELECT s.id FROM submissions s WHERE s.user_id = %s AND s.activity_code = 'EXPLORE'"
        " AND NOT EXISTS (SELECT 1 FROM submission_attachments a WHERE a.submission_id = s.id)"
        " ORDER BY s.id LIMIT 1",
        (r,),
    ) or [{"id": None}]
    if s_row["id"] is None:
        s_row = (
            await q(
                prod,
                "SELECT s.id FROM submissions s WHERE s.user_id = %s"
                " AND s.activity_code NOT IN ('LEARN', 'AMPLIFY')"
                " AND NOT EXISTS (SELECT 1 FROM submission_attachments a"
                "  WHERE a.submission_id = s.id) ORDER BY s.id LIMIT 1",
                (r,),
            )
        )[0]
    refused = str(s_row["id"])
    (x,) = await q(
        prod,
        "SELECT id, external_event_id FROM points_ledger WHERE external_event_id IS NOT NULL"
        " AND NOT user_id = ANY(%s) ORDER BY id LIMIT 1",
        ([l1, l2, l3, d, r, c1, c2],),
    )
    (admin,) = await q(prod, "SELECT id FROM users WHERE role = 'SUPERADMIN' ORDER BY id LIMIT 1")
    pg.create_database(copy_name, template=prod_name)
    copy = pg.dsn(copy_name)
    await q(
        prod,
        sql.SQL("ALTER DATABASE {} SET timezone = 'Pacific/Auckland'").format(
            sql.Identifier(copy_name)
        ),
    )
    await q(
        prod,
        sql.SQL("ALTER DATABASE {} SET datestyle = 'SQL, DMY'").format(sql.Identifier(copy_name)),
    )
    lost = merge(await owned(copy, l1), await owned(copy, l2))
    deleted = await owned(copy, d)
    superseded = merge(await owned(copy, l3), {"points_ledger": {str(x["id"])}})
    lost["submissions"].add(refused)
    async with await psycopg.AsyncConnection.connect(prod) as conn:
        # lost: plain deletes (no app.user_id: nothing audited), cascading
        await conn.execute("DELETE FROM users WHERE id = ANY(%s)", ([l1, l2, l3],))
        await conn.execute("DELETE FROM submissions WHERE id = %s", (refused,))
        await conn.execute("DELETE FROM points_ledger WHERE id = %s", (x["id"],))
        # deleted on purpose: audited
        await conn.execute(
            "SELECT set_config('app.user_id', %s, true),"
            " set_config('app.user_role', 'ADMIN', true)",
            (admin["id"],),
        )
        await conn.execute("DELETE FROM users WHERE id = %s", (d,))
        await conn.commit()
        # changed since
        await conn.execute(
            "UPDATE users SET name = name || ' (renamed)' WHERE id = ANY(%s)", ([c1, c2],)
        )
        # new since; one takes the lost l3's e-mail, an award takes x's external_event_id
        await conn.execute(
            "INSERT INTO users (id, handle, name, email, created_at) VALUES"
            " ('new_user_1', 'new_handle_1', 'New One', %s, now() AT TIME ZONE 'UTC'),"
            " ('new_user_2', 'new_handle_2', 'New Two', 'new.two@example.org',"
            "  now() AT TIME ZONE 'UTC')",
            ((await q(copy, "SELECT email FROM users WHERE id = %s", (l3,)))[0]["email"],),
        )
        await conn.execute(
            "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
            " external_source, external_event_id, created_at, event_time)"
            " VALUES ('new_award_1', %s, 'EXPLORE', 'WEBHOOK', 50, 'kajabi', %s,"
            " now() AT TIME ZONE 'UTC', now())",
            (c1, x["external_event_id"]),
        )
        # r's hour is full: ten new submissions now; restoring r's lost one is refused
        await conn.execute(
            "INSERT INTO submissions (id, user_id, activity_code, payload, created_at, updated_at)"
            " SELECT 'new_sub_' || g, %s, 'EXPLORE', '{}'::jsonb, now() AT TIME ZONE 'UTC',"
            " now() AT TIME ZONE 'UTC' FROM generate_series(1, 10) AS g",
            (r,),
        )
        await conn.commit()
    return Scenario(
        prod=prod,
        copy=copy,
        lost=lost,
        deleted=deleted,
        superseded=superseded,
        refused=refused,
        changed_users=[c1, c2],
        new_users=["new_user_1", "new_user_2"],
        reviewer=reviewer,
    )


@pytest.fixture
async def scenario(pg: EmbeddedPostgres, leaps_template: str) -> Scenario:
    return await damaged(pg, leaps_template)


async def detection(at: str) -> tuple[datetime, str]:
    """An open incident's detection, as the bot's incidents part answers it."""
    return datetime.fromisoformat(at), "incident #7 (drill)"


async def context(prod: str, copy: str | None) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(prod)
    copy_gw = TargetGateway(copy) if copy else None
    try:
        yield RunContext(gateway, FAST_THRESHOLDS, recovery_copy=copy_gw)
    finally:
        await gateway.close()
        if copy_gw is not None:
            await copy_gw.close()


def counts(plan: Plan) -> dict[str, dict[str, int]]:
    return {t.table: t.counts for t in plan.private(RestoreData).tables}


def n(rows: dict[str, set[str]], table: str) -> int:
    return len(rows.get(table, set()))


async def admin_identity(dsn: str) -> LeapsIdentity:
    (row,) = await q(dsn, "SELECT id FROM users WHERE role = 'ADMIN' ORDER BY id LIMIT 1")
    return LeapsIdentity(str(row["id"]), "ADMIN", "a test approver's account")


async def test_plan_classes_and_apply_on_either_audit_path(
    scenario: Scenario, audit_variant: str
) -> None:
    s = scenario
    await make_audit_variant(s.prod, audit_variant)
    async for ctx in context(s.prod, s.copy):
        plan = await RESTORE.plan(ctx, [])
    got = counts(plan)
    users = got["users"]
    assert users["lost"] == 2 and users["deleted"] == 1 and users["superseded"] == 1
    assert users["changed"] == 2 and users["new"] == 2
    for table in ("submissions", "points_ledger"):
        assert got[table]["lost"] == n(s.lost, table), (table, got[table])
        assert got[table]["deleted"] == n(s.deleted, table), (table, got[table])
        assert got[table]["superseded"] == n(s.superseded, table), (table, got[table])
    assert got["submissions"]["new"] == 10
    assert got["points_ledger"]["new"] == 1
    assert plan.count == sum(n(s.lost, t) for t in s.lost)
    data = plan.private(RestoreData)
    assert next(t for t in data.tables if t.table == "users").differing == ["name"]
    assert any("come back as PARTICIPANT" in w for w in plan.warnings)
    assert plan.approver_role is None and RESTORE.approvers == 2

    who = await admin_identity(s.prod)
    executor = Executor(s.prod, recovery_dsn=s.copy)
    tried = await executor.preflight(RESTORE, plan, who, max_rows=5)
    assert tried.status == "accepted" and tried.tried == 5 and tried.affected == 5, tried
    state, outcome = await executor.apply(RESTORE, plan, f"apv-rst{next(_n)}", who)
    assert state == "done", outcome
    assert outcome.affected == plan.count - 1
    (refusal,) = [r for r in outcome.rows if "key" in r]
    assert refusal["key"] == s.refused and "trg_check_submission_rate_limit" in refusal["guard"]
    for table, expected in s.lost.items():
        now = await keys(s.prod, table)
        back = expected - {s.refused}
        assert back <= now, (table, back - now)
        assert not (s.deleted.get(table, set()) & now)
        assert not (s.superseded.get(table, set()) & now)
    assert s.refused not in await keys(s.prod, "submissions")
    renamed = await q(s.prod, "SELECT name FROM users WHERE id = ANY(%s)", (s.changed_users,))
    assert all(r["name"].endswith("(renamed)") for r in renamed)
    assert set(s.new_users) <= await keys(s.prod, "users")
    (role,) = await q(s.prod, "SELECT role::text AS role FROM users WHERE id = %s", (s.reviewer,))
    assert role["role"] == "PARTICIPANT"
    # Rule 11: each restored ledger row has its INSERT audit row, on either path.
    audited = await q(
        s.prod,
        "SELECT count(*) AS n FROM audit_log WHERE action = 'INSERT_points_ledger'"
        " AND actor_id = %s AND target_id = ANY(%s)",
        (who.user_id, sorted(s.lost["points_ledger"])),
    )
    assert audited[0]["n"] == n(s.lost, "points_ledger")
    # A second plan finds nothing left to restore but the refused row.
    async for ctx in context(s.prod, s.copy):
        again = await RESTORE.plan(ctx, [])
    assert again.count == 1
    assert await RESTORE.verify(TargetReader(s.prod), plan, _Run("x")) is not None


class TargetReader:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def fetch(self, query: str, params: Any = ()) -> list[dict[str, Any]]:
        return await q(self.dsn, query.encode(), tuple(params))


def _Run(approval_id: str) -> Execution:
    return Execution(approval_id, "U0TEST")


async def test_refuses_production_and_says_how_to_configure(leaps_dsn: str) -> None:
    async for ctx in context(leaps_dsn, None):
        with pytest.raises(UsageError, match="RECOVERY_DATABASE_URL"):
            await RESTORE.plan(ctx, [])
    async for ctx in context(leaps_dsn, leaps_dsn):
        with pytest.raises(UsageError, match="production itself"):
            await RESTORE.plan(ctx, [])
    # Another name for the same server: the same system identifier and database.
    elsewhere = leaps_dsn.replace("@127.0.0.1:", "@localhost:")
    assert elsewhere != leaps_dsn
    async for ctx in context(leaps_dsn, elsewhere):
        with pytest.raises(UsageError, match="same system identifier"):
            await RESTORE.plan(ctx, [])


async def test_options_tables_overwrite_keep_roles_and_small_ranges(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = scenario
    async for ctx in context(s.prod, s.copy):
        with monkeypatch.context() as small:
            # Limits small enough that the big tables are summed by bucket, in several key
            # ranges, their mixed buckets compared in several parts (the fixture's tables
            # are compared key by key at once otherwise).
            small.setattr(rowdiff, "SMALL_ROWS", 16)
            small.setattr(rowdiff, "CHUNK_ROWS", 256)
            small.setattr(rowdiff, "MIN_BUCKETS", 8)
            small.setattr(rowdiff, "PAIR_ROWS", 64)
            whole = await RESTORE.plan(ctx, ["--keep-roles"])
        attachments = await RESTORE.plan(ctx, ["--tables", "submission_attachments"])
        users = await RESTORE.plan(ctx, ["--tables=users", "--overwrite", "users"])
        report = await recover(ctx, ["--dry-run"])
        early = await RESTORE.plan(ctx, ["--until", "2000-01-01T00:00:00Z"])
        # with an incident open, --until defaults to its detection (here as early)
        detected = replace(ctx, incident_detection=partial(detection, "2000-01-01T00:00:00Z"))
        by_incident = await RESTORE.plan(detected, [])
        with pytest.raises(UsageError, match="no table nope"):
            await RESTORE.plan(ctx, ["--tables", "nope"])
    # The fallbacks for servers that differ give the same diff: byte-order bounds
    # (COLLATE "C", another collation on one side), md5 of UTF8 (another encoding) and key
    # by key (no bit_xor() before PostgreSQL 14); so do the columns' own hash functions
    # (the same major version on both sides), and buckets so few that most hold several
    # differences (an entry given by a bucket that held more is not confirmed: compared key
    # by key), summed again when far more differ than the counts told, the copy's TimeZone
    # and DateStyle differing all along.
    gw, cgw = TargetGateway(s.prod), TargetGateway(s.copy)
    columns = ("created_at", "email", "id", "name", "role")
    types = ("timestamp(3) without time zone", "text", "text", "text", '"Role"')
    try:
        diffs = []
        for fallback, record, buckets, few in (
            (False, False, True, False),
            (True, False, False, False),
            (False, True, True, False),
            (False, True, True, True),
        ):
            cmp = rowdiff.Compare(
                "users",
                "id",
                "text",
                columns,
                fallback,
                not fallback,
                types if record else (),
                buckets,
            )
            with monkeypatch.context() as small:
                small.setattr(rowdiff, "SMALL_ROWS", 4)
                small.setattr(rowdiff, "CHUNK_ROWS", 8)
                small.setattr(rowdiff, "PAIR_ROWS", 8)
                if few:
                    small.setattr(rowdiff, "MIN_BUCKETS", 2)
                    small.setattr(rowdiff, "MIXED_SHARE", 0.01)
                diffs.append(await rowdiff.diff_table(gw, cgw, cmp))
    finally:
        await gw.close()
        await cgw.close()
    fast, portable, values, few_buckets = diffs
    assert few_buckets.statements > values.statements
    assert 'hashtextextended("t"."email" COLLATE "C", 2)' in cmp.row_hash().as_string()
    assert '"role"::text' in cmp.row_hash().as_string()
    for d in (portable, values, few_buckets):
        assert sorted(fast.only_copy) == sorted(d.only_copy) and len(fast.only_copy) == 4
        assert sorted(fast.only_prod) == sorted(d.only_prod) == sorted(s.new_users)
        assert sorted(fast.changed) == sorted(d.changed) == sorted(s.changed_users)
    got = counts(whole)
    for table in ("users", "submissions", "points_ledger"):
        assert got[table]["lost"] == n(s.lost, table), (table, got)
        assert got[table]["deleted"] == n(s.deleted, table), (table, got)
        assert got[table]["superseded"] == n(s.superseded, table), (table, got)
    assert got["users"]["changed"] == 2 and got["users"]["new"] == 2
    # --keep-roles: the lost REVIEWER keeps the role, so a SUPERADMIN approves.
    assert whole.approver_role == "SUPERADMIN"
    assert set(counts(attachments)) == {
        "activities",
        "users",
        "submissions",
        "submission_attachments",
    }
    assert any("added the tables they need" in w for w in attachments.warnings)
    assert set(counts(users)) == {"users"} and users.count == 2 + 2
    # Every user missing from production was created before 2000-01-01 in no copy:
    # none is lost, whatever else is on record about them.
    assert counts(early)["users"]["after_until"] == 4 and early.count == 0
    assert counts(by_incident) == counts(early) and by_incident.count == 0
    assert any("the detection of incident #7 (drill)" in w for w in by_incident.warnings)
    assert any("the copy's newest creation time" in w for w in whole.warnings)
    # /db recover lists restoring from the copy first; the other steps wait for it.
    steps = [f for f in report.findings if f.check.startswith("step: ")]
    assert steps[0].check == f"step: {RESTORE_NAME}" and steps[0].hint == f"/db {RESTORE_NAME}"
    assert "would request" in steps[0].summary
    assert any(f"after {RESTORE_NAME}" in f.summary for f in steps[1:])

    # One transaction per table batch: a batch that fails leaves the ones before it.
    who = await admin_identity(s.prod)
    executor = Executor(s.prod, recovery_dsn=s.copy)
    await q(s.prod, b"ALTER TABLE submission_attachments DROP COLUMN hash")
    state, outcome = await executor.apply(RESTORE, attachments, f"apv-rst{next(_n)}", who)
    assert state == "failed" and "the batches committed before stay" in outcome.summary, outcome
    assert [r["table"] for r in outcome.rows if "planned" in r] == ["users", "submissions"]
    assert s.lost["users"] <= await keys(s.prod, "users")
    assert not (s.lost["submission_attachments"] & await keys(s.prod, "submission_attachments"))

    async for ctx in context(s.prod, s.copy):
        users = await RESTORE.plan(ctx, ["--tables=users", "--overwrite", "users"])
    before = await q(s.prod, "SELECT id, name FROM users WHERE id = ANY(%s)", (s.changed_users,))
    approval = f"apv-rst{next(_n)}"
    state, outcome = await executor.apply(RESTORE, users, approval, who)
    # The renamed users and the REVIEWER restored as PARTICIPANT, whose role stays.
    assert state == "done" and outcome.affected == 3 and outcome.backed_up == 3, outcome
    (role,) = await q(s.prod, "SELECT role::text AS role FROM users WHERE id = %s", (s.reviewer,))
    assert role["role"] == "PARTICIPANT" and users.approver_role is None
    after = await q(s.prod, "SELECT id, name FROM users WHERE id = ANY(%s)", (s.changed_users,))
    assert all(not r["name"].endswith("(renamed)") for r in after)
    assert outcome.backup_table is not None
    backup = await q(
        s.prod, sql.SQL("SELECT id, name FROM {} ORDER BY id").format(sql.SQL(outcome.backup_table))
    )
    assert [r for r in backup if r["id"] != s.reviewer] == sorted(before, key=lambda r: r["id"])
    verdict = await RESTORE.verify(TargetReader(s.prod), users, _Run(approval))
    assert verdict.landed, verdict


async def test_two_admins_approve_it_in_slack(
    pg: EmbeddedPostgres, leaps_template: str, fake_slack: FakeSlack, audit_variant: str
) -> None:
    s = await damaged(pg, leaps_template)
    await make_audit_variant(s.prod, audit_variant)
    who = await admin_identity(s.prod)
    (email,) = await q(s.prod, "SELECT email FROM users WHERE id = %s", (who.user_id,))
    fake_slack.add_user(ADMIN, email=str(email["email"]))
    fake_slack.add_user(ADMIN2, email=None)
    settings = bot_settings(s.prod, fake_slack, role_map=ROLES, recovery_database_url=s.copy)
    lost_users = sorted(s.lost["users"])
    async with running_bot(settings, fake_slack) as bot:
        plan = await request(bot, RESTORE_NAME)
        shown = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
        assert "one transaction per table batch" in shown and "the database accepted it" in shown
        await press(bot, plan, ADMIN)
        await settle(bot)
        assert not (set(lost_users) & await keys(s.prod, "users"))  # one approval is not enough
        await press(bot, plan, ADMIN2)
        await settle(bot)
        final = message_text(fake_slack, CHANNEL, str(plan.response["ts"]))
    assert "trg_check_submission_rate_limit" in final and who.user_id in final
    for table, expected in s.lost.items():
        assert expected - {s.refused} <= await keys(s.prod, table), table


async def test_a_copy_of_production_s_own_lineage_is_compared_by_row_version(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scenario's copy is of production's own lineage (a database made from it as a
    template: the same pages, the same xmin), so its tables are compared by row version:
    in ranges of a few blocks, several chunks, with buckets enough or so few that most hold
    several differences (read whole, an entry that was not there read again); the answer
    is the one by content. Freezing production keeps its versions; rewriting it (VACUUM
    FULL) moves them; an UPDATE of every row makes every version new (compared by content
    instead); a table the copy wrote since it was made is compared by content."""
    s = scenario
    gw, cgw = TargetGateway(s.prod), TargetGateway(s.copy)

    async def catalogs() -> tuple[rowdiff.Catalog, rowdiff.Catalog]:
        return await gw.read(rowdiff.read_catalog), await cgw.read(rowdiff.read_catalog)

    async def diff(
        table: str, physical: bool, few: bool = False, estimates: tuple[int, int] | None = None
    ) -> rowdiff.TableDiff:
        """By the statistics' estimates (by default), or sized by counting first (0, 0)."""
        prod, copy = await catalogs()
        p_shape, c_shape = prod.tables[table], copy.tables[table]
        assert rowdiff.physical_lineage(prod.facts, copy.facts)
        if estimates is None:
            estimates = (p_shape.estimate, c_shape.estimate)
            assert min(estimates) > 4, estimates
        columns = tuple(sorted(c_shape.columns))
        cmp = rowdiff.Compare(
            table,
            c_shape.key[0],
            c_shape.types[c_shape.key[0]],
            columns,
            False,
            True,
            tuple(c_shape.types[c] for c in columns),
            physical=physical,
            blocks=max(p_shape.blocks, c_shape.blocks),
            estimates=estimates,
        )
        with monkeypatch.context() as small:
            small.setattr(rowdiff, "SMALL_ROWS", 4)
            small.setattr(rowdiff, "RANGE_ROWS", 16)
            small.setattr(rowdiff, "CHUNK_ROWS", 48)
            if few:
                small.setattr(rowdiff, "VERSION_BUCKETS_PER_DIFFERENCE", 0.01)
            return await rowdiff.diff_table(gw, cgw, cmp)

    def same(a: rowdiff.TableDiff, b: rowdiff.TableDiff) -> None:
        assert (a.only_copy, a.only_prod, a.changed) == (b.only_copy, b.only_prod, b.changed)

    try:
        by_content = {t: await diff(t, False) for t in ("users", "points_ledger")}
        # sized by the statistics, by counts, and by estimates far off (one more pass)
        sizing = (None, (0, 0), (5, 5), (10**7, 5))
        for (table, expected), few, est in itertools.product(
            by_content.items(), (False, True), sizing
        ):
            assert expected.method == rowdiff.BUCKETS
            got = await diff(table, True, few, est)
            assert got.method == rowdiff.VERSIONS, (table, few, est)
            same(got, expected)
            assert (got.prod_rows, got.copy_rows) == (expected.prod_rows, expected.copy_rows)
            # the copy's rows only there are given with their ctid in the copy
            assert sorted(got.copy_tids) == got.only_copy
        users = by_content["users"]
        assert users.only_copy and users.only_prod and users.changed
        await q(s.prod, b"VACUUM (FREEZE) users")
        frozen = await diff("users", True)
        assert frozen.method == rowdiff.VERSIONS
        same(frozen, users)
        await q(s.prod, b"VACUUM FULL users")
        same(await diff("users", True), users)
        # A table the copy has written since counts its writes: the plan compares it by
        # content (tests/test_pitr.py reads the plan's note on a real restored copy).
        await q(s.copy, b"UPDATE badges SET name = name")
        assert (await cgw.read(rowdiff.read_catalog)).tables["badges"].writes > 0
        # Every version new: compared by content after all.
        await q(s.prod, b"UPDATE users SET name = name")
        rewritten = await diff("users", True)
        assert rewritten.method == rowdiff.BUCKETS
        same(rewritten, users)
    finally:
        await gw.close()
        await cgw.close()


async def test_array_literals_bring_every_text_back(pg: EmbeddedPostgres) -> None:
    """`rowdiff.texts`, both ways it writes a literal (JSON's form, and each element quoted
    when a string holds a control character), read back by PostgreSQL as the same texts."""
    fast = ["plain", 'quote"d', "ends\\", "NULL", "", "{braces},", " spaced ", "é ☃", None]
    slow = [*fast, "back\\slash", "line\nbreak", "tab\there", "\x01"]
    assert rowdiff.texts(fast) == "{" + json.dumps(fast, ensure_ascii=False)[1:-1] + "}"
    assert rowdiff.texts(slow) != "{" + json.dumps(slow, ensure_ascii=False)[1:-1] + "}"
    async with await psycopg.AsyncConnection.connect(pg.dsn("postgres")) as conn:
        for listed in (fast, slow, []):
            cur = await conn.execute("SELECT %s::text[]", (rowdiff.texts(listed),))
            assert await cur.fetchone() == (listed,)
        cur = await conn.execute("SELECT %s::bigint[]", (rowdiff.ints([-(2**63), 0, 7]),))
        assert await cur.fetchone() == ([-(2**63), 0, 7],)
