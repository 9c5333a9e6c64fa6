"""Production's guards, as the fixture carries them (LEAPS_SCHEMA.md "Business rules
enforced in the database"): each refuses what it must with its SQLSTATE and message, and
lets through what the application does (`SET LOCAL app.user_role` / `app.user_id`, a
reviewer named). Remedies meet these guards, so a guard missing here would let a remedy
test pass that production refuses.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg import errors

from commands.fixture.faults import FaultInjector

Conn = psycopg.AsyncConnection[Any]
LEARN = {"course_name": "AI Foundations for Educators"}


async def one(dsn: str, query: LiteralString, params: tuple[Any, ...] = ()) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params or None)
        row = await cur.fetchone()
        assert row is not None, query
        return row[0] if len(row) == 1 else row


@asynccontextmanager
async def acting(dsn: str, user_id: str | None, role: str | None) -> AsyncIterator[Conn]:
    """One transaction as the application opens it: who acts and with what role, set
    for this transaction only."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        async with conn.transaction():
            if user_id is not None:
                await conn.execute("SELECT set_config('app.user_id', %s, true)", (user_id,))
            if role is not None:
                await conn.execute("SELECT set_config('app.user_role', %s, true)", (role,))
            yield conn


async def user_of_role(dsn: str, role: str) -> str:
    query: LiteralString = 'SELECT id FROM users WHERE role = %s::"Role" ORDER BY id LIMIT 1'
    return str(await one(dsn, query, (role,)))


async def submission(dsn: str, status: str, activity: str = "LEARN") -> tuple[str, str]:
    """(id, user_id) of a seeded submission in `status`."""
    row = await one(
        dsn,
        'SELECT id, user_id FROM submissions WHERE status = %s::"SubmissionStatus"'
        " AND activity_code = %s ORDER BY id LIMIT 1",
        (status, activity),
    )
    return str(row[0]), str(row[1])


async def insert_submission(
    conn: Conn, user_id: str, activity: str, payload: dict[str, Any], status: str = "PENDING"
) -> str:
    sub_id = f"g_{uuid.uuid4().hex[:12]}"
    await conn.execute(
        "INSERT INTO submissions (id, user_id, activity_code, status, payload, updated_at)"
        " VALUES (%s, %s, %s, %s, %s, now() AT TIME ZONE 'UTC')",
        (sub_id, user_id, activity, status, json.dumps(payload)),
    )
    return sub_id


async def participant_without_submissions(dsn: str) -> str:
    return str(
        await one(
            dsn,
            "SELECT id FROM users u WHERE role = 'PARTICIPANT'"
            " AND NOT EXISTS (SELECT 1 FROM submissions s WHERE s.user_id = u.id)"
            " ORDER BY id LIMIT 1",
        )
    )


# ------------------------------------------------------------ payload CHECKs


@pytest.mark.parametrize(
    ("activity", "payload", "constraint"),
    [
        ("LEARN", {"course": "renamed key"}, "chk_learn_payload"),
        ("LEARN", {"course_name": "  "}, "chk_learn_payload"),
        ("AMPLIFY", {"peers_trained": "5", "students_trained": 1}, "chk_amplify_payload"),
        ("AMPLIFY", {"peers_trained": 5}, "chk_amplify_payload"),
        ("AMPLIFY", {"peersTrained": 5, "studentsTrained": 1}, "chk_amplify_payload"),
        ("AMPLIFY", {"peers_trained": -1, "students_trained": 1}, "chk_amplify_payload"),
        ("PRESENT", {"linkedin_url": "https://events.example/x"}, "chk_present_payload"),
        ("PRESENT", {"url": "https://linkedin.com/posts/1"}, "chk_present_payload"),
    ],
)
async def test_payload_checks_refuse_bad_payloads(
    leaps_dsn: str, activity: str, payload: dict[str, Any], constraint: str
) -> None:
    user_id = await participant_without_submissions(leaps_dsn)
    with pytest.raises(errors.CheckViolation) as refused:
        async with acting(leaps_dsn, None, None) as conn:
            await insert_submission(conn, user_id, activity, payload)
    assert refused.value.sqlstate == "23514"
    assert refused.value.diag.constraint_name == constraint


