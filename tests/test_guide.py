"""Every section of the operators' guide has a `/db` command, and `/db help` says which."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.router import BOT_COMMANDS, find, help_answer, help_text
from commands import guide
from commands.base import REGISTRY
from commands.incidents import lifecycle as incident
from commands.remedies.base import REMEDIES
from tests.conftest import RunningBot
from tests.test_cli import bot_cli
from tests.test_health_e2e import private_answer

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "TROUBLESHOOTING.md"


def test_every_cited_command_exists() -> None:
    for section in guide.SECTIONS:
        assert section.commands, section.heading
        for cited in section.commands:
            name, *sub = cited.split()
            assert find(name) is not None, f"{section.heading}: no command `{name}`"
            if sub:
                assert name in BOT_COMMANDS and sub[0] in incident.SUBCOMMANDS, cited


def test_every_command_serves_a_section() -> None:
    """A command nobody can find from the guide is a command the on-call never runs."""
    for name in [*REGISTRY, *REMEDIES, *BOT_COMMANDS]:
        assert guide.sections_for(name), f"`{name}` is in no guide section"


@pytest.mark.skipif(not GUIDE.exists(), reason="the operators' guide is not beside the checkout")
def test_every_heading_of_the_guide_is_mapped() -> None:
    chapter = ""
    headings: list[tuple[str, str]] = []
    in_code = False
    for line in GUIDE.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code:
            continue
        elif m := re.match(r"^## (.+)$", line):
            chapter = m.group(1).strip()
        elif m := re.match(r"^### (.+)$", line):
            headings.append((chapter, m.group(1).strip()))
    mapped = {(s.chapter, s.heading) for s in guide.SECTIONS}
    assert len(headings) >= 25
    assert set(headings) == mapped


def test_help_lists_every_section_with_its_commands() -> None:
    text = help_text(markup=False)
    for section in guide.SECTIONS:
        assert section.heading in text
        for cited in section.commands:
            assert f"`{cited}`" in text


def test_help_on_one_command_and_one_section() -> None:
    one = help_answer(["cleanup-orphans"], markup=False)
    assert one.outcome == "help"
    assert "`/db cleanup-orphans" in one.text
    assert "approved by 2 x ADMIN" in one.text  # it destroys data
    assert "guide: Data Integrity Problems → Orphaned Records" in one.text

    by_words = help_answer(["email", "MATCHING"], markup=False)
    assert by_words.outcome == "help"
    assert "Webhook Integration Issues → Email Matching Issues" in by_words.text
    assert "`/db rematch-emails`" in by_words.text

    nothing = help_answer(["flux", "capacitor"], markup=False)
    assert nothing.outcome == "unknown"
    assert "no command or guide section called `flux capacitor`" in nothing.text


async def test_help_over_slack_is_escaped_and_private(bot: RunningBot) -> None:
    listing = await private_answer(bot, "help", "U0GUIDE1")
    text = listing.params["text"]
    assert listing.params["response_type"] == "ephemeral"
    assert "Authentication &amp; Authorization" in text
    assert "<command|guide section>" not in text  # would be a Slack link
    for section in guide.SECTIONS:
        assert section.heading.replace("&", "&amp;") in text

    one = await private_answer(bot, "help kajabi webhook", "U0GUIDE2")
    assert "Kajabi Webhook Failures" in one.params["text"]
    assert "reprocess-webhooks" in one.params["text"]


def test_help_on_the_console_has_no_slack_markup() -> None:
    done = bot_cli("run", "help roles")
    assert done.returncode == 0, done.stderr
    assert "guide: Authentication & Authorization → Role Permission Issues" in done.stdout
    assert "&amp;" not in done.stdout
