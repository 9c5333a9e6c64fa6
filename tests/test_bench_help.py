"""Every benchmark still starts after the layout moves: `python bench/<x>.py --help` runs
each one's imports and argument parser (all of them at once, as processes)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = {"timing.py"}  # imported by the benchmarks, not run


def benches() -> list[Path]:
    return sorted(p for p in (ROOT / "bench").glob("*.py") if p.name not in LIBRARIES)


async def _help(path: Path) -> tuple[str, int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(path),
        "--help",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    return path.name, proc.returncode or 0, out.decode(errors="replace")


async def test_every_bench_starts_with_help() -> None:
    found = benches()
    assert len(found) >= 18
    results = await asyncio.gather(*(_help(p) for p in found))
    broken = [f"{name}: rc={rc}\n{out[-800:]}" for name, rc, out in results if rc != 0]
    assert broken == []
    assert all("usage:" in out for _, _, out in results)