async def test_payload_checks_accept_what_the_application_writes(leaps_dsn: str) -> None:
    user_id = await participant_without_submissions(leaps_dsn)
    async with acting(leaps_dsn, None, None) as conn:
        await insert_submission(conn, user_id, "LEARN", LEARN)
        await insert_submission(
            conn, user_id, "AMPLIFY", {"peers_trained": 50, "students_trained": 200}
        )
        await insert_submission(
            conn, user_id, "PRESENT", {"linkedin_url": "https://linkedin.com/posts/42"}
        )
        await insert_submission(conn, user_id, "EXPLORE", {"reflection": "no rule for this"})


async def test_legacy_camelcase_rows_stay_and_new_ones_are_refused(leaps_dsn: str) -> None:
    user_id = await participant_without_submissions(leaps_dsn)
    async with FaultInjector(leaps_dsn) as inj:
        (legacy,) = await inj.legacy_amplify(user_id, [{"peersTrained": 3, "studentsTrained": 4}])
    validated = await one(
        leaps_dsn,
        "SELECT convalidated FROM pg_constraint WHERE conname = 'chk_amplify_payload'",
    )
    assert validated is False
    assert await one(leaps_dsn, "SELECT payload FROM submissions WHERE id = %s", (legacy,)) == {
        "peersTrained": 3,
        "studentsTrained": 4,
    }
    with pytest.raises(errors.CheckViolation):
        async with acting(leaps_dsn, None, None) as conn:
            await insert_submission(
                conn, user_id, "AMPLIFY", {"peersTrained": 3, "studentsTrained": 4}
            )


# ------------------------------------------------------- status transitions


@pytest.mark.parametrize(("final", "to"), [("APPROVED", "REJECTED"), ("REJECTED", "PENDING")])
async def test_decided_status_is_final_whoever_asks(leaps_dsn: str, final: str, to: str) -> None:
    sub_id, _user = await submission(leaps_dsn, final)
    admin = await user_of_role(leaps_dsn, "SUPERADMIN")
    with pytest.raises(errors.CheckViolation) as refused:
        async with acting(leaps_dsn, admin, "SUPERADMIN") as conn:
            await conn.execute(
                "UPDATE submissions SET status = %s, reviewer_id = %s WHERE id = %s",
                (to, admin, sub_id),
            )
    assert refused.value.sqlstate == "23514"
    assert refused.value.diag.message_primary == f"Cannot change status from {final} to {to}"
    assert "validate_status_transition()" in (refused.value.diag.context or "")


async def test_decision_needs_a_reviewer(leaps_dsn: str) -> None:
    sub_id, _user = await submission(leaps_dsn, "PENDING")
    reviewer = await user_of_role(leaps_dsn, "REVIEWER")
    with pytest.raises(errors.NotNullViolation) as refused:
        async with acting(leaps_dsn, reviewer, "REVIEWER") as conn:
            await conn.execute(
                "UPDATE submissions SET status = 'REJECTED' WHERE id = %s", (sub_id,)
            )
    assert refused.value.sqlstate == "23502"
    assert refused.value.diag.message_primary == "reviewer_id required when status is REJECTED"


@pytest.mark.parametrize("role", [None, "PARTICIPANT", ""])
async def test_status_change_needs_a_staff_role(leaps_dsn: str, role: str | None) -> None:
    sub_id, _user = await submission(leaps_dsn, "PENDING")
    reviewer = await user_of_role(leaps_dsn, "REVIEWER")
    with pytest.raises(errors.InsufficientPrivilege) as refused:
        async with acting(leaps_dsn, reviewer, role) as conn:
            await conn.execute(
                "UPDATE submissions SET status = 'REJECTED', reviewer_id = %s WHERE id = %s",
                (reviewer, sub_id),
            )
    assert refused.value.sqlstate == "42501"
    assert "Insufficient permissions to change submission status" in str(refused.value)


async def test_role_set_for_one_transaction_does_not_outlive_it(leaps_dsn: str) -> None:
    """What `SET LOCAL` / set_config(..., true) promise: the next transaction on the same
    session is nobody again."""
    sub_id, _user = await submission(leaps_dsn, "PENDING")
    reviewer = await user_of_role(leaps_dsn, "REVIEWER")
    async with await psycopg.AsyncConnection.connect(leaps_dsn) as conn:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.user_role', 'REVIEWER', true)")
        with pytest.raises(errors.InsufficientPrivilege):
            async with conn.transaction():
                await conn.execute(
                    "UPDATE submissions SET status = 'REJECTED', reviewer_id = %s WHERE id = %s",
                    (reviewer, sub_id),
                )


