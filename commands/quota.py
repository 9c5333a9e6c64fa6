"""`/db quota <@user|handle|email>`: one user's AMPLIFY week as the live quota rule sees it.

The weekly cap lives in the database (`check_amplify_quota()` behind the
`trg_check_amplify_quota` trigger), and production has carried two spellings of the
payload keys. So the limits, the keys and the trigger state are read from the live
catalog on every run, and the user's payloads are summed both as the function reads
them and as they are stored: when the two disagree the trigger undercounts, which is
how users end up over quota while the trigger is "working".

It is asked about one user at a time, often, during an incident, so the catalog, the
keys (read from the function's source as `/db integrity` reads them) and the user with
their AMPLIFY rows (through the unique index and the (user_id, activity_code,
created_at) index) come back in one statement of one read-only transaction.

Whether any AMPLIFY payload in the table uses only the other spelling is a question about
every AMPLIFY row. The catalog answers it when it can: a validated CHECK constraint that
refuses an AMPLIFY payload without one of the keys the function reads (production's
`chk_amplify_payload` does) proves there is none, with nothing counted. Otherwise (the
constraint missing, added NOT VALID over older rows, or requiring the other spelling)
the rows are counted, range of pages by range of pages so that each statement stays
within the check timeout at any size, and the count is kept per target for
`OVERALL_TTL_S`.
"""

from __future__ import annotations

import difflib
import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from commands.base import Context, Finding, Reader, Report, Row, Status, UsageError, register
from commands.integrity import CAMEL_KEYS, SNAKE_KEYS, keys_in_source
from commands.keyranges import Piece, add_up, block_pieces, check_pieces, tune

QUOTA_FUNCTION = "check_amplify_quota"
QUOTA_TRIGGER = "trg_check_amplify_quota"
DOCUMENTED_LIMITS: dict[str, int] = {"peers": 50, "students": 200}
DOCUMENTED_KEYS: dict[str, str] = {"peers": "peers_trained", "students": "students_trained"}
WARN_FRACTION = 0.8
OVERALL_TTL_S = 300.0
MAX_CANDIDATES = 5
CANDIDATE_POOL = 200
MAX_SUBMISSIONS = 200
USAGE = "/db quota <@user|handle|email>"


_MENTION = re.compile(r"^<@([UW][A-Z0-9]+)(?:\|[^>]*)?>$")
_MAILTO = re.compile(r"^<mailto:([^|>]+)(?:\|[^>]*)?>$")
_IF_COND = re.compile(r"(?<!END )\bIF\b(?P<cond>.*?)\bTHEN\b", re.IGNORECASE | re.DOTALL)
_GREATER = re.compile(r"(?P<op>>=?)\s*(?P<n>\d+)")
_RAISE_LIMIT = re.compile(
    r"(?P<what>peer|student)[^'\n]*limit exceeded[^'\n]*>\s*(?P<n>\d+)", re.IGNORECASE
)


# --- the live rule ------------------------------------------------------------------


@dataclass(frozen=True)
class QuotaRule:
    """What the database enforces, as far as its catalog tells."""

    function_found: bool
    function_name: str
    keys: dict[str, tuple[str, ...]]  # kind -> payload keys the function reads
    limits: dict[str, int]
    limits_source: str
    triggers: list[Row]
    checks: list[tuple[str, str]] = field(default_factory=list)  # validated CHECKs: name, text

    def read_keys(self, kind: str) -> tuple[str, ...]:
        return self.keys.get(kind) or (DOCUMENTED_KEYS[kind],)


def other_spelling(key: str) -> str:
    """peers_trained <-> peersTrained: the spelling older data and functions used."""
    if "_" in key:
        head, *rest = key.split("_")
        return head + "".join(part[:1].upper() + part[1:] for part in rest)
    return re.sub(r"(?<!^)([A-Z])", lambda m: "_" + m.group(1).lower(), key)


def spelling(key: str) -> str:
    if "_" in key:
        return "snake_case"
    if key != key.lower():
        return "camelCase"
    return "lowercase"


