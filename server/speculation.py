"""A prompt's plain engine request, started while the gate still classifies it (issue 19: time to first token).

Unflagged traffic must be served as plain vLLM serves it, and the gate's verdict (embedding and scoring the prompt,
about 6.5 ms on 2 cores) used to come before the engine saw the prompt: added to every first token, that was 10–12 %
of a 55 ms TTFT on the bench model. So when the registry holds targets, the pipeline submits each prompt's *plain*
plan (its token ids, the request's own sampling parameters, no extra_args, no LoRA) at once, and classifies it
meanwhile. If the plan then computed for the prompt is that same plain plan, the request already under way is the
reply: the same engine input as a request submitted after classification, so the same tokens. If the prompt hit a
target, the speculative request is aborted before anything it produced is read, and the protected plan is submitted
instead. (With an always-gated mechanism registered, no prompt's plan is plain, and nothing is speculated.)

Nothing a speculative request generates reaches a client unless its prompt was classified clean: its outputs are read
only through ``stream``, which the pipeline calls for kept requests alone, and the run is handed to the endpoint only
after every prompt is classified and planned.

It is off by default (``LETHE_SPECULATIVE_PREFILL``). vLLM cannot stop a forward pass it has begun: on an idle engine
the plain prefill starts before the gate's verdict, the abort takes effect only after it, and a flagged prompt's first
token then waits for two prefills (measured on the bench model at concurrency 1: 197 against 102 ms). That is a
timing difference a client can read, telling it that its prompt is about a registered target, which is what
``/metrics`` and the refusal policies keep from it; it suits deployments whose targets' existence is no secret (a
copyrighted book, hazardous know-how) more than right-to-be-forgotten requests. Figures: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

_END = object()  # the engine's stream ended before its first output (an engine error is raised, not this)


class PlainStart:
    """One prompt's plain engine request, submitted now; later either kept (``stream``) or aborted (``discard``)."""

    def __init__(self, outputs: AsyncGenerator[Any, None]) -> None:
        self._outputs = outputs
        # Awaiting the first output is what submits the request (vLLM's generate adds it on its first step).
        self._first: asyncio.Future[Any] = asyncio.ensure_future(anext(outputs, _END))
        self._read = False

    async def stream(self) -> AsyncIterator[Any]:
        """The request's outputs from its first on (an error it met, such as a refused parameter, raises here as it
        would have on a request submitted after classification). Read at most once."""
        if self._read:
            raise RuntimeError("a speculative request's outputs are read once")
        self._read = True
        async with aclosing(self._outputs):  # a reader that stops early aborts the request now, not when collected
            first = await self._first
            if first is _END:
                return
            yield first
            async for output in self._outputs:
                yield output

    async def discard(self) -> None:
        """Abort the engine request without reading anything it produced (vLLM aborts a request whose stream is
        cancelled or closed); nothing for one whose outputs are being read (their reader closes them)."""
        if self._read:
            return
        self._read = True
        self._first.cancel()
        await asyncio.wait([self._first])  # never raises: neither its error nor its cancellation is ours
        if not self._first.cancelled():
            self._first.exception()  # retrieved, so asyncio does not log it as never retrieved
        await self._outputs.aclose()
