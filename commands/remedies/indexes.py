"""`create-index` and `drop-index`: build a missing index, remove an exact duplicate.

Both run `... INDEX CONCURRENTLY`, which PostgreSQL refuses inside a transaction block,
so the statement goes through `Writer.run_outside_transaction` while the guarded
transaction only rechecks the catalog (it must hold no lock on the table, or the
concurrent build would wait for it). Such a statement commits on its own, and a failed
one can leave an INVALID index behind (CREATE after its catalog entry, DROP after
marking the index invalid): the remedy removes or names what is left, and says so.

Index and table names reach SQL only as `sql.Identifier`, and only after the live
catalog has confirmed them; columns a user names are checked against `pg_attribute`.
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Sequence

import psycopg
from psycopg import sql
from pydantic import BaseModel

from commands.base import Context, Reader, Row, UsageError, human_duration, human_size
from commands.indexes import (
    RECOMMENDED,
    Index,
    KeyColumn,
    check_columns,
    drop_statement,
    find_table,
    load_indexes,
    measure,
    parse_column,
    recommended,
    serves,
    twin_of,
)
from commands.remedies.base import (
    Execution,
    LockScope,
    Outcome,
    OutsideStepFailed,
    Plan,
    PlanStep,
    Remedy,
    Verification,
    Writer,
    add_remedy,
    check_count,
    check_drift,
)

CREATE_INDEX_NAME = "create-index"
DROP_INDEX_NAME = "drop-index"
MAX_IDENTIFIER = 63  # NAMEDATALEN - 1
# What CREATE/DROP INDEX CONCURRENTLY's ShareUpdateExclusiveLock on the table waits for.
_CONCURRENT_CONFLICTS = [
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
]
_TABLE_COLUMNS = re.compile(r"^\s*([A-Za-z_][\w$]*(?:\.[A-Za-z_][\w$]*)?)\s*\((.*)\)\s*$", re.S)

_ONE_INDEX_SQL = """
SELECT c.oid::bigint AS oid, i.indisvalid AS is_valid
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_index i ON i.indexrelid = c.oid
WHERE n.nspname = %s AND c.relname = %s
"""
_NAMES_SQL = """
SELECT c.relname::text AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s
"""
_OPEN_TRANSACTIONS_SQL = """
SELECT count(*)::int AS n, max(extract(epoch FROM now() - xact_start))::float AS oldest_s
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
"""
# Sessions with a lock on the table: a concurrent build or drop waits for every one that
# writes (and a drop for every one at all) to end its transaction.
_LOCKERS_SQL = """
SELECT l.pid, string_agg(DISTINCT l.mode, '+') AS mode,
       coalesce(nullif(a.application_name, ''), a.usename::text, '?') AS who,
       extract(epoch FROM now() - a.xact_start)::float AS xact_s
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.relation = %s::oid AND l.granted AND l.pid <> pg_backend_pid()
GROUP BY l.pid, a.application_name, a.usename, a.xact_start
ORDER BY l.pid
"""
_TABLE_SIZE_SQL = """
SELECT pg_total_relation_size(%s::oid)::bigint AS bytes,
       greatest(reltuples, 0)::bigint AS est_rows
