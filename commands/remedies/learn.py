"""`dedupe-learn`: one live LEARN submission per user, as a reviewer would leave it.

Production's guards make APPROVED and REJECTED final and let only a named reviewer with a
staff role change a status, so the remedy keeps a user's APPROVED submission (its points
were awarded) where there is one, else the latest, and rejects only PENDING rows, as the
acting LEAPS identity. A user with two APPROVED LEARN rows is listed for a person.
"""

from __future__ import annotations

from psycopg import sql

from commands.base import BACKUP_SCHEMA, Context, Reader, Row, UsageError
from commands.guards import acting_notes, triggers_reading
from commands.remedies.base import (
    LockScope,
    Outcome,
    Plan,
    PlanStep,
    Remedy,
    RemedyAbort,
    Writer,
    add_remedy,
    check_count,
)
from commands.remedies.rowsets import (
    APPROVAL_PLACEHOLDER,
    SAMPLE,
    Counts,
    Part,
    audit_note,
    backup_display,
    backup_sql,
    check_parts,
    count_rows,
    lock_and_backup_ids,
    plural,
    sample_parts,
    sampled_parts,
    verify_backup_of,
)

DEDUPE_LEARN_NAME = "dedupe-learn"

_LIVE_LEARN = "{a}.activity_code = 'LEARN' AND {a}.status IN ('PENDING', 'APPROVED')"
_APPROVED_LEARNS = (
    "(SELECT count(*) FROM submissions AS a WHERE a.user_id = {a}.user_id"
    " AND a.activity_code = 'LEARN' AND a.status = 'APPROVED')"
)
# The live LEARN a user keeps: the APPROVED one where there is one (its points were
# awarded, and production's guards keep a decision final), else the latest PENDING.
_KEPT_ORDER = " ORDER BY (k.status = 'APPROVED') DESC, k.created_at DESC, k.id DESC LIMIT 1)"
_KEPT = (
    "(SELECT k.id FROM submissions AS k WHERE k.user_id = s.user_id AND "  # noqa: S608
    + _LIVE_LEARN.format(a="k")
    + _KEPT_ORDER
)
_KEPT_LABEL = (
    "(SELECT k.id || ' (' || k.status::text || ')' FROM submissions AS k"  # noqa: S608
    " WHERE k.user_id = s.user_id AND " + _LIVE_LEARN.format(a="k") + _KEPT_ORDER
)
# What is rejected: only PENDING rows, never the kept one, and nothing of a user with two
# or more APPROVED LEARN rows (which award stands is a person's decision).
DUPLICATE_LEARN = (
    "s.activity_code = 'LEARN' AND s.status = 'PENDING' AND s.id <> "
    + _KEPT
    + " AND "
    + _APPROVED_LEARNS.format(a="s")
    + " < 2"
)
# A PENDING duplicate repeating the certificateHash of another user's APPROVED LEARN:
# where the live database has an UPDATE trigger reading certificateHash (production's
# trg_check_certificate_hash), every change to such a row is refused, so it is left to a
# person instead of failing the whole remedy.
CERT_CONFLICT = (
    "s.payload ->> 'certificateHash' IS NOT NULL AND EXISTS (SELECT 1 FROM submissions AS o"
    " WHERE o.activity_code = 'LEARN' AND o.status = 'APPROVED' AND o.user_id <> s.user_id"
    " AND o.payload ->> 'certificateHash' = s.payload ->> 'certificateHash')"
)
CERTIFICATE_KEY = "certificateHash"


def learn_part(certificate_guarded: bool) -> Part:
    condition = DUPLICATE_LEARN + (f" AND NOT ({CERT_CONFLICT})" if certificate_guarded else "")
    return Part(
        "learn",
        "submissions",
        "s",
        condition,
        "PENDING duplicate LEARN submissions (not the kept one)",
    )