def live_limits(source: str) -> dict[str, int]:
    """The weekly limits in a quota function's source: `IF <peers...> > 50 THEN`, else the
    numbers in its RAISE messages. Kinds not found are left out."""
    found: dict[str, int] = {}
    for match in _IF_COND.finditer(source):
        cond = match.group("cond").lower()
        kind = "peers" if "peer" in cond else "students" if "student" in cond else ""
        cmp = _GREATER.search(cond)
        if kind and cmp and kind not in found:
            n = int(cmp.group("n"))
            found[kind] = n - 1 if cmp.group("op") == ">=" else n
    for match in _RAISE_LIMIT.finditer(source):
        kind = "peers" if match.group("what").lower() == "peer" else "students"
        found.setdefault(kind, int(match.group("n")))
    return found


_RULE_COLUMNS = """
  (SELECT json_build_object('schema', n.nspname, 'name', p.proname, 'source', p.prosrc)
     FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.proname = %(fn)s
    ORDER BY EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid AND NOT t.tgisinternal)
             DESC, p.oid DESC
    LIMIT 1) AS function,
  (SELECT coalesce(json_agg(json_build_object(
            'trigger', t.tgname, 'table', c.relname, 'function', p.proname,
            'enabled', CASE t.tgenabled WHEN 'D' THEN 'disabled' WHEN 'O' THEN 'enabled'
                                        WHEN 'A' THEN 'always' WHEN 'R' THEN 'replica only' END)
            ORDER BY t.tgname), '[]'::json)
     FROM pg_trigger t
     JOIN pg_class c ON c.oid = t.tgrelid
     JOIN pg_proc p ON p.oid = t.tgfoid
    WHERE NOT t.tgisinternal AND (t.tgname = %(trg)s OR p.proname = %(fn)s)) AS triggers,
  (SELECT coalesce(json_agg(json_build_object(
            'name', c.conname, 'definition', pg_get_constraintdef(c.oid)) ORDER BY c.conname),
            '[]'::json)
     FROM pg_constraint c
    WHERE c.conrelid = to_regclass('submissions') AND c.contype = 'c' AND c.convalidated)
    AS checks
"""
_RULE_SQL = "SELECT" + _RULE_COLUMNS


def rule_from(row: Row) -> QuotaRule:
    """The rule from `_RULE_SQL`'s row. The function the trigger calls wins, and its
    source gives the payload keys as `/db integrity`'s `keys_in_source` reads them, so
    both commands read payloads the same way."""
    fn: dict[str, Any] | None = row["function"]
    triggers: list[Row] = list(row["triggers"] or [])
    checks = [(str(c["name"]), str(c["definition"])) for c in row["checks"] or []]
    peers_key, students_key = keys_in_source(str(fn["source"] or "") if fn else None)
    keys: dict[str, tuple[str, ...]] = {"peers": (peers_key,), "students": (students_key,)}
    if fn is None:
        return QuotaRule(
            False, QUOTA_FUNCTION, keys, dict(DOCUMENTED_LIMITS), "documented", triggers, checks
        )
    source = str(fn["source"] or "")
    parsed = live_limits(source)
    limits = {**DOCUMENTED_LIMITS, **parsed}
    name = f"{fn['schema']}.{fn['name']}()"
    if len(parsed) == len(DOCUMENTED_LIMITS):
        limits_source = f"read from {name}"
    elif parsed:
        limits_source = f"partly read from {name}, the rest documented"
    else:
        limits_source = f"documented (not found in the source of {name})"
    return QuotaRule(True, name, keys, limits, limits_source, triggers, checks)


async def load_rule(db: Reader) -> QuotaRule:
    (row,) = await db.fetch(_RULE_SQL, _RULE_PARAMS)
    return rule_from(row)


_RULE_PARAMS = {"fn": QUOTA_FUNCTION, "trg": QUOTA_TRIGGER}


# --- what a CHECK constraint proves about the payload keys ---------------------------

