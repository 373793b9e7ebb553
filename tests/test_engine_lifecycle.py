"""Identity with plain vLLM, client disconnects, health, metrics and engine death."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from demo.tofu_data import authors_of, general_knowledge
from tests.conftest import (REPO, RunningServer, admin_headers, auth_headers, start_server, stop_server,
                            unfinished_requests)

FORGET01 = authors_of("forget01")


def wait_until_idle(base_url: str, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if unfinished_requests(base_url) == 0:
            return True
        time.sleep(0.2)
    return False


REFERENCE_CASES = [
    *({"kind": "chat", "messages": [{"role": "user", "content": item.question}], "max_tokens": 48}
      for item in FORGET01[1].items[:4]),
    {"kind": "chat", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": general_knowledge()[0].question}], "max_tokens": 16},
    {"kind": "completion", "prompt": FORGET01[0].items[0].question, "max_tokens": 24},
    {"kind": "completion", "prompt": "The", "max_tokens": 24},
]


@pytest.fixture(scope="module")
def second_engines(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[tuple[list[dict], RunningServer]]:
    """Plain vLLM's replies to ``REFERENCE_CASES`` (``tests/plain_vllm_reference.py``, a process of its own) and a
    server of its own for the engine-death test, started together: each start is mostly one process importing vLLM,
    so the two take little longer than one."""
    workdir = tmp_path_factory.mktemp("plain-vllm")
    cases, out = workdir / "cases.json", workdir / "out.json"
    cases.write_text(json.dumps(REFERENCE_CASES))
    reference = subprocess.Popen([sys.executable, str(REPO / "tests" / "plain_vllm_reference.py"), str(tiny_model_dir),
                                  str(cases), str(out)], cwd=workdir, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        server = start_server(tiny_model_dir, workdir / "server.log")
        assert reference.wait(timeout=600) == 0, "the plain vLLM reference failed"
    finally:
        if reference.poll() is None:
            reference.kill()
    try:
        yield json.loads(out.read_text()), server
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def plain_vllm_outputs(second_engines: tuple[list[dict], RunningServer]) -> list[dict]:
    return second_engines[0]


def test_unflagged_request_is_token_identical_to_plain_vllm(
    client: openai.OpenAI, model_name: str, plain_vllm_outputs: list[dict]
) -> None:
    for case, expected in zip(REFERENCE_CASES, plain_vllm_outputs, strict=True):
        if case["kind"] == "chat":
            reply = client.chat.completions.create(model=model_name, messages=case["messages"], temperature=0,
                                                   max_tokens=case["max_tokens"])
            text, usage = reply.choices[0].message.content, reply.usage
        else:
            reply = client.completions.create(model=model_name, prompt=case["prompt"], temperature=0,
                                              max_tokens=case["max_tokens"])
            text, usage = reply.choices[0].text, reply.usage
        assert text == expected["text"], case
        assert usage.prompt_tokens == len(expected["prompt_token_ids"])
        assert usage.completion_tokens == len(expected["token_ids"])


def audit_record(base_url: str, predicate, timeout_s: float = 20) -> dict:
    """The first audit record matching ``predicate``, waiting for the batched audit writer to flush it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = httpx.get(f"{base_url}/admin/v1/audit", params={"limit": 50}, headers=admin_headers(),
                            timeout=10).json()["data"]
        found = [record for record in records if predicate(record)]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError("no matching audit record")


def test_stream_disconnect_aborts_the_engine_request(lethe_server, model_name: str) -> None:
    # Enough work (16 choices x 1000 tokens, with logprobs) that it cannot finish before the disconnect is noticed:
    # 1 x 1000 tokens once did on a fast machine and was audited as "served".
    body = {"model": model_name, "prompt": "The", "max_tokens": 1000, "ignore_eos": True, "stream": True, "n": 16,
            "logprobs": 5}
    with httpx.Client(base_url=lethe_server.base_url, headers=auth_headers(), timeout=60) as session:
        with session.stream("POST", "/v1/completions", json=body) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            request_id = json.loads(first.removeprefix("data: "))["id"]
    record = audit_record(lethe_server.base_url, lambda r: r["request_id"] == request_id)
    assert record["outcome"] == "aborted"  # the run was cut short, not generated to its 1000 tokens
    assert wait_until_idle(lethe_server.base_url), "engine still generating for a disconnected client"


def test_non_stream_disconnect_aborts_the_engine_request(lethe_server, model_name: str) -> None:
    # 16 x 1000 tokens is at least 1000 engine steps, which no machine finishes in the 0.3 s the client waits.
    body = {"model": model_name, "prompt": "The", "max_tokens": 1000, "ignore_eos": True, "n": 16, "temperature": 1}
    started = time.time()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{lethe_server.base_url}/v1/completions", json=body, headers=auth_headers(),
                   timeout=httpx.Timeout(10.0, read=0.3))
    record = audit_record(lethe_server.base_url,
                          lambda r: r["created"] >= started and r["endpoint"] == "completions")
    assert record["outcome"] == "aborted"
    assert wait_until_idle(lethe_server.base_url), "engine still generating for a disconnected client"


def test_health_and_metrics_report_a_live_engine(http: httpx.Client, client: openai.OpenAI, model_name: str) -> None:
    client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert http.get("/health").json() == {"status": "ok"}
    metrics = http.get("/metrics").text
    assert "lethe_engine_up 1.0" in metrics
    assert 'lethe_requests_total{endpoint="chat/completions",status="200"}' in metrics
    assert "lethe_time_to_first_token_seconds_count" in metrics
    assert "lethe_completion_tokens_total" in metrics


def test_metrics_carry_vllms_own_series_beside_lethes(http: httpx.Client, client: openai.OpenAI,
                                                     model_name: str) -> None:
    client.completions.create(model=model_name, prompt="The", max_tokens=2)
    text = http.get("/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}  # valid exposition
    assert "lethe_engine_up" in families and "vllm:num_requests_running" in families
    prompt_tokens = families["vllm:prompt_tokens"].samples
    assert prompt_tokens and all(sample.labels["model_name"] == model_name for sample in prompt_tokens)
    assert sum(sample.value for sample in prompt_tokens if sample.name == "vllm:prompt_tokens_total") > 0
    assert "vllm:lora_requests_info" not in text  # its labels list the LoRA adapters (O3's stacks) running
    help_lines = [line for line in text.splitlines() if line.startswith(("# HELP", "# TYPE"))]
    assert len(help_lines) == len(set(help_lines))


def test_openapi_docs_are_served(http: httpx.Client) -> None:
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(paths)


def test_engine_death_turns_health_503_and_exits_non_zero(second_engines: tuple[list[dict], RunningServer]) -> None:
    _, server = second_engines
    try:
        engine_cores = [p for p in psutil.Process(server.process.pid).children(recursive=True)
                        if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
        assert engine_cores, [p.cmdline() for p in psutil.Process(server.process.pid).children(recursive=True)]
        for process in engine_cores:
            os.kill(process.pid, signal.SIGKILL)
        saw_503 = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.process.poll() is None:
            try:
                saw_503 |= httpx.get(f"{server.base_url}/health", timeout=2).status_code == 503
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert server.process.poll() is not None, "server kept running with a dead engine"
        assert server.process.returncode != 0
        assert saw_503 or "engine.dead" in server.log()
    finally:
        stop_server(server)
