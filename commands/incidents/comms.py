"""`/db incident template user|tech` and `/db incident summary [--file]`: their arguments.

Kept apart from `commands.incidents.lifecycle` so the lifecycle and the communications can change
side by side; `commands.incidents.lifecycle.parse` hands these two verbs here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from commands.base import UsageError

Audience = Literal["user", "tech"]
AUDIENCES: dict[Audience, str] = {
    "user": "user notification",
    "tech": "technical team alert",
}
SUBCOMMANDS: dict[str, str] = {
    "template": "/db incident template user|tech",
    "summary": "/db incident summary [--file]",
}


@dataclass(frozen=True)
class Template:
    audience: Audience


@dataclass(frozen=True)
class Summary:
    file: bool


def parse(verb: str, rest: str) -> Template | Summary:
    words = rest.split()
    if verb == "template":
        if len(words) != 1 or words[0].lower() not in AUDIENCES:
            raise UsageError("`template` takes one of: " + ", ".join(AUDIENCES))
        return Template(words[0].lower())  # type: ignore[arg-type]
    if any(w.lower() != "--file" for w in words):
        raise UsageError("`summary` takes only `--file`")
    return Summary(file=bool(words))
