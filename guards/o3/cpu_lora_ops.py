"""The LoRA ops vLLM's CPU path runs for O3's adapters, replaced: correct for batches that mix LoRA and plain
requests, and one matrix product per adapter instead of one per token.

vLLM 0.32's CPU punica wrapper (``vllm/lora/punica_wrapper/punica_cpu.py``) calls the PyTorch reference ops of
``vllm/lora/ops/torch_ops``, which

* index the stacked adapter weights with each token's LoRA slot, and a token of a request without LoRA has slot -1:
  Python indexing turns that into the *last* slot, so with vLLM's default ``max_loras=1`` every plain request batched
  beside an O3 request is served through the unlearning adapter. Measured on the tiny demo model: 11 of 12 plain
  replies changed when 6 O3 requests shared their batch (most became O3's refusal); the GPU kernels skip -1.
* gather a whole (rank x width) matrix per token (``weights[indices]``) before an einsum: on the bench model that is
  hundreds of megabytes copied per decoding step, and O3 cost 5x the unprotected throughput at concurrency 8.

These versions keep the ops' signatures and their results for every token with a slot; a token with slot -1 gets no
LoRA contribution. Tokens are grouped by slot (a batch uses one or two adapters) once per step (``SlotPlan``), so each
op is one matrix product per adapter in use, written into vLLM's buffer in place. vLLM stores every adapter padded
to ``max_lora_rank`` (64 by default: room for eight O3 targets) and multiplies the padding too; the products here use
only the ranks a slot's adapter fills (``UsedRanks``: two O3 targets stack to rank 16, a quarter of the bytes).
``install`` puts them in the CPU punica wrapper's namespace and has vLLM's LoRA layers report what they write; the
engine's worker calls it when it loads Lethe's worker extension (``guards/engine_extension.py``), before any LoRA
request.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

NO_LORA = -1
"""vLLM's slot index for a token whose request has no LoRA."""


class SlotPlan:
    """Which rows use which adapter slot, worked out once per decoding step.

    vLLM calls these ops about 14 times per layer and step (each slice of each adapted projection, shrink and expand),
    all with the same slots. Grouping the tokens by slot each time (``unique``, comparisons, ``nonzero``) cost about
    as much as the products themselves on the bench model (8.5 ms of a 54 ms step at batch 8). The last plan is kept
    with a copy of the slots it was made for and reused only when the slots are equal to that copy (one small
    comparison), never on a tensor's identity, which the allocator reuses.
    """

    def __init__(self) -> None:
        self._slots: torch.Tensor | None = None
        self._groups: tuple[tuple[int, torch.Tensor | None], ...] = ()

    def groups(self, slots: torch.Tensor, tokens: int) -> tuple[tuple[int, torch.Tensor | None], ...]:
        """Per slot in use among the first ``tokens``: the rows that use it, or None where all ``tokens`` rows do."""
        slots = slots[:tokens]
        cached = self._slots
        if cached is not None and cached.shape == slots.shape and torch.equal(cached, slots):
            return self._groups
        groups: list[tuple[int, torch.Tensor | None]] = []
        for slot in torch.unique(slots).tolist():
            if slot < 0:  # NO_LORA
                continue
            rows = (slots == slot).nonzero().squeeze(1)
            groups.append((slot, None if rows.numel() == tokens else rows))
        self._slots, self._groups = slots.clone(), tuple(groups)
        return self._groups


_PLAN = SlotPlan()  # the engine's worker runs the ops from one thread


