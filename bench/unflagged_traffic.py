"""Unflagged traffic: what Lethe adds in front of vLLM for requests about no forget target (issue 6, SPEC §10).

One serving replica runs in-process (``server.runtime.Runtime``: the engine, guards and pipeline ``lethe serve``
runs). Three paths drive the same ``AsyncLLM`` with the same prompts, in rounds whose order rotates so that host noise
hits each alike:

* ``vllm``: the chat template rendered and ``AsyncLLM.generate`` called directly — vLLM without Lethe;
* ``lethe, 0 targets``: the request pipeline (render, classification skipped with an empty registry, plan, engine,
  choice events);
* ``lethe, 100 targets``: the same with 100 registered targets (the two forget01 authors plus 98 synthetic heads
  with made-up names, thresholds above every negative) that none of the prompts hits: every prompt pays the
  classifier's embedding and the bank's scoring.

HTTP framing is the same for Lethe and a vLLM server and is left out of both. Prompts are retain-author questions and
generic chat, each sent with a unique reference number so that the classifier's embedding cache never helps (real
traffic rarely repeats a prompt); replies are greedy with ``ignore_eos`` and a fixed length, so every path produces
the same number of tokens.
Throughput (tokens/s) and time to first token (p50, p99) at concurrency 1, 8 and 32; ratios are Lethe ÷ vLLM
(throughput: ≥ 0.97 is the goal; TTFT: how much later the first token comes), medians over rounds.

    python bench/unflagged_traffic.py [--variant tiny|full | --model DIR] [--rounds 3]
"""

from __future__ import annotations

import itertools
import statistics
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.guard_overhead import hundred_targets, target_body, wait_until_served  # noqa: E402
from bench.runtime_harness import bench_main, drive  # noqa: E402
from classifiers.negatives import builtin_negative_pool  # noqa: E402
from demo.tofu_data import authors_of, demo_authors  # noqa: E402
from guards.chat import chat_prompt_ids  # noqa: E402
from server.planner import ChatTurn  # noqa: E402
from server.run import ChatPrompt, RunRequest  # noqa: E402
from server.runtime import Runtime  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "unflagged_traffic.json"
MAX_TOKENS = 32
CONCURRENCIES = (1, 8, 32)
PROMPTS = 64
PATHS = ("vllm", "lethe, 0 targets", "lethe, 100 targets")


def unflagged_questions() -> list[str]:
    """Retain-author questions and generic chat: what a served model mostly answers."""
    retain = [item.question for author in demo_authors()[:3] for item in author.items]
    generic = [n.text for n in builtin_negative_pool() if n.source == "generic"]
    mixed = [q for pair in zip(retain, generic * (len(retain) // max(1, len(generic)) + 1), strict=False) for q in pair]
    return mixed[:PROMPTS]


async def through(runtime: Runtime, path: str, questions: list[str], concurrency: int) -> dict[str, float | list]:
    """tokens/s and per-request TTFT of the questions through one path ("vllm": the engine alone; otherwise Lethe's
    pipeline) at one concurrency."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    pipeline, engine = runtime.pipeline, runtime.engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    hits = 0

    async def plain(question: str) -> AsyncIterator[int]:
        ids = chat_prompt_ids(engine.tokenizer, question)
        async for output in engine.generate({"prompt_token_ids": ids}, params, f"plain-{uuid.uuid4().hex}"):
            yield len(output.outputs[0].token_ids)

    async def lethe(question: str) -> AsyncIterator[int]:
        nonlocal hits
        run = await pipeline.start(RunRequest("chat", f"bench-{uuid.uuid4().hex}",
                                              ChatPrompt((ChatTurn("user", question),))))
        hits += bool(run.hit_target_ids)
        async with run:
            async for event in run.events(params):
                yield len(event.token_ids)

    load = await drive(questions, concurrency, plain if path == "vllm" else lethe)
    return {"tokens_per_s": load.tokens_per_s, "ttft": load.ttft, "hits": hits}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def measure(runtime: Runtime, rounds: int, model: str) -> dict:
    forget, retain_authors = authors_of("forget01"), demo_authors()[:3]
    ids = [runtime.control.registry.targets.create(target_body(a, retain_authors, ("guard",))).id for a in forget]
    await wait_until_served(runtime, ids)
    holder = runtime.control.snapshots
    registered = holder.current
    snapshots = {"lethe, 0 targets": replace(registered, targets={}, bank=None),
                 "lethe, 100 targets": hundred_targets(registered, runtime)}
    questions = unflagged_questions()
    serial = itertools.count()

    def unique(texts: list[str]) -> list[str]:
        return [f"{text} (ref {next(serial)})" for text in texts]

    await through(runtime, "vllm", questions[:8], 8)  # warm-up
    raw: dict[str, dict[int, list[dict]]] = {path: {c: [] for c in CONCURRENCIES} for path in PATHS}
    for round_index in range(rounds):
        order = PATHS[round_index % len(PATHS):] + PATHS[:round_index % len(PATHS)]
        for concurrency in CONCURRENCIES:
            for path in order:
                holder.current = snapshots.get(path, registered)
                raw[path][concurrency].append(await through(runtime, path, unique(questions), concurrency))
        print(f"round {round_index + 1}/{rounds} done", flush=True)
    holder.current = registered

    table = {}
    for concurrency in CONCURRENCIES:
        plain = raw["vllm"][concurrency]
        for path in PATHS:
            rows = raw[path][concurrency]
            table[f"{path} @ {concurrency}"] = {
                "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1),
                "throughput_ratio": round(statistics.median(
                    r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rows, plain, strict=True)), 3),
                "ttft_p50_ms": round(1000 * statistics.median(percentile(r["ttft"], 50) for r in rows), 1),
                "ttft_p99_ms": round(1000 * statistics.median(percentile(r["ttft"], 99) for r in rows), 1),
                "hits": [r["hits"] for r in rows],
            }
    return {"model": model, "rounds": rounds, "max_tokens": MAX_TOKENS, "prompts": len(questions), "table": table}


def markdown(summary: dict) -> str:
    """Throughput and time to first token of each path at each concurrency, against vLLM alone."""
    lines = [
        f"model {summary['model']}, {summary['rounds']} rounds, {summary['prompts']} unflagged prompts, "
        f"{summary['max_tokens']} tokens per reply",
        "",
        "| path @ concurrency | tokens/s | throughput vs vLLM | TTFT p50 (ms) | TTFT p99 (ms) |",
        "| --- | --: | --: | --: | --: |",
    ]
    for name, row in summary["table"].items():
        lines.append(f"| {name} | {row['tokens_per_s']} | {row['throughput_ratio']:.3f}x | {row['ttft_p50_ms']} "
                     f"| {row['ttft_p99_ms']} |")
    return "\n".join(lines)


def main() -> None:
    bench_main(__doc__.splitlines()[0], RESULTS, measure, markdown)


if __name__ == "__main__":
    main()
