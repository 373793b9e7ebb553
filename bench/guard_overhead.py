"""What each unlearning mechanism costs a flagged request, what it protects, what training it needs, and what 100
registered targets cost unflagged traffic (issues 4 and 5).

Runs a serving replica in-process (``server.runtime.Runtime``: the engine, guards and pipeline ``lethe serve`` runs),
registers the two TOFU forget01 authors with all four mechanisms (σ calibrated, phrases extracted, ULD assistant and
O3 LoRA trained by the jobs, as in production; each job's wall time is reported) and then, in rounds whose order
rotates so that host noise hits every variant alike:

* flagged: the authors' 40 forget questions, each classified (a hit), then planned with no mechanism
  ("unprotected": the same request sent as plain token ids), each mechanism alone, ECO + GUARD (the default), or all
  four. Each mechanism applies under its own gate (O3: the OOD detector), exactly as served. Generation is greedy with
  ``ignore_eos`` and a fixed length, so every variant produces the same number of tokens and cost ratios compare
  like with like. Throughput at concurrency 8, latency per request at concurrency 1.
* unflagged: 40 retain-author questions with no targets registered vs 100 (the 2 real + 98 synthetic heads with
  made-up names, ``bench/classifier_latency.py``'s synthesis, thresholds above every negative so nothing is hit).

Ratios are medians over rounds; cost ratio = unprotected throughput / variant throughput (1.05 = 5 % dearer).
Before timing, each variant's quality is measured once with normal greedy replies (at most 60 tokens): mean ROUGE-L
recall of the gold answer on the forget questions, on their TOFU paraphrases and on retain-author questions, and the
share of the questions the unprotected model answered (recall >= 0.5) that fall below 0.3.

    python bench/guard_overhead.py [--variant tiny|full | --model DIR] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.classifier_latency import synthesise_heads  # noqa: E402
from bench.runtime_harness import bench_main, drive  # noqa: E402
from classifiers import ClassifierBank  # noqa: E402
from classifiers.negatives import builtin_negative_pool  # noqa: E402
from demo.tofu_data import authors_of, demo_authors  # noqa: E402
from evals.fluency import median_known_word_share  # noqa: E402
from guards.text_metrics import rouge_l_recall  # noqa: E402
from server.admin.protocol import TargetCreate  # noqa: E402
from server.admin.serving import new_target  # noqa: E402
from server.classifier_jobs import _load_prompt_artifact  # noqa: E402
from server.planner import ChatTurn, EnginePlan  # noqa: E402
from server.registry.records import NewTarget  # noqa: E402
from server.registry.snapshot import RegistrySnapshot  # noqa: E402
from server.run import ChatPrompt, RunRequest  # noqa: E402
from server.runtime import Runtime  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "guard_overhead.json"
ALL_FOUR = ("eco", "guard", "uld", "o3")
VARIANTS: dict[str, tuple[str, ...] | None] = {
    "unprotected": None, "eco": ("eco",), "guard": ("guard",), "uld": ("uld",), "o3": ("o3",),
    "eco+guard": ("eco", "guard"), "all four": ALL_FOUR}
MAX_TOKENS = 48
CONCURRENCY = 8
LATENCY_SAMPLE = 10
SYNTHETIC_TARGETS = 100


def target_body(author, retain_authors, mechanisms: tuple[str, ...] = ALL_FOUR) -> NewTarget:
    return new_target(TargetCreate.model_validate({
        "name": author.name, "aliases": [author.name],
        "forget": [{"question": i.question, "answer": i.answer} for i in author.items],
        "retain": [{"question": i.question, "answer": i.answer} for a in retain_authors for i in a.items],
        "mechanisms": {name: {} for name in mechanisms},
    }), default_mechanisms=())


async def wait_until_served(runtime: Runtime, target_ids: list[str]) -> None:
    targets, snapshots = runtime.control.registry.targets, runtime.control.snapshots
    while True:
        statuses = [targets.get(tid).status for tid in target_ids]
        if {"failed", "degraded"} & set(statuses):
            raise RuntimeError(f"target preparation failed: {statuses}")
        if all(s == "active" for s in statuses) and snapshots.current.revision == targets.revision():
            return
        await asyncio.sleep(1)


def only(snapshot: RegistrySnapshot, mechanisms: tuple[str, ...]) -> RegistrySnapshot:
    """The snapshot with each target's mechanisms restricted to ``mechanisms``."""
    targets = {tid: replace(record, mechanisms={k: v for k, v in record.mechanisms.items() if k in mechanisms})
               for tid, record in snapshot.targets.items()}
    return replace(snapshot, targets=targets)


def question(text: str) -> ChatPrompt:
    """One user question, rendered by the pipeline as a chat request is."""
    return ChatPrompt((ChatTurn("user", text),))


