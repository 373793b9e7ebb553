"""What the in-process serving benchmarks share: a replica started as `lethe serve` starts it, their flags and output,
and the one load driver.

Each benchmark supplies ``measure(runtime, rounds, model) -> summary`` and ``markdown(summary) -> str``; this module
starts a ``Runtime`` on a throw-away data directory, runs the measurement, writes the JSON and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from demo.builder import build_demo_model
from server.config import Settings
from server.metrics import Metrics
from server.runtime import Runtime

Measure = Callable[[Runtime, int, str], Awaitable[dict]]
Request = TypeVar("Request")


@dataclass
class Load:
    """What one load run measured: overall tokens/s, and per request its seconds and time to first token."""

    tokens_per_s: float = 0.0
    seconds: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)


async def drive(requests: Sequence[Request], concurrency: int,
                send: Callable[[Request], AsyncIterator[int]]) -> Load:
    """Send every request with at most ``concurrency`` in flight; ``send`` yields each step's number of new tokens."""
    limit = asyncio.Semaphore(concurrency)
    load, tokens = Load(), 0

    async def one(request: Request) -> None:
        nonlocal tokens
        async with limit:
            started, first = time.perf_counter(), None
            async for new_tokens in send(request):
                if first is None and new_tokens:
                    first = time.perf_counter()
                tokens += new_tokens
            finished = time.perf_counter()
            load.seconds.append(finished - started)
            load.ttft.append((first or finished) - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(request) for request in requests))
    load.tokens_per_s = tokens / (time.perf_counter() - started)
    return load


async def run_with_runtime(args: argparse.Namespace, measure: Measure) -> dict:
    with tempfile.TemporaryDirectory(prefix="lethe-bench-") as data_dir:
        # No erasure-report verification after each registration: it would run beside the measurement.
        settings = Settings(data_dir=Path(data_dir), log_level="WARNING", verify_after_changes=False, _env_file=None)
        model_dir = Path(args.model) if args.model else build_demo_model(settings.cache_dir, args.variant)
        runtime = await Runtime.start(settings, model_dir, "bench", Metrics())
        try:
            return await measure(runtime, args.rounds, str(model_dir))
        finally:
            await runtime.stop()


def bench_main(description: str, results: Path, measure: Measure, markdown: Callable[[dict], str],
               default_variant: str = "tiny",
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """``default_variant``: ``bench`` for a benchmark of costs (``bench/workload.py``), a trained demo model for one of
    quality. ``add_arguments`` adds a benchmark's own flags; their values reach ``measure`` as keyword arguments."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variant", choices=["tiny", "full", "bench"], default=default_variant)
    parser.add_argument("--model", help="serve this model directory instead of a demo model")
    parser.add_argument("--rounds", type=int, default=3)
    common = {action.dest for action in parser._actions}
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    own = {name: value for name, value in vars(args).items() if name not in common}
    logging.basicConfig(level=logging.WARNING)
    summary = asyncio.run(run_with_runtime(args, functools.partial(measure, **own)))
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps(summary, indent=2))
    print("\n" + markdown(summary))
