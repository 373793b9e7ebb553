"""Registry propagation delay: seconds from a committed change to a replica serving it (SPEC §4: within 2 s).

Two replicas' control planes are reproduced without their vLLM engines (the engine plays no part in propagation): a
writer commits target creations to one registry database while a reader replica runs the same ``SnapshotHolder``
watch loop that ``lethe serve`` runs, polling every ``LETHE_REGISTRY_POLL_S``. Each delay is measured from the
writer's commit to the reader's snapshot swap. Run against SQLite (default) and, with ``--postgres URL``, PostgreSQL.

    python bench/registry_propagation.py [--changes 40] [--postgres postgresql+psycopg://…]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from server.admin.protocol import TargetCreate
from server.admin.serving import new_target
from server.config import Settings
from server.registry import Registry
from server.registry.database import make_engine, upgrade_database
from server.registry.snapshot import SnapshotHolder

RESULTS = Path(__file__).parent / "results" / "registry_propagation.json"


async def measure(url: str, changes: int, poll_s: float) -> list[float]:
    engine = make_engine(url)
    upgrade_database(engine)
    writer = Registry.open(engine).targets
    reader = Registry.open(make_engine(url)).targets
    swapped: dict[int, float] = {}
    holder = SnapshotHolder(reader, Path, lambda artifacts, aliases, negatives: None, poll_s)
    holder.on_swap.append(lambda snapshot: swapped.setdefault(snapshot.revision, time.perf_counter()))
    watch = asyncio.create_task(holder.watch())
    delays = []
    try:
        for i in range(changes):
            await asyncio.sleep(random.uniform(0, poll_s))  # changes arrive at arbitrary phases of the poll
            body = new_target(TargetCreate.model_validate({"name": f"bench-{time.time_ns()}-{i}", "aliases": ["Bench"],
                                                           "forget": [{"text": "x"}]}), ["eco"])
            created = await asyncio.to_thread(writer.create, body)
            committed = time.perf_counter()
            deadline = committed + 30 * poll_s + 10.0
            while not any(revision >= created.revision for revision in swapped):
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"revision {created.revision} never reached the reader's snapshot "
                                       "(see the registry.reload_failed log lines)")
                await asyncio.sleep(0.005)
            seen = min(t for revision, t in swapped.items() if revision >= created.revision)
            delays.append(max(0.0, seen - committed))
    finally:
        watch.cancel()
    return delays


def summarise(delays: list[float]) -> dict[str, float]:
    ordered = sorted(delays)
    return {"n": len(ordered), "p50_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], "max_s": ordered[-1]}


def markdown(summary: dict) -> str:
    """Delay from a committed registry change to a replica serving it, per backend."""
    changes = next(iter(summary["results"].values()))["n"] if summary["results"] else 0
    lines = [f"registry propagation delay (poll every {summary['poll_s']} s, {changes} changes, budget 2 s)", "",
             "| backend | p50 | p99 | max |", "| --- | --- | --- | --- |"]
    for name, row in summary["results"].items():
        lines.append(f"| {name} | {row['p50_s']:.3f} s | {row['p99_s']:.3f} s | {row['max_s']:.3f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--postgres", help="also measure on this PostgreSQL URL")
    args = parser.parse_args()
    poll_s = Settings().registry_poll_s
    backends = {"sqlite": f"sqlite:///{tempfile.mkdtemp(prefix='lethe-bench-')}/registry.db"}
    if args.postgres:
        backends["postgresql"] = args.postgres
    results = {name: summarise(asyncio.run(measure(url, args.changes, poll_s))) for name, url in backends.items()}
    summary = {"poll_s": poll_s, "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))


if __name__ == "__main__":
    main()
