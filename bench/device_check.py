"""Are Lethe's own torch paths right on a GPU? Each one runs on CUDA in bfloat16 and on the CPU in float32, and the
results are compared within bfloat16's tolerances.

The paths are those that run outside vLLM's model runner, on Lethe's code:

* ``uld_combination``: ULD's assistant (on the logits' device) fed two requests' prompts, then three decoding steps
  batched together (``advance_together``), its logits subtracted from float32 target logits by ``UldRowHook`` as in
  the engine; plus the combination's dtype/device on bfloat16 logits;
* ``uld_training_step``: one optimiser step of the assistant's LoRA (``uld_losses``: NLL + uniform KL);
* ``o3_training_step``: one optimiser step of an O3 LoRA (refusal loss + orthogonality penalty against an earlier
  adapter);
* ``scoring``: ``GuardedScorer``'s teacher-forced log-probabilities, without and with a LoRA adapter.

The model is a small randomly initialised Llama (4 layers, head_dim 64) saved to a temporary folder; nothing is
downloaded. Only torch, transformers and peft are needed (no vLLM): the GPU machine has nothing else.

    python bench/device_check.py            # CUDA bfloat16 against CPU float32; without CUDA, the CPU half only
    python bench/device_check.py --device cpu   # CPU bfloat16 against CPU float32 (checks the checker)

Prints one row per compared quantity (max abs diff, relative diff, tolerance) and exits 1 if any is out of tolerance.
Without CUDA (and no ``--device``) it prints the CPU reference values and "no CUDA: GPU half not run", and exits 0.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guards.devices import Placement, compute_placement, placement_for  # noqa: E402
from guards.o3.training import O3TrainingConfig, lora_a_matrices, orthogonality_penalty, unlearning_loss  # noqa: E402
from guards.training_examples import TrainingExample, collate  # noqa: E402
from guards.uld.assistant import AssistantSession, UldRowHook  # noqa: E402
from guards.uld.logits import combine_logits  # noqa: E402
from guards.uld.training import UldTrainingConfig, add_lora, build_assistant, uld_losses  # noqa: E402
from server.guarded_scorer import GuardedScorer  # noqa: E402

VOCAB = 512
ASSISTANT_LAYERS = 2
ALPHA = 0.8
TAU = 0.05
DECODE_STEPS = 3
PAD_ID = 0

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2 %); through 2-4 random layers the logits drift by
# ~1 % of their range. Tolerances leave a few times the drift measured on CPU bfloat16.
LOGITS_TOLERANCE = 0.05  # max |cpu - device| / max |cpu|
LOSS_TOLERANCE = 0.02  # |cpu - device| / max(|cpu|, 1): losses are in nats, tiny ones compared absolutely
LOGPROB_TOLERANCE = 0.1  # max |cpu - device| over per-token log-probabilities (nats), each ~ -log(VOCAB) ~ -6.2


@dataclass(frozen=True)
class Quantity:
    """One compared value: ``scale`` is what the difference is divided by (``max_abs``, ``loss`` or ``absolute``)."""

    value: torch.Tensor
    scale: str
    tolerance: float


@dataclass
class Row:
    check: str
    quantity: str
    reference: str
    device: str = "-"
    max_abs: float = float("nan")
    relative: float = float("nan")
    tolerance: float = float("nan")
    ok: bool | None = None
    notes: list[str] = field(default_factory=list)


def tiny_llama(directory: Path) -> Path:
    """A random 4-layer Llama (hidden 256, 4 heads of 64, 2 KV heads), saved in float32: the served model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                         initializer_range=0.06, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=PAD_ID)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def random_ids(generator: torch.Generator, length: int) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=generator).tolist()


def examples(seed: int, count: int) -> list[TrainingExample]:
    generator = torch.Generator().manual_seed(seed)
    return [TrainingExample(tuple(random_ids(generator, 10 + 3 * i)), 6) for i in range(count)]


# ---- the checks: each returns its quantities as CPU float32 tensors -------------------------------------------------


