"""What the in-process serving benchmarks share: a replica started as `lethe serve` starts it, their flags and output.

Each benchmark supplies ``measure(runtime, rounds, model) -> summary`` and ``markdown(summary) -> str``; this module
starts a ``Runtime`` on a throw-away data directory, runs the measurement, writes the JSON and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from demo.builder import build_demo_model
from server.config import Settings
from server.metrics import Metrics
from server.runtime import Runtime

Measure = Callable[[Runtime, int, str], Awaitable[dict]]


async def run_with_runtime(args: argparse.Namespace, measure: Measure) -> dict:
    with tempfile.TemporaryDirectory(prefix="lethe-bench-") as data_dir:
        settings = Settings(data_dir=Path(data_dir), log_level="WARNING", _env_file=None)
        model_dir = Path(args.model) if args.model else build_demo_model(settings.cache_dir, args.variant)
        runtime = await Runtime.start(settings, model_dir, "bench", Metrics())
        try:
            return await measure(runtime, args.rounds, str(model_dir))
        finally:
            await runtime.stop()


def bench_main(description: str, results: Path, measure: Measure, markdown: Callable[[dict], str]) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variant", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--model", help="serve this model directory instead of a demo model")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    summary = asyncio.run(run_with_runtime(args, measure))
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps(summary, indent=2))
    print("\n" + markdown(summary))