FROM pg_class WHERE oid = %s::oid
"""


async def _lockers(db: Reader | Writer, table_oid: int) -> list[Row]:
    return await db.fetch(_LOCKERS_SQL, (table_oid,))


def _describe_lockers(rows: Sequence[Row]) -> str:
    return ", ".join(
        f"pid {r['pid']} ({r['who']}, {r['mode']}, transaction open {human_duration(r['xact_s'])})"
        for r in rows
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# How the statement really runs, for the plan's "limits" line (the executor adds its
# timeouts, which hold on the statement's own session too): not the executor's usual
# one transaction.
CREATE_LIMITS = (
    "CREATE INDEX CONCURRENTLY outside any transaction, on its own session, committing by "
    "itself (the guarded transaction only rechecks the catalog); if the build fails, the "
    "INVALID index it leaves is dropped with DROP INDEX CONCURRENTLY"
)
DROP_LIMITS = (
    "DROP INDEX CONCURRENTLY outside any transaction, on its own session, committing by "
    "itself (the guarded transaction only rechecks the catalog); if it fails midway the "
    "index is left INVALID and drop-index can be requested again"
)


class CreateData(BaseModel):
    schema_name: str
    table: str
    table_oid: int
    name: str
    columns: list[str]
    desc: list[bool]
    attnums: list[int]
    where: str | None = None  # only from RECOMMENDED (repo data), never from a user
    recommended: str | None = None


class DropData(BaseModel):
    oid: int
    schema_name: str
    name: str
    definition: str
    twin_oid: int
    twin: str


# --- create-index -------------------------------------------------------------------


def create_statement(data: CreateData) -> sql.Composed:
    cols = sql.SQL(", ").join(
        sql.SQL("{}{}").format(sql.Identifier(c), sql.SQL(" DESC") if d else sql.SQL(""))
        for c, d in zip(data.columns, data.desc, strict=True)
    )
    stmt = sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} USING btree ({})").format(
        sql.Identifier(data.name), sql.Identifier(data.schema_name, data.table), cols
    )
    rec = recommended(data.recommended) if data.recommended else None
    if data.where is not None:
        # Only the predicate of a RECOMMENDED entry (repo data, reviewed like code) is
        # written as SQL, taken from the entry itself rather than from the stored plan.
        if rec is None or rec.where != data.where:
            raise ValueError("a predicate that is not a recommended index's")
        stmt = sql.SQL("{} WHERE {}").format(stmt, sql.SQL(rec.where))
    return stmt


def parse_create_args(args: list[str]) -> tuple[str, list[KeyColumn], str | None, str | None]:
    """(table, columns, predicate, recommended name) from `<name>` or `table(col, ...)`."""
    text = " ".join(args).strip()
    if not text:
        names = ", ".join(r.name for r in RECOMMENDED)
        raise UsageError(
            f"`create-index` takes a recommended index ({names}) or `table(column, ...)`"
        )
    rec = recommended(text)
    if rec is not None:
        return rec.qualified, [parse_column(c) for c in rec.columns], rec.where, rec.name
    m = _TABLE_COLUMNS.match(text)
    if m is None:
        close = difflib.get_close_matches(text, [r.name for r in RECOMMENDED], n=1, cutoff=0.6)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise UsageError(f"`{text}` is neither a recommended index{hint} nor `table(column, ...)`")
    cols = [parse_column(c) for c in m.group(2).split(",") if c.strip()]
    if not cols:
        raise UsageError("name at least one column: `table(column, ...)`")
    return m.group(1), cols, None, None


def index_name(table: str, columns: Sequence[KeyColumn], taken: set[str]) -> str:
    """`<table>_<col>_<col>_idx`, cut to PostgreSQL's 63 bytes, made unique in the schema."""
    base = "_".join([table, *(c.name for c in columns), "idx"])
    base = base.encode()[:MAX_IDENTIFIER].decode(errors="ignore")
    name, n = base, 1
    while name in taken:
        suffix = f"_{n}"
        name = base.encode()[: MAX_IDENTIFIER - len(suffix)].decode(errors="ignore") + suffix
        n += 1
    return name