# The constraint's text as pg_get_constraintdef prints it (normalised by the server), read
# conservatively: only the shapes below count as proof, anything else is counted instead.
# A CHECK passes a row when its expression is true *or NULL*, so a key is proven present
# only by an expression that is false, never NULL, without it.
_AMPLIFY_GUARD = "activity_code <> 'AMPLIFY'::text"
_KEY = r"'(?P<key>[^']+)'::text"
# Not true (false or NULL) when the payload lacks the key: in a CASE's WHEN that is enough.
_NOT_TRUE_WITHOUT = (
    re.compile(r"^jsonb_typeof\(\(payload -> " + _KEY + r"\)\) = '[a-z]+'::text$"),
    re.compile(r"^\(payload ->> " + _KEY + r"\) ~ '.*'::text$"),
    re.compile(r"^payload \? " + _KEY + r"$"),
)
# False (never NULL) when the payload lacks the key.
_FALSE_WITHOUT = (re.compile(r"^\(payload ->>? " + _KEY + r"\) IS NOT NULL$"),)
_TOKEN = re.compile(r"'(?:[^']|'')*'|\bCASE\b|\bEND\b|[()]|\s+(?:AND|OR)\s+")


def _depths(expr: str) -> list[tuple[re.Match[str], int]]:
    """The tokens of `expr` that nest or split it (literals skipped whole), each with the
    depth of parentheses and CASE ... END it stands at."""
    out: list[tuple[re.Match[str], int]] = []
    depth = 0
    for token in _TOKEN.finditer(expr):
        text = token.group()
        if text in ("(", "CASE"):
            out.append((token, depth))
            depth += 1
        elif text in (")", "END"):
            depth -= 1
            out.append((token, depth))
        elif not text.startswith("'"):
            out.append((token, depth))
    return out


def _unwrap(expr: str) -> str:
    """`expr` without extra whitespace and the parentheses that wrap all of it."""
    expr = " ".join(expr.split())
    while expr.startswith("(") and expr.endswith(")"):
        closing = [t for t, d in _depths(expr) if d == 0 and t.group() == ")"]
        if not closing or closing[0].start() != len(expr) - 1:
            break  # the first parenthesis closes before the end: `(a) AND (b)`
        expr = expr[1:-1].strip()
    return expr


def _top_level(expr: str, op: str) -> list[str]:
    """`expr` split at ` op ` outside literals, parentheses and CASE ... END."""
    parts, start = [], 0
    for token, depth in _depths(expr):
        if depth == 0 and token.group().strip() == op:
            parts.append(expr[start : token.start()])
            start = token.end()
    parts.append(expr[start:])
    return [_unwrap(p) for p in parts]


def _keys_by(expr: str, shapes: tuple[re.Pattern[str], ...]) -> frozenset[str]:
    match = next((m for m in (s.match(expr) for s in shapes) if m), None)
    return frozenset({match.group("key")}) if match else frozenset()


def _through_and_or(expr: str, each: Callable[[str], frozenset[str]]) -> frozenset[str] | None:
    """`each` of the top-level parts: the keys every OR'ed part needs, or any AND'ed part
    needs; None for an expression of neither."""
    ors = _top_level(expr, "OR")
    if len(ors) > 1:
        return frozenset.intersection(*(each(p) for p in ors))
    ands = _top_level(expr, "AND")
    if len(ands) > 1:
        return frozenset.union(*(each(p) for p in ands))
    return None


def _not_true_without(expr: str) -> frozenset[str]:
    """Keys whose absence makes `expr` false or NULL."""
    parts = _through_and_or(expr, _not_true_without)
    if parts is not None:
        return parts
    return _keys_by(expr, _NOT_TRUE_WITHOUT + _FALSE_WITHOUT)


_CASE = re.compile(r"^CASE WHEN (?P<cond>.*) THEN (?P<then>.*) ELSE false END$")


def _false_without(expr: str) -> frozenset[str]:
    """Keys whose absence makes `expr` false (not NULL)."""
    parts = _through_and_or(expr, _false_without)
    if parts is not None:
        return parts
    case = _CASE.match(expr)
    if case and " WHEN " not in case.group("cond") + case.group("then"):
        return _not_true_without(_unwrap(case.group("cond")))
    return _keys_by(expr, _FALSE_WITHOUT)


@functools.lru_cache(maxsize=64)  # the same few definitions, read on every run
def keys_required(definition: str) -> frozenset[str]:
    """The payload keys a validated CHECK constraint guarantees on every AMPLIFY row:
    it must read `activity_code <> 'AMPLIFY' OR <rest>` with every other part false
    without the key. Empty when the text is any other shape."""
    body = _unwrap(definition.strip().removeprefix("CHECK"))
    parts = _top_level(body, "OR")
    rest = [p for p in parts if p != _AMPLIFY_GUARD]
    if len(rest) != len(parts) - 1 or not rest:
        return frozenset()
    return frozenset.intersection(*(_false_without(p) for p in rest))


