"""Admission: a bound on the inference work the server holds at once, answered 429 past it.

Every inference request takes a slot when it arrives (``AdmissionMiddleware``, before its body is read) and, once its
size is validated, reserves its sequences (prompts × ``n``) before any prompt is rendered. Both are given back when the
request's ASGI call returns, streams included, however it ends (served, failed, disconnected, cancelled at shutdown),
so a slot cannot leak. The limit applies to every request alike, before classification: a refusal says nothing about
whether a prompt is about a forget target. Counters are only touched on the event loop, so they need no lock.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from server.errors import Overloaded, send_error

Scope = dict[str, Any]
STATE_KEY = "admission"  # where the request's slot lives in ``scope["state"]`` (``request.state.admission``)


class Admission:
    """Counts inference requests and their sequences in flight against two limits."""

    def __init__(self, max_requests: int, max_sequences: int) -> None:
        self.max_requests = max_requests
        self.max_sequences = max_sequences
        self.requests = 0
        self.sequences = 0

    def enter(self) -> AdmissionSlot:
        if self.requests >= self.max_requests:
            raise Overloaded(f"The server is serving its limit of {self.max_requests} requests; retry shortly.")
        self.requests += 1
        return AdmissionSlot(self)


class AdmissionSlot:
    """One admitted request's share of the limits; ``release`` gives it back (once)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.sequences = 0
        self._released = False

    def reserve(self, sequences: int) -> None:
        """Reserve the request's sequences, or refuse it (429) when they would pass the limit."""
        admission = self._admission
        if admission.sequences + sequences > admission.max_sequences:
            raise Overloaded(f"The server is generating its limit of {admission.max_sequences} sequences; "
                             "retry shortly.")
        admission.sequences += sequences
        self.sequences += sequences

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._admission.requests -= 1
        self._admission.sequences -= self.sequences


class AdmissionMiddleware:
    """ASGI middleware: a slot for each ``POST`` to one of ``paths`` for the whole ASGI call, or a 429 at once."""

    def __init__(self, app: Any, admission: Admission, paths: Collection[str]) -> None:
        self.app = app
        self.admission = admission
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            slot = self.admission.enter()
        except Overloaded as exc:
            await send_error(send, exc)
            return
        scope.setdefault("state", {})[STATE_KEY] = slot
        try:
            await self.app(scope, receive, send)
        finally:
            slot.release()