async def plan_create_index(ctx: Context, args: list[str]) -> Plan:
    table_name, cols, where, rec_name = parse_create_args(args)

    async def survey(db: Reader) -> tuple[CreateData, list[Index], Row, Row]:
        table = await find_table(db, table_name)
        attnums = check_columns(table, cols)
        indexes = await load_indexes(db)
        desc = [c.desc for c in cols]
        already = next((i for i in indexes if serves(i, table.oid, attnums, desc, where)), None)
        if already is not None:
            raise UsageError(
                f"{already.qualified} already serves {table.qualified}"
                f"({', '.join(c.text() for c in cols)}): {already.definition}; nothing to build"
            )
        taken = {str(r["name"]) for r in await db.fetch(_NAMES_SQL, (table.schema,))}
        name = rec_name if rec_name is not None else index_name(table.name, cols, taken)
        if name in taken:
            raise UsageError(
                f"`{table.schema}.{name}` already exists but does not serve "
                f"{table.qualified}({', '.join(c.text() for c in cols)}); `/db indexes` says "
                "what it is"
            )
        same_invalid = [
            i
            for i in indexes
            if i.table_oid == table.oid
            and not i.is_valid
            and list(i.keys[: len(attnums)]) == attnums
        ]
        (size,) = await db.fetch(_TABLE_SIZE_SQL, (table.oid, table.oid))
        (open_tx,) = await db.fetch(_OPEN_TRANSACTIONS_SQL)
        open_tx["lockers"] = await _lockers(db, table.oid)
        data = CreateData(
            schema_name=table.schema,
            table=table.name,
            table_oid=table.oid,
            name=name,
            columns=[c.name for c in cols],
            desc=desc,
            attnums=attnums,
            where=where,
            recommended=rec_name,
        )
        return data, same_invalid, size, open_tx

    data, same_invalid, size, open_tx = await ctx.gateway.read(survey)
    stmt = create_statement(data).as_string()
    warnings = [
        "CREATE INDEX CONCURRENTLY cannot run inside a transaction: it runs on its own "
        "session with the same timeouts and commits by itself; if it fails, the INVALID "
        "index it leaves is dropped with DROP INDEX CONCURRENTLY"
    ]
    if open_tx["lockers"]:
        warnings.append(
            f"{data.schema_name}.{data.table} is locked now by "
            + _describe_lockers(open_tx["lockers"])
            + ": the build waits for each writer to end its transaction, up to the lock "
            "timeout"
        )
    elif open_tx["n"]:
        warnings.append(
            f"{open_tx['n']} other transaction(s) are open now (oldest "
            f"{human_duration(open_tx['oldest_s'])}): the build waits for those that "
            "touch the table or began before it, up to the lock timeout"
        )
    for i in same_invalid:
        warnings.append(
            f"{i.qualified} is an INVALID index on the same columns (a failed build?): "
            f"`{drop_statement(i.schema, i.name).as_string()}` removes it"
        )
    what = f"{data.schema_name}.{data.table}({', '.join(c.text() for c in cols)})"
    what += f" WHERE {where}" if where else ""
    return Plan(
        remedy=CREATE_INDEX_NAME,
        args=list(args),
        title=f"Create index {data.name}",
        summary=f"build index {data.name} on {what} CONCURRENTLY (writes go on; "
        f"table {human_size(size['bytes'])}, ~{int(size['est_rows']):,} rows)",
        steps=[
            PlanStep(
                sql=stmt,
                note="outside a transaction block, on its own session with the same "
                "statement and lock timeouts",
            )
        ],
        targets=[
            {
                "table": f"{data.schema_name}.{data.table}",
                "index": f"{data.schema_name}.{data.name}",
                "columns": [c.text() for c in cols],
                "where": where,
                "recommended": rec_name,
                "table_size": human_size(size["bytes"]),
                "est_rows": size["est_rows"],
            }
        ],
        count=1,
        warnings=warnings,
        limits=CREATE_LIMITS,
        locks=LockScope(relations=[data.table], modes=_CONCURRENT_CONFLICTS),
        data=data.model_dump(mode="json"),
    )


async def _one_index(db: Reader | Writer, schema: str, name: str) -> Row | None:
    rows = await db.fetch(_ONE_INDEX_SQL, (schema, name))
    return rows[0] if rows else None


async def _drop_leftover(writer: Writer, schema: str, name: str) -> str:
    """After a failed build: drop the INVALID index it left, and say what happened."""
    left = await _one_index(writer, schema, name)
    if left is None:
        return "it left no index behind"
    if left["is_valid"]:
        return f"{schema}.{name} exists and is valid (built by someone else?); left alone"
    drop = drop_statement(schema, name)
    try:
        await writer.run_outside_transaction(drop)
    except psycopg.Error as exc:
        return (
            f"the INVALID index {schema}.{name} it left could not be dropped "
            f"({_first_line(exc)}): it remains; `{drop.as_string()}` removes it"
        )
    if await _one_index(writer, schema, name) is not None:
        return f"the INVALID index {schema}.{name} is still there; `{drop.as_string()}`"
    return f"the INVALID index {schema}.{name} it left was dropped ({drop.as_string()})"


