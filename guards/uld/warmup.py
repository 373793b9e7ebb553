"""The front end's half of ULD's assistant loading: which assistants the engine has loaded, kept current.

When a registry snapshot loads (``UldServing.share``, off the event loop), the snapshot's assistants are sent to the
engine to be loaded in the background (``cache.py``), and ``want`` waits up to ``WAIT_S`` for those new to this
snapshot, so a snapshot that adds an assistant usually swaps in with it already loaded. Past that wait (a slow disk, a
large model, an assistant over the memory budget) or at once when the engine does not answer, the snapshot swaps in
anyway and a background thread keeps asking the engine until every assistant is loaded. Meanwhile
``plan`` raises ``NotReady`` for a target whose assistant is not loaded yet: the target is protected by its other
mechanisms or interim protection, and the engine never meets an assistant it would have to load inside a step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from guards.uld.assistant import ULD_KEY
from guards.uld.cache import DEFAULT_MEMORY_BYTES

logger = logging.getLogger(__name__)

WAIT_S = 10.0  # how long a snapshot load waits for its new assistants before swapping in without them
POLL_S = 0.2  # how often the engine is asked while assistants load
MAX_POLL_S = 5.0  # the slowest asking gets while the engine cannot be reached

Warm = Callable[[str, Mapping[str, Any]], list[str]]


class AssistantWarmup:
    """Which of the served snapshot's assistants the engine has loaded; ``loaded(path)`` is what ``plan`` asks."""

    def __init__(self, warm: Warm, memory_bytes: int = DEFAULT_MEMORY_BYTES, wait_s: float = WAIT_S,
                 poll_s: float = POLL_S) -> None:
        self._warm = warm
        self._memory_bytes = memory_bytes
        self._wait_s = wait_s
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._wanted: tuple[str, ...] = ()
        self._loaded: frozenset[str] = frozenset()
        self._failing = False
        self._poller: threading.Thread | None = None

    def loaded(self, path: str) -> bool:
        return path in self._loaded

    @property
    def complete(self) -> bool:
        """Whether every wanted assistant is loaded."""
        return set(self._wanted) <= self._loaded

    def want(self, assistants: Sequence[str]) -> AssistantWarmup:
        """Have the engine load ``assistants`` (and only keep those for sure); wait up to ``wait_s`` for the ones new
        to this snapshot while the engine answers, then let a background thread follow the rest. Returns itself: the
        snapshot's live view."""
        wanted = tuple(dict.fromkeys(assistants))
        with self._lock:
            new = set(wanted) - set(self._wanted)
            changed, self._wanted = wanted != self._wanted, wanted
        if not new:  # nothing to wait for: a snapshot without new assistants never waits on an engine round trip
            if changed:  # the engine may let go of the dropped ones: tell it off the snapshot's path
                threading.Thread(target=self.poll, name="lethe-uld-release", daemon=True).start()
            return self
        deadline = time.monotonic() + self._wait_s
        while self.poll() and not new <= self._loaded:  # an engine that does not answer is not waited for
            if time.monotonic() >= deadline:
                logger.warning("uld.assistants_loading", extra={"wanted": len(self._wanted),
                                                                "loaded": len(self._loaded)})
                break
            time.sleep(self._poll_s)
        if not self.complete:
            self._follow()
        return self

    def poll(self) -> bool:
        """Ask the engine once; False if it could not be reached (logged once per run of failures)."""
        wanted = self._wanted
        try:
            loaded = self._warm(ULD_KEY, {"assistants": list(wanted), "memory_bytes": self._memory_bytes})
        except Exception as exc:
            if not self._failing:
                logger.warning("uld.warm_failed", extra={"error": type(exc).__name__})
            self._failing = True
            return False
        if self._failing:
            logger.info("uld.warm_recovered")
        self._failing = False
        if wanted == self._wanted:  # a newer ``want`` replaced the set meanwhile: its own poll decides
            self._loaded = frozenset(loaded)
        return True

    def _follow(self) -> None:
        """Keep polling in the background until every wanted assistant is loaded (one thread at a time)."""
        with self._lock:
            if self._poller is not None and self._poller.is_alive():
                return
            self._poller = threading.Thread(target=self._poll_until_complete, name="lethe-uld-warmup", daemon=True)
            self._poller.start()

    def _poll_until_complete(self) -> None:
        delay = self._poll_s
        while not self.complete:
            time.sleep(delay)
            delay = self._poll_s if self.poll() else min(MAX_POLL_S, delay * 2)
        logger.info("uld.assistants_loaded", extra={"loaded": len(self._loaded)})
