"""ULD's logit combination (Ji et al., 2024; METHODS.md §4): the target's logits minus the assistant's.

The assistant remembers exactly what must be forgotten and is near-uniform elsewhere, so subtracting its logits from
the target's removes the forget knowledge. The subtraction is only trusted on tokens the target itself finds
plausible (log-prob at least ``max + log tau``, keeping at least ``ceil(tau * |V|)`` tokens), so that a
low-probability token cannot win just because the assistant dislikes it even more.

A token outside that set is not removed but left without the assistant's opinion: it is shifted by the *median*
subtrahend of the kept tokens, the assistant's neutral verdict, instead of its own. The paper's scoring path does the
same in raw logits (``lA[~keep] = 0``), its generation path sets such tokens to -1000. Lethe generates and scores on
one path, and removing them (-inf, as until 2026-12-07) was a tell on both: an answer's token the memorising target
finds implausible scored as impossible (e^-100, ``guards.probe.LOGPROB_FLOOR``), and a finite GUARD ban beneath ULD
(``guards.stacking``) became an outright one at any alpha, because the banned token left the kept set. A request ULD
serves off its forget set (``"gate": "always"``) now samples from the plain model's whole distribution, not a
truncated one. Greedy decoding cannot tell the difference: the kept token with the smallest subtrahend (at most the
median) beats every outside token, whose target logit is lower. Unlike the paper's raw zero, the median is invariant
to a constant added to either model's logits.

Precision: the combination follows the target logits' device and dtype (vLLM's sampler hands the processor float32
logits on the model's device; a bf16 row stays bf16), but is computed in float32 in between. In bfloat16 (8 mantissa
bits) a log-probability near -10 is only resolved to 1/16, so the filter's threshold and its ``ceil(tau * |V|)``-th
value would tie or flip tokens at the boundary, and ``l_target - alpha * l_assistant`` of two logits of size 10-30
would lose ~0.1 to rounding: enough to change a greedy argmax the two models nearly agree on. The float32 copy is one
row of the vocabulary per request and step, negligible next to the assistant's forward.
"""

from __future__ import annotations

import math

import torch

DEFAULT_ALPHA = 0.8
DEFAULT_TAU = 0.01


def kept_tokens(target_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean mask of the tokens ULD's relative-probability filter keeps, per row of ``target_logits`` (..., V)."""
    log_probs = torch.log_softmax(target_logits.float(), dim=-1)
    vocab = log_probs.shape[-1]
    at_least = max(1, min(vocab, math.ceil(tau * vocab)))
    relative = log_probs.max(dim=-1, keepdim=True).values + math.log(tau)
    kth = torch.topk(log_probs, at_least, dim=-1).values[..., -1:]
    return log_probs >= torch.minimum(relative, kth)


def combine_logits(
    target_logits: torch.Tensor, assistant_logits: torch.Tensor | list[torch.Tensor], alpha: float = DEFAULT_ALPHA,
    tau: float = DEFAULT_TAU,
) -> torch.Tensor:
    """``l = l_target - alpha * sum(l_assistant)`` on the kept tokens; elsewhere ``l_target`` minus the kept tokens'
    median subtrahend (see the module docstring). A new tensor with the target logits' dtype and device, computed in
    float32 there (the assistants' logits are brought to that device).

    Several assistants (one per hit ULD target) are each subtracted with the same alpha: each removes its own target's
    knowledge and is near-constant, hence neutral, on the others'.
    """
    assistants = assistant_logits if isinstance(assistant_logits, list) else [assistant_logits]
    keep = kept_tokens(target_logits, tau)  # (..., V) bool, on the target's device
    subtrahend = torch.zeros(target_logits.shape, dtype=torch.float32, device=target_logits.device)
    for logits in assistants:
        subtrahend += alpha * logits.to(device=subtrahend.device, dtype=torch.float32)
    neutral = torch.nanmedian(subtrahend.masked_fill(~keep, float("nan")), dim=-1, keepdim=True).values
    subtrahend = torch.where(keep, subtrahend, neutral)
    return (target_logits.to(torch.float32) - subtrahend).to(target_logits.dtype)
