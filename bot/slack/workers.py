"""Several HTTP worker processes on one port (SO_REUSEPORT), for bursts of commands.

One Python process acks a `/db` command in about 0.3-0.5 ms of CPU; during an incident
a whole channel may type at once. The kernel spreads connections over the workers;
each worker is a complete bot (its own pool and coalescing), and everything shared
across workers lives in the state store, as it does across replicas.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from prometheus_client import multiprocess

from bot.metrics import MULTIPROC_ENV

log = logging.getLogger(__name__)


def supervise(workers: int, port: int, host: str) -> int:
    """Run `workers` copies of `serve --reuse-port`; stop all when one stops or on a signal.

    The workers share a fresh metrics directory (unless the operator set one), so that
    /metrics, answered by any one of them, counts what all of them did.
    """
    own_dir = None if os.environ.get(MULTIPROC_ENV) else tempfile.mkdtemp(prefix="dbops-metrics-")
    env = {**os.environ, **({MULTIPROC_ENV: own_dir} if own_dir else {})}
    try:
        return _run(workers, port, host, env)
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


def _run(workers: int, port: int, host: str, env: dict[str, str]) -> int:
    command = [sys.executable, "-m", "bot", "serve", "--port", str(port), "--host", host]
    procs = [
        subprocess.Popen([*command, "--workers", "1", "--reuse-port"], env=env)
        for _ in range(workers)
    ]
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while not stopping:
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            code = ended[0].returncode or 0
            log.error("worker %d exited with %s; stopping the others", ended[0].pid, code)
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        multiprocess.mark_process_dead(p.pid, env[MULTIPROC_ENV])  # type: ignore[no-untyped-call]
    return code
