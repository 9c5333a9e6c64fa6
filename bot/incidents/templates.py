"""The user notification and the technical team alert: Jinja2 files, filled with figures.

The files ship with the bot (`bot/templates/*.md.j2`); an operator overrides one by
putting a file of the same name in `TEMPLATE_DIR`. Rendering is strict: a variable the
incident cannot supply yet (no verification against a baseline, say) stops the
rendering with its name, so nothing goes out with a blank or a placeholder in it. Every
value is escaped for mrkdwn on its way into the text, except those already made safe
(mentions, timeline lines).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    UndefinedError,
)
from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ContextBlock,
    ConversationFilter,
    ConversationSelectElement,
    MarkdownTextObject,
    SectionBlock,
)

from bot.incidents.facts import Mrkdwn
from bot.messages.render import MAX_SECTION_CHARS, SlackMessage, esc
from commands.incidents.comms import AUDIENCES, Audience

TEMPLATE_FILES: dict[Audience, str] = {"user": "user.md.j2", "tech": "tech.md.j2"}
POST = "dbops_template_post"  # the button
PICK = "dbops_template_channel"  # the channel picker next to it
PICK_BLOCK = "dbops_template_pick"

# What to do when a value is missing, by its name (others: the name alone).
WHY_MISSING = {
    "recovery": "no recovery verification against a baseline yet: run `/db recover` here",
    "baseline_at": "no recovery verification against a baseline yet: run `/db recover` here",
    "verified_at": "no recovery verification against a baseline yet: run `/db recover` here",
    "affected": "no recovery verification against a baseline yet: run `/db recover` here",
    "lost": "no recovery verification against a baseline yet: run `/db recover` here",
    "data_loss_window": "no recovery verification against a baseline yet: run `/db recover` here",
    "resolved_at": "the incident is not resolved yet",
}


class MissingValue(UndefinedError):
    """A template asked for a value the incident does not have."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"{name!r} is undefined")

    def explain(self, template: str) -> str:
        why = WHY_MISSING.get(self.name)
        return f"`{template}` needs `{self.name}`, which this incident has no value for" + (
            f" ({why})" if why else ""
        )


class _Strict(StrictUndefined):
    """StrictUndefined that says which name was missing (the attribute for `a.b`)."""

    __slots__ = ()

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise MissingValue(self._undefined_name or "?")


def _finalize(value: Any) -> Any:
    if isinstance(value, Mrkdwn):
        return value
    return esc(value)


@lru_cache(maxsize=8)
def environment(template_dir: Path | None) -> Environment:
    loaders: list[BaseLoader] = []
    if template_dir is not None:
        loaders.append(FileSystemLoader(str(template_dir)))
    loaders.append(PackageLoader("bot", "templates"))
    return Environment(
        loader=ChoiceLoader(loaders),
        undefined=_Strict,
        finalize=_finalize,
        autoescape=False,  # mrkdwn, not HTML: `_finalize` escapes for Slack
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )


def render(audience: Audience, values: dict[str, Any], template_dir: Path | None = None) -> str:
    """The filled template; `MissingValue` names what the incident lacks."""
    template = environment(template_dir).get_template(TEMPLATE_FILES[audience])
    try:
        text = template.render(values)
    except MissingValue:
        raise
    except UndefinedError as exc:  # raised by Jinja itself rather than our Undefined
        raise MissingValue(str(exc).split("'")[1] if "'" in str(exc) else str(exc)) from exc
    return text.strip() + "\n"


def _sections(text: str) -> list[Block]:
    """The text in sections of at most 3000 characters, split between lines."""
    blocks: list[Block] = []
    chunk = ""
    for line in text.splitlines(keepends=True):
        if len(chunk) + len(line) > MAX_SECTION_CHARS:
            blocks.append(SectionBlock(text=MarkdownTextObject(text=chunk)))
            chunk = ""
        chunk += line[:MAX_SECTION_CHARS]
    if chunk.strip():
        blocks.append(SectionBlock(text=MarkdownTextObject(text=chunk)))
    return blocks[:45]


def message(audience: Audience, text: str) -> SlackMessage:
    """The filled template as it is posted to a channel."""
    return SlackMessage(text=text, blocks=_sections(text))


def preview(
    audience: Audience, text: str, incident_id: int, default_channel: str | None
) -> SlackMessage:
    """The preview in the incident thread: the text, a channel picker and the button."""
    label = AUDIENCES[audience]
    picker = ConversationSelectElement(
        action_id=PICK,
        placeholder="Channel to post to",
        initial_conversation=default_channel,
        filter=ConversationFilter(include=["public", "private"], exclude_bot_users=True),
    )
    button = ButtonElement(
        text="Post to channel…",
        action_id=POST,
        value=json.dumps({"incident": incident_id, "audience": audience}),
        style="primary",
    )
    head = ContextBlock(
        elements=[
            MarkdownTextObject(
                text=f"Preview of the *{label}* (`{TEMPLATE_FILES[audience]}`): pick a channel "
                "and press the button. The figures are measured again when it is posted."
            )
        ]
    )
    blocks = [head, *_sections(text), ActionsBlock(block_id=PICK_BLOCK, elements=[picker, button])]
    return SlackMessage(text=f"Preview of the {label}", blocks=blocks)


def chosen_channel(body: dict[str, Any]) -> str | None:
    """The channel picked in the preview, from the click's `state.values`."""
    values = (body.get("state") or {}).get("values") or {}
    for block in values.values():
        if isinstance(block, dict) and isinstance(block.get(PICK), dict):
            picked = block[PICK].get("selected_conversation")
            return str(picked) if picked else None
    return None
