"""Many concurrent streaming clients against a running Lethe server for a bounded time: how every stream ended.

Shared by the load test (``tests/test_load.py``: every stream ends with ``[DONE]`` or an error event, no 5xx, one
audit record per request) and the load benchmark (``bench/load.py``: the same run, plus the server's resident memory
before and after). Streams are read as raw server-sent events, so a stream cut off without ``[DONE]`` is seen as cut,
not smoothed over by a client library.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

DONE = "done"  # the stream ended with `data: [DONE]`
ERROR_EVENT = "error_event"  # the stream carried `data: {"error": ...}` and ended
CUT = "cut"  # the stream ended (or the connection broke) without either
REFUSED = "refused"  # an HTTP error status before the stream began


@dataclass
class StreamOutcome:
    status: int
    ended: str
    response_id: str | None
    seconds: float
    flagged_prompt: bool


@dataclass
class LoadReport:
    outcomes: list[StreamOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def by_status(self) -> dict[int, int]:
        return dict(Counter(outcome.status for outcome in self.outcomes))

    @property
    def by_ending(self) -> dict[str, int]:
        return dict(Counter(outcome.ended for outcome in self.outcomes))

    @property
    def server_errors(self) -> list[StreamOutcome]:
        return [outcome for outcome in self.outcomes if outcome.status >= 500]

    def latency_percentile(self, fraction: float) -> float:
        finished = sorted(outcome.seconds for outcome in self.outcomes if outcome.ended == DONE)
        return finished[min(len(finished) - 1, int(fraction * len(finished)))] if finished else float("nan")


async def stream_one(client: httpx.AsyncClient, body: dict, flagged_prompt: bool) -> StreamOutcome:
    started = time.perf_counter()
    response_id: str | None = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return StreamOutcome(response.status_code, REFUSED, None, time.perf_counter() - started,
                                     flagged_prompt)
            ended = CUT
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    ended = DONE if ended == CUT else ended
                    break
                event = json.loads(data)
                if "error" in event:
                    ended = ERROR_EVENT
                response_id = response_id or event.get("id")
            return StreamOutcome(200, ended, response_id, time.perf_counter() - started, flagged_prompt)
    except httpx.TransportError:
        return StreamOutcome(200 if response_id else 0, CUT, response_id, time.perf_counter() - started,
                             flagged_prompt)


async def run_streams(base_url: str, api_key: str, model: str, prompts: Sequence[tuple[str, bool]], clients: int,
                      duration_s: float, max_tokens: int = 16) -> LoadReport:
    """``clients`` concurrent clients, each streaming chat completions back to back (cycling through ``prompts``,
    pairs of text and whether it names a registered target) until ``duration_s`` has passed."""
    report = LoadReport()
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client_index: int, client: httpx.AsyncClient) -> None:
        turn = client_index
        while time.monotonic() < deadline:
            text, flagged = prompts[turn % len(prompts)]
            turn += clients
            body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                    "stream": True, "temperature": 0.7, "seed": turn}
            report.outcomes.append(await stream_one(client, body, flagged))

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                                 timeout=httpx.Timeout(120.0), limits=limits) as client:
        await asyncio.gather(*(client_loop(index, client) for index in range(clients)))
    report.seconds = time.perf_counter() - started
    return report


def process_tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the vLLM engine core runs as a child of the server)."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(int(status.parent.name))
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        pending.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
