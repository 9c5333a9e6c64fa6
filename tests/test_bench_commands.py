"""`bench/all_commands.py`'s own arithmetic and choices, without a database: what it times
(every diagnostic issue 16 names, every row-writing remedy's plan but restore-from-copy),
the watchdog's share of a core, and `--only` refusing a name it does not know."""

from __future__ import annotations

from pathlib import Path

import pytest

from commands.remedies.base import REMEDIES

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_what_the_commands_bench_times(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/all_commands.py` runs it
    import all_commands as b

    names = b.spec_names()
    assert len(names) == len(set(names))
    for word in ("health", "integrity", "quota", "recover", "explain", "export", "analytics"):
        assert any(n.split("_")[0] == word for n in names), word
    planned = {r.name for _, r, _ in b.planned_remedies()}
    writing = {n for n, r in REMEDIES.items() if r.preflight or r.runbook}
    assert planned == writing - {"restore-from-copy"}
    assert {"reconcile-points", "recover-runbook", "set-role"} <= planned
    # one 60 s tick costing 0.3 s, and a 36 s baseline once an hour: 0.3 + 36/60 = 0.9 s
    assert b.watchdog_pct(0.3, 36.0, 60.0, 3600.0) == pytest.approx(1.5)
    assert b.picked(None, names) == names
    assert b.picked("quota, health", names) == ["health", "quota"]
    with pytest.raises(SystemExit, match="unknown nope"):
        b.picked("health,nope", names)
