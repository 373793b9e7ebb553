"""Every endpoint fuzzed from the server's own OpenAPI schema through the real engine: no input gets a 5xx, and every
error comes in the OpenAI / admin error shape (``{"error": {"message", "type", ...}}``).

schemathesis generates requests that fit the schema and requests that break it (wrong types, missing fields, odd
Unicode, huge numbers), with bounded examples per operation so the module fits CI (``LETHE_FUZZ_EXAMPLES``, 40 by
default). Registrations are narrowed to GUARD, a training-free mechanism, so no long training is queued; every target
and negative the fuzzer created is deleted when the module ends, so later modules meet the registry they expect.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from tests.conftest import ADMIN_KEY, API_KEY, RunningServer, remove_targets

EXAMPLES = int(os.environ.get("LETHE_FUZZ_EXAMPLES", "40"))
REGISTRATION_PATHS = ("/admin/v1/targets", "/admin/v1/targets/{target_id}")
TRAINING_FREE = "guard"


@pytest.fixture(scope="module")
def registry_restored(admin: httpx.Client) -> Iterator[None]:
    """Delete every target and negative the fuzzer created, so later modules meet the registry they expect."""
    targets_before = {target["id"] for target in admin.get("/targets").json()["data"]}
    negatives_before = {negative["id"] for negative in admin.get("/negatives").json()["data"]}
    yield
    remove_targets(admin, [target["id"] for target in admin.get("/targets").json()["data"]
                           if target["id"] not in targets_before])
    for negative in admin.get("/negatives").json()["data"]:
        if negative["id"] not in negatives_before:
            admin.delete(f"/negatives/{negative['id']}")


def training_free(case: Any) -> None:
    """A fuzzed registration keeps its GUARD options (if any) and drops every other mechanism's."""
    if case.operation.path in REGISTRATION_PATHS and case.method in ("POST", "PATCH") and isinstance(case.body, dict):
        mechanisms = case.body.get("mechanisms")
        if isinstance(mechanisms, dict) or case.method == "POST":
            options = mechanisms.get(TRAINING_FREE) if isinstance(mechanisms, dict) else None
            case.body["mechanisms"] = {TRAINING_FREE: options if isinstance(options, dict) else {}}


def error_shape_problem(response: Any) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} without a JSON body: {response.text[:300]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or \
            not isinstance(error.get("type"), str):
        return f"{response.status_code} not in the error shape: {body!r:.300}"
    return None


def fuzz_operation(operation: Any, mode: GenerationMode, base_url: str, outcomes: Counter[str]) -> None:
    """Up to ``EXAMPLES`` generated requests to one operation; raises on the first (shrunk) failing one."""
    key = ADMIN_KEY if operation.path.startswith("/admin/") else API_KEY

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def one(case: Any) -> None:
        training_free(case)
        response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        outcomes[f"{response.status_code // 100}xx"] += 1
        assert response.status_code < 500, f"{response.status_code} {response.text[:500]}\n{case.as_curl_command()}"
        if response.status_code >= 400 and operation.path != "/metrics":
            problem = error_shape_problem(response)
            assert problem is None, f"{problem}\n{case.as_curl_command()}"

    one()


def test_no_fuzzed_request_gets_a_5xx_and_every_error_has_the_error_shape(
        lethe_server: RunningServer, registry_restored: None) -> None:
    schema = schemathesis.openapi.from_url(f"{lethe_server.base_url}/openapi.json")
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, lethe_server.base_url, outcomes)
            except Unsatisfiable:  # no request breaks this operation's schema (no parameters, or only a path id)
                continue
            except Exception as exc:  # every operation is fuzzed; all failures are reported together
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    print(f"\nfuzzing: {len(operations)} operations, {sum(outcomes.values())} requests, by status class: "
          f"{dict(sorted(outcomes.items()))}")
    assert not failures, "\n\n".join(failures)
