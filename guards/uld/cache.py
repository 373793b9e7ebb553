"""The loaded ULD assistants of one process, by artifact path (content-addressed: a path never changes meaning).

In vLLM's engine process the assistants are used inside a decoding step, where a load from disk would stall every
request in the batch. So the front end *warms* the cache whenever a registry snapshot is applied (``warm``, reached
through ``collective_rpc``: ``guards/engine_extension.py``): the snapshot's assistants are *wanted*, loaded by a
background thread and kept for as long as they are wanted, however many there are, within a memory budget
(``LETHE_ULD_ASSISTANT_MEMORY_GIB``); assistants no longer wanted stay while there is room, least recently used
leaving first. The front end plans ULD only for an assistant the engine reported loaded (``warmup.py``), and in the
engine a request naming one that is not loaded never waits: ``get`` raises ``AssistantNotLoaded`` (the processor then
ends that request's reply, fail closed) and starts its load in the background.

Outside the engine (the scoring path, tests) nothing warms the cache, and ``get`` loads on demand (``block_on_miss``),
keeping at most ``capacity`` assistants.

Assistants are loaded where their logits are used (``placement``, chosen by ``guards.devices.assistant_placement``): in
the engine, on the logits' device, in bfloat16 on a CPU that multiplies it natively, else in the served model's dtype
(on a GPU, inside the engine's process and outside vLLM's ``gpu_memory_utilization`` share: the memory budget must fit
in what vLLM leaves free); on the scoring path, on the scorer's device. The default is the CPU in float32.
"""

from __future__ import annotations

import json
import logging
import math
import time
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from guards.devices import Placement, placement_for

logger = logging.getLogger(__name__)