async def apply_create_index(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(CreateData)
    # Catalog reads only: a lock on the table here would make the build wait for us.
    indexes = await load_indexes(writer)
    table_rows = await writer.fetch(
        "SELECT a.attnum::int AS attnum, a.attname::text AS name FROM pg_attribute a"
        " WHERE a.attrelid = %s::oid AND a.attnum = ANY(%s::int[]) AND NOT a.attisdropped",
        (data.table_oid, data.attnums),
    )
    columns_now = {int(r["attnum"]): str(r["name"]) for r in table_rows}
    same_columns = [columns_now.get(a) for a in data.attnums] == data.columns
    served = any(serves(i, data.table_oid, data.attnums, data.desc, data.where) for i in indexes)
    name_taken = await _one_index(writer, data.schema_name, data.name) is not None
    check_drift(plan, 1 if same_columns and not served and not name_taken else 0, "index to build")
    stmt = create_statement(data)
    started = time.perf_counter()
    try:
        await writer.run_outside_transaction(stmt)
    except psycopg.errors.DuplicateTable as exc:
        # Someone took the name since the recheck: what carries it is theirs, not ours.
        raise OutsideStepFailed(
            Outcome(
                ok=False,
                summary=f"CREATE INDEX CONCURRENTLY failed: {_first_line(exc)}; the name was "
                "taken meanwhile, nothing was built and nothing dropped",
                error=_first_line(exc),
            )
        ) from exc
    except psycopg.Error as exc:
        lockers = await _lockers(writer, data.table_oid)
        cleanup = await _drop_leftover(writer, data.schema_name, data.name)
        waited = f"; sessions locking the table: {_describe_lockers(lockers)}" if lockers else ""
        raise OutsideStepFailed(
            Outcome(
                ok=False,
                summary=f"CREATE INDEX CONCURRENTLY failed: {_first_line(exc)}; {cleanup}{waited}",
                error=_first_line(exc),
                rows=lockers,
                offers=[f"terminate {r['pid']}" for r in lockers],
            )
        ) from exc
    seconds = time.perf_counter() - started
    built = await _one_index(writer, data.schema_name, data.name)
    if built is None or not built["is_valid"]:
        cleanup = await _drop_leftover(writer, data.schema_name, data.name)
        raise OutsideStepFailed(
            Outcome(ok=False, summary=f"the build ended without a valid index; {cleanup}")
        )
    check_count(plan, 1, "index built")
    (facts,) = await writer.fetch(
        "SELECT pg_get_indexdef(%s::oid) AS definition, pg_relation_size(%s::oid)::bigint AS bytes",
        (built["oid"], built["oid"]),
    )
    return Outcome(
        ok=True,
        summary=f"built {data.schema_name}.{data.name} CONCURRENTLY in "
        f"{human_duration(seconds)} ({human_size(facts['bytes'])}), valid",
        affected=1,
        rows=[
            {
                "index": f"{data.schema_name}.{data.name}",
                "definition": facts["definition"],
                "size": human_size(facts["bytes"]),
                "seconds": round(seconds, 3),
                "valid": True,
            }
        ],
    )


async def verify_create_index(db: Reader, plan: Plan, run: Execution) -> Verification:
    data = plan.private(CreateData)
    found = await _one_index(db, data.schema_name, data.name)
    qualified = f"{data.schema_name}.{data.name}"
    if found is None:
        return Verification(landed=False, found=f"no index {qualified}")
    if not found["is_valid"]:
        drop = drop_statement(data.schema_name, data.name).as_string()
        return Verification(
            landed=False, found=f"{qualified} exists but is INVALID (the build failed): `{drop}`"
        )
    return Verification(landed=True, found=f"{qualified} exists and is valid")


# --- drop-index ---------------------------------------------------------------------


def _find_index(indexes: Sequence[Index], word: str) -> Index:
    schema, _, name = word.strip().rpartition(".")
    matches = [i for i in indexes if i.name == name and (not schema or i.schema == schema)]
    if len(matches) > 1:
        public = [i for i in matches if i.schema == "public"]
        if len(public) != 1:
            listing = ", ".join(f"`{i.qualified}`" for i in matches)
            raise UsageError(f"`{word}` names several indexes ({listing}); give the schema")
        matches = public
    if not matches:
        close = difflib.get_close_matches(name, sorted({i.name for i in indexes}), n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise UsageError(f"there is no index `{word}`{hint}")
    return matches[0]


async def plan_drop_index(ctx: Context, args: list[str]) -> Plan:
    if len(args) != 1:
        raise UsageError("`drop-index` takes one index name: `drop-index <name>`")

    async def survey(db: Reader) -> tuple[Index, Index]:
        indexes = await load_indexes(db)
        index = _find_index(indexes, args[0])
        if index.protected is not None:
            raise UsageError(f"the bot does not drop {index.qualified}: {index.protected}")
        twin = twin_of(index, indexes)
        if twin is None:
            raise UsageError(
                f"{index.qualified} is not an exact duplicate of another valid index "
                "(same table, columns, operator classes, expressions and predicate); the "
                "bot drops exact duplicates only. `/db indexes` lists them"
            )
        await measure(db, [index, twin])
        return index, twin

    index, twin = await ctx.gateway.read(survey)
    drop = drop_statement(index.schema, index.name).as_string()
    return Plan(
        remedy=DROP_INDEX_NAME,
        args=list(args),
        title=f"Drop duplicate index {index.qualified}",
        summary=f"drop {index.qualified} ({human_size(index.bytes)}, {index.scans} scans), an "
        f"exact duplicate of {twin.qualified}, which stays",
        steps=[
            PlanStep(
                sql=drop,
                note="outside a transaction block, on its own session with the same "
                "statement and lock timeouts",
            )
        ],
        targets=[
            index.row(role="dropped"),
            twin.row(role="stays"),
        ],
        count=1,
        backup=f"the definition, to recreate it: {index.definition}",
        warnings=[
            "DROP INDEX CONCURRENTLY cannot run inside a transaction: it commits by itself; "
            "if it fails midway the index is left INVALID (unused, still written) and "
            "drop-index can be requested again"
        ],
        limits=DROP_LIMITS,
        locks=LockScope(relations=[index.table], modes=_CONCURRENT_CONFLICTS),
        data=DropData(
            oid=index.oid,
            schema_name=index.schema,
            name=index.name,
            definition=index.definition,
            twin_oid=twin.oid,
            twin=twin.qualified,
        ).model_dump(mode="json"),
    )


async def apply_drop_index(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(DropData)
    by_oid = {i.oid: i for i in await load_indexes(writer)}
    index, twin = by_oid.get(data.oid), by_oid.get(data.twin_oid)
    still = (
        index is not None
        and index.name == data.name
        and index.protected is None
        and twin is not None
        and twin.is_valid
        and twin.signature == index.signature
    )
    check_drift(plan, 1 if still else 0, "duplicate index with its valid twin")
    qualified = f"{data.schema_name}.{data.name}"
    try:
        await writer.run_outside_transaction(drop_statement(data.schema_name, data.name))
    except psycopg.Error as exc:
        left = await _one_index(writer, data.schema_name, data.name)
        state = (
            "it is gone after all"
            if left is None
            else "it is left INVALID (unused, still written): request drop-index again"
            if not left["is_valid"]
            else "it is still there and valid: nothing changed"
        )
        raise OutsideStepFailed(
            Outcome(
                ok=False,
                summary=f"DROP INDEX CONCURRENTLY {qualified} failed: {_first_line(exc)}; "
                f"{state}; its definition: {data.definition}",
                error=_first_line(exc),
            )
        ) from exc
    gone = await _one_index(writer, data.schema_name, data.name) is None
    check_count(plan, 1 if gone else 0, "index dropped")
    return Outcome(
        ok=True,
        summary=f"dropped {qualified}; {data.twin} stays and serves the same queries; "
        f"to recreate it: {data.definition}",
        affected=1,
        rows=[{"index": qualified, "duplicate_of": data.twin, "definition": data.definition}],
    )


async def verify_drop_index(db: Reader, plan: Plan, run: Execution) -> Verification:
    data = plan.private(DropData)
    by_oid = {i.oid: i for i in await load_indexes(db)}
    twin = by_oid.get(data.twin_oid)
    if data.oid in by_oid:
        return Verification(landed=False, found=f"{data.schema_name}.{data.name} is still there")
    if twin is None or not twin.is_valid:
        return Verification(
            landed=False,
            found=f"{data.schema_name}.{data.name} is gone, but so is its twin {data.twin}: "
            f"recreate it with {data.definition}",
        )
    return Verification(
        landed=True, found=f"{data.schema_name}.{data.name} is gone; {data.twin} is there"
    )


# Rule 10: never tried before approval: CONCURRENTLY runs outside any transaction.
_INDEX_NOT_TRIED = (
    "an index {verb} that runs CONCURRENTLY cannot run inside a transaction, so no ROLLBACK "
    "could undo a try. The plan checked instead the live catalog: {checked}"
)

CREATE_INDEX = add_remedy(
    Remedy(
        name=CREATE_INDEX_NAME,
        usage="/db create-index <recommended-name | table(column, ...)>",
        summary="build a missing index CONCURRENTLY (a failed build's invalid index is dropped)",
        plan=plan_create_index,
        apply=apply_create_index,
        verify=verify_create_index,
        role="REVIEWER",
        approver_role="ADMIN",
        approvers=1,
        not_tried=_INDEX_NOT_TRIED.format(
            verb="build",
            checked="the table and columns exist, no valid index already serves them, the "
            "table's size, and the open transactions the build would wait for",
        ),
    )
)
DROP_INDEX = add_remedy(
    Remedy(
        name=DROP_INDEX_NAME,
        usage="/db drop-index <index>",
        summary="drop an exact duplicate index CONCURRENTLY (its definition is kept)",
        plan=plan_drop_index,
        apply=apply_drop_index,
        verify=verify_drop_index,
        role="REVIEWER",
        approver_role="ADMIN",
        approvers=1,
        not_tried=_INDEX_NOT_TRIED.format(
            verb="drop",
            checked="the index is an exact duplicate of another valid index, which stays, and "
            "is not one the bot protects; its definition is kept to recreate it",
        ),
    )
)