async def test_reviewer_decides_as_the_application_does_and_is_audited(leaps_dsn: str) -> None:
    sub_id, _user = await submission(leaps_dsn, "PENDING")
    reviewer = await user_of_role(leaps_dsn, "REVIEWER")
    async with acting(leaps_dsn, reviewer, "REVIEWER") as conn:
        await conn.execute(
            "UPDATE submissions SET status = 'REJECTED', reviewer_id = %s,"
            " review_note = 'duplicate', updated_at = now() AT TIME ZONE 'UTC' WHERE id = %s",
            (reviewer, sub_id),
        )
        # Other columns change without the transition guard's say.
        await conn.execute("UPDATE submissions SET visibility = 'PUBLIC' WHERE id = %s", (sub_id,))
    actor, action, meta = await one(
        leaps_dsn,
        "SELECT actor_id, action, meta FROM audit_log"
        " WHERE target_id = %s AND action = 'UPDATE_submissions'",
        (sub_id,),
    )
    assert (actor, action) == (reviewer, "UPDATE_submissions")
    assert meta["old_values"]["status"] == "PENDING"
    assert meta["new_values"]["status"] == "REJECTED"
    assert meta["new_values"]["reviewer_id"] == reviewer
    assert (meta["operation"], meta["table"], meta["user_role"]) == (
        "UPDATE",
        "submissions",
        "REVIEWER",
    )


# --------------------------------------------------------------- role changes


@pytest.mark.parametrize("role", [None, "REVIEWER"])
async def test_role_change_needs_an_admin(leaps_dsn: str, role: str | None) -> None:
    target = await user_of_role(leaps_dsn, "PARTICIPANT")
    with pytest.raises(errors.InsufficientPrivilege) as refused:
        async with acting(leaps_dsn, target, role) as conn:
            await conn.execute("UPDATE users SET role = 'ADMIN' WHERE id = %s", (target,))
    assert refused.value.sqlstate == "42501"
    assert refused.value.diag.message_primary == "Insufficient permissions to change user role"


async def test_last_superadmin_stays_and_admins_change_roles(leaps_dsn: str) -> None:
    boss = await user_of_role(leaps_dsn, "SUPERADMIN")
    assert await one(leaps_dsn, "SELECT count(*) FROM users WHERE role = 'SUPERADMIN'") == 1
    with pytest.raises(errors.CheckViolation) as refused:
        async with acting(leaps_dsn, boss, "SUPERADMIN") as conn:
            await conn.execute("UPDATE users SET role = 'ADMIN' WHERE id = %s", (boss,))
    assert refused.value.diag.message_primary == "Cannot remove the last SUPERADMIN user"

    admin = await user_of_role(leaps_dsn, "ADMIN")
    async with acting(leaps_dsn, boss, "SUPERADMIN") as conn:
        await conn.execute("UPDATE users SET role = 'SUPERADMIN' WHERE id = %s", (admin,))
        await conn.execute("UPDATE users SET role = 'ADMIN' WHERE id = %s", (boss,))
        # Unchanged role, other columns: neither guarded nor audited.
        await conn.execute("UPDATE users SET name = name WHERE id = %s", (admin,))
    actions = await one(
        leaps_dsn,
        "SELECT array_agg(target_id || ':' || (meta -> 'new_values' ->> 'role')"
        " ORDER BY target_id) FROM audit_log WHERE action = 'UPDATE_users'",
    )
    assert sorted(actions) == sorted([f"{admin}:SUPERADMIN", f"{boss}:ADMIN"])


# ---------------------------------------------------------- insert guards


async def test_single_attempt_refuses_learn_after_an_approved_one(leaps_dsn: str) -> None:
    _sub, user_id = await submission(leaps_dsn, "APPROVED")
    with pytest.raises(errors.UniqueViolation) as refused:
        async with acting(leaps_dsn, user_id, "PARTICIPANT") as conn:
            await insert_submission(conn, user_id, "LEARN", LEARN, status="REJECTED")
    assert refused.value.sqlstate == "23505"
    assert refused.value.diag.message_primary == "User already has an approved LEARN submission"
    # Other activities are not single-attempt.
    async with acting(leaps_dsn, user_id, "PARTICIPANT") as conn:
        await insert_submission(conn, user_id, "EXPLORE", {"reflection": "again"})