DEFAULT_CACHED_ASSISTANTS = 8  # outside the engine, where nothing warms the cache
DEFAULT_MEMORY_BYTES = 4 * 1024**3
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded save (a large served model's assistant)
RETRY_REFUSED_S = 30.0  # an assistant that could not be loaded is tried again after this long


class AssistantNotLoaded(RuntimeError):
    """A request named an assistant this engine has not loaded (yet): its load was started in the background."""


def _weight_files(path: Path) -> list[str]:
    if (path / WEIGHTS_INDEX).exists():
        return sorted(set(json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"].values()))
    return [WEIGHTS_FILE]


def check_assistant(path: Path) -> None:
    """Raise if the assistant saved in ``path`` cannot be read: its config must parse and every weights file's header
    must list tensors. Cheap (no weights are read): the front end runs it when a snapshot loads."""
    assistant_bytes(path)


def assistant_bytes(path: Path, dtype: torch.dtype = torch.float32) -> int:
    """The memory the assistant takes once loaded (its tensors in ``dtype``), read from the weights' headers."""
    from safetensors import safe_open

    json.loads((path / "config.json").read_text())
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for name in _weight_files(path):
        with safe_open(str(path / name), framework="pt") as weights:
            names = list(weights.keys())
            if not names:
                raise ValueError(f"the assistant's {name} holds no tensor")
            for tensor in names:
                shape = weights.get_slice(tensor).get_shape()
                total += size * math.prod(shape)
    return total


class AssistantModels:
    """Loaded assistants by artifact path: those the served snapshot wants, then the most recently used."""

    def __init__(self, capacity: int = DEFAULT_CACHED_ASSISTANTS, block_on_miss: bool = True,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES, placement: Placement | None = None) -> None:
        self._placement = placement or placement_for("cpu")
        self._capacity = capacity
        self._block_on_miss = block_on_miss
        self._memory_bytes = memory_bytes
        self._models: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # path -> (model, bytes), oldest use first
        self._wanted: list[str] = []
        self._queue: list[str] = []  # paths to load in the background, in order
        self._refused: dict[str, float] = {}  # path -> when its load failed (over budget, unreadable)
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None

    def get(self, path: str) -> Any:
        """The loaded assistant (marked as used). Not loaded: loaded now where a miss may block, else its load is
        started in the background and ``AssistantNotLoaded`` raised."""
        with self._lock:
            if path in self._models:
                self._models.move_to_end(path)
                return self._models[path][0]
            if not self._block_on_miss:
                self._enqueue([path])
        if not self._block_on_miss:
            logger.warning("uld.assistant_not_loaded", extra={"path": path})
            raise AssistantNotLoaded(path)
        return self.load(path)

    def warm(self, request: Mapping[str, Any]) -> list[str]:
        """Want ``request["assistants"]`` (the served snapshot's) loaded, within ``request["memory_bytes"]`` when
        given; returns those loaded now. Loading runs in a background thread: call again to see progress."""
        wanted = [str(path) for path in request.get("assistants", [])]
        with self._lock:
            if "memory_bytes" in request:
                self._memory_bytes = int(request["memory_bytes"])
            if wanted != self._wanted:
                self._refused = {}  # a new snapshot, or a new budget: try again what was refused
            self._wanted = wanted
            self._enqueue([path for path in wanted if path not in self._models])
            return [path for path in wanted if path in self._models]

    def load(self, path: str) -> Any:
        """Load ``path`` now (blocking) and keep it, making room within the budget; the background loader's step."""
        with self._lock:
            if path in self._models:
                return self._models[path][0]
        needed = assistant_bytes(Path(path), self._placement.dtype)
        with self._lock:
            if not self._make_room(needed, keep=path):
                raise MemoryError(f"{needed} bytes do not fit the assistants' budget of {self._memory_bytes}")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=self._placement.dtype)
        model = model.to(self._placement.device).eval()
        with self._lock:
            self._models[path] = (model, needed)
            if self._block_on_miss:
                while len(self._models) > self._capacity:
                    self._evict_oldest(protect=path)
        logger.info("uld.assistant_loaded", extra={"path": path, "bytes": needed, "loaded": len(self._models)})
        return model

    def _make_room(self, needed: int, keep: str) -> bool:
        """Evict assistants no longer wanted, least recently used first, until ``needed`` more bytes fit (lock held);
        False if even then they would not."""
        used = sum(size for _, size in self._models.values())
        for path in list(self._models):
            if used + needed <= self._memory_bytes:
                break
            if path not in self._wanted and path != keep:
                used -= self._models.pop(path)[1]
                logger.info("uld.assistant_evicted", extra={"path": path})
        return used + needed <= self._memory_bytes

    def _evict_oldest(self, protect: str) -> None:
        for path in self._models:
            if path != protect:
                self._models.pop(path)
                logger.info("uld.assistant_evicted", extra={"path": path})
                return

    def _enqueue(self, paths: Sequence[str]) -> None:
        """Queue loads (lock held) and make sure the background loader runs."""
        now = time.monotonic()
        for path in paths:
            if path not in self._queue and now - self._refused.get(path, -RETRY_REFUSED_S) >= RETRY_REFUSED_S:
                self._queue.append(path)
        if self._queue and (self._loader is None or not self._loader.is_alive()):
            self._loader = threading.Thread(target=self._load_queued, name="lethe-uld-loader", daemon=True)
            self._loader.start()

    def _load_queued(self) -> None:
        """The background loader: loads queued assistants one by one; one that fails is logged and skipped (tried
        again after ``RETRY_REFUSED_S``, or at once for a new wanted set), never ending the loader."""
        while True:
            with self._lock:
                if not self._queue:
                    self._loader = None
                    return
                path = self._queue.pop(0)
            try:
                self.load(path)
            except Exception as exc:
                with self._lock:
                    self._refused[path] = time.monotonic()
                logger.error("uld.assistant_load_failed", extra={"path": path, "error": type(exc).__name__,
                                                                 "budget_bytes": self._memory_bytes})

    @property
    def loading(self) -> bool:
        """Whether the background loader is at work."""
        with self._lock:
            return self._loader is not None and self._loader.is_alive()

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def __len__(self) -> int:
        return len(self._models)
