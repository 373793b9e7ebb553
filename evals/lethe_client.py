"""A small synchronous client of a running Lethe for the evaluation: the OpenAI surface and the admin API.

Plain ``httpx`` rather than the ``openai`` SDK, so the evaluation needs nothing the server does not already install;
every failure is raised with the server's OpenAI-style error message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx


class LetheError(RuntimeError):
    """A call to the server failed; the message carries the server's error."""


@dataclass(frozen=True)
class Reply:
    text: str
    response_id: str


@dataclass(frozen=True)
class Scored:
    """Per-continuation length-normalised losses of one prompt, and what protected it."""

    mean_losses: tuple[float, ...]
    mechanisms: tuple[str, ...]
    targets: tuple[str, ...]


class LetheClient:
    def __init__(self, base_url: str, api_key: str | None, admin_key: str | None, timeout_s: float = 300.0) -> None:
        inference_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        admin_headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._api = httpx.Client(base_url=f"{base_url.rstrip('/')}/v1", headers=inference_headers, timeout=timeout_s)
        self._admin = httpx.Client(base_url=f"{base_url.rstrip('/')}/admin/v1", headers=admin_headers,
                                   timeout=timeout_s)

    def close(self) -> None:
        self._api.close()
        self._admin.close()

    def __enter__(self) -> LetheClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------ OpenAI surface

    def model(self) -> str:
        return _json(self._api.get("/models"))["data"][0]["id"]

    def reply(self, model: str, question: str, max_tokens: int) -> Reply:
        """The greedy reply to one user question."""
        body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
                "max_tokens": max_tokens}
        data = _json(self._api.post("/chat/completions", json=body))
        return Reply(data["choices"][0]["message"]["content"] or "", data["id"])

    # ------------------------------------------------------------ admin API

    def score(self, question: str, continuations: Sequence[str]) -> Scored:
        body = {"messages": [{"role": "user", "content": question}], "continuations": list(continuations)}
        data = _json(self._admin.post("/score", json=body))
        return Scored(tuple(s["mean_loss"] for s in data["scores"]), tuple(data["mechanisms"]), tuple(data["targets"]))

    def targets(self) -> list[dict[str, Any]]:
        return _json(self._admin.get("/targets"))["data"]

    def create_target(self, body: Mapping[str, Any]) -> str:
        return _json(self._admin.post("/targets", json=dict(body)))["id"]

    def delete_target(self, target_id: str) -> None:
        response = self._admin.delete(f"/targets/{target_id}")
        if response.status_code != 404:
            _json(response)

    def wait_until_active(self, target_ids: Sequence[str], timeout_s: float, poll_s: float = 1.0) -> None:
        """Until every target is active and served by the replica; raises on a failed job or at the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            targets = [_json(self._admin.get(f"/targets/{target_id}")) for target_id in target_ids]
            failed = [t for t in targets if t["status"] == "failed"]
            if failed:
                jobs = [job for t in failed for job in t.get("jobs", []) if job.get("status") == "failed"]
                raise LetheError(f"target preparation failed: {[(j['kind'], j.get('error')) for j in jobs]}")
            registry = _json(self._admin.get("/registry"))
            if all(t["status"] == "active" for t in targets) and registry["serving_revision"] >= registry["revision"]:
                return
            time.sleep(poll_s)
        raise LetheError(f"targets not active after {timeout_s:.0f} s")

    def audit_targets(self, since: float) -> dict[str, list[str]]:
        """The targets each audited request since ``since`` (Unix time) hit, by response id."""
        records = _json(self._admin.get("/audit", params={"limit": 10_000, "since": since}))["data"]
        return {record["request_id"]: list(record["targets"]) for record in records}


def _json(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    raise LetheError(f"{response.request.method} {response.request.url.path}: {response.status_code} {message}")