_HELD_SQL = (
    "SELECT s.id, s.user_id FROM submissions AS s WHERE "  # noqa: S608
    + DUPLICATE_LEARN
    + " AND "
    + CERT_CONFLICT
    + f" ORDER BY s.id LIMIT {SAMPLE}"
)
_LEARN_SAMPLE = (
    "s.id, s.user_id, s.status::text AS status, s.created_at, " + _KEPT + " AS kept_submission"
)
# Users with two or more APPROVED LEARN rows: listed for a human decision, never changed.
NEEDS_DECISION_SQL = f"""
SELECT s.user_id, count(*) AS approved,
       string_agg(s.id, ', ' ORDER BY s.created_at, s.id) AS approved_submissions,
       (SELECT count(*) FROM submissions AS p WHERE p.user_id = s.user_id
          AND p.activity_code = 'LEARN' AND p.status = 'PENDING') AS pending
FROM submissions AS s
WHERE s.activity_code = 'LEARN' AND s.status = 'APPROVED'
GROUP BY s.user_id HAVING count(*) >= 2
ORDER BY s.user_id LIMIT {SAMPLE}
"""  # noqa: S608
NEEDS_DECISION_COUNT_SQL = """
SELECT count(*) AS n FROM (SELECT 1 FROM submissions AS s
  WHERE s.activity_code = 'LEARN' AND s.status = 'APPROVED'
  GROUP BY s.user_id HAVING count(*) >= 2) AS d
"""


class LearnData(Counts):
    needs_decision: list[str] = []  # user ids left for a person
    certificate_guards: list[str] = []  # triggers that refuse changing a repeated certificate


def reject_sql(backup: sql.Identifier) -> sql.Composed:
    """Rejects exactly the backed-up rows as a reviewer would: the acting identity named
    as reviewer, a note saying why and which submission is kept, updated_at now (UTC
    wall-clock like every timestamp(3) column, never before created_at)."""
    return sql.SQL(
        "UPDATE submissions AS s SET status = 'REJECTED', reviewer_id = %s,"  # noqa: S608
        " review_note = 'Duplicate LEARN submission: ' || coalesce("
        + _KEPT_LABEL
        + ", '?') || ' is kept; rejected by dbops-bot, approval ' || %s::text,"
        " updated_at = greatest(now() AT TIME ZONE 'UTC', s.created_at)"
        " FROM {} AS b WHERE s.id = b.id"
    ).format(backup)


def _decision_lines(rows: list[Row], total: int) -> list[str]:
    lines = [
        f"needs a human decision: user {r['user_id']} has {r['approved']} APPROVED LEARN "
        f"submissions ({r['approved_submissions']}) and {r['pending']} PENDING; "
        "left unchanged"
        for r in rows
    ]
    if total > len(rows):
        lines.append(f"… and {total - len(rows)} more users needing a human decision")
    return lines


async def plan_dedupe_learn(ctx: Context, args: list[str]) -> Plan:
    if [a for a in args if a.strip()]:
        raise UsageError("`dedupe-learn` takes no arguments")

    async def survey(
        db: Reader,
    ) -> tuple[int, int, list[Row], list[Row], int, list[str], list[str], list[Row], str | None]:
        cert_guards = await triggers_reading(db, "submissions", "UPDATE", CERTIFICATE_KEY)
        part = learn_part(bool(cert_guards))
        n = await count_rows(db, part.count_sql())
        audit = await audit_note(db, [("submissions", "UPDATE")]) if n else None
        users = await db.fetch(
            "SELECT count(DISTINCT s.user_id) AS n FROM submissions AS s WHERE "  # noqa: S608
            + part.condition
        )
        sample = await db.fetch(part.sample_sql(_LEARN_SAMPLE).as_string()) if n else []
        decide = await db.fetch(NEEDS_DECISION_SQL)
        n_decide = int((await db.fetch(NEEDS_DECISION_COUNT_SQL))[0]["n"]) if decide else 0
        notes = await acting_notes(db, ["submissions"], "UPDATE", ctx.service_identity) if n else []
        held = await db.fetch(_HELD_SQL) if cert_guards else []
        return n, int(users[0]["n"]), sample, decide, n_decide, notes, cert_guards, held, audit

    survey_result = await ctx.gateway.read(survey)
    n, users, targets, decide, n_decide, notes, cert_guards, held, audit = survey_result
    part = learn_part(bool(cert_guards))
    backup = sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_submissions")
    warnings = [*notes, *_decision_lines(decide, n_decide)]
    warnings += [
        f"needs a human decision: submission {r['id']} of user {r['user_id']} repeats the "
        f"certificateHash of another user's APPROVED LEARN; {', '.join(cert_guards)} refuses "
        "any change to it; left unchanged"
        for r in held
    ]
    if n:
        summary = (
            f"set {plural(n, 'PENDING LEARN submission')} of {plural(users, 'user')} to "
            "REJECTED, keeping each user's APPROVED one where there is one (its points were "
            "awarded), else the latest; nothing is deleted"
        )
    else:
        summary = "no PENDING LEARN submission duplicates a kept one; nothing to do"
    if n_decide:
        summary += f"; {plural(n_decide, 'user')} with several APPROVED LEARN rows need a human"
    return Plan(
        remedy=DEDUPE_LEARN_NAME,
        args=list(args),
        title="Reject duplicate LEARN submissions",
        summary=summary,
        steps=[
            PlanStep(sql=part.lock_sql().as_string(), note=f"locks and recounts: {n}"),
            PlanStep(
                sql=backup_sql("submissions", backup).as_string(),
                params=["<the locked ids>"],
                note="whole rows, before the change",
            ),
            PlanStep(
                sql=reject_sql(backup).as_string(),
                params=["<the acting LEAPS user id>", APPROVAL_PLACEHOLDER],
                note="as the acting identity (app.user_role set for this transaction, and "
                "app.user_id where LEAPS's audit trigger can write its row); the count must "
                "match the plan",
            ),
            PlanStep(sql=part.count_sql().as_string(), note="verification: must be 0"),
        ],
        targets=targets,
        count=n,
        backup=f"whole rows copied first into {backup_display('submissions')}" if n else None,
        warnings=warnings,
        needs_approval=n > 0,
        locks=LockScope(relations=["submissions"]),
        data=LearnData(
            counts={"learn": n},
            needs_decision=[str(r["user_id"]) for r in decide],
            certificate_guards=cert_guards,
        ).model_dump(mode="json"),
        audit=audit,
    )


