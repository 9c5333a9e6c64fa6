"""LEAPS's own audit trail as the live catalog shows it, and the bot writing it itself.

Production's `audit_trigger_func()` writes an `audit_log` row for every audited change
made with `app.user_id` set, and inserts it without an `id` while `audit_log.id` has no
default (the application's ORM makes the ids): every such write is refused (23502).
LEAPS_SCHEMA.md, Audit. A deployment may have fixed it with a default, and the fixture's
function supplies an id itself, so nothing here is assumed: `audit_trail()` reads the
live functions from `pg_proc`, the column's default from `pg_attrdef`, and the triggers
that call them (tables, events, `UPDATE OF` columns) from `pg_trigger`.

Where the trail refuses such writes, a remedy acts as the application's system
operations do (`app.user_role` set, `app.user_id` not, so the trigger skips) and the
`AuditRecorder` writes the rows the trigger would have written (DESIGN.md rule 11), in
the live function's format: an explicit id, `<OP>_<table>` as action, the acting LEAPS
user as actor, the old and new rows in `meta` under the function's own keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from psycopg import sql
from psycopg.types.json import Jsonb

from commands.base import LeapsIdentity, Reader, Row

AUDIT_TABLE = "audit_log"
AuditPath = Literal["trigger", "bot", "none"]
Op = Literal["INSERT", "UPDATE", "DELETE"]

# A function's source that inserts into audit_log (a PostgreSQL regular expression, `~*`).
AUDIT_INSERT = r'insert\s+into\s+("?public"?\.)?"?audit_log"?'

# Functions of enabled, non-internal triggers on public tables that insert into audit_log.
_FUNCTIONS_SQL = """
SELECT p.oid::bigint AS oid, p.proname::text AS function, p.prosrc AS source,
       c.relname::text AS "table", t.tgname::text AS trigger, t.tgtype::int AS tgtype,
       ARRAY(SELECT a.attname::text FROM unnest(t.tgattr::int2[]) AS k(num)
             JOIN pg_attribute AS a ON a.attrelid = t.tgrelid AND a.attnum = k.num)
         AS columns
FROM pg_trigger AS t
JOIN pg_class AS c ON c.oid = t.tgrelid
JOIN pg_proc AS p ON p.oid = t.tgfoid
WHERE NOT t.tgisinternal AND t.tgenabled <> 'D'
  AND c.relnamespace = to_regnamespace('public')
  AND p.prosrc ~* %s
