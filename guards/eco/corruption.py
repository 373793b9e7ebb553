"""ECO's corruption of a prompt's input embeddings: the paper's three functions and which tokens they hit.

Which tokens (``scope``): ``entities`` — the target's alias mentions (from the classifier, mapped onto token offsets),
or, when the prompt names no alias (a paraphrase, "this author"), every user-content token but the last; ``prompt`` —
every user-content token but the last, as ECO does for WMDP. The noise is seeded by the prompt and the target
(``guards.base.corruption_seed``), never by the client's sampling seed: the same prompt always meets the same
corruption, and a client cannot redraw it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guards.base import PromptView
from guards.eco.token_spans import alias_token_positions, token_offsets, user_content_positions

RAND_NOISE_FIRST_N = "rand_noise_first_n"
ZERO_OUT_TOP_K = "zero_out_top_k"
FLIP_SIGN_TOP_K = "flip_sign_top_k"
ENTITIES = "entities"
PROMPT = "prompt"


# ---- the paper's corruption functions: each edits rows (k, d) of the prompt's embeddings in place ---------------


def rand_noise_first_n(rows: torch.Tensor, sigma: float, n: int, generator: torch.Generator) -> None:
    """e_i[0:n] += ε, ε ~ N(0, σ²)."""
    noise = torch.randn((rows.shape[0], n), generator=generator, dtype=torch.float32) * sigma
    rows[:, :n] += noise.to(rows.dtype)


def zero_out_top_k(rows: torch.Tensor, k: int) -> None:
    """The k largest-|e_i| dimensions of each row set to 0."""
    top = rows.abs().topk(k, dim=-1).indices
    rows.scatter_(-1, top, 0.0)


def flip_sign_top_k(rows: torch.Tensor, k: int) -> None:
    """The k largest-|e_i| dimensions of each row negated."""
    top = rows.abs().topk(k, dim=-1).indices
    rows.scatter_(-1, top, -rows.gather(-1, top))


def default_dims(corruption: str, hidden_size: int) -> int:
    """Dims corrupted when the target does not say: all of them, except zero-out, where ECO zeroes ~16-25 %."""
    return hidden_size // 4 if corruption == ZERO_OUT_TOP_K else hidden_size


@dataclass(frozen=True)
class EcoEdit:
    """One target's corruption of one prompt: which token positions, how, and the noise seed."""

    positions: tuple[int, ...]
    corruption: str
    sigma: float | None
    dims: int | None
    seed: int

    def apply(self, embeds: torch.Tensor) -> None:
        if not self.positions:
            return
        index = torch.as_tensor(self.positions, dtype=torch.long)
        rows = embeds[index]  # (k, d), a copy
        dims = min(self.dims or default_dims(self.corruption, embeds.shape[1]), embeds.shape[1])
        if self.corruption == RAND_NOISE_FIRST_N:
            if self.sigma is None:
                raise ValueError("rand_noise_first_n needs sigma")
            rand_noise_first_n(rows, self.sigma, dims, torch.Generator().manual_seed(self.seed))
        elif self.corruption == ZERO_OUT_TOP_K:
            zero_out_top_k(rows, dims)
        elif self.corruption == FLIP_SIGN_TOP_K:
            flip_sign_top_k(rows, dims)
        else:
            raise ValueError(f"unknown ECO corruption {self.corruption!r}")
        embeds[index] = rows



def corrupted_positions(
    tokenizer: Any, prompt: PromptView, alias_spans: Any, special_ids: frozenset[int], scope: str = ENTITIES
) -> tuple[int, ...]:
    """``entities``: the target's entity tokens if the prompt names it, else (and for ``prompt``) every user-content
    token but the last."""
    offsets = token_offsets(tokenizer, prompt)
    if scope == ENTITIES and offsets is not None and alias_spans:
        positions = alias_token_positions(prompt, offsets, alias_spans)
        if positions:
            return tuple(positions)
    positions = user_content_positions(prompt, offsets, special_ids)
    return tuple(positions[:-1]) if len(positions) > 1 else tuple(positions)