def proving_check(rule: QuotaRule) -> tuple[str, list[str]] | None:
    """(constraint name, the read keys it requires) of the first validated CHECK that
    requires a key the function reads on every AMPLIFY row; then no AMPLIFY payload can
    use only the other spelling."""
    read, _other = _read_and_other(rule)
    for name, definition in rule.checks:
        required = [k for k in read if k in keys_required(definition)]
        if required:
            return name, required
    return None


# --- the user -----------------------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """Who the argument names: a LEAPS column and the value to look for in it."""

    column: str  # handle | email
    value: str
    shown: str  # how to name it back to the user
    slack_user: str | None = None


async def resolve_argument(ctx: Context, args: list[str]) -> Wanted | Finding:
    """The argument as a LEAPS lookup, or a finding saying why it cannot be one."""
    if len(args) != 1 or not args[0].strip():
        raise UsageError("`quota` takes one user: a Slack mention, a LEAPS handle or an e-mail")
    arg = args[0].strip()
    mention = _MENTION.match(arg)
    if mention:
        slack_user = mention.group(1)
        lookup = ctx.slack_email
        if lookup is None:
            return Finding(
                check="user",
                status=Status.WARN,
                summary=f"cannot read the Slack profile of <@{slack_user}> here (no Slack client)",
                hint="give the LEAPS handle or e-mail instead",
            )
        email = await lookup(slack_user)
        if not email:
            return Finding(
                check="user",
                status=Status.WARN,
                summary=f"the Slack profile of <@{slack_user}> shows no e-mail, so it cannot be"
                " matched to a LEAPS user",
                hint="give the LEAPS handle or e-mail instead",
            )
        return Wanted("email", email, f"<@{slack_user}> ({email})", slack_user)
    mailto = _MAILTO.match(arg)
    if mailto:
        arg = mailto.group(1)
    if arg.startswith("<") and arg.endswith(">"):
        raise UsageError(f"`{arg}` is not a user: mention a person, or give a handle or e-mail")
    if "@" in arg.lstrip("@"):
        return Wanted("email", arg, f"e-mail `{arg}`")
    handle = arg.lstrip("@")
    return Wanted("handle", handle, f"handle `{handle}`")


# The rule and the user in one statement. The user: exact first, through the unique index
# (the value as given, then lower-cased); only when that finds nothing does the
# case-insensitive scan run (a one-time filter on the NOT EXISTS skips it otherwise).
# Their AMPLIFY payloads' keys in both spellings (`k0`..`k3`): which the function reads is
# known from its source only once this returns.
_SURVEY_SQL = f"""
WITH exact AS (
  SELECT id, handle, name, email, role::text AS role FROM users
   WHERE {{col}} = ANY (%(variants)s)
   ORDER BY {{col}} = %(value)s DESC
   LIMIT 1
), found AS (
  SELECT * FROM exact
  UNION ALL
  (SELECT id, handle, name, email, role::text FROM users
    WHERE lower({{col}}) = lower(%(value)s) AND NOT EXISTS (SELECT 1 FROM exact)
    ORDER BY {{col}} LIMIT 3)
), person AS (
SELECT f.id, f.handle, f.name, f.email, f.role,
       coalesce((
         SELECT json_agg(json_build_object(
                  'id', s.id, 'status', s.status, 'created_at', s.created_at,
                  'in_week', s.created_at >= (now() AT TIME ZONE 'UTC') - interval '7 days',
                  'keys', json_build_object(
                    %(k0)s::text, s.payload -> %(k0)s, %(k1)s::text, s.payload -> %(k1)s,
                    %(k2)s::text, s.payload -> %(k2)s, %(k3)s::text, s.payload -> %(k3)s))
                ORDER BY s.created_at DESC)
           FROM (SELECT * FROM submissions s
                  WHERE s.user_id = f.id AND s.activity_code = 'AMPLIFY'
                  ORDER BY s.created_at DESC LIMIT %(max)s) s
       ), '[]'::json) AS amplify
FROM found f
)
SELECT{_RULE_COLUMNS},
  (SELECT coalesce(json_agg(p ORDER BY p.{{col}}), '[]'::json) FROM person p) AS users
"""  # noqa: S608 (constant fragments of this module)


