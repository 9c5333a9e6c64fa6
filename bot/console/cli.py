"""`python -m bot`: serve, socket, run, demo; with no subcommand, the mode the settings allow.

Configuration mistakes end with one line naming the variable and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys

from bot.messages import render
from bot.settings import Settings, SettingsError, load_settings

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bot", description="dbops-bot: /db incident bot")
    sub = p.add_subparsers(dest="mode")
    serve = sub.add_parser("serve", help="HTTP mode: /slack/events, /healthz, /metrics")
    serve.add_argument("--port", type=int, default=None, help="default: $PORT, else 3000")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: $WEB_CONCURRENCY, 1)"
    )
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    socket = sub.add_parser("socket", help="Socket Mode (/healthz and /metrics on --port)")
    socket.add_argument("--port", type=int, default=None, help="default: $PORT, else 3000")
    socket.add_argument("--host", default="0.0.0.0")
    run = sub.add_parser("run", help='one command against DATABASE_URL, e.g. run "health"')
    run.add_argument("command", help='the text after /db, e.g. "health"')
    run.add_argument("--json", action="store_true", help="print the Report as JSON")
    run.add_argument(
        "--user",
        help="request a remedy as this Slack user id (roles from ROLE_MAP); "
        "without it a remedy prints its plan only",
    )
    export = sub.add_parser("export", help="a table as CSV: leaderboard, submissions or ledger")
    export.add_argument("kind", help="leaderboard, submissions or ledger")
    export.add_argument("--since", help="rows from this date (YYYY-MM-DD, UTC)")
    export.add_argument("--out", default="-", help="file to write (default: stdout)")
    for verb in ("approve", "reject"):
        decide = sub.add_parser(verb, help=f"{verb} a pending remedy from the console")
        decide.add_argument("approval_id")
        decide.add_argument("--user", required=True, help="the Slack user id deciding")
    demo = sub.add_parser("demo", help="embedded PostgreSQL with the LEAPS fixture and faults")
    demo.add_argument("--keep", action="store_true", help="keep the database up and print its DSN")
    return p


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The pool retries a dead target in the background; one line per attempt is noise.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def imports_done() -> None:
    """The mode's modules are imported: the cyclic GC, off while `python -m bot` imports
    them (bot/__main__.py), is on again for the run itself."""
    gc.enable()


async def run_once(settings: Settings, text: str, as_json: bool) -> int:
    from bot.console.console import console_frontend
    from bot.house import build_house
    from bot.router import Answer, help_answer, parse
    from commands.base import UsageError
    from commands.remedies.base import Plan

    imports_done()

    try:
        name, words = parse(text)
    except UsageError:
        name, words = "", []  # the dispatcher says what is wrong with it
    if name == "help":  # needs no database; printed without Slack's markup
        helped = help_answer(words, markup=False)
        print(helped.text, file=sys.stdout if helped.outcome == "help" else sys.stderr)
        return 0 if helped.outcome == "help" else EXIT_CONFIG
    # One command, no state of its own: the refresh log (for `views`) and the baselines are
    # read from the state store when STATE_DATABASE_URL names one; without it the store
    # keeps nothing (no state file is created).
    async with build_house(settings, console_frontend(), keeps_state=False) as house:
        result = await house.dispatcher.run(text)
    if isinstance(result, Answer):
        print(result.text, file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(result, Plan):
        if as_json:
            sys.stdout.write(result.model_dump_json(indent=2) + "\n")
        else:
            text = render.plan_text(result, m=render.PLAIN)
            sys.stdout.write(f"{text}\n\n{render.steps_text(result)}\n\n")
            sys.stdout.write(render.rows_table(result.targets, 50) + "\n")
            sys.stdout.write("(plan only: remedies run from Slack, after approval)\n")
        return 0
    sys.stdout.write(render.to_json(result) if as_json else render.to_text(result))
    if result.follow_ups and not as_json:
        sys.stdout.write(
            "\nto request: "
            + "; ".join(f'python -m bot run "{t}" --user …' for t in result.follow_ups)
            + "\n"
        )
    return 0


def _require_before_importing(settings: Settings, mode: str, args: argparse.Namespace) -> None:
    """The settings a mode cannot start without, checked before its modules are imported
    (the Slack stack, the house): a missing one costs a one-line error, not a second of
    imports first. The modes check again where they start; this only answers sooner."""
    if mode == "serve":
        settings.require("slack_bot_token", "slack_signing_secret", "database_url")
    elif mode == "socket":
        settings.require("slack_bot_token", "slack_app_token", "database_url")
    elif mode == "run" and not args.user:
        from bot.router import parse
        from commands.base import UsageError

        try:
            name = parse(args.command)[0]
        except UsageError:
            name = ""  # the dispatcher says what is wrong with it, with the database
        if name != "help":  # help needs no database (run_once)
            settings.require("database_url")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        _configure_logging(settings)
        mode = args.mode
        if mode is None:
            if settings.has_socket_mode:
                mode = "socket"
            elif settings.has_http_mode:
                mode = "serve"
            else:
                mode = "demo"
        _require_before_importing(settings, mode, args)
        if mode == "serve":
            from bot.slack.server import serve_http

            port = getattr(args, "port", None) or settings.port
            host = getattr(args, "host", "0.0.0.0")
            workers = getattr(args, "workers", None) or settings.web_concurrency
            if workers > 1:
                from bot.slack.workers import supervise

                imports_done()
                return supervise(workers, port, host)
            imports_done()
            asyncio.run(serve_http(settings, port, host, getattr(args, "reuse_port", False)))
            return 0
        if mode == "socket":
            from bot.slack.server import serve_socket

            imports_done()
            asyncio.run(
                serve_socket(
                    settings, getattr(args, "port", None), getattr(args, "host", "0.0.0.0")
                )
            )
            return 0
        if mode == "run" and args.user:
            from bot.console.console import request_from_console

            imports_done()
            return asyncio.run(request_from_console(settings, args.command, args.user))
        if mode == "run":
            return asyncio.run(run_once(settings, args.command, args.json))
        if mode == "export":
            from bot.slack.exports import export_from_console

            imports_done()
            what = [args.kind, *(["--since", args.since] if args.since else [])]
            return asyncio.run(export_from_console(settings, what, args.out))
        if mode in ("approve", "reject"):
            from bot.console.console import decide_from_console

            imports_done()
            return asyncio.run(
                decide_from_console(
                    settings, args.approval_id, args.user, approve=mode == "approve"
                )
            )
        from bot.console.demo import run_demo

        imports_done()
        try:
            return asyncio.run(run_demo(settings, keep=getattr(args, "keep", False)))
        except KeyboardInterrupt:
            return 0
    except SettingsError as exc:
        print(f"dbops-bot: {exc}", file=sys.stderr)
        return EXIT_CONFIG
