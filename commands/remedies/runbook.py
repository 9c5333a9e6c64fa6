"""`recover-runbook`: the whole recovery as one approved, ordered plan (issue 15, part 3).

`/db recover --runbook [--freeze] [--from-step N]` asks for it (a follow-up of the recover
report), or `/db recover-runbook …` directly. The steps are remedies named here, so the
runbook is written over names, not modules:

1. `freeze-writes` (with `--freeze`);
2. `restore-from-copy` when RECOVERY_DATABASE_URL names a copy, else the audit and Kajabi
   sources: `recover-users`, `rematch-kajabi`;
3. `recover-learn`, `reconcile-points`, `refresh-views`;
4. `verify-recovery`: `/db recover`'s own verification, read-only: not clean, it stops
   the run before the unfreeze (the freeze stays until someone decides); as the last
   step it reports what is still lost (what the sources did not hold);
5. `unfreeze-writes` (with `--freeze`, or when the writes are frozen when it is asked for:
   a freeze made before the runbook, by the bot or by hand, is lifted at its end).

A step whose remedy this bot does not have is "not available in this bot", and the runbook
is refused: it would not be the recovery the approvers read.

What the approval binds (DESIGN.md rule 5's one exception): the steps, and for each a bound
on the rows it may change when it is re-planned at its turn: its dry run's estimate plus
RUNBOOK_TOLERANCE_PCT, rounded up (the engine binds it from the setting, `bind` in
bot/approvals/runbook.py). Earlier steps change what later ones find, so a step that
follows up earlier steps of the same runbook (`FOLLOWS`: one LEARN submission per user
restored or event re-matched, one award per LEARN submission recovered) may also change up
to their bounds' rows. A step estimated at 0 that follows nothing may change nothing: if it
finds rows at its turn, they appeared after the approval, and it stops the run. A step
that follows earlier ones and cannot be planned before they ran (nothing to unfreeze before
the freeze) is estimated at 0 and planned at its turn within their bounds.

The running, the lease and the records are the bot's (bot/approvals/runbook.py); this
module only plans, read-only, like every remedy.
"""

from __future__ import annotations

from functools import partial

from commands.base import Context, Finding, Reader, Report, Row, Status, UsageError
from commands.remedies.base import (
    REMEDIES,
    Execution,
    Outcome,
    Plan,
    PlanStep,
    Remedy,
    RunbookStep,
    Verification,
    Writer,
    add_remedy,
)
from commands.remedies.freeze import freeze_state

RUNBOOK_NAME = "recover-runbook"
FREEZE = "freeze-writes"
UNFREEZE = "unfreeze-writes"
RESTORE = "restore-from-copy"
VERIFY = "verify-recovery"  # not a remedy: the runbook measures it itself, read-only
FREEZE_FLAG = "--freeze"
FROM_FLAG = "--from-step"
SOURCES = ("recover-users", "rematch-kajabi")  # the audit trail and the Kajabi events
AFTER_SOURCES = ("recover-learn", "reconcile-points", "refresh-views")
# Steps whose rows may follow one-for-one from rows of earlier steps of the same runbook
# (a LEARN submission per user restored or event re-matched; an award per LEARN recovered):
# their bound adds those steps' bounds.
# The unfreeze undoes the freeze of the same run: nothing to undo before it ran.
FOLLOWS: dict[str, tuple[str, ...]] = {
    "recover-learn": ("recover-users", "rematch-kajabi"),
    "reconcile-points": ("recover-learn",),
    UNFREEZE: (FREEZE,),
}
NOT_AVAILABLE = "not available in this bot"


def parse_runbook_args(args: list[str]) -> tuple[bool, int]:
    """`[--freeze] [--from-step N]` -> (freeze, first step)."""
    freeze, first = False, 1
    words = list(args)
    while words:
        word = words.pop(0)
        if word == FREEZE_FLAG:
            freeze = True
        elif word == FROM_FLAG and words:
            first = _step_number(words.pop(0))
        elif word.startswith(f"{FROM_FLAG}="):
            first = _step_number(word.split("=", 1)[1])
        else:
            raise UsageError(f"unknown argument {word!r}")
    return freeze, first


def _step_number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{FROM_FLAG} wants a step number (1, 2, …), not {text!r}")
    return int(text)


def runbook_args(freeze: bool, first: int = 1) -> list[str]:
    """The arguments that ask for this runbook again (the continuation command)."""
    return [*([FREEZE_FLAG] if freeze else []), *([FROM_FLAG, str(first)] if first > 1 else [])]


def continue_command(freeze: bool, first: int) -> str:
    return " ".join(["/db recover --runbook", *runbook_args(freeze, first)])


def step_names(ctx: Context, freeze: bool, frozen: bool = False) -> list[str]:
    """The whole runbook's remedies, in order, by name (numbered from 1): the unfreeze
    last when the runbook freezes or the writes were `frozen` already. The same request
    gives the same numbers while the run goes on (`--from-step`): a run's own freeze is
    step 1 whether or not it has happened yet."""
    sources = [RESTORE] if ctx.recovery_copy is not None else list(SOURCES)
    return [
        *([FREEZE] if freeze else []),
        *sources,
        *AFTER_SOURCES,
        VERIFY,
        *([UNFREEZE] if freeze or frozen else []),
    ]


