"""Unflagged traffic: what Lethe adds in front of vLLM for requests about no forget target (issue 6, SPEC §10).

One serving replica runs in-process (``server.runtime.Runtime``: the engine, guards and pipeline ``lethe serve``
runs). Four paths drive the same ``AsyncLLM`` with the same prompts, in rounds whose order rotates so that host noise
hits each alike:

* ``vllm``: the chat template rendered and ``AsyncLLM.generate`` called directly — vLLM without Lethe;
* ``lethe, 0 targets``: the request pipeline (render, classification skipped with an empty registry, plan, engine,
  choice events);
* ``lethe, 100 targets``: the same with 100 registered targets (the two forget01 authors plus 98 synthetic heads
  with made-up names, thresholds above every negative) that none of the prompts hits: every prompt pays the
  classifier's embedding and the bank's scoring before the engine sees it (the default);
* ``lethe, 100 targets, speculative prefill``: the same with ``LETHE_SPECULATIVE_PREFILL=true``: each prompt's
  plain request starts while it is classified (``server/speculation.py``).

HTTP framing is the same for Lethe and a vLLM server and is left out of both. The workload is
``bench/workload.py``'s, on the bench model: unique TOFU questions about people no target names (the split's
registrable and held-out authors, ``demo/author_split.py``: never in the gate's negative pool, so never in its
embedding cache), 64 tokens with ``ignore_eos``, concurrency 1, 8 and 32, rotated rounds, medians.
Ratios are Lethe ÷ vLLM: throughput (goal >= 0.95 with 100 targets) and time to first token p50 (goal <= 1.1), both
at concurrency 1 and 8 (issue 19). The gate column is each classified prompt's wait from its classification's queue to
its verdict, as served beside the engine: set it beside ``bench/classifier_latency.py``'s, measured in a quiet process.

    python bench/unflagged_traffic.py [--variant bench|tiny|full | --model DIR] [--rounds 3]
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.registration import hundred_targets, target_body, wait_until_served  # noqa: E402
from bench.runtime_harness import bench_main, drive  # noqa: E402
from bench.workload import (CONCURRENCIES, MAX_TOKENS, UniqueQuestions, median, requests_at,  # noqa: E402
                            rotated, sampling_params)
from demo.author_split import HELDOUT, REGISTRABLE, authors_in  # noqa: E402
from demo.tofu_data import authors_of, demo_authors  # noqa: E402
from guards.chat import chat_prompt_ids  # noqa: E402
from server.planner import NO_TARGETS, ChatTurn  # noqa: E402
from server.run import ChatPrompt, RunRequest  # noqa: E402
from server.runtime import Runtime  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "unflagged_traffic.json"
HUNDRED, SPECULATIVE = "lethe, 100 targets", "lethe, 100 targets, speculative prefill"
PATHS = ("vllm", "lethe, 0 targets", HUNDRED, SPECULATIVE)
GOAL_CONCURRENCIES = (1, 8)
THROUGHPUT_GOAL = 0.95  # Lethe with 100 targets ÷ vLLM, at least
TTFT_GOAL = 1.1  # time to first token p50, Lethe with 100 targets ÷ vLLM, at most


def unflagged_questions() -> list[str]:
    """Questions about TOFU people no benchmark target names and the gate was never fitted on."""
    return [item.question for author in authors_in(REGISTRABLE) + authors_in(HELDOUT) for item in author.items]


async def through(runtime: Runtime, path: str, questions: list[str], concurrency: int) -> dict[str, float | list]:
    """tokens/s and per-request TTFT of the questions through one path ("vllm": the engine alone; otherwise Lethe's
    pipeline) at one concurrency."""
    pipeline, engine = runtime.pipeline, runtime.engine
    params = sampling_params()
    hits = 0
    gate_seconds: list[float] = []

    async def plain(question: str) -> AsyncIterator[int]:
        ids = chat_prompt_ids(engine.tokenizer, question)
        async for output in engine.generate({"prompt_token_ids": ids}, params, f"plain-{uuid.uuid4().hex}"):
            yield len(output.outputs[0].token_ids)

    async def lethe(question: str) -> AsyncIterator[int]:
        nonlocal hits
        run = await pipeline.start(RunRequest("chat", f"bench-{uuid.uuid4().hex}",
                                              ChatPrompt((ChatTurn("user", question),)), params=params))
        hits += bool(run.hit_target_ids)
        gate_seconds.extend(c.seconds for c in run.classifications if c is not NO_TARGETS)
        async with run:
            async for event in run.events():
                yield len(event.token_ids)

    load = await drive(questions, concurrency, plain if path == "vllm" else lethe)
    return {"tokens_per_s": load.tokens_per_s, "ttft": load.ttft, "hits": hits, "gate": gate_seconds}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _gate_p50_ms(seconds: list[float]) -> float | None:
    """A path's classification time at p50 (queued to verdict, as served; None where nothing was classified)."""
    return round(1000 * percentile(seconds, 50), 2) if seconds else None


