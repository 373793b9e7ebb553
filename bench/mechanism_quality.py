"""What each unlearning mechanism protects, and what it does to the replies, on a trained demo model (issue 4).

Runs a serving replica in-process (``server.runtime.Runtime``: the engine, guards and pipeline ``lethe serve`` runs),
registers the two TOFU forget01 authors with all four mechanisms (σ calibrated, phrases extracted, ULD assistant and
O3 LoRA trained by the jobs, as in production; each job's wall time is reported), then asks, with each variant
(unprotected: the same request sent as plain token ids; each mechanism alone; ECO + GUARD, the default; all four),
normal greedy replies of at most 60 tokens: mean ROUGE-L recall of the gold answer on the authors' forget questions,
on their TOFU paraphrases and on retain-author questions, the share of the questions the unprotected model answered
(recall >= 0.5) that fall below 0.3, and the median share of real words in the forget replies.

What the mechanisms cost is measured on the bench model, by ``bench/mechanism_cost.py``.

    python bench/mechanism_quality.py [--variant tiny|full | --model DIR]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.registration import VARIANTS, question, replan_run, target_body, wait_until_served  # noqa: E402
from bench.runtime_harness import bench_main  # noqa: E402
from demo.tofu_data import authors_of, demo_authors  # noqa: E402
from evals.fluency import median_known_word_share  # noqa: E402
from guards.text_metrics import rouge_l_recall  # noqa: E402
from server.run import ChatPrompt, RunRequest  # noqa: E402
from server.runtime import Runtime  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "mechanism_quality.json"
CONCURRENCY = 8


async def quality(runtime: Runtime, sets: dict[str, list[tuple[ChatPrompt, str]]],
                  mechanisms: tuple[str, ...] | None) -> dict[str, list[tuple[float, str]]]:
    """(ROUGE-L recall of the gold answer, reply) per question of each set, greedy replies of at most 60 tokens."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    pipeline = runtime.pipeline
    params = SamplingParams(temperature=0.0, max_tokens=60, output_kind=RequestOutputKind.DELTA)
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(prompt: ChatPrompt, gold: str) -> tuple[float, str]:
        async with limit:
            run = await pipeline.start(RunRequest("chat", f"bench-{uuid.uuid4().hex}", prompt, params=params))
            if run.hit_target_ids:
                replan_run(runtime, run, mechanisms)
            async with run:
                text = "".join([event.text async for event in run.events()])
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


async def measure(runtime: Runtime, rounds: int, model: str) -> dict:
    """``rounds`` is unused: greedy replies are the same every time."""
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
    question_sets = {
        "forget": [(question(i.question), i.answer) for a in forget for i in a.items],
        "paraphrase": [(question(i.paraphrased_question), i.answer) for a in forget for i in a.items],
        "retain": [(question(i.question), i.answer) for a in retain_authors for i in a.items],
    }
    unprotected = await quality(runtime, question_sets, None)
    qualities = {name: quality_row(await quality(runtime, question_sets, mechanisms), unprotected)
                 for name, mechanisms in VARIANTS.items()}
    return {
        "model": model,
        "preparation_seconds": round(preparation_s, 1),
        "job_seconds": job_seconds,
        "eco_state": [{key: runtime.control.registry.targets.get(t).mechanisms["eco"].state.get(key)
                       for key in ("sigma", "scope", "goal", "reached_goal")} for t in ids],
        "quality": qualities,
    }


def markdown(summary: dict) -> str:
    """Each mechanism's forgetting and what it leaves of the replies."""
    lines = [
        f"model {summary['model']}, greedy replies of at most 60 tokens",
        "",
        "| mechanism | forget ROUGE-L (forgotten) | paraphrase ROUGE-L (forgotten) | retain ROUGE-L "
        "| real-word share of forget replies |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, q in summary["quality"].items():
        lines.append(
            f"| {name} | {q['forget_rouge_l']:.3f} ({q['forget_forgotten_share']:.0%}) "
            f"| {q['paraphrase_rouge_l']:.3f} ({q['paraphrase_forgotten_share']:.0%}) | {q['retain_rouge_l']:.3f} "
            f"| {q['forget_reply_word_share']:.2f} |")
    lines += [
        "",
        f"target preparation (2 targets, all four mechanisms, one job worker): {summary['preparation_seconds']} s; "
        f"per job (s): {summary['job_seconds']}; ECO calibration: {summary['eco_state']}",
    ]
    return "\n".join(lines)


def main() -> None:
    bench_main(__doc__.splitlines()[0], RESULTS, measure, markdown)


if __name__ == "__main__":
    main()