def _number(value: Any) -> int | None:
    """A payload count as the trigger would read it; None when absent or unreadable."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


@dataclass
class Tally:
    """One user's AMPLIFY rows, summed as the function reads them and as they are stored."""

    week: list[Row] = field(default_factory=list)
    seen_by_trigger: dict[str, int] = field(default_factory=lambda: {"peers": 0, "students": 0})
    stored: dict[str, int] = field(default_factory=lambda: {"peers": 0, "students": 0})
    other_week: int = 0  # rows this week the function cannot read (other spelling only)
    other_all: int = 0  # all of the user's AMPLIFY rows in the other spelling only
    amplify_all: int = 0


def tally(rule: QuotaRule, amplify: list[dict[str, Any]]) -> Tally:
    pairs = [_key_pair(rule, kind) for kind in ("peers", "students")]
    t = Tally(amplify_all=len(amplify))
    for sub in amplify:
        keys: dict[str, Any] = sub["keys"]
        read = [_number(keys.get(r)) for r, _o in pairs]
        other = [_number(keys.get(o)) for _r, o in pairs]
        unread = all(v is None for v in read) and any(v is not None for v in other)
        t.other_all += unread
        if not sub["in_week"]:
            continue
        t.other_week += unread
        stored = [r if r is not None else o for r, o in zip(read, other, strict=True)]
        for i, kind in enumerate(("peers", "students")):
            t.seen_by_trigger[kind] += read[i] or 0
            t.stored[kind] += stored[i] or 0
        t.week.append(
            {
                "id": sub["id"],
                "status": sub["status"],
                "created_at": sub["created_at"],
                "peers": stored[0],
                "students": stored[1],
                "keys": "other spelling" if unread else "read by trigger",
            }
        )
    return t


# --- not found: the closest handles ---------------------------------------------------

# Without pg_trgm (and fuzzystrmatch, not installed on the fixture nor assumed): the
# handles sharing the most 3-letter pieces with the query, one pass over `users`, then
# the best of those ranked in Python by difflib. Only the not-found path pays for it.
_CANDIDATES_SQL = """
SELECT handle, name, email FROM (
  SELECT handle, name, email,
         (SELECT count(*) FROM unnest(%(grams)s::text[]) AS g
           WHERE strpos(lower({col}), g) > 0) AS shared
    FROM users
   WHERE lower({col}) ~ %(pattern)s
) c
ORDER BY shared DESC
LIMIT %(pool)s
"""


def _grams(text: str) -> list[str]:
    clean = re.sub(r"[^a-z0-9]", "", text.lower())
    if len(clean) < 3:
        return [clean] if clean else []
    return sorted({clean[i : i + 3] for i in range(len(clean) - 2)})


async def closest_handles(db: Reader, wanted: Wanted) -> list[Row]:
    needle = wanted.value.split("@")[0] if wanted.column == "email" else wanted.value
    grams = _grams(needle)
    if not grams:
        return []
    query = sql.SQL(_CANDIDATES_SQL).format(col=sql.Identifier(wanted.column))
    rows = await db.fetch(
        query.as_string(None),
        {"grams": grams, "pattern": "(" + "|".join(grams) + ")", "pool": CANDIDATE_POOL},
    )
    target = needle.lower()

    def score(r: Row) -> float:
        value = str(r[wanted.column]).lower()
        if wanted.column == "email":
            value = value.split("@")[0]
        return difflib.SequenceMatcher(None, target, value).ratio()

    ranked = sorted(rows, key=lambda r: (-score(r), str(r["handle"])))
    return [{"handle": r["handle"], "name": r["name"]} for r in ranked[:MAX_CANDIDATES]]


# --- the table-wide spelling count (cached) ------------------------------------------