async def apply_dedupe_learn(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(LearnData)
    now_guards = await triggers_reading(writer, "submissions", "UPDATE", CERTIFICATE_KEY)
    if bool(now_guards) != bool(data.certificate_guards):
        raise RemedyAbort(
            "drift: the certificate-hash triggers on submissions changed since the plan "
            f"({', '.join(data.certificate_guards) or 'none'} then, "
            f"{', '.join(now_guards) or 'none'} now); nothing was changed, request it again"
        )
    (part,) = sampled_parts([learn_part(bool(now_guards))], data)
    await check_parts(writer, plan, [part], data.counts)
    if plan.count == 0:
        return Outcome(ok=True, summary="no duplicate LEARN submission; nothing was changed")
    if writer.identity is None:
        raise RemedyAbort(
            "a rejection names its reviewer, and there is nobody to act as: no approver has "
            "a LEAPS account (matched by Slack e-mail) and REMEDY_SERVICE_USER_ID is not "
            "set; nothing was changed"
        )
    backup, ids = await lock_and_backup_ids(writer, part, plan.count)
    copied = len(ids)
    await writer.audit.before(writer, "submissions", ids)
    rejected = await writer.fetch(
        reject_sql(backup) + sql.SQL(" RETURNING s.id"),
        (writer.identity.user_id, writer.approval_id),
    )
    await writer.audit.after(writer, "submissions", "UPDATE", [str(r["id"]) for r in rejected])
    updated = len(rejected)
    check_count(plan, updated, "LEARN submissions")
    rest = part.changed(ids)
    if await count_rows(writer, rest.count_sql(), rest.params):
        return Outcome(
            ok=False, summary="verification failed: duplicate LEARN submissions remain; rolled back"
        )
    rows = await writer.fetch(
        sql.SQL(
            "SELECT s.id, s.user_id, b.status::text AS was, s.status::text AS now,"
            " s.reviewer_id FROM submissions AS s JOIN {} AS b ON b.id = s.id"
            " ORDER BY s.id LIMIT {}"
        ).format(backup, sql.Literal(SAMPLE))
    )
    left = data.needs_decision
    return Outcome(
        ok=True,
        summary=f"rejected {plural(updated, 'duplicate LEARN submission')}; the previous rows "
        f"are in {backup.as_string()}; every user now has at most one live LEARN"
        + (f", except {plural(len(left), 'user')} left for a human decision" if left else ""),
        affected=updated,
        backed_up=copied,
        backup_table=backup.as_string(),
        rows=rows,
    )


DEDUPE_LEARN = add_remedy(
    Remedy(
        name=DEDUPE_LEARN_NAME,
        usage="/db dedupe-learn",
        summary="keep each user's APPROVED (else latest) LEARN submission, reject the PENDING "
        "duplicates as a reviewer (backed up)",
        plan=plan_dedupe_learn,
        apply=apply_dedupe_learn,
        verify=verify_backup_of("submissions"),
        approver_role="ADMIN",
        approvers=2,
        destroys_data=True,
        preflight=True,
        sample=sample_parts(LearnData),
    )
)
