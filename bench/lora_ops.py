"""O3's LoRA ops per decoding step on the bench model's shapes: vLLM's CPU reference ops against Lethe's
(``guards/o3/cpu_lora_ops.py``), side by side in one process (issue 19).

Replays the calls vLLM's CPU punica wrapper makes for one decoding step (``add_lora_linear`` per adapted projection
and layer: a zeroed float32 buffer per slice, one shrink per slice, one slice expand per slice; q/k/v are three
slices, gate/up two) on random weights of the bench model's sizes and O3's stacked rank (two targets at rank 8). Every
token has an adapter, which is where vLLM's ops are correct; Lethe's are also timed with half the tokens plain, the
mixed batch vLLM's ops get wrong. One thread, as the engine's worker runs here. Prints milliseconds per step (median
of rounds) and the ratio; no engine is started.

    python bench/lora_ops.py [--model DIR] [--rounds 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.builder import build_demo_model  # noqa: E402
from guards.o3 import cpu_lora_ops as lethe_ops  # noqa: E402
from guards.o3.cpu_lora_ops import NO_LORA  # noqa: E402
from server.config import Settings  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lora_ops.json"
STACKED_RANK = 16  # two O3 targets at the default rank 8, rank-stacked into one adapter
TOKENS = (1, 8, 32)


def projections(config: dict) -> list[tuple[int, tuple[int, ...]]]:
    """(input width, output slices) of each adapted projection in one layer: q/k/v, o, gate/up, down."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    return [(hidden, (hidden, kv, kv)), (hidden, (hidden,)), (hidden, (inner, inner)), (inner, (hidden,))]


def step(ops: ModuleType, layers: int, shapes: list[tuple[int, tuple[int, ...]]], inputs: dict[int, torch.Tensor],
         lora_a: dict[int, torch.Tensor], lora_b: dict[int, torch.Tensor], slots: torch.Tensor) -> None:
    """One decoding step's LoRA calls, as the CPU punica wrapper makes them."""
    for _ in range(layers):
        for width, slices in shapes:
            x = inputs[width]
            y = torch.zeros(x.shape[0], sum(slices))
            buffers = [torch.zeros(x.shape[0], STACKED_RANK) for _ in slices]
            for buffer in buffers:
                ops.bgmv_shrink(x, lora_a[width], buffer, slots, 1.0)
            offset = 0
            for buffer, size in zip(buffers, slices, strict=True):
                ops.bgmv_expand_slice(buffer, lora_b[size], y, slots, offset, size, True)
                offset += size


def timed(run: Callable[[], None], steps: int) -> float:
    """Milliseconds per call of ``run`` over ``steps`` calls."""
    started = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    from vllm.lora.ops import torch_ops as vllm_ops

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: the bench model, built if absent)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = args.model or build_demo_model(Settings().cache_dir, "bench", progress=False)
    config = json.loads((model_dir / "config.json").read_text())
    shapes, layers = projections(config), config["num_hidden_layers"]
    generator = torch.Generator().manual_seed(0)
    widths = {width for width, _ in shapes}
    sizes = {size for _, slices in shapes for size in slices}
    lora_a = {w: torch.randn(1, 1, STACKED_RANK, w, generator=generator) / w ** 0.5 for w in widths}
    lora_b = {s: torch.randn(1, 1, s, STACKED_RANK, generator=generator) for s in sizes}
    rows = []
    for tokens in TOKENS:
        inputs = {w: torch.randn(tokens, w, generator=generator) for w in widths}
        every = torch.zeros(tokens, dtype=torch.long)
        half = torch.tensor([0 if i % 2 == 0 else NO_LORA for i in range(tokens)])
        variants = {"vllm": (vllm_ops, every), "lethe": (lethe_ops, every), "lethe, half plain": (lethe_ops, half)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(args.rounds):
            order = list(variants)[round_index % len(variants):] + list(variants)[:round_index % len(variants)]
            for name in order:
                ops, slots = variants[name]
                step(ops, layers, shapes, inputs, lora_a, lora_b, slots)  # warm-up
                times[name].append(timed(lambda: step(ops, layers, shapes, inputs, lora_a, lora_b, slots),
                                         args.steps))
        medians = {name: statistics.median(values) for name, values in times.items()}
        rows.append({"tokens": tokens, **{f"{name} ms": round(value, 2) for name, value in medians.items()},
                     "vllm / lethe": round(medians["vllm"] / medians["lethe"], 2)})
    print(f"model {model_dir}, {layers} layers, stacked rank {STACKED_RANK}, {args.rounds} rounds of {args.steps} "
          "steps, 1 thread\n")
    print("| tokens in the step | vLLM's ops (ms) | Lethe's (ms) | Lethe's, half the tokens plain (ms) "
          "| vLLM / Lethe |")
    print("| --: | --: | --: | --: | --: |")
    for row in rows:
        print(f"| {row['tokens']} | {row['vllm ms']} | {row['lethe ms']} | {row['lethe, half plain ms']} "
              f"| {row['vllm / lethe']}x |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"model": model_dir.name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
