"""The unprotected window: how long after its registration's 201 a new target's questions are served unguarded, with
a training job queued ahead of its own jobs (issue 15).

Runs a serving replica in-process (``server.runtime.Runtime``: the engine, guards, pipeline and per-lane job workers
``lethe serve`` runs). Each round registers one forget01 author with ULD and waits until its assistant's training
runs (the ``training`` lane is busy for minutes), then registers the other author with the default ECO + GUARD and,
from the moment its registration committed (what the admin API answers 201 on), sends a question that names it every
``PROBE_INTERVAL_S`` through the pipeline (greedy, ``PROBE_TOKENS`` tokens). Per round:

* ``served_s``: until the replica's snapshot holds the target (the poll; budget 2 s);
* ``first_guarded_reply_s``: until the first reply that was guarded (its target hit and a protection applied) was
  complete: the unprotected window, as a client sees it;
* ``own_classifier_s``: until the snapshot serves the target's own fitted classifier (its gate);
* ``own_mechanism_s``: until a probe is guarded by one of its own mechanisms instead of interim protection;
* ``unguarded`` / ``refused``: probes after ``served_s`` that hit the target yet got no protection / a 503 (both
  should be 0), and whether the older training job was still running when the target's own gate was ready (it
  should be: gate jobs have their own lane).

Both targets are deleted at the end of each round (the training job is cancelled). Medians over rounds.

    python bench/unprotected_window.py [--variant tiny|full | --model DIR] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.registration import question, target_body  # noqa: E402
from bench.runtime_harness import bench_main  # noqa: E402
from demo.tofu_data import authors_of, demo_authors  # noqa: E402
from server.errors import GuardFailed  # noqa: E402
from server.run import RunRequest  # noqa: E402
from server.runtime import Runtime  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "unprotected_window.json"
PROBE_INTERVAL_S = 0.1
PROBE_TOKENS = 8
TRAINING_START_TIMEOUT_S = 300
GATE_TIMEOUT_S = 600
FIGURES = ("served_s", "first_guarded_reply_s", "own_classifier_s", "own_mechanism_s")


async def probe(runtime: Runtime, text: str) -> tuple[list[str], list[str]] | None:
    """(targets hit, protections applied) of one greedy reply to ``text``, or None if it was refused (503)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=PROBE_TOKENS, output_kind=RequestOutputKind.DELTA)
    try:
        run = await runtime.pipeline.start(RunRequest("chat", f"bench-{uuid.uuid4().hex}", question(text),
                                                             params=params))
    except GuardFailed:
        return None
    async with run:
        async for _ in run.events():
            pass
    return list(run.hit_target_ids), list(run.mechanisms)


async def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def one_round(runtime: Runtime, round_index: int) -> dict:
    forget = authors_of("forget01")
    retain_authors = [a for a in demo_authors() if a.index in (0, 1, 2)]
    targets, jobs, holder = runtime.control.registry.targets, runtime.control.registry.jobs, runtime.control.snapshots
    slow = targets.create(target_body(forget[0], retain_authors, ("uld",)))
    training_id = next(job.id for job in slow.jobs if job.kind == "uld_train")
    await wait_for(lambda: jobs.get(training_id).status == "running", TRAINING_START_TIMEOUT_S, "the ULD training")

    author = forget[1]
    asked = [item.question for item in author.items if author.name in item.question]
    new = targets.create(target_body(author, retain_authors, ("eco", "guard")))
    registered = time.perf_counter()
    row: dict = {"round": round_index, "unguarded": 0, "refused": 0, "probes": 0}
    try:
        while time.perf_counter() - registered < GATE_TIMEOUT_S:
            snapshot = holder.current
            served = new.id in snapshot.targets
            if served:
                row.setdefault("served_s", time.perf_counter() - registered)
                if snapshot.targets[new.id].classifier_ready:
                    row.setdefault("own_classifier_s", time.perf_counter() - registered)
            outcome = await probe(runtime, asked[row["probes"] % len(asked)])
            row["probes"] += 1
            finished = time.perf_counter() - registered
            if outcome is None:
                row["refused"] += served
            elif new.id in outcome[0] and outcome[1]:
                row.setdefault("first_guarded_reply_s", finished)
                if "interim" not in outcome[1]:
                    row["own_mechanism_s"] = finished
                    row["training_running_at_own_gate"] = jobs.get(training_id).status == "running"
                    break
            elif served:
                row["unguarded"] += 1
            await asyncio.sleep(PROBE_INTERVAL_S)
    finally:
        for target_id in (new.id, slow.id):
            targets.delete(target_id)
        await wait_for(lambda: holder.current.revision == targets.revision(), 10, "the deletions to be served")
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()}


async def measure(runtime: Runtime, rounds: int, model: str) -> dict:
    rows = []
    for round_index in range(rounds):
        rows.append(await one_round(runtime, round_index))
        print(f"round {round_index + 1}/{rounds}: {rows[-1]}", flush=True)
    medians = {name: round(statistics.median(row[name] for row in rows), 3)
               for name in FIGURES if all(name in row for row in rows)}
    return {"model": model, "rounds": rounds, "poll_s": runtime.control.settings.registry_poll_s,
            "probe_interval_s": PROBE_INTERVAL_S, "medians": medians, "raw": rows}


def markdown(summary: dict) -> str:
    """Seconds from the 201 to the new target being served, guarded, and guarded by its own gate and mechanism."""
    medians = summary["medians"]

    def cell(name: str) -> str:
        return f"{medians[name]:.2f} s" if name in medians else "n/a"

    raw = summary["raw"]
    lines = [
        f"model {summary['model']}, {summary['rounds']} rounds, poll every {summary['poll_s']} s, a ULD training job "
        "running ahead of the new target; medians",
        "",
        "| snapshot serves it | first guarded reply | own classifier served | own mechanism guards |",
        "| --- | --- | --- | --- |",
        f"| {cell('served_s')} | {cell('first_guarded_reply_s')} | {cell('own_classifier_s')} "
        f"| {cell('own_mechanism_s')} |",
        "",
        f"hits served unguarded: {sum(r['unguarded'] for r in raw)}, refused: {sum(r['refused'] for r in raw)} "
        f"(of {sum(r['probes'] for r in raw)} probes); the older training job still running when the target's own "
        f"gate was ready: {sum(bool(r.get('training_running_at_own_gate')) for r in raw)}/{len(raw)} rounds",
    ]
    return "\n".join(lines)


def main() -> None:
    bench_main(__doc__.splitlines()[0], RESULTS, measure, markdown)


if __name__ == "__main__":
    main()