def replan_run(runtime: Runtime, run: Any, mechanisms: tuple[str, ...] | None) -> None:
    """Re-plan a started (hit) run with only ``mechanisms``, or as plain token ids ("unprotected") when None."""
    prompt = run.prompts[0]
    if mechanisms is None:
        run.plans = [EnginePlan(prompt={"prompt_token_ids": prompt.token_ids})]
    else:
        run.snapshot = only(run.snapshot, mechanisms)
        run.plans = [runtime.pipeline.plan(run, 0)]


async def serve(runtime: Runtime, prompts: list[ChatPrompt], concurrency: int,
                mechanisms: tuple[str, ...] | None = None, replan: bool = False) -> tuple[float, list[float], int]:
    """(tokens/s, per-request seconds, hits) for the prompts through the pipeline at a concurrency."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    hits = 0

    async def send(prompt: ChatPrompt) -> AsyncIterator[int]:
        nonlocal hits
        run = await runtime.pipeline.start(RunRequest("chat", f"bench-{uuid.uuid4().hex}", prompt))
        hits += bool(run.hit_target_ids)
        if replan:
            replan_run(runtime, run, mechanisms)
        async with run:
            async for event in run.events(params):
                yield len(event.token_ids)

    load = await drive(prompts, concurrency, send)
    return load.tokens_per_s, load.seconds, hits


async def quality(runtime: Runtime, sets: dict[str, list[tuple[ChatPrompt, str]]],
                  mechanisms: tuple[str, ...] | None) -> dict[str, list[tuple[float, str]]]:
    """(ROUGE-L recall of the gold answer, reply) per question of each set, greedy replies of at most 60 tokens."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    pipeline = runtime.pipeline
    params = SamplingParams(temperature=0.0, max_tokens=60, output_kind=RequestOutputKind.DELTA)
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(prompt: ChatPrompt, gold: str) -> tuple[float, str]:
        async with limit:
            run = await pipeline.start(RunRequest("chat", f"bench-{uuid.uuid4().hex}", prompt))
            if run.hit_target_ids:
                replan_run(runtime, run, mechanisms)
            async with run:
                text = "".join([event.text async for event in run.events(params)])
            return rouge_l_recall(text, gold), text

    return {name: list(await asyncio.gather(*(one(p, g) for p, g in items))) for name, items in sets.items()}


def quality_row(results: dict[str, list[tuple[float, str]]],
                before: dict[str, list[tuple[float, str]]]) -> dict[str, float]:
    scores = {name: [score for score, _ in values] for name, values in results.items()}
    row = {f"{name}_rouge_l": round(statistics.fmean(values), 3) for name, values in scores.items()}
    for name in ("forget", "paraphrase"):
        answered = [i for i, (value, _) in enumerate(before[name]) if value >= 0.5]
        row[f"{name}_forgotten_share"] = round(sum(scores[name][i] < 0.3 for i in answered) / len(answered), 3)
    row["forget_reply_word_share"] = round(median_known_word_share([text for _, text in results["forget"]]), 3)
    return row


def hundred_targets(snapshot: RegistrySnapshot, runtime: Runtime) -> RegistrySnapshot:
    real = [_load_prompt_artifact(runtime.control.artifacts.path(record.classifier["artifact"]))
            for record in snapshot.targets.values()]
    embedder = runtime.control.embedder()
    negatives = embedder.encode([n.text for n in builtin_negative_pool()])
    heads = synthesise_heads(real, SYNTHETIC_TARGETS, negatives)
    for key, head in list(heads.items()):
        if key.startswith("synthetic"):  # above every negative: the bench measures cost, not false positives
            logit = np.log(head.threshold / (1 - head.threshold))
            heads[key] = replace(head, bias=float(logit - (negatives @ head.weights).max() - 1.0))
    return replace(snapshot, bank=ClassifierBank.from_artifacts(heads, embedder))