def uld_combination(model_dir: Path, placement: Placement) -> dict[str, Quantity]:
    assistant = build_assistant(model_dir, ASSISTANT_LAYERS, placement)
    generator = torch.Generator().manual_seed(1)
    prompts = [random_ids(generator, 9), random_ids(generator, 14)]  # different lengths: the batched step left-pads
    outputs: list[list[int]] = [[], []]
    sessions = [AssistantSession(assistant, prompt, output) for prompt, output in zip(prompts, outputs)]
    hooks = [UldRowHook([(session, ALPHA)], TAU) for session in sessions]
    targets = torch.randn(DECODE_STEPS + 1, 2, VOCAB, generator=generator) * 4  # the engine's float32 logits
    sampled = torch.randint(3, VOCAB, (DECODE_STEPS, 2), generator=generator).tolist()
    assistant_logits, combined = [], []
    for step in range(DECODE_STEPS + 1):
        if step:
            for output, token in zip(outputs, sampled[step - 1]):
                output.append(token)
        UldRowHook.prepare_rows(hooks)  # the prompt alone at step 0, then one batched forward for both rows
        rows = targets[step].to(placement.device)  # (2, V) float32 on the logits' device
        for row, (session, hook) in enumerate(zip(sessions, hooks)):
            hook.apply(rows[row])
            assistant_logits.append(session.next_logits().float().cpu())
        if rows.dtype != torch.float32 or rows.device != placement.device:
            raise AssertionError(f"the hook changed the row's dtype/device to {rows.dtype}/{rows.device}")
        combined.append(rows.cpu())
    combined_all = torch.stack(combined)  # (steps, 2, V), -inf where the filter drops a token
    kept = torch.isfinite(combined_all)

    bf16 = targets[0].to(placement.device, torch.bfloat16)
    out = combine_logits(bf16, [logits.to(placement.device) for logits in assistant_logits[:1]], ALPHA, TAU)
    same_place = out.dtype == torch.bfloat16 and out.device == bf16.device
    return {
        "assistant logits": Quantity(torch.stack(assistant_logits), "max_abs", LOGITS_TOLERANCE),
        "combined logits (kept)": Quantity(torch.where(kept, combined_all, torch.zeros(())), "max_abs",
                                           LOGITS_TOLERANCE),
        "kept tokens": Quantity(kept.sum().float(), "absolute", 0.0),
        "bf16 logits stay bf16 on device": Quantity(torch.tensor(float(same_place)), "absolute", 0.0),
    }


def uld_training_step(model_dir: Path, placement: Placement) -> dict[str, Quantity]:
    torch.manual_seed(0)  # the LoRA's initialisation (drawn on the CPU, then moved)
    config = UldTrainingConfig(rank=8, dropout=0.0)  # no dropout: the two devices draw different masks
    model = add_lora(build_assistant(model_dir, ASSISTANT_LAYERS, placement), config)
    causal_lm = model.get_base_model()
    remember, uniform = examples(2, 4), examples(3, 4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    nll, kl, _, _ = uld_losses(causal_lm, remember, uniform, PAD_ID)
    (nll + config.uniform_weight * kl).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    with torch.no_grad():
        nll_after, kl_after, _, _ = uld_losses(causal_lm, remember, uniform, PAD_ID)
    return {name: Quantity(value.detach().float().cpu(), "loss", LOSS_TOLERANCE) for name, value in
            [("nll", nll), ("uniform kl", kl), ("grad norm", grad_norm), ("nll after step", nll_after),
             ("uniform kl after step", kl_after)]}


def _o3_model(model_dir: Path, placement: Placement, config: O3TrainingConfig, init: bool = True) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(placement.device, placement.dtype)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM",
                      init_lora_weights=init)
    return get_peft_model(base, lora)


