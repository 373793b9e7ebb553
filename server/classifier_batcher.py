"""Coalescing the prompt classification of concurrent requests into one embedding call.

The sentence-embedding model is the whole cost of classifying a prompt (~25 ms a text on 2 CPU cores, next to a
~1 ms bank product), and on CPU one call for 32 texts costs about a quarter of 32 calls. Requests therefore queue
here: when the model is idle a request is classified at once (no added latency at concurrency 1); while a batch runs,
arriving requests wait and go together in the next one. No timer, no tuning knob: the batch size follows the load.

Requests are grouped by classifier bank, since requests that started on different registry snapshots must be scored
against their own. A waiter that is cancelled (client gone) is simply skipped when its result arrives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from classifiers.bank import ClassifierBank
from classifiers.types import BankResult, Conversation

logger = logging.getLogger(__name__)

MAX_BATCH_REQUESTS = 64


@dataclass
class _Waiting:
    bank: ClassifierBank
    conversation: Conversation
    future: asyncio.Future[BankResult]


class ClassificationBatcher:
    """Classifies conversations against a bank, batching the ones that wait while the model is busy."""

    def __init__(self, max_batch_requests: int = MAX_BATCH_REQUESTS,
                 on_batch: Callable[[int], None] | None = None) -> None:
        """`on_batch(size)` is told each batch's number of requests (the server's batch-size histogram)."""
        if max_batch_requests < 1:
            raise ValueError("max_batch_requests must be at least 1")
        self._max_batch = max_batch_requests
        self._on_batch = on_batch or (lambda size: None)
        self._queue: list[_Waiting] = []
        self._draining: asyncio.Task[None] | None = None

    async def score(self, bank: ClassifierBank, conversation: Conversation) -> BankResult:
        """`bank.score(conversation)`, run off the event loop together with the requests queued beside it."""
        future: asyncio.Future[BankResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(bank, conversation, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Run batches until the queue is empty; every waiter gets its result or the batch's exception."""
        while self._queue:
            batch, self._queue = self._next_batch()
            live = [waiting for waiting in batch if not waiting.future.done()]
            if not live:
                continue
            bank = live[0].bank
            self._report(len(live))
            try:
                results = await asyncio.to_thread(bank.score_many, [waiting.conversation for waiting in live])
            except Exception as error:  # noqa: BLE001 - handed to each waiter, whose request fails closed
                logger.exception("classifier.batch_failed", extra={"requests": len(live)})
                for waiting in live:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                continue
            for waiting, result in zip(live, results, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(result)

    def _report(self, size: int) -> None:
        """Tell ``on_batch`` (a metric): its failure is logged, never the batch's (an exception here would end the
        drain task and leave the batch's requests waiting forever)."""
        try:
            self._on_batch(size)
        except Exception:
            logger.exception("classifier.batch_report_failed")

    def _next_batch(self) -> tuple[list[_Waiting], list[_Waiting]]:
        """The oldest request's bank's queued requests (up to the cap), and the rest in arrival order."""
        bank = self._queue[0].bank
        batch: list[_Waiting] = []
        rest: list[_Waiting] = []
        for waiting in self._queue:
            (batch if waiting.bank is bank and len(batch) < self._max_batch else rest).append(waiting)
        return batch, rest
