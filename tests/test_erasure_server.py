"""Erasure on delete through the real server (real engine, shared ``lethe_server``): a forget01 author registered with
ECO and GUARD, served and asked about, then deleted; within a bounded time no file of the server's data dir (SQLite
registry with its WAL and shared memory, artifacts, staging folders) holds the author's name or answers.

ECO is given its σ so that no calibration runs: it stores no artifact, and the test stays within the suite's budget.
"""

from __future__ import annotations

import json
import time
import httpx
import openai

from tests.conftest import RunningServer
from tests.erasure_probe import files_holding
from tests.unlearning import FORGET01, assert_no_targets, target_body, wait_until_served

PURGE_TIMEOUT_S = 90  # LETHE_ERASURE_GRACE_S=15 after the last artifact was written, plus passes and reports


def secrets_of(author) -> list[str]:
    """What must not survive: the name, each longer part of it, and every gold answer."""
    parts = [part for part in author.name.replace("-", " ").split() if len(part) >= 5]
    return [author.name, *parts, *(item.answer for item in author.items)]


def test_a_deleted_target_leaves_no_byte_of_its_name_or_answers_in_the_servers_data_dir(
        lethe_server: RunningServer, admin: httpx.Client, client: openai.OpenAI, model_name: str) -> None:
    assert_no_targets(admin)
    data_dir = lethe_server.log_path.parent / "data"
    author = FORGET01[0]
    secrets = secrets_of(author)
    response = admin.post("/targets", json=target_body(author, {"eco": {"sigma": 1.0}, "guard": {}}))
    assert response.status_code == 201, response.text
    target_id = response.json()["id"]
    try:
        wait_until_served(admin, [target_id])
        client.chat.completions.create(model=model_name, max_tokens=8, messages=[
            {"role": "user", "content": author.items[0].question}])  # the replica loads the target's phrases
        before = files_holding(data_dir, secrets)
        assert "lethe.db" in {path.split("-")[0] for path in before} and any(
            path.startswith("artifacts/") for path in before), before
    finally:
        deleted = admin.delete(f"/targets/{target_id}")
    assert deleted.status_code == 200, deleted.text
    assert admin.get(f"/targets/{target_id}").status_code == 404

    deadline = time.monotonic() + PURGE_TIMEOUT_S
    while (left := files_holding(data_dir, secrets)) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == {}, f"still holding {author.name}'s data {PURGE_TIMEOUT_S} s after the delete: {left}"
    purged = [json.loads(line) for line in lethe_server.log().splitlines() if '"erasure.purged"' in line]
    assert any(target_id in record["targets"] for record in purged)
