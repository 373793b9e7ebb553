"""Bounded work on the real server: an oversized request is refused at once and stalls no one, overload is answered
429 with ``Retry-After``, and SIGTERM ends the server (streams and all) in bounded time.

The admission and shutdown tests run on a server of their own with small limits (``LETHE_MAX_CONCURRENT_REQUESTS=2``,
``LETHE_SHUTDOWN_TIMEOUT_S=2``); the last test stops it. The engine-free versions: ``tests/test_request_limits.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from server.config import STOP_GRACE_S
from tests.conftest import API_KEY, RunningServer, auth_headers, start_server, stop_server

SHUTDOWN_TIMEOUT_S = 2
# Tens of megabytes of SSE (16 choices x 1000 tokens, each with its 20 top logprobs) behind a client receive buffer of
# a few kilobytes: a client that stops reading holds the stream, and its admission slot, open however fast the engine
# is (the server's socket buffer takes at most a few megabytes; uvicorn then waits for the client).
LONG_STREAM = {"messages": [{"role": "user", "content": "The"}], "max_tokens": 1000, "ignore_eos": True,
               "stream": True, "n": 16, "temperature": 1, "logprobs": True, "top_logprobs": 20}
SMALL_RECEIVE_BUFFER = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]


def test_a_hundred_thousand_prompts_are_refused_at_once_and_stall_no_one(http: httpx.Client, model_name: str) -> None:
    """Once, this request got no answer in 120 s and every chat request hung for five minutes after it."""
    started = time.monotonic()
    response = http.post("/v1/completions", json={"model": model_name, "prompt": ["a"] * 100_000, "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert time.monotonic() - started < 10
    reply = http.post("/v1/chat/completions", json={"model": model_name, "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
    assert reply.status_code == 200


def test_metrics_name_no_target_and_no_unknown_path(http: httpx.Client) -> None:
    for i in range(50):
        http.get(f"/v1/probe-{i}")
    metrics = http.get("/metrics").text
    assert "probe-" not in metrics
    assert 'target="' not in metrics


@pytest.fixture(scope="module")
def bounded_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("bounded") / "server.log", {
        "LETHE_MAX_CONCURRENT_REQUESTS": "2", "LETHE_MAX_CONNECTIONS": "64",
        "LETHE_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S)})
    yield server
    stop_server(server)


def _open_stream(stack: ExitStack, server: RunningServer, model: str, *, stalled: bool = False) -> Iterator[str]:
    """A long stream, opened and read up to its first chunk (so it holds its admission slot); its remaining lines.
    ``stalled``: behind a tiny receive buffer, so the server cannot finish it while the client does not read."""
    transport = httpx.HTTPTransport(socket_options=SMALL_RECEIVE_BUFFER if stalled else None)
    session = stack.enter_context(httpx.Client(base_url=server.base_url, headers=auth_headers(), timeout=120,
                                               transport=transport))
    response = stack.enter_context(session.stream("POST", "/v1/chat/completions",
                                                  json={"model": model, **LONG_STREAM}))
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data: "))
    return lines


def _model(server: RunningServer) -> str:
    return httpx.get(f"{server.base_url}/v1/models", headers=auth_headers()).json()["data"][0]["id"]


def test_requests_past_the_admission_limit_get_429_with_retry_after(bounded_server: RunningServer) -> None:
    model = _model(bounded_server)
    client = openai.OpenAI(base_url=f"{bounded_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    with ExitStack() as stack:
        # held: a dropped iterator closes its connection
        streams = [_open_stream(stack, bounded_server, model, stalled=True) for _ in range(2)]
        response = httpx.post(f"{bounded_server.base_url}/v1/chat/completions", headers=auth_headers(), timeout=30,
                              json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert response.status_code == 429, response.text
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=model, prompt="Hi", max_tokens=2)
        del streams
    deadline = time.monotonic() + 30  # the closed streams give their slots back
    while True:
        try:
            client.completions.create(model=model, prompt="Hi", max_tokens=2)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "slots of closed streams never came back"
            time.sleep(0.2)


def test_sigterm_ends_the_server_with_streams_open(bounded_server: RunningServer) -> None:
    """Runs last: it stops the module's server. SIGTERM goes to the server process alone, as orchestrators send it."""
    model = _model(bounded_server)
    children = psutil.Process(bounded_server.process.pid).children(recursive=True)
    ended: list[str] = []
    with ExitStack() as stack:
        streams = [_open_stream(stack, bounded_server, model) for _ in range(2)]

        def drain(lines: Iterator[str]) -> None:
            try:
                for _ in lines:
                    pass
                ended.append("closed")
            except httpx.HTTPError as exc:
                ended.append(type(exc).__name__)

        readers = [threading.Thread(target=drain, args=(lines,), daemon=True) for lines in streams]
        for reader in readers:
            reader.start()
        started = time.monotonic()
        os.kill(bounded_server.process.pid, signal.SIGTERM)
        bounded_server.process.wait(timeout=SHUTDOWN_TIMEOUT_S + STOP_GRACE_S + 15)
        stopped_after = time.monotonic() - started
        for reader in readers:
            reader.join(timeout=10)
    assert len(ended) == 2, "a stream outlived its server"
    assert stopped_after < SHUTDOWN_TIMEOUT_S + STOP_GRACE_S + 5, stopped_after
    deadline = time.monotonic() + 15
    while any(_alive(child) for child in children):  # the engine process did not outlive the server either
        assert time.monotonic() < deadline, [child.pid for child in children if _alive(child)]
        time.sleep(0.2)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
