"""The floors of `bot/` and `commands/` stay clean: every import (module level, inside
functions, under TYPE_CHECKING) goes down or sideways, never up, and no two modules import
each other, however far round.

The allowed directions are written once, here: FLOORS, lowest first. A module may import
modules of its own floor or of a lower one. `commands` imports neither `bot` nor Slack.
`bench/` and `tests/` may import anything. `python tests/test_floors.py` prints the
modules' floors, arrows and circles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "commands")

# Lowest first: (floor, the module prefixes that live on it).
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("commands", ("commands",)),
    (
        "plain",
        (
            "bot",  # the package itself (its __init__)
            "bot.settings",
            "bot.clock",
            "bot.metrics",
            "bot.tasks",
            "bot.embedded_pg",
            "bot.gateway",
            "bot.router",
        ),
    ),
    ("state", ("bot.state",)),
    ("messages", ("bot.messages",)),
    ("access", ("bot.access",)),
    ("approvals", ("bot.approvals",)),
    ("incidents", ("bot.incidents",)),
    ("house", ("bot.house",)),
    ("slack", ("bot.slack",)),
    ("console", ("bot.console", "bot.__main__")),
)
# Third-party packages a floor must never import.
FORBIDDEN = {"commands": ("slack_bolt", "slack_sdk", "bot")}


def modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts and "versions" in path.parts:
                continue  # Alembic revisions: loaded by Alembic, import nothing of ours
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported_names(path: Path, module: str) -> Iterator[str]:
    """Every module name an import statement anywhere in the file names."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            for alias in node.names:
                yield f"{base}.{alias.name}"  # `from bot.x import y`: y may be a module


def graph() -> dict[str, set[str]]:
    """Module -> the modules of the packages it imports (submodules resolved)."""
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for name in imported_names(path, module):
            target = name
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                edges[module].add(target)
    return edges


def floor_of(module: str) -> int:
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            fits = module == prefix or module.startswith(prefix + ".")
            if fits and len(prefix) > best_len and (prefix != "bot" or module == "bot"):
                best, best_len = index, len(prefix)
    return best


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def depth(edges: dict[str, set[str]], within: str) -> int:
    """The longest chain of imports among the modules under `within`: its floors."""
    memo: dict[str, int] = {}

    def height(v: str) -> int:
        if v not in memo:
            memo[v] = 0
            below = [height(w) for w in edges[v] if w.startswith(within)]
            memo[v] = 1 + max(below, default=0)
        return memo[v]

    return max((height(v) for v in edges if v.startswith(within)), default=0)


def test_every_module_has_a_floor() -> None:
    assert [m for m in modules() if floor_of(m) < 0] == []


def test_no_import_goes_up_a_floor() -> None:
    edges = graph()
    upward = [
        f"{m} ({FLOORS[floor_of(m)][0]}) imports {t} ({FLOORS[floor_of(t)][0]})"
        for m, targets in sorted(edges.items())
        for t in sorted(targets)
        if floor_of(t) > floor_of(m)
    ]
    assert upward == []


def test_no_circle_between_modules() -> None:
    assert circles(graph()) == []


def test_commands_import_neither_slack_nor_bot() -> None:
    known = modules()
    bad = [
        f"{m} imports {name}"
        for m, path in sorted(known.items())
        for floor, banned in FORBIDDEN.items()
        if FLOORS[floor_of(m)][0] == floor
        for name in imported_names(path, m)
        if name.split(".")[0] in banned
    ]
    assert bad == []


def test_the_checker_sees_imports_inside_functions_and_type_checking(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from bot.slack import app\n"
        "def f():\n    import bot.console.cli\n"
        "from . import sibling\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source, encoding="utf-8")
    names = set(imported_names(path, "commands.probe"))
    assert {"bot.slack.app", "bot.console.cli", "commands.sibling"} <= names


def test_at_most_ten_files_at_the_top_of_bot() -> None:
    top = sorted(p.name for p in (ROOT / "bot").glob("*.py"))
    assert len(top) <= 10, top


if __name__ == "__main__":
    edges = graph()
    for within in ("bot", "commands"):
        arrows = sum(1 for m, ts in edges.items() if m.startswith(within) for _ in ts)
        inside = sum(
            1 for m, ts in edges.items() if m.startswith(within) for t in ts if t.startswith(within)
        )
        print(
            f"{within}: {sum(1 for m in edges if m.startswith(within))} modules, "
            f"{depth(edges, within)} floors, {inside} arrows inside ({arrows} in all), "
            f"{len(circles(edges))} circles"
        )
    pairs = {(floor_of(m), floor_of(t)) for m, ts in edges.items() for t in ts}
    between = sorted((a, b) for a, b in pairs if a != b)
    print(
        f"floors of packages: {len(FLOORS)}; {len(between)} directions used between them: "
        + ", ".join(f"{FLOORS[a][0]}->{FLOORS[b][0]}" for a, b in between)
    )