class UsedRanks:
    """How many of its ``max_lora_rank`` ranks each slot's adapter fills, per stacked weight tensor of vLLM's layers.

    vLLM writes an adapter into a slot only through its LoRA layers' ``set_lora`` and clears it through
    ``reset_lora``; ``watch`` wraps both to read the filled ranks right after (nonzero rows of A, nonzero columns of
    B: exact, so the skipped products are exactly zero). A record names its tensor by a weak reference checked for
    identity, so a freed tensor's address can never answer for another's; a tensor or slot without a record is
    multiplied in full.
    """

    def __init__(self) -> None:
        self._ranks: dict[tuple[int, int], tuple[weakref.ref[torch.Tensor], int]] = {}

    def record(self, layer: Any, index: int) -> None:
        """After ``layer`` wrote or cleared slot ``index``: the ranks its A (rows) and B (columns) fill."""
        for stacked in getattr(layer, "lora_a_stacked", ()):
            self._ranks[(id(stacked), index)] = (weakref.ref(stacked), _filled(stacked[index], rows=True))
        for stacked in getattr(layer, "lora_b_stacked", ()):
            self._ranks[(id(stacked), index)] = (weakref.ref(stacked), _filled(stacked[index], rows=False))

    def of(self, weights: torch.Tensor, slot: int) -> int | None:
        """The ranks slot ``slot`` of ``weights`` fills, or None if unknown (use them all)."""
        entry = self._ranks.get((id(weights), slot))
        if entry is None or entry[0]() is not weights:
            return None
        return entry[1]

    def watch(self, layer_class: type) -> None:
        """Record after every ``set_lora``/``reset_lora`` of ``layer_class`` and its subclasses (idempotent)."""
        for cls in (layer_class, *_subclasses(layer_class)):
            for name in ("set_lora", "reset_lora"):
                method = cls.__dict__.get(name)
                if method is not None and not getattr(method, "_lethe_records_ranks", False):
                    setattr(cls, name, self._recording(method))

    def _recording(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(layer: Any, index: int, *args: Any, **kwargs: Any) -> Any:
            result = method(layer, index, *args, **kwargs)
            self.record(layer, index)
            return result

        wrapper._lethe_records_ranks = True  # type: ignore[attr-defined]
        return wrapper


def _filled(matrix: torch.Tensor, rows: bool) -> int:
    """1 + the last nonzero rank of one slot's A (ranks are rows) or B (ranks are columns); 0 if all zero."""
    matrix = matrix.reshape(-1, matrix.shape[-1]) if rows else matrix.reshape(-1, matrix.shape[-1]).T
    used = (matrix != 0).any(dim=1).nonzero()
    return int(used[-1]) + 1 if used.numel() else 0


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


USED_RANKS = UsedRanks()


def _matrices(weights: torch.Tensor) -> torch.Tensor:
    """The stacked adapter tensor as (slots, out, in): vLLM hands (slots, out, in) or (slots, 1, out, in)."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _write_products(inputs: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor, target: torch.Tensor,
                    accumulate: bool, scaling: float = 1.0, ranks_in: bool = False) -> None:
    """``target[t] (+)= scaling * weights[slots[t]] @ inputs[t]`` for every token with a slot; a token without one
    is left as it was when accumulating, else set to zero. ``target`` is a (tokens, out) view written in place.

    Only the ranks the slot's adapter fills are multiplied (``USED_RANKS``): a shrink's output ranks (``weights`` is
    A, the ranks are its rows) or an expand's input ranks (``ranks_in``: ``weights`` is B, the ranks its columns).
    The others hold zeros, so the result is the same."""
    matrices = _matrices(weights)
    tokens = target.shape[0]
    groups = _PLAN.groups(slots, tokens)
    everyone = len(groups) == 1 and groups[0][1] is None
    if not accumulate and not everyone:
        target.zero_()  # rows without an adapter (or every row, when none has one) get nothing
    source = inputs[:tokens].to(target.dtype)
    for slot, rows in groups:
        matrix, into, fed = matrices[slot].to(target.dtype), target, source
        used = USED_RANKS.of(weights, slot)
        if used is not None and used < (matrix.shape[1] if ranks_in else matrix.shape[0]):
            if ranks_in:
                matrix, fed = matrix[:, :used], source[:, :used]
            else:
                if not accumulate and everyone:
                    target[:, used:].zero_()
                matrix, into = matrix[:used], target[:, :used]
        if matrix.numel() == 0:  # the slot is empty: nothing to add
            if not accumulate and everyone:
                target.zero_()
            continue
        if rows is None:  # every token uses this slot: one fused product straight into the target
            into.addmm_(fed, matrix.T, beta=1.0 if accumulate else 0.0, alpha=scaling)
        else:
            product = torch.mm(fed.index_select(0, rows), matrix.T)
            if scaling != 1.0:
                product.mul_(scaling)
            if accumulate:
                into.index_add_(0, rows, product)
            else:
                into.index_copy_(0, rows, product)


def per_slot_product(inputs: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """(tokens, out): row t is ``weights[slots[t]] @ inputs[t]``, zeros where ``slots[t]`` is NO_LORA.

    ``weights`` is the stacked adapter tensor, (slots, out, in) or (slots, 1, out, in); ``inputs`` is (tokens, in).
    """
    out = torch.empty(inputs.shape[0], _matrices(weights).shape[1], dtype=dtype, device=inputs.device)
    _write_products(inputs, weights, slots, out, accumulate=False, ranks_in=True)
    return out


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    rank = _matrices(lora_a_weights).shape[1]
    _write_products(inputs, lora_a_weights, lora_indices_tensor, output_tensor[:, :rank], False, scaling)


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    outputs = per_slot_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad the output differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    target = output_tensor[:, slice_offset: slice_offset + slice_size]
    if _matrices(lora_b_weights).shape[1] == slice_size and inputs.shape[0] == output_tensor.shape[0]:
        _write_products(inputs, lora_b_weights, lora_indices_tensor, target, add_inputs, ranks_in=True)
        return
    outputs = per_slot_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        target += outputs
    else:
        target.copy_(outputs)


def _token_slots(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """The prefill ops' per-sequence slots, one per token."""
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, scaling: float) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _token_slots(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, add_inputs: bool = False) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor, _token_slots(lora_indices_tensor, seq_len_tensor),
                add_inputs)


def sgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                      batches: int, max_seq_length: int, token_nums: int, slice_offset: int, slice_size: int,
                      add_inputs: bool = False) -> None:
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _token_slots(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = {op.__name__: op for op in (bgmv_shrink, bgmv_expand, bgmv_expand_slice, sgmv_shrink, sgmv_expand,
                                  sgmv_expand_slice)}


def install() -> bool:
    """Replace the CPU punica wrapper's ops with these (idempotent); False where vLLM has no such wrapper."""
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # no vLLM here (a training worker) or a vLLM without the CPU wrapper
        return False
    missing = [name for name in OPS if not hasattr(punica_cpu, name)]
    if missing:
        logger.warning("o3.cpu_lora_ops_not_installed", extra={"missing": missing})
        return False
    for name, op in OPS.items():
        setattr(punica_cpu, name, op)
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    USED_RANKS.watch(BaseLinearLayerWithLoRA)
    return True
