"""`python -m bot.console.expected [--stdout]`: `commands/expected_schema.json` from the
fixture built in a throwaway embedded PostgreSQL, so the dump never sees an injected fault
(`python -m commands.fixture.expected DSN` dumps a database you already have)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bot.embedded_pg import EmbeddedPostgres
from commands.fixture.expected import dump_expected, write_expected
from commands.fixture.seed import build_fixture
from commands.migrations import EXPECTED_FILE


async def dump_fresh_fixture() -> dict[str, Any]:
    server = EmbeddedPostgres()
    server.start()
    try:
        dsn = server.create_database("leaps_expected")
        await build_fixture(dsn, users=20)
        return await dump_expected(dsn)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bot.console.expected",
        description=f"write {EXPECTED_FILE.name} from the fixture, built in a temporary server",
    )
    parser.add_argument("--stdout", action="store_true", help="print instead of writing the file")
    args = parser.parse_args(argv)
    write_expected(asyncio.run(dump_fresh_fixture()), args.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
