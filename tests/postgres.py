"""A throwaway PostgreSQL server for the tests (Debian's postgresql package, run as the `postgres` user)."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_databases = itertools.count()


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def postgres_available() -> bool:
    return all(_bin(name) for name in ("initdb", "pg_ctl")) and _run_as_prefix() is not None


def _run_as_prefix() -> list[str] | None:
    """initdb refuses to run as root: run the server as the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return [runuser, "-u", "postgres", "--"] if runuser else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    """A running throwaway cluster that a test can stop and start again (an outage of the registry database)."""

    url: str
    _data: Path
    _options: str
    _log: Path

    def stop(self) -> None:
        """Stop the server at once (``-m immediate``: like a crash, open connections are cut)."""
        subprocess.run([*_run_as_prefix(), _bin("pg_ctl"), "-D", str(self._data), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        subprocess.run([*_run_as_prefix(), _bin("pg_ctl"), "-D", str(self._data), "-o", self._options, "-l",
                        str(self._log), "-w", "start"], check=True, stdout=subprocess.DEVNULL)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a fresh cluster on a free loopback port; yields it (``.url``: its SQLAlchemy URL); stops and deletes it
    after."""
    prefix = _run_as_prefix()
    assert prefix is not None
    root = Path(tempfile.mkdtemp(prefix="lethe-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()
    subprocess.run([*prefix, _bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    server = PostgresServer(f"postgresql+psycopg://postgres@127.0.0.1:{port}/lethe", data, options, root / "log")
    server.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            created = subprocess.run([*prefix, _bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port),
                                      "-U", "postgres", "lethe"], capture_output=True)
            if created.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new empty database on the server of ``server_url``; returns its URL (one per test: no shared state)."""
    from sqlalchemy import create_engine, text

    name = f"t{next(_databases)}_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def running_postgres() -> Iterator[str]:
    """Start a fresh cluster on a free loopback port; yields its SQLAlchemy URL; stops and deletes it after."""
    with postgres_server() as server:
        yield server.url