async def frozen_now(ctx: Context) -> bool:
    """Whether the application's writes are frozen now (by the bot or by hand). If it
    cannot be read, the runbook does not plan an unfreeze: a freeze outlives a runbook
    that did not lift it, never the other way round."""
    try:
        state = await ctx.gateway.read(partial(freeze_state, ctx.app_roles))
    except Exception:
        return False
    return bool(state.frozen)


async def _names(ctx: Context, freeze: bool, first: int) -> list[str]:
    frozen = await frozen_now(ctx)
    if freeze and frozen and first == 1:
        raise UsageError(
            "the writes are frozen already: ask for the runbook without --freeze; it still "
            "ends with `unfreeze-writes`"
        )
    return step_names(ctx, freeze, frozen)


def missing_steps(names: list[str]) -> list[tuple[int, str]]:
    return [(i, n) for i, n in enumerate(names, 1) if n != VERIFY and n not in REMEDIES]


def _follows(names: list[str], number: int, first: int) -> list[int]:
    """The earlier steps of this run (from `first` on) whose rows step `number` follows."""
    wanted = FOLLOWS.get(names[number - 1], ())
    return [i for i, n in enumerate(names, 1) if first <= i < number and n in wanted]


async def plan_runbook(ctx: Context, args: list[str]) -> Plan:
    freeze, first = parse_runbook_args(args)
    names = await _names(ctx, freeze, first)
    missing = missing_steps(names)
    if missing:
        listed = "; ".join(
            f"{i}. {n}" + (f" ({NOT_AVAILABLE})" if (i, n) in missing else "")
            for i, n in enumerate(names, 1)
        )
        raise UsageError(
            "the recovery runbook is refused: "
            + ", ".join(f"step {i} `{n}` is {NOT_AVAILABLE}" for i, n in missing)
            + f". Its steps: {listed}"
        )
    if first > len(names):
        raise UsageError(f"the runbook has {len(names)} steps; there is no step {first}")
    steps: list[RunbookStep] = []
    for number, name in enumerate(names, 1):
        if number < first:
            continue
        if name == VERIFY:
            steps.append(
                RunbookStep(
                    number=number,
                    remedy=name,
                    summary="`/db recover`'s verification against the latest baseline, "
                    "read-only; if it is not clean and steps follow (the unfreeze), the run "
                    "stops here",
                )
            )
            continue
        follows = _follows(names, number, first)
        try:
            dry = await REMEDIES[name].plan(ctx, [])
        except UsageError as exc:
            if not follows:
                raise UsageError(
                    f"the recovery runbook is refused: step {number} `{name}` cannot be "
                    f"planned: {exc}"
                ) from None
            # what it undoes or follows up is not there yet (nothing is frozen before the
            # freeze): it is planned at its turn, within the bounds of the steps it follows
            steps.append(
                RunbookStep(
                    number=number,
                    remedy=name,
                    summary=f"planned at its turn, after step(s) "
                    f"{', '.join(map(str, follows))} (now: {exc})",
                    estimate=0,
                    follows=follows,
                )
            )
            continue
        steps.append(
            RunbookStep(
                number=number,
                remedy=name,
                summary=dry.summary,
                estimate=dry.count,
                follows=follows,
                approver_role=dry.approver_role,
                approvers=dry.approvers,
            )
        )
    count = sum(s.estimate or 0 for s in steps)
    skipped = (
        f"; steps 1-{first - 1} are not part of it (`{FROM_FLAG} {first}`)" if first > 1 else ""
    )
    return Plan(
        remedy=RUNBOOK_NAME,
        args=list(args),
        title=f"Recovery runbook: steps {first}-{len(names)} of {len(names)}",
        summary=(
            # every bound is 0: no step may change a row, only the verification is left
            "no step finds anything to change (every bound would be 0); `/db recover` "
            "runs the verification"
            if count == 0
            else "run the recovery in order under this one approval: "
            + ", ".join(f"{s.number}. {s.remedy}" for s in steps)
            + skipped
            + ". Each step is re-planned at its turn, its plan hashed and posted in this "
            "thread before it runs, tried first where its remedy is, applied, verified; a "
            "step over its bound, or failing, stops the run there"
            + (" and the freeze stays" if freeze else "")
        ),
        steps=[
            PlanStep(sql=s.command, note=f"step {s.number}: {s.summary}")
            for s in steps
            if s.remedy != VERIFY
        ]
        + [
            PlanStep(sql="/db recover --dry-run", note=f"step {s.number}: {s.summary}")
            for s in steps
            if s.remedy == VERIFY
        ],
        targets=step_rows(steps),
        count=count,
        warnings=[
            "a step estimated at 0 rows that follows no earlier step may change none: rows "
            "it finds at its turn appeared after this approval, and stop the run",
            "bounds: the dry run's rows + RUNBOOK_TOLERANCE_PCT, rounded up; recover-learn "
            "adds the bounds of recover-users and rematch-kajabi, reconcile-points that of "
            "recover-learn (one row per row they restore), unfreeze-writes that of "
            "freeze-writes",
        ]
        + (
            [
                "the freeze stays if the run stops: unfreeze with `/db unfreeze-writes`, or "
                "continue the runbook from where it stopped"
            ]
            if freeze
            else []
        ),
        limits="one transaction per step, in order; the runbook holds its lease throughout",
        runbook=steps,
        data={"freeze": freeze, "first": first, "total": len(names)},
    )


