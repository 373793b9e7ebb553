"""A synchronous client of a running Lethe's own API: the admin API, and the few OpenAI calls an evaluation makes.

The ``lethe`` command's ``targets`` / ``jobs`` and the TOFU evaluation both speak to the server through it. Plain
``httpx`` rather than the ``openai`` SDK, so its users need nothing the server does not already install; every HTTP
error is raised as `AdminClientError`, carrying the server's OpenAI-style error message and validation details.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx


class AdminClientError(RuntimeError):
    """A call to the server failed; the message carries the server's error.

    For an HTTP error, ``status`` is its status code, ``server_message`` the server's error message (or the body when
    it is not an OpenAI-style error) and ``details`` the validation errors the server listed (``loc``, ``msg``).
    """

    def __init__(self, message: str, *, status: int | None = None, server_message: str | None = None,
                 details: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = message if server_message is None else server_message
        self.details = tuple(details)


@dataclass(frozen=True)
class Reply:
    text: str
    response_id: str


@dataclass(frozen=True)
class Scored:
    """Per-continuation length-normalised losses of one prompt (and each continuation's token logprobs), and what
    protected it."""

    mean_losses: tuple[float, ...]
    mechanisms: tuple[str, ...]
    targets: tuple[str, ...]
    token_logprobs: tuple[tuple[float, ...], ...] = ()


class AdminClient:
    """``admin_key`` authorises the admin API (``/admin/v1``), ``api_key`` the OpenAI surface (``/v1``)."""

    def __init__(self, base_url: str, admin_key: str | None, api_key: str | None = None,
                 timeout_s: float = 300.0) -> None:
        inference_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        admin_headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._api = httpx.Client(base_url=f"{base_url.rstrip('/')}/v1", headers=inference_headers, timeout=timeout_s)
        self._admin = httpx.Client(base_url=f"{base_url.rstrip('/')}/admin/v1", headers=admin_headers,
                                   timeout=timeout_s)

    def close(self) -> None:
        self._api.close()
        self._admin.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------ admin API

    def targets(self, filters: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Every target (meeting ``filters``: ``reference``, ``legal_basis``, ``received_after``,
        ``received_before``), without contents."""
        return _json(self._admin.get("/targets", params=_given(filters)))["data"]

    def target(self, target_id: str) -> dict[str, Any]:
        return _json(self._admin.get(f"/targets/{target_id}"))

    def create_target(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The created target (its ``id``, ``revision`` and the ``jobs`` preparing it)."""
        return _json(self._admin.post("/targets", json=dict(body)))

    def delete_target(self, target_id: str, *, missing_ok: bool = False) -> dict[str, Any] | None:
        """The server's reply; None when ``missing_ok`` and the target was already gone."""
        response = self._admin.delete(f"/targets/{target_id}")
        if missing_ok and response.status_code == 404:
            return None
        return _json(response)

    def patch_target(self, target_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return _json(self._admin.patch(f"/targets/{target_id}", json=dict(body)))

    def report(self, target_id: str, *, contents: bool = False, html: bool = False) -> Any:
        """The target's erasure report: its JSON, or with ``html`` the page's text."""
        response = self._admin.get(f"/targets/{target_id}/report",
                                   params={"contents": str(contents).lower(), "format": "html" if html else "json"})
        if html and response.is_success:
            return response.text
        return _json(response)

    def verify(self, target_id: str) -> dict[str, Any]:
        """Queue a verification run of the target; the job."""
        return _json(self._admin.post(f"/targets/{target_id}/verify"))

    def records(self, listing: str, filters: Mapping[str, Any] | None = None, limit: int | None = None,
                page_size: int = 500) -> Iterator[dict[str, Any]]:
        """The records of a paged listing (``actions``, ``tombstones``, ``audit``), newest first, following its
        cursor until ``limit`` records (or the last page)."""
        params: dict[str, Any] = {**_given(filters), "limit": min(page_size, limit or page_size)}
        served = 0
        while True:
            page = _json(self._admin.get(f"/{listing}", params=params))
            for record in page["data"]:
                yield record
                served += 1
                if limit is not None and served >= limit:
                    return
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def admin_keys(self) -> list[dict[str, Any]]:
        return _json(self._admin.get("/admin-keys"))["data"]

    def create_admin_key(self, key_id: str) -> dict[str, Any]:
        """The new key's record, with the key itself (shown this once)."""
        return _json(self._admin.post("/admin-keys", json={"id": key_id}))

    def revoke_admin_key(self, key_id: str) -> dict[str, Any]:
        return _json(self._admin.delete(f"/admin-keys/{key_id}"))

    def job(self, job_id: str) -> dict[str, Any]:
        return _json(self._admin.get(f"/jobs/{job_id}"))

    def registry(self) -> dict[str, Any]:
        return _json(self._admin.get("/registry"))

    def score(self, question: str, continuations: Sequence[str]) -> Scored:
        body = {"messages": [{"role": "user", "content": question}], "continuations": list(continuations)}
        data = _json(self._admin.post("/score", json=body))
        return Scored(tuple(s["mean_loss"] for s in data["scores"]), tuple(data["mechanisms"]), tuple(data["targets"]),
                      tuple(tuple(s["token_logprobs"]) for s in data["scores"]))

    def wait_until_active(self, target_ids: Sequence[str], timeout_s: float, poll_s: float = 1.0) -> None:
        """Until every target is active and served by the replica; raises on a failed job (a ``degraded`` target's
        classifier fit failed: it will not become active either) or at the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            targets = [self.target(target_id) for target_id in target_ids]
            failed = [t for t in targets if t["status"] in ("failed", "degraded")]
            if failed:
                jobs = [job for t in failed for job in t.get("jobs", []) if job.get("status") == "failed"]
                raise AdminClientError(f"target preparation failed: {[(j['kind'], j.get('error')) for j in jobs]}")
            registry = self.registry()
            if all(t["status"] == "active" for t in targets) and registry["serving_revision"] >= registry["revision"]:
                return
            time.sleep(poll_s)
        raise AdminClientError(f"targets not active after {timeout_s:.0f} s")

    def audit_targets(self, since: float) -> dict[str, list[str]]:
        """The targets each audited request since ``since`` (Unix time) hit, by response id."""
        records = _json(self._admin.get("/audit", params={"limit": 10_000, "since": since}))["data"]
        return {record["request_id"]: list(record["targets"]) for record in records}

    # ------------------------------------------------------------ OpenAI surface

    def model(self) -> str:
        return _json(self._api.get("/models"))["data"][0]["id"]

    def reply(self, model: str, question: str, max_tokens: int) -> Reply:
        """The greedy reply to one user question."""
        body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
                "max_tokens": max_tokens}
        data = _json(self._api.post("/chat/completions", json=body))
        return Reply(data["choices"][0]["message"]["content"] or "", data["id"])


def _given(filters: Mapping[str, Any] | None) -> dict[str, Any]:
    return {name: value for name, value in (filters or {}).items() if value is not None}


def _json(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        message, shown = error["message"], error["message"]
        details = error.get("details") or ()
    except (ValueError, KeyError, TypeError):
        message, shown, details = response.text, response.text[:500], ()
    raise AdminClientError(f"{response.request.method} {response.request.url.path}: {response.status_code} {shown}",
                           status=response.status_code, server_message=message, details=details)
