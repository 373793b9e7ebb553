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
LoRA contribution. Tokens are grouped by slot (a batch uses one or two adapters), so each op is one matrix product
per adapter in use. ``install`` puts them in the CPU punica wrapper's namespace; the engine's worker calls it when
it loads Lethe's worker extension (``guards/engine_extension.py``), before any LoRA request.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

NO_LORA = -1
"""vLLM's slot index for a token whose request has no LoRA."""


def per_slot_product(inputs: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """(tokens, out): row t is ``weights[slots[t]] @ inputs[t]``, zeros where ``slots[t]`` is NO_LORA.

    ``weights`` is the stacked adapter tensor, (slots, out, in) or (slots, 1, out, in); ``inputs`` is (tokens, in).
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    out = torch.zeros(inputs.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
    slots = slots[: inputs.shape[0]]
    for slot in torch.unique(slots).tolist():
        if slot < 0:
            continue
        matrix = weights[slot].to(dtype)
        if len(slots) == inputs.shape[0] and bool((slots == slot).all()):
            out = inputs @ matrix.T
        else:
            rows = (slots == slot).nonzero().squeeze(1)
            out[rows] = inputs[rows] @ matrix.T
    return out


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    outputs = per_slot_product(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


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
    outputs = per_slot_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


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
    return True