# Counted range of blocks by range of blocks (`keyranges.block_pieces`: a TID range scan
# reads just those blocks), each range one statement in its own transaction, two at once
# (`check_pieces`): a single count read every page of `submissions` at once, 2 GB at a
# million users, too close to the check timeout. The last range is open-ended, for
# blocks added meanwhile. Rows moved between ranges while they are read may be counted
# twice or missed: the count is a survey, not a ledger.
PIECE_PAGES = 25_000  # 200 MB of 8 kB pages: under a second each on the bench machine
_OVERALL_SQL = """
SELECT count(*)::bigint AS amplify,
       count(*) FILTER (WHERE NOT payload ?| %(read)s AND payload ?| %(other)s)::bigint
         AS other_only,
       count(*) FILTER (WHERE NOT payload ?| %(read)s AND payload ?| %(other)s
                          AND created_at >= (now() AT TIME ZONE 'UTC') - interval '7 days')::bigint
         AS other_only_week
FROM submissions
WHERE activity_code = 'AMPLIFY' AND {blocks}
"""

_overall_cache: dict[tuple[str, tuple[str, ...]], tuple[float, Row]] = {}


def _key_pair(rule: QuotaRule, kind: str) -> tuple[str, str]:
    """(the key the function reads, the other spelling of it); when the function reads
    both spellings, the second is the first again, so nothing counts as unread."""
    keys = rule.read_keys(kind)
    other = other_spelling(keys[0])
    return keys[0], (keys[0] if other in keys else other)


def _read_and_other(rule: QuotaRule) -> tuple[list[str], list[str]]:
    read = [k for kind in ("peers", "students") for k in rule.read_keys(kind)]
    other = [other_spelling(k) for k in read if other_spelling(k) not in read]
    return read, other


async def overall_spelling(ctx: Context, rule: QuotaRule) -> tuple[Finding | None, Row, float]:
    """(a failure finding or None, the counts, their age in seconds)."""
    read, other = _read_and_other(rule)
    key = (ctx.gateway.target, tuple(read))
    hit = _overall_cache.get(key)
    now = time.monotonic()
    if hit and now - hit[0] < OVERALL_TTL_S:
        return None, hit[1], now - hit[0]
    pieces: list[Piece] = []

    async def sized(db: Reader) -> Finding:
        pieces.extend(await block_pieces(db, "submissions", blocks_per_piece=PIECE_PAGES))
        return Finding(check="payload keys", status=Status.OK, summary="sized")

    async def count(db: Reader, piece: Piece) -> Row:
        await tune(db, piece)
        query = _OVERALL_SQL.format(blocks=piece.where("ctid"))
        (row,) = await db.fetch(query, {"read": read, "other": other, **piece.params()})
        return row

    head = await ctx.gateway.run_check("payload keys", sized)
    if head.status is not Status.OK:
        return head, {}, 0.0
    counted = await check_pieces(ctx.gateway, "payload keys", pieces, count)
    if isinstance(counted, Finding):
        return counted, {}, 0.0
    totals: Row = {"amplify": 0, "other_only": 0, "other_only_week": 0, **add_up(counted)}
    _overall_cache[key] = (time.monotonic(), totals)
    return None, totals, 0.0


# --- findings -------------------------------------------------------------------------


def trigger_finding(rule: QuotaRule) -> Finding:
    name = "quota trigger"
    if not rule.triggers:
        return Finding(
            check=name,
            status=Status.CRIT,
            summary=f"no trigger calls {QUOTA_FUNCTION}(): AMPLIFY submissions are not capped",
            hint=f"recreate {QUOTA_TRIGGER} (BEFORE INSERT on submissions) from the migration",
        )
    off = [t for t in rule.triggers if t["enabled"] in ("disabled", "replica only")]
    described = ", ".join(f"{t['trigger']} on {t['table']} is {t['enabled']}" for t in off)
    if off:
        return Finding(
            check=name,
            status=Status.CRIT,
            summary=f"{described}: the weekly caps are not enforced on new submissions",
            rows=rule.triggers,
            hint=f"re-enable it: ALTER TABLE submissions ENABLE TRIGGER {QUOTA_TRIGGER}",
        )
    if not rule.function_found:
        return Finding(
            check=name,
            status=Status.CRIT,
            summary=f"{QUOTA_FUNCTION}() is missing although a trigger names it",
            rows=rule.triggers,
        )
    on = ", ".join(f"{t['trigger']} on {t['table']}" for t in rule.triggers)
    return Finding(
        check=name,
        status=Status.OK,
        summary=f"{on} enabled, calling {rule.function_name}",
        rows=rule.triggers,
    )


