"""Per-request classifier latency for banks of 1, 10, 100 and 1,000 targets (SPEC §10, issue 3).

Two real targets are fitted (the TOFU forget01 authors, question/answer items). Fitting 1,000 real heads would take
most of an hour, and latency depends on the shapes, not on what a head learned, so the other targets are synthesised:
a random direction with a real head's norm as weights, the bias set so that 1 % of the built-in negative pool clears
the threshold (a real head's false-positive rate, so hits per request are realistic: ~T/100), and a unique made-up
two- or three-part name (so the alias index holds 1,000 targets' keys, postings and typo neighbourhoods). O3 gates
are synthesised as perturbed copies of the two real ones (same shapes: rank-64 precision, ~100 exemplars each); note
that O3 stacks one rank-8 LoRA block per target into one adapter, so real deployments have tens of O3 targets, not
1,000.

All 200 requests (single prompts about the targets, about other authors, general questions, and three-turn
conversations) are scored by every bank size in turn, round-robin, so that load from other processes on the host
skews all sizes alike; the O3 gates are timed afterwards on the same embeddings (see `measure`). The embedder's
cache is off, so every request pays its embedding as a new prompt would; the embedding model runs on `--threads`
threads (default 1: the cost of one request on one core). Last, the 100-target bank scores the workload in batches of
1, 8 and 32 requests, as the server coalesces concurrent requests into one embedding call
(``server.classifier_batcher``), once with the served ONNX Runtime embeddings and once with PyTorch's, interleaved, for
the ratio between them.

    python bench/classifier_latency.py [--threads N]   # prints a table, writes bench/results/classifier_latency.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from classifiers import (
    ClassifierBank,
    Embedder,
    ForgetItem,
    PromptClassifierArtifact,
    TargetSpec,
    fit_prompt_classifier,
)
from classifiers.negatives import GENERIC_PROMPTS, builtin_negative_pool
from classifiers.types import Conversation
from guards.o3.ood import OODArtifact, OODBank, fit_ood_detector
from demo.tofu_data import authors_of, demo_authors, load_split

SIZES = (1, 10, 100, 1000)
BATCH_SIZES = (1, 8, 32)  # requests coalesced into one embedding call (server.classifier_batcher), at 100 targets
BATCHED_BANK_SIZE = 100
N_REQUESTS = 200
WARMUP_REQUESTS = 10
RESULTS = Path(__file__).parent / "results" / "classifier_latency.json"
_SYLLABLES = ("ka", "ro", "mi", "tel", "van", "shu", "dor", "ine", "bal", "zek", "ar", "lo", "nu", "pet", "sa", "vik")


def real_targets() -> list[TargetSpec]:
    retain = [ForgetItem(i.question, i.answer) for a in demo_authors()[:9] for i in a.items]
    return [
        TargetSpec(f"tofu-{a.index}", a.name, [a.name], [ForgetItem(i.question, i.answer) for i in a.items], retain)
        for a in authors_of("forget01")
    ]


def synthetic_name(rng: np.random.Generator) -> str:
    parts = rng.integers(2, 4)
    return " ".join("".join(rng.choice(_SYLLABLES, rng.integers(2, 4))).title() for _ in range(parts))


def synthesise_heads(
    real: list[PromptClassifierArtifact], size: int, negatives: np.ndarray, seed: int = 0
) -> dict[str, PromptClassifierArtifact]:
    rng = np.random.default_rng(seed)
    out = {f"real-{i}": a for i, a in enumerate(real[:size])}
    for i in range(size - len(out)):
        base = real[i % len(real)]
        direction = rng.standard_normal(base.weights.shape).astype(np.float32)
        weights = direction * (np.linalg.norm(base.weights) / np.linalg.norm(direction))
        threshold_logit = np.log(base.threshold / (1 - base.threshold))
        bias = float(threshold_logit - np.quantile(negatives @ weights, 0.99))
        out[f"synthetic-{i}"] = replace(base, weights=weights, bias=bias, aliases=[synthetic_name(rng)])
    return out


def synthesise_gates(real: list[OODArtifact], size: int, seed: int = 0) -> dict[str, OODArtifact]:
    rng = np.random.default_rng(seed)
    out = {f"real-{i}": a for i, a in enumerate(real[:size])}
    for i in range(size - len(out)):
        base = real[i % len(real)]
        shift = rng.standard_normal(base.mean.shape).astype(np.float32) * 0.05
        out[f"synthetic-{i}"] = replace(base, mean=base.mean + shift, exemplars=base.exemplars + shift)
    return out


def requests() -> list[Conversation]:
    """200 requests: 50 about the targets, 50 about other authors, 50 general, 50 three-turn conversations."""
    forget = [i.paraphrased_question for a in authors_of("forget01") for i in a.items]
    others = [i.question for a in demo_authors()[:18] for i in a.items]
    general = [r["question"] for r in load_split("world_facts")] + list(GENERIC_PROMPTS)
    rng = np.random.default_rng(0)
    single = [*rng.choice(forget, 50), *rng.choice(others, 50), *rng.choice(general, 50)]
    multi = [
        [("user", str(rng.choice(others))), ("assistant", "I am not sure."), ("user", str(rng.choice(general)))]
        for _ in range(50)
    ]
    return [[("user", str(p))] for p in single] + multi


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def measure(heads, gates, negatives: np.ndarray, embedder: Embedder, workload: list[Conversation]) -> list[dict]:
    """Per size: latency percentiles of each stage over `workload`.

    Classifier banks are interleaved request by request (host load skews all sizes alike). O3 gates are timed after,
    size by size, on the embeddings the classifier produced: a 1,000-target gate sweeps ~300 MB per request, which
    would evict the embedding model from the CPU caches and bill its misses to whichever bank runs next.
    """
    banks, build_seconds = {}, {}
    for size in SIZES:
        artifacts = synthesise_heads(heads, size, negatives)
        started = time.perf_counter()
        banks[size] = ClassifierBank.from_artifacts(artifacts, embedder)  # what a replica does per registry revision
        build_seconds[size] = time.perf_counter() - started
    samples = {size: {"total": [], "embed": [], "rest": [], "ood": [], "hits": 0, "hit_targets": 0} for size in SIZES}
    embedded: list[np.ndarray] = []
    for i, conversation in enumerate(workload[:WARMUP_REQUESTS] + workload):
        for size, bank in banks.items():
            result = bank.score(conversation)
            if i < WARMUP_REQUESTS:
                continue
            sample = samples[size]
            sample["total"].append(result.total_seconds)
            sample["embed"].append(result.embed_seconds)
            sample["rest"].append(result.total_seconds - result.embed_seconds)
            sample["hits"] += bool(result.hits)
            sample["hit_targets"] += len(result.hits)
        if i >= WARMUP_REQUESTS:
            embedded.append(result.embeddings)
    for size in SIZES:
        gate = OODBank(synthesise_gates(gates, size), embedder)
        for embeddings in embedded[:WARMUP_REQUESTS]:
            gate.score_embeddings(embeddings)
        for embeddings in embedded:
            started = time.perf_counter()
            gate.score_embeddings(embeddings)
            samples[size]["ood"].append(time.perf_counter() - started)
    return [
        {
            "targets": size,
            "requests": len(workload),
            "requests_with_hits": s["hits"],
            "mean_hit_targets_per_request": s["hit_targets"] / len(workload),
            "bank_build_s": build_seconds[size],
            "classifier_total": percentiles(s["total"]),
            "embedding": percentiles(s["embed"]),
            "heads_and_aliases": percentiles(s["rest"]),
            "ood_gate_from_embeddings": percentiles(s["ood"]),
        }
        for size, s in samples.items()
    ]


ONNX, PYTORCH = "onnxruntime", "pytorch"


def measure_batched(banks: dict[str, ClassifierBank], workload: list[Conversation]) -> list[dict]:
    """Per embedding backend and batch size: milliseconds per request when concurrent requests share one embedding
    call.

    The workload is cut into rounds of 32 requests; each round is scored by every (backend, batch size) in turn
    (rotating which goes first), so host load skews them alike.
    """
    cases = [(backend, size) for backend in banks for size in BATCH_SIZES]
    per_request: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    for bank in banks.values():
        bank.score_many(workload[:WARMUP_REQUESTS])
    chunk = max(BATCH_SIZES)
    for round_index, start in enumerate(range(0, len(workload) - chunk + 1, chunk)):
        requests_ = workload[start:start + chunk]
        shift = round_index % len(cases)
        for backend, size in cases[shift:] + cases[:shift]:
            started = time.perf_counter()
            for first in range(0, chunk, size):
                banks[backend].score_many(requests_[first:first + size])
            per_request[backend, size].append((time.perf_counter() - started) / chunk)
    baseline = {size: np.median(per_request[PYTORCH, size]) for size in BATCH_SIZES}
    return [{"backend": backend, "batch": size, "ms_per_request": float(np.median(seconds) * 1e3),
             "vs_unbatched": float(np.median(seconds) / np.median(per_request[backend, 1])),
             "vs_pytorch": float(np.median(seconds) / baseline[size])}
            for (backend, size), seconds in per_request.items()]


def markdown(summary: dict) -> str:
    """A table of per-request milliseconds, p50 / p99, of each stage, by bank size."""
    lines = [
        f"per-request latency, ms p50 / p99 ({N_REQUESTS} requests, torch threads={summary['threads']}, "
        "no embedding cache)",
        "",
        "| targets | classifier total | embedding | heads + aliases | O3 gate | hit targets/request | bank build |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in summary["sizes"]:
        cells = [
            f"{r[stage]['p50_ms']:.2f} / {r[stage]['p99_ms']:.2f}"
            for stage in ("classifier_total", "embedding", "heads_and_aliases", "ood_gate_from_embeddings")
        ]
        lines.append(f"| {r['targets']} | " + " | ".join(cells) + f" | {r['mean_hit_targets_per_request']:.2f}"
                     f" | {r['bank_build_s'] * 1e3:.0f} ms |")
    batched = summary.get("batched", [])
    if batched:
        lines += ["", f"requests classified together in one embedding call ({BATCHED_BANK_SIZE} targets, medians of "
                  "rounds of 32 requests), by embedding backend", "",
                  "| backend | requests per batch | ms per request | vs one at a time | vs PyTorch |",
                  "|---|--:|--:|--:|--:|"]
        lines += [f"| {b['backend']} | {b['batch']} | {b['ms_per_request']:.2f} | {b['vs_unbatched']:.2f}x | "
                  f"{b['vs_pytorch']:.2f}x |" for b in batched]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the embedding model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    fitting_embedder = Embedder()
    specs = real_targets()
    heads = [fit_prompt_classifier(s, fitting_embedder) for s in specs]
    gates = [fit_ood_detector(s, fitting_embedder) for s in specs]
    negatives = fitting_embedder.encode([n.text for n in builtin_negative_pool()])
    embedder = Embedder(cache_size=0)
    workload = requests()
    rows = measure(heads, gates, negatives, embedder, workload)
    batched_heads = synthesise_heads(heads, BATCHED_BANK_SIZE, negatives)
    banks = {backend: ClassifierBank.from_artifacts(batched_heads, Embedder(cache_size=0, onnx=backend == ONNX))
             for backend in (ONNX, PYTORCH)}
    batched = measure_batched(banks, workload)

    summary = {"threads": args.threads, "sizes": rows, "batched": batched}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    print("\n" + markdown(summary))
    print(f"\nwritten {RESULTS}")


if __name__ == "__main__":
    main()
