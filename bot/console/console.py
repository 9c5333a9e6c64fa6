"""Remedies and incidents from the command line: the same approval engine, incident
service, state store and executor as in Slack, speaking through console notifiers (the
demo's way to try the flow)."""

from __future__ import annotations

import sys
from contextlib import AbstractAsyncContextManager
from typing import TextIO

from bot.access.roles import refusal
from bot.approvals.engine import APPROVE, REJECT, ApprovalEngine, Click
from bot.clock import Clock, SystemClock
from bot.house import Frontend, House, build_house
from bot.incidents.comms import ConsolePublisher
from bot.incidents.service import ConsoleIncidents
from bot.messages import render
from bot.messages.notify import ConsoleNotifier
from bot.router import Answer, BotCommand, preflight
from bot.settings import Settings
from bot.state.store import Approval
from commands.base import Command, Report, UsageError, role_rank
from commands.incidents import lifecycle as incident
from commands.recover import recovery_evidence, recovery_verified
from commands.remedies.base import Remedy

CONSOLE_CHANNEL = "console"


def console_frontend(out: TextIO = sys.stdout, clock: Clock | None = None) -> Frontend:
    """The console's frontend: approvals and incidents printed, ROLE_MAP only (no Slack),
    system time unless the demo brings its own; nothing runs on timers."""
    return Frontend(
        notifier=ConsoleNotifier(out),
        publisher=ConsolePublisher(out),
        incident_slack=ConsoleIncidents(out),
        clock=clock or SystemClock(),
    )


def console_house(settings: Settings) -> AbstractAsyncContextManager[House]:
    """The bot of one console command (`bot.house`): the same approval engine, incident
    service, state store and executor as in Slack, printing to stdout. Console approvals
    join the console's incident."""
    return build_house(settings, console_frontend())


async def incident_from_console(settings: Settings, text: str, user_id: str) -> int:
    """`run "incident …" --user U…`: the same incident service as Slack, printing instead of
    posting, in the console's own channel (its timeline and clocks live in the state store)."""
    request = incident.parse(text.strip().partition(" ")[2])
    async with console_house(settings) as house:
        refused = refusal(settings.diagnostics_role, await house.roles.resolve(user_id), "diagnose")
        if refused:
            print(f"{user_id}: incident: {refused}", file=sys.stderr)
            return 2
        service = house.incidents
        reply = await service.handle(request, user_id=user_id, channel_id=CONSOLE_CHANNEL)
        await service.slack.post(CONSOLE_CHANNEL, reply.message)
    return 0


async def diagnose_from_console(
    settings: Settings, command: Command, args: list[str], text: str, user_id: str
) -> int:
    """`run "health" --user U…`: a diagnostic as that person, joining the timeline of the
    console's incident when one is open (plain `run "health"` stays anonymous and stateless)."""
    async with console_house(settings) as house:
        needed = max(command.role, settings.diagnostics_role, key=role_rank)
        refused = refusal(needed, await house.roles.resolve(user_id), "diagnose")
        if refused:
            print(f"{user_id}: {command.name}: {refused}", file=sys.stderr)
            return 2
        result = await house.dispatcher.run_command(command, args)
        if not isinstance(result, Report):
            print(getattr(result, "text", result), file=sys.stderr)
            return 2
        sys.stdout.write(render.to_text(result))
        incidents = house.incidents
        await incidents.on_command(CONSOLE_CHANNEL, user_id, text.strip(), result)
        if recovery_verified(result):  # a clean `recover`: full recovery reached
            await incidents.mark_recovered(CONSOLE_CHANNEL, recovery_evidence(result), user_id)
    # The remedies the report asks for (`recover`'s steps), requested as this person.
    status = 0
    for follow in result.follow_ups:
        status = max(status, await request_from_console(settings, follow, user_id))
    return status


async def request_from_console(settings: Settings, text: str, user_id: str) -> int:
    pre = preflight(text)
    if isinstance(pre, Answer):
        print(pre.text.replace("*", ""), file=sys.stderr)
        return 2
    if isinstance(pre[0], BotCommand):
        return await incident_from_console(settings, text, user_id)
    if isinstance(pre[0], Command):
        return await diagnose_from_console(settings, pre[0], pre[1], text, user_id)
    remedy = pre[0]
    if not isinstance(remedy, Remedy):
        print("`--user` runs a command as that person; see `python -m bot run help`")
        return 2
    args = pre[1]
    async with console_house(settings) as house:
        engine = house.engine
        needed = max(remedy.role, settings.diagnostics_role, key=role_rank)
        refused = refusal(needed, await house.roles.resolve(user_id), "request")
        if refused:
            print(f"{user_id}: {remedy.name}: {refused}", file=sys.stderr)
            return 2
        try:
            approval_id = await engine.request(
                remedy,
                args,
                user_id=user_id,
                user_name=user_id,
                channel_id=CONSOLE_CHANNEL,
                origin="console",
            )
        except UsageError as exc:
            print(f"{exc}\nUsage: {remedy.usage}", file=sys.stderr)
            return 2
        approval = await engine.store.get_approval(approval_id)
        if approval is not None and approval.state == "pending":
            print(
                f"\napproval {approval_id} is pending: python -m bot approve {approval_id} --user …"
            )
    return 0


def console_click(
    engine: ApprovalEngine, approval: Approval, user_id: str, *, approve: bool = True
) -> Click:
    """A button press from the console: the one way the command line and the demo approve
    or reject."""
    return Click(
        action_id=APPROVE if approve else REJECT,
        value=engine.sign(approval.id, approval.channel_id),
        user_id=user_id,
        user_name=user_id,
        channel_id=approval.channel_id,
        message_ts=approval.message_ts or "",
        origin="console",
    )


async def decide_from_console(
    settings: Settings, approval_id: str, user_id: str, *, approve: bool
) -> int:
    async with console_house(settings) as house:
        engine = house.engine
        approval = await engine.store.get_approval(approval_id)
        if approval is None:
            print(f"no approval {approval_id}", file=sys.stderr)
            return 2
        await engine.on_click(console_click(engine, approval, user_id, approve=approve))
        if approve and approval.origin != "console":
            return 2  # refused (and audited): Slack requests are approved in Slack
        final = await engine.store.get_approval(approval_id)
        return 0 if final is not None and final.state in ("done", "pending", "rejected") else 1