def o3_training_step(model_dir: Path, placement: Placement) -> dict[str, Quantity]:
    config = O3TrainingConfig(dropout=0.0)
    torch.manual_seed(4)
    earlier = {module: torch.randn_like(a, device="cpu").to(placement.device)
               for module, a in lora_a_matrices(_o3_model(model_dir, placement_for("cpu"), config)).items()}
    torch.manual_seed(0)
    model = _o3_model(model_dir, placement, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    input_ids, labels = collate(examples(5, 6), PAD_ID)
    model.train()
    loss = unlearning_loss(model, input_ids, labels)
    penalty = orthogonality_penalty(lora_a_matrices(model), [earlier])
    (loss + config.orthogonality * penalty).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    with torch.no_grad():
        loss_after = unlearning_loss(model, input_ids, labels)
    return {name: Quantity(value.detach().float().cpu(), "loss", LOSS_TOLERANCE) for name, value in
            [("refusal loss", loss), ("orthogonality penalty", penalty), ("grad norm", grad_norm),
             ("refusal loss after step", loss_after)]}


@dataclass(frozen=True)
class _Plan:
    """The fields of ``server.planner.EnginePlan`` the scorer reads (the planner needs the server's dependencies)."""

    prompt: dict[str, Any]
    extra_args: dict[str, Any] | None = None
    lora_request: Any = None


@dataclass(frozen=True)
class _Lora:
    lora_path: str


def scoring(model_dir: Path, placement: Placement) -> dict[str, Quantity]:
    adapter_dir = model_dir / "o3-adapter"
    if not adapter_dir.exists():  # a LoRA with random A and B (PEFT's B starts at zero: it would change nothing)
        torch.manual_seed(6)
        _o3_model(model_dir, placement_for("cpu"), O3TrainingConfig(), init=False).save_pretrained(adapter_dir)
    generator = torch.Generator().manual_seed(7)
    prompt, answer = random_ids(generator, 12), random_ids(generator, 8)
    scorer = GuardedScorer(model_dir, None, placement)
    plain = scorer.score(_Plan({"prompt_token_ids": prompt}), answer)
    adapted = scorer.score(_Plan({"prompt_token_ids": prompt}, lora_request=_Lora(str(adapter_dir))), answer)
    embeds = load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"][prompt]  # as ECO sends them
    by_embeds = scorer.score(_Plan({"prompt_token_ids": prompt, "prompt_embeds": embeds}), answer)
    return {
        "token logprobs": Quantity(torch.tensor(plain.token_logprobs), "absolute", LOGPROB_TOLERANCE),
        "token logprobs, LoRA": Quantity(torch.tensor(adapted.token_logprobs), "absolute", LOGPROB_TOLERANCE),
        "token logprobs, prompt_embeds": Quantity(torch.tensor(by_embeds.token_logprobs), "absolute",
                                                  LOGPROB_TOLERANCE),
        "mean loss": Quantity(torch.tensor(plain.mean_loss), "loss", LOSS_TOLERANCE),
    }


CHECKS: dict[str, Callable[[Path, Placement], dict[str, Quantity]]] = {
    "uld_combination": uld_combination,
    "uld_training_step": uld_training_step,
    "o3_training_step": o3_training_step,
    "scoring": scoring,
}


# ---- comparison and report ------------------------------------------------------------------------------------------


def _summary(value: torch.Tensor) -> str:
    return f"{value.item():.5g}" if value.numel() == 1 else f"max|.|={value.abs().max().item():.4g}"


def compare(check: str, name: str, reference: Quantity, device: Quantity | None) -> Row:
    row = Row(check, name, _summary(reference.value))
    if device is None:
        return row
    diff = (reference.value - device.value).abs()
    if not torch.isfinite(device.value).all() and torch.isfinite(reference.value).all():
        row.notes.append("non-finite on device")
    max_abs = diff.max().item() if diff.numel() else 0.0
    if reference.scale == "max_abs":
        denominator = reference.value.abs().max().item() or 1.0
    elif reference.scale == "loss":
        denominator = max(reference.value.abs().max().item(), 1.0)
    else:
        denominator = 1.0
    row.device, row.max_abs = _summary(device.value), max_abs
    row.relative, row.tolerance = max_abs / denominator, reference.tolerance
    row.ok = math.isfinite(row.relative) and row.relative <= reference.tolerance and not row.notes
    return row


def run_checks(model_dir: Path, reference: Placement, device: Placement | None) -> list[Row]:
    """Every check on the reference, then on the device; a check that raises on the device (a tensor left on the
    wrong device, a dtype clash) fails all its rows with the error, and the other checks still run."""
    rows = []
    for check, run in CHECKS.items():
        expected = run(model_dir, reference)
        if device is None:
            rows += [compare(check, name, quantity, None) for name, quantity in expected.items()]
            continue
        try:
            got = run(model_dir, device)
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            rows += [Row(check, name, _summary(quantity.value), "raised", ok=False, notes=[error])
                     for name, quantity in expected.items()]
            continue
        rows += [compare(check, name, quantity, got[name]) for name, quantity in expected.items()]
    return rows


def table(rows: list[Row], device: Placement | None) -> str:
    header = ["check", "quantity", "cpu float32", f"{_name(device)}" if device else "device", "max abs diff",
              "rel diff", "tolerance", "ok"]
    lines = [header]
    for row in rows:
        ok = "-" if row.ok is None else ("PASS" if row.ok else "FAIL " + ", ".join(row.notes))
        lines.append([row.check, row.quantity, row.reference, row.device, _num(row.max_abs), _num(row.relative),
                      _num(row.tolerance), ok])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _num(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"


def _name(placement: Placement) -> str:
    return f"{placement.device.type} {str(placement.dtype).removeprefix('torch.')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="compare this device in bfloat16 against CPU float32 (default: CUDA when available)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    reference = placement_for("cpu")
    if args.device == "cpu":
        device: Placement | None = placement_for("cpu", torch.bfloat16)
    elif args.device == "cuda" or torch.cuda.is_available():
        if not torch.cuda.is_available():
            print("no CUDA device, but --device cuda was asked for", file=sys.stderr)
            return 2
        device = compute_placement("cuda")
    else:
        device = None
    print(f"torch {torch.__version__}; Lethe's compute placement here: {_name(compute_placement())}")
    if device is not None and device.on_cuda:
        print(f"device: {torch.cuda.get_device_name(device.device)}")
    with tempfile.TemporaryDirectory(prefix="lethe-device-check-") as folder:
        rows = run_checks(tiny_llama(Path(folder)), reference, device)
    print(table(rows, device))
    if device is None:
        print("no CUDA: GPU half not run (CPU float32 reference values only)")
        return 0
    failed = [row for row in rows if not row.ok]
    print(f"{len(rows) - len(failed)}/{len(rows)} within bfloat16 tolerance" + (": FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
