"""Bounded work per request and a safe request surface, without an engine: size caps answered 400 before any prompt
is read, an admission limit answered 429, rendering off the event loop, bounded metrics labels, no model path on
``/v1/models``, and a stop that always ends (the same on the real server: ``tests/test_errors.py``,
``tests/test_hardening_requests.py``, ``tests/test_openai_api.py``).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.admission import Admission
from server.app import create_app
from server.config import Settings
from server.errors import Overloaded, RequestTooLarge
from server.http_server import LetheServer, StopDeadline, server_config
from server.metrics import Metrics
from server.openai.limits import RequestLimits
from server.openai.protocol import MAX_INT32, ChatCompletionRequest, CompletionRequest
from server.openai.serving import OpenAIServing
from server.pipeline import Pipeline
from server.run import RunRequest
from tests.pipeline_fakes import HI, CharTokenizer, FakeEngine, FakeMechanism, collect, guarded

MODEL_PATH = Path("/srv/models/private-checkout")


def settings(**overrides: Any) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


def make_app(engine: FakeEngine | None = None, **overrides: Any) -> tuple[FastAPI, FakeEngine, list[RunRequest]]:
    """The real app (middleware, routes, error handlers) around a pipeline on a fake engine; records what reached
    the pipeline."""
    engine = engine or FakeEngine()
    config = settings(**overrides)
    app = create_app(config, MODEL_PATH, engine.info.served_model_name)
    pipeline = Pipeline(engine, 5, app.state.metrics)  # type: ignore[arg-type]
    started: list[RunRequest] = []
    start = pipeline.start

    async def recording_start(request: RunRequest):
        started.append(request)
        return await start(request)

    pipeline.start = recording_start  # type: ignore[method-assign]
    app.state.serving = OpenAIServing(pipeline, engine.info, RequestLimits.from_settings(config))
    return app, engine, started


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error


# ---- size caps: 400 before any prompt is rendered ------------------------------------------------------------------


def test_a_hundred_thousand_prompts_are_refused_at_once_without_rendering_any() -> None:
    app, engine, started = make_app()
    client = TestClient(app)
    began = time.perf_counter()
    response = client.post("/v1/completions", json=completion(prompt=["a"] * 100_000))
    error = assert_openai_error(response, 400, "prompt")
    assert error["code"] == "array_above_max_length" and "64" in error["message"]
    assert time.perf_counter() - began < 5
    assert started == [] and engine.calls == []
    assert client.post("/v1/completions", json=completion(prompt=["a"] * 64)).status_code == 200


def test_prompts_times_n_is_capped() -> None:
    app, _, started = make_app(max_sequences_per_request=8)
    client = TestClient(app)
    response = client.post("/v1/completions", json=completion(prompt=["a"] * 3, n=3, temperature=1))
    error = assert_openai_error(response, 400, "n")
    assert "9 sequences" in error["message"] and started == []
    assert client.post("/v1/completions", json=completion(prompt=["a"] * 4, n=2, temperature=1)).status_code == 200


def test_chat_messages_are_capped() -> None:
    app, _, started = make_app(max_messages=4)
    client = TestClient(app)
    many = [{"role": "user", "content": "hi"}] * 5
    assert_openai_error(client.post("/v1/chat/completions", json=chat(messages=many)), 400, "messages")
    assert started == []


@pytest.mark.parametrize(("field", "value"), [
    ("stop", "x" * 257),
    ("stop", ["ok", "x" * 257]),
    ("logit_bias", {str(i): 1 for i in range(301)}),
    ("stop_token_ids", list(range(257))),
    ("top_k", 2**64),
    ("top_k", MAX_INT32 + 1),
    ("min_tokens", 2**64),
    ("max_tokens", 2**64),
])
def test_oversized_sampling_fields_are_refused_by_the_request_model(field: str, value: Any) -> None:
    for model, body in ((ChatCompletionRequest, chat()), (CompletionRequest, completion())):
        with pytest.raises(ValidationError) as info:
            model.model_validate({**body, field: value})
        assert info.value.errors()[0]["loc"][0] == field


def test_the_largest_allowed_values_still_validate() -> None:
    ChatCompletionRequest.model_validate(chat(stop=["x" * 256] * 16, stop_token_ids=list(range(256)), top_k=MAX_INT32,
                                              min_tokens=1))


def test_an_oversized_top_k_is_a_400_not_a_500_over_http() -> None:
    app, engine, _ = make_app()
    response = TestClient(app).post("/v1/chat/completions", json=chat(top_k=2**64))
    assert_openai_error(response, 400, "top_k")
    assert engine.calls == []


@pytest.mark.parametrize("raw", ['"temperature": NaN', '"top_p": Infinity', '"logit_bias": {"1": -Infinity}'])
def test_non_finite_numbers_are_refused(raw: str) -> None:
    app, _, started = make_app()
    body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], ' + raw + "}"
    response = TestClient(app).post("/v1/chat/completions", content=body,
                                    headers={"content-type": "application/json"})
    assert_openai_error(response, 400)
    assert started == []


def test_request_limits_count_sequences_per_prompt_form() -> None:
    limits = RequestLimits(max_prompts=4, max_sequences=8)
    assert limits.check_completion(CompletionRequest.model_validate(completion(prompt=[1, 2, 3], n=2))) == 2
    assert limits.check_completion(CompletionRequest.model_validate(completion(prompt=[[1], [2]], n=4))) == 8
    with pytest.raises(RequestTooLarge):
        limits.check_completion(CompletionRequest.model_validate(completion(prompt=["a"] * 5)))
    assert limits.check_chat(ChatCompletionRequest.model_validate(chat(n=8))) == 8


# ---- admission: 429 with Retry-After, the same for every request ---------------------------------------------------


def test_admission_counts_requests_and_sequences_and_gives_them_back_once() -> None:
    admission = Admission(max_requests=2, max_sequences=4)
    first = admission.enter()
    first.reserve(3)
    second = admission.enter()
    with pytest.raises(Overloaded) as info:
        admission.enter()
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
    with pytest.raises(Overloaded):
        second.reserve(2)
    second.reserve(1)
    first.release()
    first.release()
    assert (admission.requests, admission.sequences) == (1, 1)
    second.release()
    assert (admission.requests, admission.sequences) == (0, 0)


async def _wait_for(condition, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_requests_past_the_admission_limit_get_429_with_retry_after_and_slots_come_back() -> None:
    app, engine, started = make_app(FakeEngine(hang=True), max_concurrent_requests=1, max_connections=8)
    admission: Admission = app.state.admission
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lethe") as client:
        held = asyncio.create_task(client.post("/v1/completions", json=completion()))
        await _wait_for(lambda: len(engine.calls) == 1)
        response = await client.post("/v1/chat/completions", json=chat())
        error = assert_openai_error(response, 429)
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert response.headers["retry-after"] == "1"
        assert len(started) == 1  # the refused request was never rendered, so never classified
        held.cancel()  # the client goes away: its slot must come back
        await asyncio.gather(held, return_exceptions=True)
        assert (admission.requests, admission.sequences) == (0, 0)
        engine.hang = False
        assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200
        assert (admission.requests, admission.sequences) == (0, 0)
        metrics = (await client.get("/metrics")).text
        assert 'lethe_requests_total{endpoint="chat/completions",status="429"} 1.0' in metrics


async def test_sequences_in_flight_are_bounded_too() -> None:
    app, engine, _ = make_app(FakeEngine(hang=True), max_sequences_in_flight=4, max_sequences_per_request=4)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lethe") as client:
        held = asyncio.create_task(client.post("/v1/completions", json=completion(prompt=["a", "b", "c", "d"])))
        await _wait_for(lambda: len(engine.calls) == 4)
        assert_openai_error(await client.post("/v1/completions", json=completion()), 429)
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        assert (app.state.admission.requests, app.state.admission.sequences) == (0, 0)


def test_a_refused_request_gives_its_slot_back() -> None:
    app, _, _ = make_app(max_concurrent_requests=1, max_connections=8)
    client = TestClient(app)
    for _ in range(3):
        assert_openai_error(client.post("/v1/completions", json=completion(prompt=["a"] * 100)), 400)
    assert client.post("/v1/completions", json=completion()).status_code == 200
    assert app.state.admission.requests == 0


async def test_a_finished_stream_gives_its_slot_back() -> None:
    app, _, _ = make_app(max_concurrent_requests=1, max_connections=8)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://lethe") as client:
        for _ in range(2):
            response = await client.post("/v1/chat/completions", json=chat(stream=True))
            assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    assert (app.state.admission.requests, app.state.admission.sequences) == (0, 0)


# ---- rendering off the event loop ----------------------------------------------------------------------------------


class SlowTokenizer(CharTokenizer):
    """Tokenising waits (up to 2 s) until the event loop has run something else meanwhile."""

    def __init__(self) -> None:
        self.loop_ran = threading.Event()
        self.saw_the_loop_run = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.saw_the_loop_run = self.loop_ran.wait(timeout=2)
        return super().encode(text, add_special_tokens)


async def test_rendering_and_tokenising_do_not_block_the_event_loop() -> None:
    tokenizer = SlowTokenizer()
    pipeline = Pipeline(FakeEngine(tokenizer=tokenizer), 5, Metrics())  # type: ignore[arg-type]
    starting = asyncio.create_task(pipeline.start(RunRequest("completions", "req-1", "hello")))
    await asyncio.sleep(0.05)  # runs only if tokenising is not holding the loop
    tokenizer.loop_ran.set()
    run = await starting
    async with run:
        pass
    assert tokenizer.saw_the_loop_run
    pipeline.close()


# ---- metrics: a bounded label set, nothing that names a target -----------------------------------------------------


def test_unknown_paths_do_not_add_metrics_series() -> None:
    app, _, _ = make_app()
    client = TestClient(app)
    for i in range(200):
        assert client.get(f"/v1/probe-{i}").status_code == 404
    client.post("/v1/completions", json=completion())
    client.get("/v1/models")
    series = [line for line in client.get("/metrics").text.splitlines() if line.startswith("lethe_requests_total{")]
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in series}
    assert endpoints == {"other", "completions", "models"}
    assert 'lethe_requests_total{endpoint="other",status="404"} 200.0' in series


async def test_target_hits_are_counted_without_naming_the_target() -> None:
    pipeline = guarded(FakeEngine(), FakeMechanism("eco"), FakeMechanism("guard"))
    await collect(pipeline, HI, max_tokens=1)
    rendered = pipeline._metrics.render().decode()
    assert "lethe_target_hits_total 1.0" in rendered
    assert "tgt_1" not in rendered and "target=" not in rendered


# ---- /v1/models ----------------------------------------------------------------------------------------------------


def test_models_show_the_served_name_not_the_model_path() -> None:
    app, _, _ = make_app()
    response = TestClient(app).get("/v1/models")
    assert response.status_code == 200
    card = response.json()["data"][0]
    assert card["id"] == card["root"] == "m"
    assert str(MODEL_PATH) not in response.text and "private-checkout" not in response.text


# ---- stopping: bounded, whatever hangs -----------------------------------------------------------------------------


def test_uvicorn_is_configured_to_cancel_open_requests_and_to_cap_connections() -> None:
    config = server_config(FastAPI(), settings(shutdown_timeout_s=7, max_connections=300))
    assert config.timeout_graceful_shutdown == 7
    assert config.limit_concurrency == 300


def test_the_stop_deadline_kills_children_and_exits_once_it_expires() -> None:
    events: list[Any] = []
    deadline = StopDeadline(0.05, exit_process=events.append, kill=lambda: events.append("kill"))
    deadline.arm()
    deadline.arm()
    time.sleep(0.5)
    assert events == ["kill", 1]


def test_a_stop_signal_arms_the_deadline() -> None:
    events: list[Any] = []
    deadline = StopDeadline(0.01, exit_process=events.append, kill=lambda: None)
    server = LetheServer(server_config(FastAPI(), settings()), deadline)
    server.handle_exit(signal.SIGTERM, None)
    time.sleep(0.3)
    assert server.should_exit and events == [1]


def test_settings_keep_a_request_within_the_caps_admissible() -> None:
    with pytest.raises(ValidationError):
        settings(max_sequences_per_request=64, max_sequences_in_flight=32)
    with pytest.raises(ValidationError):
        settings(max_concurrent_requests=100, max_connections=100)
