"""The uvicorn server ``lethe serve`` runs, configured so that overload and shutdown stay bounded.

- ``limit_concurrency`` (``LETHE_MAX_CONNECTIONS``) caps the connections and requests held at once, every path
  included; inference requests meet the admission limit's 429 (``server/admission.py``) well before it.
- On SIGTERM/SIGINT (or engine death), open requests get ``LETHE_SHUTDOWN_TIMEOUT_S`` to finish; uvicorn then cancels
  them (streams end, their engine requests are aborted and audited ``aborted``) and the lifespan stops the job workers
  and the engine.
- Whatever still hangs after ``STOP_GRACE_S`` more (a stuck thread, an engine that will not stop), ``StopDeadline``
  kills the process's children and exits with status 1: a replica that was asked to stop always does. An overloaded
  replica once ignored SIGTERM for minutes.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import psutil
import uvicorn

from server.config import STOP_GRACE_S, Settings

logger = logging.getLogger(__name__)


def kill_children() -> None:
    """Kill this process's descendants (vLLM's EngineCore), which an ``os._exit`` would leave behind."""
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


class StopDeadline:
    """Once armed, ends the process after ``seconds`` unless it has exited by then."""

    def __init__(self, seconds: float, *, exit_process: Callable[[int], Any] = os._exit,
                 kill: Callable[[], None] = kill_children) -> None:
        self.seconds = seconds
        self._exit_process = exit_process
        self._kill = kill
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def arm(self) -> None:
        """Start the countdown (later calls do nothing). A daemon thread: a blocked event loop cannot hold it up."""
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(self.seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        logger.error("shutdown.deadline", extra={"detail": f"still stopping after {self.seconds:g} s: exiting"})
        try:
            self._kill()
        finally:
            self._exit_process(1)


class LetheServer(uvicorn.Server):
    """uvicorn's server with a hard deadline on stopping, armed by the first stop request."""

    def __init__(self, config: uvicorn.Config, deadline: StopDeadline) -> None:
        super().__init__(config)
        self.deadline = deadline

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.deadline.arm()

    def request_stop(self) -> None:
        """Stop as a signal would (the engine died)."""
        self.should_exit = True
        self.deadline.arm()


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, timeout_keep_alive=30,
                          access_log=False, limit_concurrency=settings.max_connections,
                          timeout_graceful_shutdown=settings.shutdown_timeout_s)


def make_server(app: Any, settings: Settings) -> LetheServer:
    deadline = StopDeadline(settings.shutdown_timeout_s + STOP_GRACE_S)
    return LetheServer(server_config(app, settings), deadline)