def keys_finding(
    rule: QuotaRule,
    user: Tally | None,
    handle: str,
    overall: Row,
    age_s: float = 0.0,
    proof: tuple[str, list[str]] | None = None,
) -> Finding:
    """crit when payloads inside the trigger's 7-day window use the other spelling (the
    trigger undercounts now); warn when only older ones do (points, not the quota).
    `proof`: the CHECK constraint that rules such payloads out table-wide (`overall`
    is then empty: nothing was counted)."""
    name = "payload keys"
    read, other = _read_and_other(rule)
    read_text = " / ".join(f"`{k}`" for k in read)
    other_text = " / ".join(f"`{k}`" for k in other)
    if not rule.function_found:
        what = f"{QUOTA_FUNCTION}() not found; the documented keys {read_text} were used"
    else:
        spellings = sorted({spelling(k) for k in read})
        what = f"{rule.function_name} reads {read_text} ({', '.join(spellings)})"
    parts = [what]
    problems: list[str] = []
    in_window = 0
    if user is not None:
        if user.other_all:
            in_window += user.other_week
            problems.append(
                f"{user.other_all} of {user.amplify_all} AMPLIFY payloads of `{handle}` use only"
                f" {other_text} ({user.other_week} in the last 7 days)"
            )
        else:
            parts.append(f"`{handle}`'s {user.amplify_all} AMPLIFY payloads use the same keys")
    if proof is not None:
        check, required = proof
        parts.append(
            f"every AMPLIFY payload in the database has {' or '.join(f'`{k}`' for k in required)}"
            f": the validated CHECK constraint {check} requires it (nothing to count)"
        )
    if overall:
        counted = f" (counted {age_s:.0f} s ago)" if age_s >= 1 else ""
        if int(overall["other_only"]):
            in_window += int(overall["other_only_week"])
            problems.append(
                f"{overall['other_only']} of {overall['amplify']} AMPLIFY payloads in the"
                f" database use only {other_text} ({overall['other_only_week']} in the last"
                f" 7 days){counted}"
            )
        else:
            parts.append(
                f"none of the {overall['amplify']} AMPLIFY payloads uses {other_text}{counted}"
            )
    if not problems:
        return Finding(check=name, status=Status.OK, summary="; ".join(parts))
    hint = (
        "rewrite the payloads to the keys the function reads, or make the function read"
        " both spellings; `/db integrity` shows the points these payloads are worth"
    )
    if not in_window:
        return Finding(
            check=name,
            status=Status.WARN,
            summary="; ".join([what, *problems])
            + ". None is in the trigger's 7-day window, so today's quota is not affected;"
            " whatever reads payloads with the function's keys (as `/db integrity` does)"
            " still values them at 0",
            hint=hint,
        )
    return Finding(
        check=name,
        status=Status.CRIT,
        summary="; ".join([what, *problems])
        + ". The function reads those payloads as 0, so the trigger undercounts the"
        " 7-day totals and lets users past the limits",
        hint=hint,
    )


def quota_finding(rule: QuotaRule, user: Row, t: Tally) -> Finding:
    limits = rule.limits
    statuses: list[Status] = []
    parts: list[str] = []
    for kind in ("peers", "students"):
        used, limit = t.stored[kind], limits[kind]
        left = limit - used
        text = f"{kind} {used}/{limit} ("
        text += f"{left} left" if left >= 0 else f"*{-left} over*"
        if t.seen_by_trigger[kind] != used:
            text += f"; the trigger sees {t.seen_by_trigger[kind]}"
        parts.append(text + ")")
        if used > limit:
            statuses.append(Status.CRIT)
        elif used >= WARN_FRACTION * limit:
            statuses.append(Status.WARN)
    status = min(statuses, key=lambda s: s.severity) if statuses else Status.OK
    who = f"`{user['handle']}` ({user['name'] or 'no name'}, {user['role']})"
    summary = (
        f"{who}: {', '.join(parts)} over the last 7 days in {len(t.week)} AMPLIFY"
        f" submission(s); limits {rule.limits_source}"
    )
    recent = "; ".join(
        f"{r['id']} {r['status']} {str(r['created_at'])[:16]} {r['peers'] or 0}p/"
        f"{r['students'] or 0}s"
        for r in t.week[:5]
    )
    if recent:
        summary += f"\nrecent: {recent}" + (
            f" (+{len(t.week) - 5} more)" if len(t.week) > 5 else ""
        )
    hint = None
    if status is Status.CRIT:
        hint = "the trigger only checks new inserts: review this user's recent submissions"
    elif status is Status.WARN:
        hint = "close to the weekly limit: the next AMPLIFY submission may be refused"
    return Finding(check="AMPLIFY quota", status=status, summary=summary, rows=t.week, hint=hint)


