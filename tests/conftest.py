"""Shared fixtures: the tiny demo model, one real Lethe server (real vLLM engine) per test session, clients.

vLLM takes ~30 s to start on CPU, so the server is started once, as a subprocess exactly as an operator runs it
(`lethe serve`), and every integration test talks to it over HTTP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from server.config import Settings

REPO = Path(__file__).resolve().parent.parent
LETHE_BIN = Path(sys.executable).parent / "lethe"
API_KEY = "test-inference-key"
ADMIN_KEY = "test-admin-key-of-26-chars"
STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path
    env: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# A verification run (~250 greedy replies) after every registration would load the engine under the suite's other
# tests, some of which time the server on 2 cores: the suite's servers verify on demand only (the browser test presses
# the report's button); queueing after changes is tested without an engine (tests/test_erasure_report.py).
VERIFY_ON_DEMAND = {"LETHE_VERIFY_AFTER_CHANGES": "false"}


def start_server(model_dir: Path, log_path: Path, env_overrides: dict[str, str] | None = None) -> RunningServer:
    """Start ``lethe serve`` and wait until ``/health`` is 200; fail with the server log if it never is.

    Each server gets its own data dir (SQLite registry, artifacts) next to its log unless the caller shares one.
    """
    return start_servers(model_dir, [(log_path, env_overrides)])[0]


def start_servers(model_dir: Path, servers: list[tuple[Path, dict[str, str] | None]]) -> list[RunningServer]:
    """Start several ``lethe serve`` at once (each ``(log path, environment overrides)``), then wait until all are
    healthy: a start is mostly one process importing vLLM at a time, so two starting together take little longer
    than one (about 50 s each here)."""
    started = [_launch(model_dir, log_path, env) for log_path, env in servers]
    try:
        for server in started:
            _wait_healthy(server)
    except BaseException:
        for server in started:
            stop_server(server)
        raise
    return started


def _launch(model_dir: Path, log_path: Path, env_overrides: dict[str, str] | None) -> RunningServer:
    port = free_port()
    env = {**os.environ, "LETHE_API_KEYS": API_KEY, "LETHE_ADMIN_KEY": ADMIN_KEY, "LETHE_LOG_LEVEL": "INFO",
           "LETHE_DATA_DIR": str(log_path.parent / "data"), **VERIFY_ON_DEMAND, **(env_overrides or {})}
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [str(LETHE_BIN), "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
    )
    return RunningServer(process, f"http://127.0.0.1:{port}", log_path, env)


def _wait_healthy(server: RunningServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"lethe serve exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"lethe serve did not become healthy:\n{server.log()[-4000:]}")


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


def run_lethe_eval(server: RunningServer, admin: httpx.Client, benchmark: str, *args: str) -> None:
    """``lethe eval BENCHMARK --base-url SERVER ARGS`` as a user runs it (a subprocess, the admin key in its
    environment), on a registry it finds empty; fails with the command's stderr."""
    assert admin.get("/targets").json()["data"] == [], "an earlier test left targets registered"
    env = {**os.environ, "LETHE_ADMIN_KEY": ADMIN_KEY, "LETHE_API_KEYS": API_KEY, "LETHE_LOG_LEVEL": "WARNING"}
    done = subprocess.run([str(LETHE_BIN), "eval", benchmark, "--base-url", server.base_url, *args],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--model-dir", default=None,
                     help="run the suite against this built model directory instead of (building) the tiny demo model")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One throwaway PostgreSQL server for the session's registry tests (``tests.postgres.fresh_database`` gives each
    test its own database on it)."""
    from tests.postgres import postgres_available, running_postgres

    if not postgres_available():
        pytest.fail("PostgreSQL is not installed: .ci/run installs Debian's `postgresql` package")
    with running_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty registry database URL, once on SQLite and once on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    from tests.postgres import fresh_database

    return fresh_database(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def tiny_model_dir(request: pytest.FixtureRequest) -> Path:
    from demo.builder import build_demo_model

    given = request.config.getoption("--model-dir")
    return Path(given) if given else build_demo_model(Settings().cache_dir, "tiny", progress=False)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    """The served model's tokenizer, to speak token ids with the server."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# The shared server purges a deleted target's artifacts seconds after its deletion (tests/test_erasure_server.py);
# the grace still covers a job's store-then-publish on a busy CI host. It runs speculative prefill (off by default),
# so every end-to-end test through it checks protection and plain-vLLM identity with it on; the other test servers
# run the default.
SHARED_SERVER_ENV = {"LETHE_ERASURE_GRACE_S": "15", "LETHE_ERASURE_INTERVAL_S": "1",
                     "LETHE_SPECULATIVE_PREFILL": "true"}


@pytest.fixture(scope="session")
def lethe_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("lethe") / "server.log", SHARED_SERVER_ENV)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def model_name(lethe_server: RunningServer) -> str:
    return httpx.get(f"{lethe_server.base_url}/v1/models", headers=auth_headers()).json()["data"][0]["id"]


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def unfinished_requests(base_url: str) -> float:
    """Requests the server's engine still holds (``lethe_engine_unfinished_requests``)."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith("lethe_engine_unfinished_requests "))
    return float(line.split()[1])


@pytest.fixture(scope="session")
def admin(lethe_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{lethe_server.base_url}/admin/v1", headers=admin_headers(), timeout=60) as session:
        yield session


def remove_targets(admin: httpx.Client, target_ids: list[str]) -> None:
    """Delete a module's targets and wait until the server serves the registry without them: the next module's
    requests must not meet a target that is deleted but still in the served snapshot (the poll takes up to 0.25 s)."""
    revision = 0
    for target_id in target_ids:
        response = admin.delete(f"/targets/{target_id}")
        if response.status_code == 200:
            revision = response.json()["revision"]
    deadline = time.monotonic() + 10
    while admin.get("/registry").json()["serving_revision"] < revision:
        assert time.monotonic() < deadline, f"registry revision {revision} not served after 10 s"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def client(lethe_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lethe_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def async_client(lethe_server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{lethe_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(lethe_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lethe_server.base_url, headers=auth_headers(), timeout=120) as session:
        yield session


@pytest.fixture(scope="session")
def baseline(lethe_server: RunningServer, model_name: str, admin: httpx.Client):
    """The unprotected tiny model's replies to the forget01 questions (measured once, before any target exists)."""
    from tests.unlearning import measure_baseline

    return measure_baseline(lethe_server, model_name, admin)
