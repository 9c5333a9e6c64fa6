"""Remedies from the command line: the same approval engine, state store and executor
as in Slack, speaking through the console notifier (the demo's way to try the flow)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from bot.approvals import APPROVE, REJECT, ApprovalEngine, Click, refresh_history
from bot.authz import RoleResolver, refusal
from bot.executor import executor_from_settings
from bot.gateway import gateway_from_settings
from bot.notify import ConsoleNotifier
from bot.router import Answer, RunContext, preflight
from bot.settings import Settings
from bot.state import open_store
from commands.base import UsageError, role_rank
from commands.remedies.base import Remedy

CONSOLE_CHANNEL = "console"


@asynccontextmanager
async def console_engine(settings: Settings) -> AsyncIterator[ApprovalEngine]:
    settings.require("database_url")
    assert settings.database_url is not None
    gateway = gateway_from_settings(settings)
    store = await open_store(settings.state_database_url)
    try:
        ctx = RunContext(
            gateway,
            settings.thresholds,
            settings.allow_superuser_kill,
            refresh_log=partial(refresh_history, store),
            service_identity=settings.service_identity,
        )
        executor = executor_from_settings(settings)
        roles = RoleResolver(
            settings.role_map, None, gateway, stale_max_s=settings.role_stale_max_s, store=store
        )
        yield ApprovalEngine(settings, store, ctx, executor, ConsoleNotifier(), roles)
    finally:
        await gateway.close()
        await store.close()


async def request_from_console(settings: Settings, text: str, user_id: str) -> int:
    pre = preflight(text)
    remedy = None if isinstance(pre, Answer) else pre[0]
    if isinstance(pre, Answer) or not isinstance(remedy, Remedy):
        print("`--user` requests a remedy; see `python -m bot run help`", file=sys.stderr)
        return 2
    args = pre[1]
    async with console_engine(settings) as engine:
        needed = max(remedy.role, settings.diagnostics_role, key=role_rank)
        refused = refusal(needed, await engine.roles.resolve(user_id), "request")
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


async def decide_from_console(
    settings: Settings, approval_id: str, user_id: str, *, approve: bool
) -> int:
    async with console_engine(settings) as engine:
        approval = await engine.store.get_approval(approval_id)
        if approval is None:
            print(f"no approval {approval_id}", file=sys.stderr)
            return 2
        await engine.on_click(
            Click(
                action_id=APPROVE if approve else REJECT,
                value=engine.sign(approval.id, approval.channel_id),
                user_id=user_id,
                user_name=user_id,
                channel_id=approval.channel_id,
                message_ts=approval.message_ts or "",
                origin="console",
            )
        )
        if approve and approval.origin != "console":
            return 2  # refused (and audited): Slack requests are approved in Slack
        final = await engine.store.get_approval(approval_id)
        return 0 if final is not None and final.state in ("done", "pending", "rejected") else 1
