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


class PostgresServer:
    """One throwaway cluster on a loopback port, which a test can stop and start again (an outage) on the same data."""

    def __init__(self) -> None:
        prefix = _run_as_prefix()
        assert prefix is not None
        self._prefix = prefix
        self.root = Path(tempfile.mkdtemp(prefix="lethe-pg-"))
        self._data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.port = _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/lethe"
        subprocess.run([*prefix, _bin("initdb"), "-D", str(self._data), "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run([*self._prefix, _bin("pg_ctl"), "-D", str(self._data), "-o", options, "-l",
                        str(self.root / "log"), "-w", "start"], check=True, stdout=subprocess.DEVNULL)

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash (open connections are cut); ``fast`` ends every session as a restart for
        maintenance does."""
        subprocess.run([*self._prefix, _bin("pg_ctl"), "-D", str(self._data), "-m", mode, "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def create_database(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            created = subprocess.run([*self._prefix, _bin("createdb") or "createdb", "-h", "127.0.0.1", "-p",
                                      str(self.port), "-U", "postgres", "lethe"], capture_output=True)
            if created.returncode == 0 or time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh running cluster with an empty ``lethe`` database; stopped and deleted after."""
    server = PostgresServer()
    try:
        server.start()
        server.create_database()
        yield server
    finally:
        server.remove()


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
