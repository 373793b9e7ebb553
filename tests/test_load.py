"""Load through the real engine: 64 concurrent streaming clients for a bounded time, with a forget01 author registered
(GUARD), half the prompts naming it. Every stream ends with ``[DONE]`` or an error event (none cut off), no request
gets a 5xx, and every response has exactly one audit record. The figures (requests, latency, the server's resident
memory before and after) are the load benchmark's (``bench/load.py``), not this test's.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from bench.stream_load import CUT, DONE, ERROR_EVENT, REFUSED, run_streams
from tests.conftest import API_KEY, RunningServer, remove_targets
from tests.unlearning import FORGET01, target_body, wait_until_served

CLIENTS = 64
DURATION_S = 20.0
AUTHOR = FORGET01[0]
OVERLOADED = 429


def load_prompts() -> list[tuple[str, bool]]:
    """Questions naming the registered author, interleaved with questions about nobody registered."""
    flagged = [(item.question, True) for item in AUTHOR.items if AUTHOR.name in item.question]
    plain = [("What is the capital of France?", False), ("Write a sentence about the sea.", False),
             ("Name three colours.", False), ("What do cats like to eat?", False)]
    return [prompt for pair in zip(flagged, plain * len(flagged), strict=False) for prompt in pair]


def test_64_streaming_clients_all_end_cleanly_without_5xx_and_each_is_audited_once(
        lethe_server: RunningServer, model_name: str, admin: httpx.Client) -> None:
    created = admin.post("/targets", json=target_body(AUTHOR, {"guard": {}}))
    assert created.status_code == 201, created.text
    target_id = created.json()["id"]
    try:
        wait_until_served(admin, [target_id])
        since = time.time()
        report = asyncio.run(run_streams(lethe_server.base_url, API_KEY, model_name, load_prompts(), CLIENTS,
                                         DURATION_S))
        endings = report.by_ending
        print(f"\nload: {len(report.outcomes)} streams in {report.seconds:.1f} s, statuses {report.by_status}, "
              f"endings {endings}")
        assert len(report.outcomes) >= CLIENTS
        assert not report.server_errors, report.server_errors[:5]
        assert endings.get(CUT, 0) == 0, [o for o in report.outcomes if o.ended == CUT][:5]
        refused = [o for o in report.outcomes if o.ended == REFUSED]
        assert all(o.status == OVERLOADED for o in refused), Counter(o.status for o in refused)
        assert endings.get(DONE, 0) + endings.get(ERROR_EVENT, 0) >= CLIENTS

        served_ids = [o.response_id for o in report.outcomes if o.ended in (DONE, ERROR_EVENT)]
        assert None not in served_ids and len(set(served_ids)) == len(served_ids)
        records = audited(admin, since, set(served_ids))
        per_id = Counter(record["request_id"] for record in records)
        assert {request_id: count for request_id, count in per_id.items() if count > 1} == {}
        flagged_ids = {o.response_id for o in report.outcomes if o.flagged_prompt and o.ended == DONE}
        hits = {record["request_id"] for record in records if target_id in record["targets"]}
        assert flagged_ids <= hits, f"{len(flagged_ids - hits)} flagged streams not audited as hits"
    finally:
        remove_targets(admin, [target_id])


def audited(admin: httpx.Client, since: float, expected: set[str]) -> list[dict]:
    """The audit records written since ``since``, once all ``expected`` ids are in (the writer batches)."""
    deadline = time.monotonic() + 30
    while True:
        records = admin.get("/audit", params={"since": since, "limit": 10_000}).json()["data"]
        missing = expected - {record["request_id"] for record in records}
        if not missing:
            return records
        assert time.monotonic() < deadline, f"{len(missing)} of {len(expected)} responses not audited after 30 s"
        time.sleep(0.5)