ORDER BY c.relname, t.tgname
"""

# audit_log.id's default: an expression, or an identity column.
_ID_DEFAULT_SQL = """
SELECT pg_get_expr(d.adbin, d.adrelid) AS expr, a.attidentity::text AS identity
FROM pg_attribute AS a
LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = to_regclass('public.audit_log') AND a.attname = 'id' AND NOT a.attisdropped
"""

_INSERT_COLUMNS = re.compile(
    r'insert\s+into\s+(?:"?public"?\.)?"?audit_log"?\s*(\(([^)]*)\))?', re.IGNORECASE
)
# `'<key>', to_jsonb(NEW)` and the like: the meta keys of the row images.
_IMAGE_KEY = r"'(\w+)'\s*,\s*(?:to_jsonb|row_to_json|to_json)\(\s*{}\s*\)"
_LABEL_KEY = r"'(\w+)'\s*,\s*{}\b"
_ROLE_KEY = re.compile(r"'(\w+)'\s*,\s*(?:nullif\()?\s*current_setting\(\s*'app\.user_role'", re.I)
_EVENT_BITS: dict[Op, int] = {"INSERT": 4, "DELETE": 8, "UPDATE": 16}


def _key(pattern: str, target: str, source: str, default: str) -> str:
    found = re.search(pattern.format(re.escape(target)), source, flags=re.IGNORECASE)
    return found.group(1) if found else default


def image_key(source: str, row: str, default: str) -> str:
    """The meta key under which an audit function writes `row` (NEW or OLD) whole."""
    return _key(_IMAGE_KEY, row, source, default)


def label_key(source: str, variable: str, default: str) -> str:
    """The meta key under which an audit function writes `variable` (TG_OP, ...)."""
    return _key(_LABEL_KEY, variable, source, default)


def _omits_id(source: str) -> bool:
    """True when an INSERT INTO audit_log of the function names its columns without id
    (an INSERT without a column list fills every column, id included)."""
    for match in _INSERT_COLUMNS.finditer(source):
        columns = match.group(2)
        if columns is None:
            continue
        names = {c.strip().strip('"').lower() for c in columns.split(",")}
        if "id" not in names:
            return True
    return False


@dataclass(frozen=True)
class AuditedTrigger:
    table: str
    trigger: str
    function: str
    events: tuple[Op, ...]
    columns: tuple[str, ...]  # UPDATE OF these columns; empty: any column


@dataclass(frozen=True)
class MetaFormat:
    """The meta keys the live function writes (the fixture's and production's by default)."""

    op_key: str = "operation"
    table_key: str = "table"
    role_key: str = "user_role"
    old_key: str = "old_values"
    new_key: str = "new_values"


@dataclass(frozen=True)
class AuditTrail:
    functions: tuple[str, ...] = ()
    omitting: tuple[str, ...] = ()  # functions whose INSERT names no id
    id_default: str | None = None
    triggers: tuple[AuditedTrigger, ...] = ()
    meta: MetaFormat = field(default_factory=MetaFormat)

    @property
    def refuses_user_writes(self) -> bool:
        """Every write made with app.user_id set is refused by the trail itself."""
        return bool(self.omitting) and self.id_default is None

    @property
    def path(self) -> AuditPath:
        if not self.triggers:
            return "none"
        return "bot" if self.refuses_user_writes else "trigger"

    def audited(self, table: str, op: Op) -> AuditedTrigger | None:
        for t in self.triggers:
            if t.table == table and op in t.events:
                return t
        return None

    def defect(self) -> str | None:
        """The latent defect, in one line, or None."""
        if not self.refuses_user_writes:
            return None
        names = ", ".join(f"{f}()" for f in self.omitting)
        return (
            "LEAPS's audit trail refuses every write made with `app.user_id` set: "
            f"{names} inserts into audit_log without an id, and audit_log.id has no default"
        )

    def plan_note(self) -> str:
        """Which path a remedy's audit rows take, and why: for the plan."""
        if self.path == "none":
            return "no audit trigger writes audit_log rows for these tables; none are written"
        if self.path == "trigger":
            how = (
                f"audit_log.id defaults to {self.id_default}"
                if self.id_default
                else "the live audit function supplies the id"
            )
            return (
                "audit rows: written by the live audit trigger "
                f"({', '.join(f'{f}()' for f in self.functions)}; {how}), app.user_id set "
                "to the acting LEAPS user"
            )
        return (
            "audit rows: written by the bot in the live trigger's format, app.user_id not "
            f"set, because {', '.join(f'{f}()' for f in self.omitting)} inserts without an "
            "id and audit_log.id has no default (the trigger would refuse the change; "
            "`/db fix-audit-id` fixes it)"
        )


async def audit_trail(db: Reader) -> AuditTrail:
    """The live audit trail, from the catalog (a few catalog rows; no table is read)."""
    rows = await db.fetch(_FUNCTIONS_SQL, (AUDIT_INSERT,))
    defaults = await db.fetch(_ID_DEFAULT_SQL)
    id_default: str | None = None
    if defaults:
        expr, identity = defaults[0]["expr"], defaults[0]["identity"]
        id_default = str(expr) if expr else ("identity" if identity else None)
    functions: dict[str, str] = {}
    triggers: list[AuditedTrigger] = []
    for r in rows:
        functions.setdefault(str(r["function"]), str(r["source"]))
        bits = int(r["tgtype"])
        events = tuple(op for op, bit in _EVENT_BITS.items() if bits & bit)
        triggers.append(
            AuditedTrigger(
                table=str(r["table"]),
                trigger=str(r["trigger"]),
                function=str(r["function"]),
                events=events,
                columns=tuple(str(c) for c in r["columns"] or ()),
            )
        )
    meta = MetaFormat()
    for source in functions.values():
        role = _ROLE_KEY.search(source)
        meta = MetaFormat(
            op_key=label_key(source, "TG_OP", meta.op_key),
            table_key=label_key(source, "TG_TABLE_NAME", meta.table_key),
            role_key=role.group(1) if role else meta.role_key,
            old_key=image_key(source, "OLD", meta.old_key),
            new_key=image_key(source, "NEW", meta.new_key),
        )
        break
    return AuditTrail(
        functions=tuple(functions),
        omitting=tuple(f for f, src in functions.items() if _omits_id(src)),
        id_default=id_default,
        triggers=tuple(triggers),
        meta=meta,
    )


