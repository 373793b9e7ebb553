"""One plain-engine decoding step at batch 8, per model (issue 19): how much work a step is on the model a benchmark's
cost ratios are measured on.

vLLM's ``LLM`` alone, without Lethe (none of its engine arguments, logits processor or adapters): float32, eager, and
prefix caching off, so that every run prefills afresh. Eight distinct prompts of 32 tokens (retain-author questions
run together and cut to length) are generated together, greedy with ``ignore_eos``, once with ``max_tokens`` 64 and
once with ``max_tokens`` 1. The short run is the prefill and the first token; the long one adds 63 decoding steps at
batch 8, so one step = (t64 - t1) / 63. The two runs alternate which goes first over the rounds (default 3); figures
are medians. Each model runs in its own process (one engine each, its memory gone with it); demo variants are built
first if absent.

    python bench/step_time.py [--variants tiny,bench] [--model DIR ...] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.builder import build_demo_model  # noqa: E402
from demo.tofu_data import demo_authors  # noqa: E402
from server.config import Settings  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "step_time.json"
BATCH = 8
PROMPT_TOKENS = 32
MAX_TOKENS = 64


def batch_prompts(tokenizer: Any) -> list[list[int]]:
    """BATCH distinct prompts of exactly PROMPT_TOKENS ids (the tokenizer's own special tokens first)."""
    questions = [item.question for author in demo_authors()[:3] for item in author.items]
    per_prompt = len(questions) // BATCH
    prompts = [tokenizer(" ".join(questions[i * per_prompt:(i + 1) * per_prompt])).input_ids[:PROMPT_TOKENS]
               for i in range(BATCH)]
    if any(len(ids) < PROMPT_TOKENS for ids in prompts):
        raise ValueError(f"a prompt is shorter than {PROMPT_TOKENS} tokens under this tokenizer")
    return prompts


def param_count(model_dir: Path) -> int:
    """Parameters stored in the model's safetensors files (tied weights once), read from their headers alone."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as weights:
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return total


def timed_generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds to generate ``max_tokens`` tokens for every prompt, all in one batch."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    if any(len(output.outputs[0].token_ids) != max_tokens for output in outputs):
        raise RuntimeError(f"a reply is not {max_tokens} tokens long despite ignore_eos")
    return seconds


def measure_model(model_dir: Path, rounds: int) -> dict:
    """The decoding step of the plain engine on one model (run in a process of its own)."""
    settings = Settings()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    from vllm import LLM

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=settings.max_model_len,
              max_num_seqs=settings.max_num_seqs, enforce_eager=True, enable_prefix_caching=False, seed=0)
    prompts = batch_prompts(llm.get_tokenizer())
    timed_generate(llm, prompts, MAX_TOKENS)  # warm-up
    timed_generate(llm, prompts, 1)
    steps, prefills = [], []
    for round_index in range(rounds):
        order = (1, MAX_TOKENS) if round_index % 2 == 0 else (MAX_TOKENS, 1)
        seconds = {max_tokens: timed_generate(llm, prompts, max_tokens) for max_tokens in order}
        steps.append((seconds[MAX_TOKENS] - seconds[1]) / (MAX_TOKENS - 1))
        prefills.append(seconds[1])
    step = statistics.median(steps)
    return {
        "model": str(model_dir),
        "params": param_count(model_dir),
        "step_ms": round(1000 * step, 2),
        "step_ms_rounds": [round(1000 * s, 2) for s in steps],
        "decode_tokens_per_s": round(BATCH / step, 1),
        "prefill_ms": round(1000 * statistics.median(prefills), 1),
    }


def measure_in_subprocess(model_dir: Path, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lethe-step-time-") as scratch:
        out = Path(scratch) / "row.json"
        subprocess.run([sys.executable, __file__, "--measure", str(model_dir), "--rounds", str(rounds),
                        "--out", str(out)], check=True)
        return json.loads(out.read_text())


STEP_GOAL_MS = 10.0  # issue 19: a bench model's step must be real work


def rows(summary: dict) -> list[dict]:
    """The summary rows (``bench/summary.py``): each model's step; the bench model's has a floor."""
    return [{"metric": f"plain-engine decoding step ms, batch {summary['batch']}", "model": row["model"],
             "value": row["step_ms"], "goal": f">= {STEP_GOAL_MS}" if row["name"] == "bench" else None,
             "pass": row["step_ms"] >= STEP_GOAL_MS if row["name"] == "bench" else None} for row in summary["rows"]]


def markdown(summary: dict) -> str:
    """Per model: its parameters, one decoding step at batch 8, and the tokens per second that makes."""
    lines = [
        f"plain vLLM, batch {summary['batch']}, {summary['prompt_tokens']}-token prompts, "
        f"step = (t{summary['max_tokens']} - t1) / {summary['max_tokens'] - 1}, median of {summary['rounds']} rounds, "
        f"{summary['cpus']} CPUs",
        "",
        "| model | parameters | decoding step (ms) | decode tokens/s | prefill + first token (ms) |",
        "| --- | --: | --: | --: | --: |",
    ]
    for row in summary["rows"]:
        lines.append(f"| {row['name']} (`{Path(row['model']).name}`) | {row['params'] / 1e6:.1f} M | {row['step_ms']} "
                     f"| {row['decode_tokens_per_s']} | {row['prefill_ms']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="tiny,bench", help="comma-separated demo variants (built if absent)")
    parser.add_argument("--model", action="append", default=[], help="also this model directory (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one model, in this process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.measure:
        args.out.write_text(json.dumps(measure_model(args.measure, args.rounds)))
        return

    cache_dir = Settings().cache_dir
    variants = [variant for variant in args.variants.split(",") if variant]
    models = [(variant, build_demo_model(cache_dir, variant, progress=False)) for variant in variants]
    models += [(Path(model).name, Path(model).resolve()) for model in args.model]
    rows = []
    for name, model_dir in models:
        rows.append({"name": name, **measure_in_subprocess(model_dir, args.rounds)})
        print(f"{name}: {rows[-1]['step_ms']} ms a step", flush=True)
    summary = {"batch": BATCH, "prompt_tokens": PROMPT_TOKENS, "max_tokens": MAX_TOKENS, "rounds": args.rounds,
               "cpus": len(os.sched_getaffinity(0)), "rows": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    print("\n" + markdown(summary))


if __name__ == "__main__":
    main()