def step_rows(steps: list[RunbookStep]) -> list[Row]:
    return [
        {
            "step": s.number,
            "remedy": s.remedy,
            "estimate": "read-only" if s.estimate is None else s.estimate,
            "bound": "-" if s.estimate is None else ("on request" if s.bound is None else s.bound),
            "summary": s.summary,
        }
        for s in steps
    ]


async def _apply(writer: Writer, plan: Plan) -> Outcome:
    """Never called: the engine runs a runbook step by step (`Remedy.runbook`)."""
    return Outcome(ok=False, summary="a runbook runs step by step through the approval engine")


async def _verify(db: Reader, plan: Plan, run: Execution) -> Verification:
    """The engine decides a runbook from its step records (bot/approvals/runbook.py)."""
    return Verification(landed=False, found="a runbook is decided from its step records")


RECOVER_RUNBOOK: Remedy = add_remedy(
    Remedy(
        name=RUNBOOK_NAME,
        usage=f"/db {RUNBOOK_NAME} [{FREEZE_FLAG}] [{FROM_FLAG} N]",
        summary="the whole recovery as one approved, ordered plan (also `/db recover --runbook`)",
        plan=plan_runbook,
        apply=_apply,
        verify=_verify,
        approver_role="ADMIN",
        approvers=1,
        not_tried="each step is tried at its turn where its own remedy is (rule 10), and "
        "checked against its bound",
        runbook=True,
    )
)


async def runbook_report(ctx: Context, args: list[str]) -> Report:
    """`/db recover --runbook …`: the steps by name, and the runbook requested as a
    follow-up (its own approval thread, where the dry runs and bounds are shown), or the
    refusal when a step is not available in this bot."""
    freeze, first = parse_runbook_args(args)
    names = await _names(ctx, freeze, first)
    missing = dict(missing_steps(names))
    findings = [
        Finding(
            check=f"runbook step {i}: {name}",
            status=Status.SKIPPED if i in missing else Status.OK,
            summary=(
                f"`{name}` is {NOT_AVAILABLE}"
                if i in missing
                else ("not part of this run" if i < first else "in the plan")
            ),
        )
        for i, name in enumerate(names, 1)
    ]
    asked = " ".join([RUNBOOK_NAME, *runbook_args(freeze, first)])
    if missing:
        findings.append(
            Finding(
                check="runbook",
                status=Status.CRIT,
                summary="refused: "
                + ", ".join(f"step {i} `{n}` is {NOT_AVAILABLE}" for i, n in missing.items()),
            )
        )
    else:
        findings.append(
            Finding(
                check="runbook",
                status=Status.WARN,
                summary=f"requested as `/db {asked}`: its plan, with each step's rows and "
                "bound, is in its own approval thread",
                hint=f"/db {asked}",
            )
        )
    return Report(
        title="Recovery runbook",
        target=ctx.gateway.target,
        findings=findings,
        follow_ups=[] if missing else [asked],
    )


async def status_report(ctx: Context) -> Report:
    """`/db recover --status`: the running runbook and the last ones, step by step."""
    if ctx.runbook_status is None:
        finding = Finding(
            check="runbook",
            status=Status.SKIPPED,
            summary="this bot keeps no runbooks here (no state store)",
        )
        return Report(
            title="Recovery runbook status", target=ctx.gateway.target, findings=[finding]
        )
    rows = await ctx.runbook_status()
    findings: list[Finding] = []
    by_approval: dict[str, list[Row]] = {}
    for row in rows:
        by_approval.setdefault(str(row["approval"]), []).append(row)
    for approval, steps in by_approval.items():
        head = steps[0]
        state = str(head["runbook_state"])
        status = {"done": Status.OK, "failed": Status.CRIT, "aborted": Status.CRIT}.get(
            state, Status.WARN
        )
        done = [s for s in steps if s["state"] == "done"]
        findings.append(
            Finding(
                check=f"runbook {approval}",
                status=status,
                summary=f"{'running' if state == 'executing' else state}: "
                f"{len(done)} of {len(steps)} steps done"
                + (f"; {head['outcome']}" if head.get("outcome") else ""),
                rows=[
                    {k: v for k, v in s.items() if k not in ("runbook_state", "outcome")}
                    for s in steps
                ],
            )
        )
    if not findings:
        findings.append(
            Finding(check="runbook", status=Status.OK, summary="no runbook has been requested")
        )
    return Report(title="Recovery runbook status", target=ctx.gateway.target, findings=findings)
