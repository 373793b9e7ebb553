"""Bad input gets an OpenAI-style error with the right status, never a 500 or a hang."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

MODEL = "__served__"  # replaced by the served model's id


def _chat(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **overrides}


def _completion(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **overrides}


LONG_TEXT = "word " * 2000

CASES: list[tuple[str, str, dict[str, Any] | str, int, str | None]] = [
    ("unknown model", "/v1/chat/completions", _chat(model="gpt-4"), 404, "model"),
    ("malformed json", "/v1/chat/completions", "{not json", 400, None),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", _chat(messages=[]), 400, "messages"),
    ("unknown role", "/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "x"}]), 400, None),
    ("negative temperature", "/v1/chat/completions", _chat(temperature=-1), 400, "temperature"),
    ("top_p zero", "/v1/chat/completions", _chat(top_p=0), 400, "top_p"),
    ("n too large", "/v1/chat/completions", _chat(n=1000), 400, "n"),
    ("n above 1 with greedy sampling", "/v1/completions", _completion(n=2, temperature=0), 400, None),
    ("zero max_tokens", "/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens past context", "/v1/chat/completions", _chat(max_tokens=5000), 400, "max_tokens"),
    ("prompt too long", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": LONG_TEXT}]), 400,
     "messages"),
    ("top_logprobs too large", "/v1/chat/completions", _chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions", _chat(top_logprobs=2), 400, None),
    ("client guard arguments", "/v1/chat/completions", _chat(vllm_xargs={"lethe": {}}), 400, None),
    ("tools", "/v1/chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, None),
    ("stream_options without stream", "/v1/chat/completions", _chat(stream_options={"include_usage": True}), 400,
     None),
    ("bad logit_bias key", "/v1/chat/completions", _chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit_bias out of vocab", "/v1/chat/completions", _chat(logit_bias={"99999999": 1}), 400, "logit_bias"),
    ("any logit_bias", "/v1/chat/completions", _chat(logit_bias={"5": 100}), 400, "logit_bias"),
    ("any completions logit_bias", "/v1/completions", _completion(logit_bias={"5": -100}), 400, "logit_bias"),
    ("prompt embeds", "/v1/completions", _completion(prompt_embeds="AAAA"), 400, None),
    ("prompt logprobs", "/v1/completions", _completion(prompt_logprobs=1), 400, "prompt_logprobs"),
    ("echo with logprobs", "/v1/completions", _completion(echo=True, logprobs=1), 400, "echo"),
    ("logprobs too large", "/v1/completions", _completion(logprobs=10), 400, "logprobs"),
    ("token id out of vocab", "/v1/completions", _completion(prompt=[10**9]), 400, "prompt"),
    ("empty prompt list", "/v1/completions", _completion(prompt=[]), 400, None),
    ("completion prompt too long", "/v1/completions", _completion(prompt=LONG_TEXT), 400, "prompt"),
    ("wrong prompt type", "/v1/completions", _completion(prompt={"a": 1}), 400, "prompt"),
    # bounded work: each refused before any prompt is rendered (defaults of the LETHE_MAX_* settings)
    ("a hundred thousand prompts", "/v1/completions", _completion(prompt=["a"] * 100_000), 400, "prompt"),
    ("prompts times n", "/v1/completions", _completion(prompt=["a"] * 64, n=4, temperature=1), 400, "n"),
    ("too many messages", "/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x"}] * 257), 400,
     "messages"),
    ("stop string too long", "/v1/chat/completions", _chat(stop="x" * 257), 400, "stop"),
    ("too many logit_bias entries", "/v1/chat/completions", _chat(logit_bias={str(i): 1 for i in range(301)}), 400,
     "logit_bias"),
    ("too many stop_token_ids", "/v1/chat/completions", _chat(stop_token_ids=list(range(257))), 400,
     "stop_token_ids"),
    ("top_k past int64", "/v1/chat/completions", _chat(top_k=2**64), 400, "top_k"),
    ("min_tokens past int64", "/v1/completions", _completion(min_tokens=2**64), 400, "min_tokens"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error(
    http: httpx.Client, model_name: str, path: str, body: dict[str, Any] | str, status: int, param: str | None
) -> None:
    if isinstance(body, dict):
        payload = {**body, "model": model_name if body.get("model") == MODEL else body.get("model")}
        payload = {k: v for k, v in payload.items() if v is not None}
        response = http.post(path, json=payload)
    else:
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] is not None and error["param"].split(".")[0] == param, error


def test_unknown_model_has_model_not_found_code(http: httpx.Client) -> None:
    error = http.post("/v1/chat/completions", json=_chat(model="gpt-4")).json()["error"]
    assert error["code"] == "model_not_found"


def test_context_overflow_has_context_length_code(http: httpx.Client, model_name: str) -> None:
    error = http.post("/v1/chat/completions", json=_chat(model=model_name, max_tokens=5000)).json()["error"]
    assert error["code"] == "context_length_exceeded"


def test_missing_or_wrong_api_key_is_401(lethe_server, model_name: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        response = httpx.post(f"{lethe_server.base_url}/v1/chat/completions", json=_chat(model=model_name),
                              headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    bad_key = openai.OpenAI(base_url=str(client.base_url), api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_unknown_route_is_404_json(http: httpx.Client) -> None:
    response = http.get("/v1/does-not-exist")
    assert response.status_code == 404
    assert response.json()["error"]["type"]


def test_server_still_serves_after_bad_requests(http: httpx.Client, model_name: str) -> None:
    response = http.post("/v1/chat/completions", json=_chat(model=model_name))
    assert response.status_code == 200