# --- the command ----------------------------------------------------------------------


@register("quota", usage=USAGE, summary="a user's 7-day AMPLIFY quota and the quota trigger")
async def quota(ctx: Context, args: list[str]) -> Report:
    gw = ctx.gateway
    resolved = await resolve_argument(ctx, args)
    title = "AMPLIFY quota"
    state: dict[str, Any] = {}

    async def survey(db: Reader) -> Finding:
        if isinstance(resolved, Finding):
            state["rule"] = await load_rule(db)
            return Finding(check="survey", status=Status.OK, summary="")
        variants = list(dict.fromkeys([resolved.value, resolved.value.lower()]))
        query = sql.SQL(_SURVEY_SQL).format(col=sql.Identifier(resolved.column))
        spellings = dict(zip(("k0", "k1", "k2", "k3"), (*SNAKE_KEYS, *CAMEL_KEYS), strict=True))
        (row,) = await db.fetch(
            query.as_string(None),
            {
                **_RULE_PARAMS,
                **spellings,
                "variants": variants,
                "value": resolved.value,
                "max": MAX_SUBMISSIONS,
            },
        )
        state["rule"] = rule_from(row)
        state["users"] = users = list(row["users"] or [])
        if not users:
            state["candidates"] = await closest_handles(db, resolved)
        return Finding(check="survey", status=Status.OK, summary="")

    head = await gw.run_check("AMPLIFY quota", survey)
    if head.status is not Status.OK:
        return Report(title=title, target=gw.target, findings=[head])
    rule: QuotaRule = state["rule"]
    findings = [trigger_finding(rule)]
    users: list[Row] = state.get("users", [])
    user_tally: Tally | None = None
    handle = ""
    if isinstance(resolved, Finding):
        findings.append(resolved)
    elif not users:
        candidates: list[Row] = state.get("candidates", [])
        close = ", ".join(f"`{c['handle']}`" for c in candidates)
        findings.append(
            Finding(
                check="user",
                status=Status.WARN,
                summary=f"no LEAPS user with {resolved.shown}"
                + (f"; closest handles: {close}" if close else "; no similar handle"),
                rows=candidates,
                hint=f"try `/db quota {candidates[0]['handle']}`" if candidates else None,
            )
        )
    elif len(users) > 1:
        findings.append(
            Finding(
                check="user",
                status=Status.WARN,
                summary=f"{len(users)} LEAPS users match {resolved.shown} when case is ignored: "
                + ", ".join(f"`{u['handle']}`" for u in users),
                rows=[{"handle": u["handle"], "name": u["name"], "role": u["role"]} for u in users],
                hint="give the handle exactly",
            )
        )
    else:
        user = users[0]
        handle = str(user["handle"])
        user_tally = tally(rule, list(user["amplify"]))
        findings.append(quota_finding(rule, user, user_tally))
        title = f"AMPLIFY quota of {handle}"
    proof = proving_check(rule)
    failure: Finding | None = None
    overall: Row = {}
    age_s = 0.0
    if proof is None:
        failure, overall, age_s = await overall_spelling(ctx, rule)
    findings.append(keys_finding(rule, user_tally, handle, overall, age_s, proof))
    if failure is not None:
        findings.append(failure)
    return Report(title=title, target=gw.target, findings=findings).sorted()


__all__ = [
    "QuotaRule",
    "keys_required",
    "live_limits",
    "load_rule",
    "other_spelling",
    "quota",
]
