"""Tests of the embedded PostgreSQL server against real server binaries."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

import bot.embedded_pg as embedded_pg
from bot.embedded_pg import (
    NO_BINARIES_MESSAGE,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_binaries,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def port_is_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as pg:
        yield pg


@pytest.fixture
def listening_socket() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_start_connect_and_stop_cleans_up() -> None:
    pg = EmbeddedPostgres()
    pg.start()
    try:
        run_dir = pg.data_dir.parent
        port = pg.port
        assert pg.running
        assert pg.dsn() == f"postgresql://postgres:{pg.password}@127.0.0.1:{port}/postgres"
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(pg.dsn().replace(pg.password, "wrong"), connect_timeout=5)
        assert (run_dir / f".s.PGSQL.{port}").exists()
        with pytest.raises(psycopg.OperationalError, match="password"):  # the socket too
            psycopg.connect(host=str(run_dir), port=port, user="postgres", connect_timeout=5)
        with psycopg.connect(pg.dsn()) as conn:
            row = conn.execute("SELECT version(), current_user").fetchone()
        assert row is not None
        assert str(row[0]).startswith("PostgreSQL ")
        assert row[1] == "postgres"
        assert pg.log_path.is_file()
        if os.geteuid() == 0:
            # The server cannot run as root, so it must own its data as someone else.
            assert pg.data_dir.stat().st_uid != 0
    finally:
        pg.stop()
    assert not pg.running
    assert not run_dir.exists()
    assert not port_is_open(port)
    pg.stop()  # idempotent


def test_server_is_tuned_for_throwaway_data(server: EmbeddedPostgres) -> None:
    with psycopg.connect(server.dsn()) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (["fsync", "synchronous_commit", "full_page_writes", "max_connections"],),
            ).fetchall()
        )
        listen = conn.execute("SHOW listen_addresses").fetchone()
        encoding = conn.execute("SHOW server_encoding").fetchone()
    assert settings == {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
    }
    assert listen == ("127.0.0.1",)
    assert encoding == ("UTF8",)


def test_create_database_from_template(server: EmbeddedPostgres) -> None:
    template = 'Template "odd" name'
    template_dsn = server.create_database(template)
    with psycopg.connect(template_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO users VALUES (1, 'ada')")

    copy_dsn = server.create_database("copy_of_template", template=template)
    assert copy_dsn == server.dsn("copy_of_template")
    with psycopg.connect(copy_dsn) as conn:
        assert conn.execute("SELECT name FROM users").fetchall() == [("ada",)]

    server.drop_database("copy_of_template")
    server.drop_database(template)
    with psycopg.connect(server.dsn()) as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
    assert template not in names
    assert "copy_of_template" not in names


def test_drop_database_disconnects_sessions(server: EmbeddedPostgres) -> None:
    dsn = server.create_database("busy")
    with psycopg.connect(dsn) as conn:
        server.drop_database("busy")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    server.drop_database("busy")  # absent is fine


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A base dir the server's OS user can reach even when tests run as root.

    pytest's tmp_path lives under a 0700 directory, which an unprivileged server cannot enter.
    """
    path = Path(tempfile.mkdtemp(prefix="dbops-pg-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_settings_override_and_keep(shared_tmp: Path) -> None:
    with EmbeddedPostgres(base_dir=shared_tmp, keep=True, settings={"work_mem": "7MB"}) as pg:
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)
        data_dir = pg.data_dir
    assert data_dir.parent.parent == shared_tmp
    assert (data_dir / "PG_VERSION").is_file()
    assert not (data_dir / "postmaster.pid").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root drops privileges")
def test_unreachable_base_dir_is_reported(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    pg = EmbeddedPostgres(base_dir=private)
    with pytest.raises(EmbeddedPostgresError, match="not reachable by the OS user"):
        pg.start()
    assert not pg.running
    assert list(private.iterdir()) == []


def test_missing_binaries_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_BIN", str(tmp_path))
    with pytest.raises(EmbeddedPostgresError) as info:
        find_binaries(search_system=False, search_pip=False)
    assert str(info.value).startswith(NO_BINARIES_MESSAGE)
    assert str(tmp_path) in str(info.value)


def test_pg_bin_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    real = find_binaries()
    monkeypatch.setenv("PG_BIN", str(real))
    assert find_binaries(search_system=False, search_pip=False) == real


def test_explicit_bin_dir_without_programs(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(bin_dir=tmp_path)
    with pytest.raises(EmbeddedPostgresError, match="does not hold initdb"):
        pg.start()
    assert not pg.running


def test_busy_port_fails_clearly_and_cleans_up(listening_socket: socket.socket) -> None:
    port = listening_socket.getsockname()[1]
    pg = EmbeddedPostgres(port=port)
    with pytest.raises(EmbeddedPostgresError, match="already in use"):
        pg.start()
    assert not pg.running
    assert not pg.data_dir.parent.exists()


def test_lost_port_race_is_retried(
    listening_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = listening_socket.getsockname()[1]
    ports = iter([taken])
    real_free_port = embedded_pg._free_port
    monkeypatch.setattr(embedded_pg, "_free_port", lambda: next(ports, None) or real_free_port())
    with EmbeddedPostgres() as pg:
        assert pg.port != taken
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_server_goes_away_when_owner_is_killed() -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from bot.embedded_pg import EmbeddedPostgres
        pg = EmbeddedPostgres()
        pg.start()
        print(pg.port, pg.data_dir.parent, flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        port_text, run_dir_text = owner.stdout.readline().split()
        port, run_dir = int(port_text), Path(run_dir_text)
        assert port_is_open(port)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert wait_until(lambda: not port_is_open(port), 20)
        assert wait_until(lambda: not run_dir.exists(), 20)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
