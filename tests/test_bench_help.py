"""Every benchmark still starts after the layout moves: `python bench/<x>.py --help` runs
each one's imports and argument parser (in this process, as `runpy` runs a script, so the
imports are paid once)."""

from __future__ import annotations

import contextlib
import io
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = {"timing.py"}  # imported by the benchmarks, not run
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name not in LIBRARIES)


def test_there_are_benches() -> None:
    assert len(BENCHES) >= 18


@pytest.mark.parametrize("path", BENCHES, ids=[p.stem for p in BENCHES])
def test_every_bench_starts_with_help(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(path.parent))  # as `python bench/x.py` puts it first
    monkeypatch.setattr("sys.argv", [str(path), "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as ended:
        runpy.run_path(str(path), run_name="__main__")
    assert ended.value.code in (0, None)
    assert "usage:" in out.getvalue()
