"""The classification batcher: concurrent requests share one embedding call, each gets its own verdict.

A small fake bank stands in for the MiniLM one (whose batch equality is tested in
tests/classifiers/test_prompt_gate.py); it blocks its first call so that the requests arriving meanwhile queue, as they
do behind a 25 ms embedding under load.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from classifiers.types import BankResult, Conversation
from server.classifier_batcher import ClassificationBatcher


class GatedBank:
    """Scores a conversation by its first word; its first call waits until the test opens the gate."""

    def __init__(self, name: str = "bank", fail: bool = False) -> None:
        self.name = name
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.fail = fail

    def score_many(self, conversations: list[Conversation]) -> list[BankResult]:
        first = not self.calls
        self.calls.append([conversation[0][1] for conversation in conversations])
        if first:
            assert self.gate.wait(10), "test never opened the gate"
        if self.fail:
            raise RuntimeError("embedding model failed")
        return [BankResult([], {self.name: float(len(c[0][1]))}, 0.0, 0.0, np.zeros((1, 2), np.float32))
                for c in conversations]


async def _wait_for_calls(bank: GatedBank, count: int) -> None:
    for _ in range(500):
        if len(bank.calls) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"bank saw {len(bank.calls)} calls, expected {count}")


def _conversation(text: str) -> Conversation:
    return [("user", text)]


async def test_requests_queued_behind_a_running_batch_go_together_in_the_next():
    sizes: list[int] = []
    bank, batcher = GatedBank(), ClassificationBatcher(on_batch=sizes.append)
    first = asyncio.create_task(batcher.score(bank, _conversation("a")))
    await _wait_for_calls(bank, 1)  # the first request is classified at once, alone
    rest = [asyncio.create_task(batcher.score(bank, _conversation("b" * n))) for n in range(1, 6)]
    await asyncio.sleep(0.05)
    bank.gate.set()
    results = await asyncio.gather(first, *rest)
    assert bank.calls == [["a"], ["b", "bb", "bbb", "bbbb", "bbbbb"]]
    assert [r.scores["bank"] for r in results] == [1.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert sizes == [1, 5]


async def test_batches_are_per_bank_and_capped():
    old, new = GatedBank("old"), GatedBank("new")
    new.gate.set()
    batcher = ClassificationBatcher(max_batch_requests=2)
    blocker = asyncio.create_task(batcher.score(old, _conversation("x")))
    await _wait_for_calls(old, 1)
    queued = [asyncio.create_task(batcher.score(bank, _conversation(text)))
              for bank, text in [(new, "n1"), (old, "o1"), (new, "n2"), (new, "n3"), (old, "o2")]]
    await asyncio.sleep(0.05)
    old.gate.set()
    results = await asyncio.gather(blocker, *queued)
    assert old.calls == [["x"], ["o1", "o2"]]
    assert new.calls == [["n1", "n2"], ["n3"]]
    assert [next(iter(r.scores)) for r in results] == ["old", "new", "old", "new", "new", "old"]


async def test_a_cancelled_request_is_skipped_and_the_others_are_served():
    bank, batcher = GatedBank(), ClassificationBatcher()
    first = asyncio.create_task(batcher.score(bank, _conversation("a")))
    await _wait_for_calls(bank, 1)
    gone = asyncio.create_task(batcher.score(bank, _conversation("gone")))
    kept = asyncio.create_task(batcher.score(bank, _conversation("kept")))
    await asyncio.sleep(0.01)
    gone.cancel()
    bank.gate.set()
    assert (await kept).scores == {"bank": 4.0}
    await first
    assert bank.calls == [["a"], ["kept"]]
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_failing_batch_fails_each_of_its_requests_and_the_batcher_recovers():
    failing, batcher = GatedBank(fail=True), ClassificationBatcher()
    failing.gate.set()
    outcomes = await asyncio.gather(*(batcher.score(failing, _conversation(t)) for t in ("a", "b")),
                                    return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    healthy = GatedBank()
    healthy.gate.set()
    assert (await batcher.score(healthy, _conversation("ok"))).scores == {"bank": 2.0}


def test_the_batch_cap_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        ClassificationBatcher(max_batch_requests=0)


async def test_a_failing_batch_size_report_neither_stalls_nor_fails_the_requests() -> None:
    def broken_metric(size: int) -> None:
        raise ValueError("metrics backend broken")

    bank = GatedBank()
    bank.gate.set()
    batcher = ClassificationBatcher(on_batch=broken_metric)
    result = await asyncio.wait_for(batcher.score(bank, _conversation("hello")), timeout=5)
    assert result.scores == {"bank": 5.0}