async def measure(runtime: Runtime, rounds: int, model: str) -> dict:
    forget = authors_of("forget01")
    retain_authors = [a for a in demo_authors() if a.index in (0, 1, 2)]
    started = time.perf_counter()
    ids = [runtime.control.registry.targets.create(target_body(a, retain_authors)).id for a in forget]
    await wait_until_served(runtime, ids)
    preparation_s = time.perf_counter() - started
    job_seconds: dict[str, list[float]] = {}
    for target_id in ids:
        for job in runtime.control.registry.targets.get(target_id).jobs:
            if job.status == "succeeded" and job.started_at and job.finished_at:
                seconds = (job.finished_at - job.started_at).total_seconds()
                job_seconds.setdefault(job.kind, []).append(round(seconds, 1))
    holder = runtime.control.snapshots
    registered = holder.current
    flagged = [question(i.question) for a in forget for i in a.items]
    unflagged = [question(i.question) for a in retain_authors for i in a.items[:14]][:40]
    empty = replace(registered, targets={}, bank=None)
    loaded = hundred_targets(registered, runtime)

    question_sets = {
        "forget": [(question(i.question), i.answer) for a in forget for i in a.items],
        "paraphrase": [(question(i.paraphrased_question), i.answer) for a in forget for i in a.items],
        "retain": [(question(i.question), i.answer) for a in retain_authors for i in a.items],
    }
    unprotected = await quality(runtime, question_sets, None)
    qualities = {name: quality_row(await quality(runtime, question_sets, mechanisms), unprotected)
                 for name, mechanisms in VARIANTS.items()}
    print("quality measured", flush=True)

    rows: dict[str, list[dict]] = {name: [] for name in [*VARIANTS, "unflagged/0 targets", "unflagged/100 targets"]}
    await serve(runtime, flagged[:8], CONCURRENCY, None, replan=True)  # warm-up
    for round_index in range(rounds):
        names = list(VARIANTS)
        names = names[round_index % len(names):] + names[:round_index % len(names)]
        holder.current = registered
        for name in names:
            tps, _, hits = await serve(runtime, flagged, CONCURRENCY, VARIANTS[name], replan=True)
            _, latency, _ = await serve(runtime, flagged[:LATENCY_SAMPLE], 1, VARIANTS[name], replan=True)
            rows[name].append({"tokens_per_s": tps, "latency_s": statistics.median(latency), "hits": hits})
        pairs = [("unflagged/0 targets", empty), ("unflagged/100 targets", loaded)]
        for name, snapshot in pairs if round_index % 2 == 0 else pairs[::-1]:
            holder.current = snapshot
            tps, latency, hits = await serve(runtime, unflagged, CONCURRENCY)
            rows[name].append({"tokens_per_s": tps, "latency_s": statistics.median(latency), "hits": hits})
        print(f"round {round_index + 1}/{rounds} done", flush=True)
    holder.current = registered

    def ratio(numerator: str, denominator: str, key: str = "tokens_per_s") -> float:
        return statistics.median(a[key] / b[key] for a, b in zip(rows[numerator], rows[denominator], strict=True))

    summary = {
        "model": model, "rounds": rounds, "max_tokens": MAX_TOKENS, "concurrency": CONCURRENCY,
        "preparation_seconds": round(preparation_s, 1),
        "job_seconds": job_seconds,
        "eco_state": [{key: runtime.control.registry.targets.get(t).mechanisms["eco"].state.get(key)
                       for key in ("sigma", "scope", "goal", "reached_goal")} for t in ids],
        "quality": qualities,
        "flagged_cost_ratio": {name: round(ratio("unprotected", name), 3) for name in VARIANTS},
        "flagged_latency_ratio": {name: round(ratio(name, "unprotected", "latency_s"), 3) for name in VARIANTS},
        "unflagged_throughput_ratio_100_vs_0": round(ratio("unflagged/100 targets", "unflagged/0 targets"), 3),
        "unflagged_hits_with_100_targets": [r["hits"] for r in rows["unflagged/100 targets"]],
        "raw": rows,
    }
    return summary


def markdown(summary: dict) -> str:
    """The flagged-traffic table: each mechanism's quality and its cost against unprotected serving."""
    lines = [
        f"model {summary['model']}, {summary['rounds']} rounds, {summary['max_tokens']} tokens per reply",
        "",
        "| mechanism | forget ROUGE-L (forgotten) | paraphrase ROUGE-L (forgotten) | retain ROUGE-L "
        "| real-word share of forget replies | cost ratio (conc. 8) | latency ratio (conc. 1) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, q in summary["quality"].items():
        lines.append(
            f"| {name} | {q['forget_rouge_l']:.3f} ({q['forget_forgotten_share']:.0%}) "
            f"| {q['paraphrase_rouge_l']:.3f} ({q['paraphrase_forgotten_share']:.0%}) | {q['retain_rouge_l']:.3f} "
            f"| {q['forget_reply_word_share']:.2f} "
            f"| {summary['flagged_cost_ratio'][name]:.3f}x | {summary['flagged_latency_ratio'][name]:.3f}x |")
    lines += [
        "",
        f"unflagged throughput, 100 targets vs none: {summary['unflagged_throughput_ratio_100_vs_0']:.3f}x "
        f"(hits: {summary['unflagged_hits_with_100_targets']})",
        f"target preparation (2 targets, all four mechanisms, one job worker): {summary['preparation_seconds']} s; "
        f"per job (s): {summary['job_seconds']}; ECO calibration: {summary['eco_state']}",
    ]
    return "\n".join(lines)


def main() -> None:
    bench_main(__doc__.splitlines()[0], RESULTS, measure, markdown)


if __name__ == "__main__":
    main()