class _Fetcher(Protocol):
    """The remedy's writer (or any connection) the recorder reads and writes through."""

    async def fetch(self, query: Any, params: Any = ()) -> list[Row]: ...


_IMAGES = sql.SQL("SELECT id::text AS id, to_jsonb(t) AS img FROM {} AS t WHERE id::text = ANY(%s)")
_INSERT_SQL = """
INSERT INTO audit_log (id, actor_id, action, target_id, meta, created_at)
SELECT gen_random_uuid()::text, %s, x.action, x.target, x.meta, now() AT TIME ZONE 'UTC'
FROM jsonb_to_recordset(%s) AS x(n int, action text, target text, meta jsonb)
ORDER BY x.n
"""


class AuditRecorder:
    """Writes the audit rows the live trigger would have, where it cannot (`by_bot`).

    Where the trigger works (or no audit trigger exists) every call does nothing, so a
    remedy calls it the same way on either path.
    """

    def __init__(
        self, trail: AuditTrail, actor: LeapsIdentity | None, *, by_bot: bool | None = None
    ) -> None:
        self.trail = trail
        self.actor = actor
        self.by_bot = trail.path == "bot" if by_bot is None else by_bot
        self.written = 0
        self._old: dict[tuple[str, str], dict[str, Any]] = {}

    @classmethod
    def off(cls) -> AuditRecorder:
        """No audit rows written by the bot (a writer outside any remedy transaction)."""
        return cls(AuditTrail(), None, by_bot=False)

    def _active(self, table: str, op: Op) -> AuditedTrigger | None:
        if not self.by_bot or self.actor is None:
            return None
        return self.trail.audited(table, op)

    async def before(self, db: _Fetcher, table: str, ids: list[str]) -> None:
        """Remember the rows `ids` of `table` as they are, ahead of an UPDATE or DELETE."""
        if not ids or not (self._active(table, "UPDATE") or self._active(table, "DELETE")):
            return
        for r in await db.fetch(_IMAGES.format(sql.Identifier(table)), (ids,)):
            self._old[(table, str(r["id"]))] = r["img"]

    async def after(self, db: _Fetcher, table: str, op: Op, ids: list[str]) -> int:
        """Write the audit rows of `op` on the rows `ids` of `table`; the rows written."""
        trigger = self._active(table, op)
        if trigger is None or not ids or self.actor is None:
            return 0
        new: dict[str, Any] = {}
        if op != "DELETE":
            for r in await db.fetch(_IMAGES.format(sql.Identifier(table)), (ids,)):
                new[str(r["id"])] = r["img"]
        m = self.trail.meta
        entries: list[dict[str, Any]] = []
        for target in ids:
            old = self._old.pop((table, target), None) if op != "INSERT" else None
            img = new.get(target)
            if op == "UPDATE" and old is not None and img is not None:
                watched = trigger.columns or tuple(img)
                if all(old.get(c) == img.get(c) for c in watched):
                    continue  # the trigger would not have fired
            meta: dict[str, Any] = {
                m.op_key: op,
                m.table_key: table,
                m.role_key: self.actor.role,
            }
            if op != "INSERT":
                meta[m.old_key] = old
            if op != "DELETE":
                meta[m.new_key] = img
            entries.append(
                {"n": len(entries), "action": f"{op}_{table}", "target": target, "meta": meta}
            )
        if not entries:
            return 0
        await db.fetch(_INSERT_SQL + " RETURNING id", (self.actor.user_id, Jsonb(entries)))
        self.written += len(entries)
        return len(entries)
