"""`dedupe-learn`: one live LEARN submission per user, as a reviewer would leave it.

Production's guards make APPROVED and REJECTED final and let only a named reviewer with a
staff role change a status, so the remedy keeps a user's APPROVED submission (its points
were awarded) where there is one, else the latest, and rejects only PENDING rows, as the
acting LEAPS identity. A user with two APPROVED LEARN rows is listed for a person.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from commands.base import BACKUP_SCHEMA, Context, Reader, Row, UsageError
from commands.guards import acting_notes, triggers_reading
from commands.keyranges import Piece, key_pieces, no_jit, run_pieces
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


# The plan reads the live LEARN rows in pieces by ranges of user ids (every row of a user
# in one piece; commands/keyranges.py), each user's rows ranked as _KEPT orders them, so
# that a piece names exactly its rows of DUPLICATE_LEARN (rank after the first, PENDING,
# fewer than two APPROVED), of _HELD_SQL (those repeating another user's certificate) and
# its users of NEEDS_DECISION_SQL: their counts, and the first SAMPLE of each by id (by
# user id for the decisions), among which the statements above then read the rows shown.
_LEARN_PIECE_SQL = """
WITH live AS MATERIALIZED (
  SELECT s.id, s.user_id, s.status, s.payload ->> 'certificateHash' AS cert,
         row_number() OVER (PARTITION BY s.user_id ORDER BY (s.status = 'APPROVED') DESC,
                                                             s.created_at DESC, s.id DESC) AS rk,
         count(*) FILTER (WHERE s.status = 'APPROVED') OVER (PARTITION BY s.user_id) AS approved
  FROM submissions AS s
  WHERE {rows} AND s.activity_code = 'LEARN' AND s.status IN ('PENDING', 'APPROVED')
), dup AS MATERIALIZED (
  SELECT live.id, live.user_id,
         (live.cert IS NOT NULL AND EXISTS (SELECT 1 FROM submissions AS o
            WHERE o.activity_code = 'LEARN' AND o.status = 'APPROVED'
              AND o.user_id <> live.user_id AND o.payload ->> 'certificateHash' = live.cert))
           AS held
  FROM live
  WHERE live.user_id IS NOT NULL AND live.status = 'PENDING' AND live.rk > 1
    AND live.approved < 2
), kept AS MATERIALIZED (SELECT * FROM dup WHERE NOT (%(guarded)s AND dup.held)),
two AS MATERIALIZED (SELECT DISTINCT live.user_id FROM live WHERE live.approved >= 2)
SELECT (SELECT count(*) FROM kept) AS n,
       (SELECT count(DISTINCT kept.user_id) FROM kept) AS users,
       ARRAY(SELECT kept.id FROM kept ORDER BY kept.id LIMIT %(sample)s) AS learn_first,
       ARRAY(SELECT dup.id FROM dup WHERE %(guarded)s AND dup.held ORDER BY dup.id
             LIMIT %(sample)s) AS held_first,
       (SELECT count(*) FROM two) AS decide,
       ARRAY(SELECT two.user_id FROM two ORDER BY two.user_id LIMIT %(sample)s) AS decide_first
"""


def _among(query: str, column: str) -> str:
    """`query` (ending in ORDER BY … LIMIT …) restricted to the candidates (`%(among)s`)."""
    head, order = query.rsplit("ORDER BY", 1)
    return f"{head.rstrip()} AND {column} = ANY(%(among)s) ORDER BY{order}"


_DECIDE_AMONG_SQL = NEEDS_DECISION_SQL.replace(
    "WHERE s.activity_code = 'LEARN' AND s.status = 'APPROVED'",
    "WHERE s.activity_code = 'LEARN' AND s.status = 'APPROVED' AND s.user_id = ANY(%(among)s)",
)


async def _survey_pieces(ctx: Context, guarded: bool) -> dict[str, Any]:
    """The pieces' counts added up, and their candidates of each sample."""

    async def pieces(db: Reader) -> list[Piece]:
        return await key_pieces(db, "submissions", "user_id")

    async def read(db: Reader, piece: Piece) -> Row:
        query = _LEARN_PIECE_SQL.format(rows=piece.where("s.user_id"))
        params = {**piece.params(), "guarded": guarded, "sample": SAMPLE}
        return (await db.fetch(query, params))[0]

    out: dict[str, Any] = {"n": 0, "users": 0, "decide": 0}
    for row in await run_pieces(ctx.gateway, await ctx.gateway.read(pieces), read):
        for key, value in row.items():
            if key.endswith("_first"):
                out.setdefault(key, []).extend(str(v) for v in value or [])
            else:
                out[key] += int(value or 0)
    return out


async def plan_dedupe_learn(ctx: Context, args: list[str]) -> Plan:
    if [a for a in args if a.strip()]:
        raise UsageError("`dedupe-learn` takes no arguments")

    async def guards(db: Reader) -> list[str]:
        await no_jit(db)
        return await triggers_reading(db, "submissions", "UPDATE", CERTIFICATE_KEY)

    cert_guards = await ctx.gateway.read(guards)
    found = await _survey_pieces(ctx, bool(cert_guards))
    n, users, n_decide = int(found["n"]), int(found["users"]), int(found["decide"])

    async def survey(db: Reader) -> tuple[list[Row], list[Row], list[str], list[Row], str | None]:
        await no_jit(db)
        part = learn_part(bool(cert_guards))
        audit = await audit_note(db, [("submissions", "UPDATE")]) if n else None
        sample = (
            await db.fetch(
                _among(part.sample_sql(_LEARN_SAMPLE).as_string(), "s.id"),
                {"among": found.get("learn_first", [])},
            )
            if n
            else []
        )
        decide = (
            await db.fetch(_DECIDE_AMONG_SQL, {"among": found.get("decide_first", [])})
            if n_decide
            else []
        )
        notes = await acting_notes(db, ["submissions"], "UPDATE", ctx.service_identity) if n else []
        held = (
            await db.fetch(_among(_HELD_SQL, "s.id"), {"among": found.get("held_first", [])})
            if found.get("held_first")
            else []
        )
        return sample, decide, notes, held, audit

    targets, decide, notes, held, audit = await ctx.gateway.read(survey)
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
