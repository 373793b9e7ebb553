"""What each unlearning mechanism costs a flagged request, on the bench model (issue 19).

One serving replica runs in-process (``server.runtime.Runtime``: the engine, guards and pipeline ``lethe serve`` runs)
on the ``bench`` model (``bench/workload.py``). The two TOFU forget01 authors are registered with all four mechanisms
through the registry and their jobs, as in production, except that what only changes *values* is not trained: ULD's
assistant and O3's adapter keep their trained shapes with their initial weights (``epochs: 0``), ECO's σ, ULD's α
and GUARD's bans are given rather than calibrated. GUARD's phrases are the authors' real ones. Cost depends on shapes
and code paths, not on trained values; quality is measured on the demo model (``bench/mechanism_quality.py``).

Each request is one of the authors' questions or TOFU paraphrases, classified by the gate (a hit), then planned with
no mechanism ("unprotected": the same request as plain token ids), each mechanism alone, ECO + GUARD (the default)
or all four; each mechanism applies under its own gate (O3: the OOD detector), exactly as served. With
``LETHE_SPECULATIVE_PREFILL=true`` a protected variant also pays the plain request speculation starts while its
prompt is classified and aborts once it is flagged (``server/speculation.py``); the unprotected baseline never does.
The fixed workload of ``bench/workload.py``: 64 tokens with ``ignore_eos``, concurrency 1, 8 and 32, rotated rounds,
medians.

cost ratio = unprotected tokens/s ÷ the variant's tokens/s in the same round (1.05 = 5 % dearer); the goals at
concurrency 8 are issue 19's.

    python bench/mechanism_cost.py [--variant bench|tiny|full | --model DIR] [--rounds 3] [--only o3,all four]

``--only`` measures those variants (and always the unprotected one, each ratio's denominator): a re-measurement of one
mechanism's cut in a third of the time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.registration import VARIANTS, replan_run, target_body, wait_until_served  # noqa: E402
from bench.runtime_harness import bench_main, drive  # noqa: E402
from bench.workload import (CONCURRENCIES, MAX_TOKENS, UniqueQuestions, median, requests_at,  # noqa: E402
                            rotated, sampling_params)
from demo.tofu_data import authors_of, demo_authors  # noqa: E402
from server.planner import ChatTurn  # noqa: E402
from server.run import ChatPrompt, RunRequest  # noqa: E402
from server.runtime import Runtime  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "mechanism_cost.json"
GOAL_CONCURRENCY = 8
# Issue 19's goals: cost ratio at concurrency 8 (unprotected ÷ protected throughput) at most this.
GOALS = {"eco": 1.05, "guard": 1.10, "uld": 1.35, "o3": 1.25, "all four": 1.6}
# Shapes as trained, values as initialised or given: cost only (see the module docstring).
COST_OPTIONS = {
    "eco": {"sigma": 1.0},
    "guard": {"calibrate": False},
    "uld": {"alpha": 0.75, "epochs": 0},
    "o3": {"epochs": 0, "style": "refusal"},
}


async def serve(runtime: Runtime, questions: list[str], concurrency: int,
                mechanisms: tuple[str, ...] | None) -> dict:
    """tokens/s, TTFT p50 and hits of the questions through the pipeline, re-planned with ``mechanisms``."""
    params = sampling_params()
    hits = 0

    # The unprotected baseline is plain vLLM's request without speculation's start, which a flagged prompt aborts:
    # with speculation on, every protected variant pays that start as served (server/speculation.py).
    runtime.pipeline.speculate = mechanisms is not None and runtime.control.settings.speculative_prefill

    async def send(text: str) -> AsyncIterator[int]:
        nonlocal hits
        run = await runtime.pipeline.start(
            RunRequest("chat", f"bench-{uuid.uuid4().hex}", ChatPrompt((ChatTurn("user", text),)),
                       params=params))
        hits += bool(run.hit_target_ids)
        replan_run(runtime, run, mechanisms)
        async with run:
            async for event in run.events():
                yield len(event.token_ids)

    load = await drive(questions, concurrency, send)
    return {"tokens_per_s": load.tokens_per_s, "ttft_p50_s": statistics.median(load.ttft), "hits": hits,
            "requests": len(questions)}


async def measure(runtime: Runtime, rounds: int, model: str, only: list[str] | None = None) -> dict:
    variants = {name: mechanisms for name, mechanisms in VARIANTS.items()
                if only is None or name == "unprotected" or name in only}
    forget, retain_authors = authors_of("forget01"), demo_authors()[:3]
    started = time.perf_counter()
    ids = [runtime.control.registry.targets.create(target_body(a, retain_authors, COST_OPTIONS)).id for a in forget]
    await wait_until_served(runtime, ids)
    preparation_s = time.perf_counter() - started
    questions = UniqueQuestions([item.question for a in forget for item in a.items]
                                + [item.paraphrased_question for a in forget for item in a.items
                                   if item.paraphrased_question])
    for mechanisms in variants.values():  # warm-up: assistants, adapters and phrase tables loaded once
        await serve(runtime, questions.take(8), 8, mechanisms)

    raw: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in CONCURRENCIES} for name in variants}
    for round_index in range(rounds):
        for concurrency in CONCURRENCIES:
            for name in rotated(list(variants), round_index):
                raw[name][concurrency].append(
                    await serve(runtime, questions.take(requests_at(concurrency)), concurrency, variants[name]))
        print(f"round {round_index + 1}/{rounds} done", flush=True)

    table = {}
    for concurrency in CONCURRENCIES:
        plain = raw["unprotected"][concurrency]
        for name in variants:
            rows = raw[name][concurrency]
            table[f"{name} @ {concurrency}"] = {
                "tokens_per_s": round(median([r["tokens_per_s"] for r in rows]), 1),
                "cost_ratio": round(median([p["tokens_per_s"] / r["tokens_per_s"]
                                            for r, p in zip(rows, plain, strict=True)]), 3),
                "ttft_p50_ms": round(1000 * median([r["ttft_p50_s"] for r in rows]), 1),
                "hit_share": round(sum(r["hits"] for r in rows) / sum(r["requests"] for r in rows), 3),
            }
    return {"model": model, "rounds": rounds, "max_tokens": MAX_TOKENS, "options": COST_OPTIONS,
            "preparation_seconds": round(preparation_s, 1), "table": table, "raw": raw}


def rows(summary: dict) -> list[dict]:
    """The summary rows (``bench/summary.py``): each variant's cost ratio at the goal's concurrency."""
    out = []
    for name in VARIANTS:
        if name == "unprotected" or f"{name} @ {GOAL_CONCURRENCY}" not in summary["table"]:
            continue
        value = summary["table"][f"{name} @ {GOAL_CONCURRENCY}"]["cost_ratio"]
        goal = GOALS.get(name)
        out.append({"metric": f"flagged cost ratio, {name}, concurrency {GOAL_CONCURRENCY}",
                    "model": summary["model"], "value": value, "goal": f"<= {goal}" if goal else None,
                    "pass": value <= goal if goal else None})
    return out


def markdown(summary: dict) -> str:
    """Each variant's throughput, cost ratio and time to first token at each concurrency."""
    lines = [
        f"model {summary['model']}, {summary['rounds']} rounds, {summary['max_tokens']} tokens per reply, "
        f"targets prepared in {summary['preparation_seconds']} s",
        "",
        "| variant @ concurrency | tokens/s | cost ratio | TTFT p50 (ms) | hits |",
        "| --- | --: | --: | --: | --: |",
    ]
    for name, row in summary["table"].items():
        lines.append(f"| {name} | {row['tokens_per_s']} | {row['cost_ratio']:.3f}x | {row['ttft_p50_ms']} "
                     f"| {row['hit_share']:.0%} |")
    return "\n".join(lines)


def variant_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"variants are among {', '.join(VARIANTS)}; got {text!r}")
    return names


def main() -> None:
    bench_main(__doc__.splitlines()[0], RESULTS, measure, markdown, default_variant="bench",
               add_arguments=lambda parser: parser.add_argument(
                   "--only", type=variant_names, help="comma-separated variants to measure (default: all)"))


if __name__ == "__main__":
    main()