async def test_rate_limit_refuses_the_eleventh_in_an_hour(leaps_dsn: str) -> None:
    user_id = await participant_without_submissions(leaps_dsn)
    async with acting(leaps_dsn, user_id, "PARTICIPANT") as conn:
        for _ in range(10):
            await insert_submission(conn, user_id, "EXPLORE", {"reflection": "spam"})
    with pytest.raises(errors.CheckViolation) as refused:
        async with acting(leaps_dsn, user_id, "PARTICIPANT") as conn:
            await insert_submission(conn, user_id, "EXPLORE", {"reflection": "spam"})
    assert refused.value.diag.message_primary == "Submission rate limit exceeded (max 10 per hour)"
    # Older rows do not count: the same user, an hour later.
    await one(
        leaps_dsn,
        "UPDATE submissions SET created_at = created_at - interval '61 minutes'"
        " WHERE user_id = %s RETURNING 1",
        (user_id,),
    )
    async with acting(leaps_dsn, user_id, "PARTICIPANT") as conn:
        await insert_submission(conn, user_id, "EXPLORE", {"reflection": "fine now"})


async def test_certificate_hash_belongs_to_one_approved_learner(leaps_dsn: str) -> None:
    first = await participant_without_submissions(leaps_dsn)
    second = str(
        await one(
            leaps_dsn,
            "SELECT id FROM users u WHERE role = 'PARTICIPANT' AND id <> %s"
            " AND NOT EXISTS (SELECT 1 FROM submissions s WHERE s.user_id = u.id"
            "   AND s.activity_code = 'LEARN')"
            " ORDER BY id LIMIT 1",
            (first,),
        )
    )
    reviewer = await user_of_role(leaps_dsn, "REVIEWER")
    payload = {**LEARN, "certificateHash": "sha256:abc"}
    async with acting(leaps_dsn, first, "PARTICIPANT") as conn:
        sub_id = await insert_submission(conn, first, "LEARN", payload)
    async with acting(leaps_dsn, reviewer, "REVIEWER") as conn:
        await conn.execute(
            "UPDATE submissions SET status = 'APPROVED', reviewer_id = %s WHERE id = %s",
            (reviewer, sub_id),
        )
    with pytest.raises(errors.UniqueViolation) as refused:
        async with acting(leaps_dsn, second, "PARTICIPANT") as conn:
            await insert_submission(conn, second, "LEARN", payload)
    assert refused.value.diag.message_primary == (
        "Certificate hash already exists for another approved LEARN submission"
    )


@pytest.mark.parametrize(
    ("payload", "ok"),
    [
        ({"reflection": "x", "evidence_url": "javascript:alert(1)"}, False),
        ({"reflection": "x", "evidence_url": "ftp://files.example/a.pdf"}, False),
        ({"reflection": "x", "mediaUrl": "file:///etc/passwd"}, False),
        ({"reflection": "x", "evidence_url": "https://evidence.example/a"}, True),
        ({"reflection": "x", "url": "http://evidence.example/a"}, True),
        ({"reflection": "x", "evidence_url": None}, True),
    ],
)
async def test_submission_urls_must_be_http(
    leaps_dsn: str, payload: dict[str, Any], ok: bool
) -> None:
    user_id = await participant_without_submissions(leaps_dsn)
    if ok:
        async with acting(leaps_dsn, user_id, "PARTICIPANT") as conn:
            await insert_submission(conn, user_id, "EXPLORE", payload)
        return
    with pytest.raises(errors.CheckViolation) as refused:
        async with acting(leaps_dsn, user_id, "PARTICIPANT") as conn:
            await insert_submission(conn, user_id, "EXPLORE", payload)
    assert "must be http(s)" in str(refused.value)


async def test_emails_are_lower_cased_and_checked(leaps_dsn: str) -> None:
    async with acting(leaps_dsn, None, None) as conn:
        await conn.execute(
            "INSERT INTO users (id, handle, email) VALUES ('g_user', 'guser', ' Ada@School.EDU ')"
        )
    assert await one(leaps_dsn, "SELECT email FROM users WHERE id = 'g_user'") == "ada@school.edu"
    with pytest.raises(errors.CheckViolation) as refused:
        async with acting(leaps_dsn, None, None) as conn:
            await conn.execute("UPDATE users SET email = 'not-an-address' WHERE id = 'g_user'")
    assert refused.value.diag.message_primary == "Invalid email address: not-an-address"
    # Rows from before the trigger keep their case until someone writes the e-mail.
    assert await one(leaps_dsn, "SELECT count(*) FROM users WHERE email <> lower(email)") > 0


# ------------------------------------------------------------ after-triggers