async def measure(runtime: Runtime, rounds: int, model: str) -> dict:
    forget, retain_authors = authors_of("forget01"), demo_authors()[:3]
    ids = [runtime.control.registry.targets.create(target_body(a, retain_authors, ("guard",))).id for a in forget]
    await wait_until_served(runtime, ids)
    holder = runtime.control.snapshots
    registered = holder.current
    hundred = hundred_targets(registered, runtime)
    snapshots = {"lethe, 0 targets": replace(registered, targets={}, bank=None), HUNDRED: hundred,
                 SPECULATIVE: hundred}
    questions = UniqueQuestions(unflagged_questions())

    for path in PATHS:  # warm-up
        holder.current = snapshots.get(path, registered)
        runtime.pipeline.speculate = path == SPECULATIVE
        await through(runtime, path, questions.take(8), 8)
    raw: dict[str, dict[int, list[dict]]] = {path: {c: [] for c in CONCURRENCIES} for path in PATHS}
    for round_index in range(rounds):
        for concurrency in CONCURRENCIES:
            for path in rotated(PATHS, round_index):
                holder.current = snapshots.get(path, registered)
                runtime.pipeline.speculate = path == SPECULATIVE
                raw[path][concurrency].append(
                    await through(runtime, path, questions.take(requests_at(concurrency)), concurrency))
        print(f"round {round_index + 1}/{rounds} done", flush=True)
    holder.current = registered
    runtime.pipeline.speculate = runtime.control.settings.speculative_prefill

    table = {}
    for concurrency in CONCURRENCIES:
        plain = raw["vllm"][concurrency]
        for path in PATHS:
            rows = raw[path][concurrency]
            table[f"{path} @ {concurrency}"] = {
                "tokens_per_s": round(median([r["tokens_per_s"] for r in rows]), 1),
                "throughput_ratio": round(median([r["tokens_per_s"] / b["tokens_per_s"]
                                                  for r, b in zip(rows, plain, strict=True)]), 3),
                "ttft_p50_ms": round(1000 * median([percentile(r["ttft"], 50) for r in rows]), 1),
                "ttft_p50_ratio": round(median([percentile(r["ttft"], 50) / percentile(b["ttft"], 50)
                                                for r, b in zip(rows, plain, strict=True)]), 3),
                "ttft_p99_ms": round(1000 * median([percentile(r["ttft"], 99) for r in rows]), 1),
                "hits": [r["hits"] for r in rows],
                "gate_p50_ms": _gate_p50_ms([seconds for r in rows for seconds in r["gate"]]),
            }
    return {"model": model, "rounds": rounds, "max_tokens": MAX_TOKENS,
            "requests": {c: requests_at(c) for c in CONCURRENCIES}, "table": table}


def rows(summary: dict) -> list[dict]:
    """The summary rows (``bench/summary.py``): Lethe with 100 targets against vLLM, at the goals' concurrencies."""
    out = []
    for path, label in ((HUNDRED, "100 targets"), (SPECULATIVE, "100 targets, speculative prefill")):
        for concurrency in GOAL_CONCURRENCIES:
            row = summary["table"].get(f"{path} @ {concurrency}")
            if row is None:  # a result file from before the speculative path was measured
                continue
            out += [
                {"metric": f"unflagged throughput, {label} vs vLLM, concurrency {concurrency}",
                 "model": summary["model"], "value": row["throughput_ratio"], "goal": f">= {THROUGHPUT_GOAL}",
                 "pass": row["throughput_ratio"] >= THROUGHPUT_GOAL},
                {"metric": f"unflagged TTFT p50, {label} vs vLLM, concurrency {concurrency}",
                 "model": summary["model"], "value": row["ttft_p50_ratio"], "goal": f"<= {TTFT_GOAL}",
                 "pass": row["ttft_p50_ratio"] <= TTFT_GOAL},
            ]
    served_gate = summary["table"].get(f"{HUNDRED} @ 1", {}).get("gate_p50_ms")
    if served_gate is not None:  # beside detection_scale.py's figure for the same gate called back to back
        out.append({"metric": "served gate p50 ms, 100 targets, concurrency 1", "model": summary["model"],
                    "value": served_gate, "goal": None, "pass": None})
    return out


def markdown(summary: dict) -> str:
    """Throughput and time to first token of each path at each concurrency, against vLLM alone."""
    lines = [
        f"model {summary['model']}, {summary['rounds']} rounds, unique TOFU questions, "
        f"{summary['max_tokens']} tokens per reply",
        "",
        "| path @ concurrency | tokens/s | throughput vs vLLM | TTFT p50 (ms) | TTFT p50 vs vLLM | TTFT p99 (ms) "
        "| gate p50 (ms) |",
        "| --- | --: | --: | --: | --: | --: | --: |",
    ]
    for name, row in summary["table"].items():
        lines.append(f"| {name} | {row['tokens_per_s']} | {row['throughput_ratio']:.3f}x | {row['ttft_p50_ms']} "
                     f"| {row['ttft_p50_ratio']:.3f}x | {row['ttft_p99_ms']} | {row.get('gate_p50_ms') or ''} |")
    return "\n".join(lines)


def main() -> None:
    bench_main(__doc__.splitlines()[0], RESULTS, measure, markdown, default_variant="bench")


if __name__ == "__main__":
    main()