async def test_deleting_a_submission_removes_its_attachments_without_the_foreign_key(
    leaps_dsn: str,
) -> None:
    sub_id = str(
        await one(
            leaps_dsn,
            "SELECT submission_id FROM submission_attachments ORDER BY id LIMIT 1",
        )
    )
    async with acting(leaps_dsn, None, None) as conn:
        # A damaged database: the cascading foreign key is gone.
        await conn.execute(
            "ALTER TABLE submission_attachments"
            " DROP CONSTRAINT submission_attachments_submission_id_fkey"
        )
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute("LISTEN cleanup_attachments")
        await conn.execute("DELETE FROM submissions WHERE id = %s", (sub_id,))
        note = await anext(conn.notifies(timeout=5.0))
    assert json.loads(note.payload) == {"submission_id": sub_id}
    left = await one(
        leaps_dsn, "SELECT count(*) FROM submission_attachments WHERE submission_id = %s", (sub_id,)
    )
    assert left == 0


async def test_audit_rows_only_when_the_session_says_who_acts(leaps_dsn: str) -> None:
    admin = await user_of_role(leaps_dsn, "ADMIN")
    user_id = await user_of_role(leaps_dsn, "PARTICIPANT")
    before = await one(leaps_dsn, "SELECT count(*) FROM audit_log")
    insert: LiteralString = (
        "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
        " event_time) VALUES (%s, %s, 'EXPLORE', 'MANUAL', 5, now())"
    )
    async with acting(leaps_dsn, None, "ADMIN") as conn:
        await conn.execute(insert, ("g_quiet", user_id))
    assert await one(leaps_dsn, "SELECT count(*) FROM audit_log") == before
    async with acting(leaps_dsn, admin, "ADMIN") as conn:
        await conn.execute(insert, ("g_audited", user_id))
        await conn.execute("DELETE FROM points_ledger WHERE id = 'g_quiet'")
        await conn.execute(
            "INSERT INTO users (id, handle, email) VALUES ('g_new', 'gnew', 'g.new@school.edu')"
        )
    rows = await one(
        leaps_dsn,
        "SELECT array_agg(action || ' ' || target_id || ' ' || actor_id ORDER BY action)"
        " FROM audit_log WHERE target_id LIKE 'g\\_%%' AND actor_id = %s",
        (admin,),
    )
    assert rows == [
        f"DELETE_points_ledger g_quiet {admin}",
        f"INSERT_points_ledger g_audited {admin}",
        f"INSERT_users g_new {admin}",
    ]
    created = await one(leaps_dsn, "SELECT meta FROM audit_log WHERE action = 'INSERT_users'")
    assert created["new_values"]["email"] == "g.new@school.edu"
    assert "old_values" not in created


async def test_changes_notify_refresh_analytics(leaps_dsn: str) -> None:
    user_id = await user_of_role(leaps_dsn, "PARTICIPANT")
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute("LISTEN refresh_analytics")
        await conn.execute(
            "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
            " event_time) VALUES ('g_note', %s, 'EXPLORE', 'MANUAL', 5, now())",
            (user_id,),
        )
        note = await anext(conn.notifies(timeout=5.0))
    assert json.loads(note.payload) == {"table": "points_ledger", "op": "INSERT", "id": "g_note"}


async def test_every_guard_is_in_the_catalog(leaps_dsn: str) -> None:
    """The names a refusal and the bot's plans refer to."""
    triggers = await one(
        leaps_dsn,
        "SELECT array_agg(tgrelid::regclass || '.' || tgname) FROM pg_trigger"
        " WHERE NOT tgisinternal AND tgenabled <> 'D'",
    )
    assert set(triggers) >= {
        "submissions.trg_validate_status_transition",
        "users.trg_validate_role_change",
        "submissions.trg_check_single_attempt",
        "submissions.trg_check_submission_rate_limit",
        "submissions.trg_check_certificate_hash",
        "submissions.trg_validate_urls",
        "users.trg_validate_user_email",
        "submissions.trg_cleanup_attachments",
        "users.audit_users_changes",
        "points_ledger.audit_points_changes",
        "submissions.audit_submission_status_changes",
        "submissions.trg_check_amplify_quota",
        "users.trg_users_refresh_analytics",
        "submissions.trg_submissions_refresh_analytics",
        "points_ledger.trg_points_ledger_refresh_analytics",
    }
    checks = await one(
        leaps_dsn,
        "SELECT array_agg(conname::text ORDER BY conname) FROM pg_constraint"
        " WHERE conrelid = 'submissions'::regclass AND contype = 'c' AND convalidated",
    )
    assert checks == ["chk_amplify_payload", "chk_learn_payload", "chk_present_payload"]
