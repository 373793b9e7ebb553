"""ULD at decoding time, in vLLM's worker process: the assistants, their per-request KV caches, the row hook.

vLLM has no hook for "the logits of a second model", so the assistant (a small HF model, SPEC §6) runs inside the
logits processor: each flagged request gets an ``AssistantSession`` that feeds the assistant its prompt once and then
one token per step, keeping the assistant's KV cache for exactly as long as the request's row lives. Rows move and are
removed by vLLM's batch updates; the session travels with the row's hook, so it is freed with the request.

Assistants are loaded by artifact path and cached per process (``cache.py``): warmed ahead of requests in the engine,
where a request never waits on a load. An assistant lives on the device of the logits it is subtracted from (the
engine's, in ``guards.devices.assistant_placement``'s dtype), so a step's inputs are made there and nothing crosses
to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from guards.devices import model_device
from guards.uld.cache import AssistantModels
from guards.uld.kv import growing_cache
from guards.uld.logits import DEFAULT_ALPHA, DEFAULT_TAU, combine_logits

logger = logging.getLogger(__name__)

ULD_KEY = "uld"


class AssistantSession:
    """One request's assistant: its KV cache and how many of the request's tokens it has consumed.

    ``output_ids`` is vLLM's live list of the request's generated tokens, so each call sees the token sampled at the
    previous step without being told. While the session decodes in step with others its cache is a row of their
    shared ``RowBatch``; when it must run alone (its prompt, a catch-up) it takes its row back.
    """

    def __init__(self, model: Any, prompt_ids: Sequence[int], output_ids: list[int]) -> None:
        self._model = model
        self._prompt_ids = list(prompt_ids)
        self._output_ids = output_ids
        self._cache: Any = None  # its own DynamicCache, while no batch holds its row
        self._batch: RowBatch | None = None
        self._consumed = 0
        self._last: torch.Tensor | None = None
        self._ahead: Ahead | None = None

    @property
    def consumed(self) -> int:
        return self._consumed

    @property
    def model(self) -> Any:
        return self._model

    @property
    def batch(self) -> RowBatch | None:
        return self._batch

    def next_token_if_one_behind(self) -> int | None:
        """The one token this session has not fed its assistant yet, if that is all it lacks (a decoding step)."""
        total = len(self._prompt_ids) + len(self._output_ids)
        if not self._consumed or total != self._consumed + 1:
            return None
        return self._output_ids[-1] if self._output_ids else self._prompt_ids[-1]

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (1, heads, consumed, head_dim): its own cache's or its batch row's."""
        if self._batch is not None:
            return self._batch.row_kv(self)
        return [(layer.keys, layer.values) for layer in self._cache.layers]

    def joined(self, batch: RowBatch) -> None:
        """Its cache is now a row of ``batch``."""
        self._batch, self._cache = batch, None

    def stepped(self, logits: torch.Tensor) -> None:
        """Its batch fed it one token; ``logits`` are the assistant's after it."""
        self._consumed += 1
        self._last = logits

    def _start_over(self) -> None:
        """Forget everything fed so far: the next call feeds the request's tokens from the first."""
        if self._batch is not None:
            self._batch.leave(self)
        self._batch, self._cache, self._consumed, self._last, self._ahead = None, None, 0, None, None

    def _own_cache(self) -> Any:
        """Its cache as its own, taken out of its batch (which then no longer holds it)."""
        if self._batch is not None:
            cache = growing_cache()
            for layer, (keys, values) in enumerate(self._batch.row_kv(self)):
                cache.update(keys, values, layer)
            self._batch.leave(self)
            self._batch, self._cache = None, cache
        if self._cache is None:
            self._cache = growing_cache()
        return self._cache

    def expect(self, tokens: Sequence[int]) -> None:
        """The request's next ``tokens`` are known in advance (teacher forcing: an answer scored, a calibration's
        gap): feed them all to the assistant in one forward pass now, and answer ``next_logits`` from that pass while
        the request's tokens follow them: one pass for an answer instead of one per token. Never used in the engine,
        where no token is known before it is sampled."""
        if not tokens:
            return
        before = self.next_logits()  # level with the request first (its prompt's pass): the cache holds all of it
        start = self._consumed
        with torch.inference_mode():
            out = self._model(input_ids=torch.tensor([list(tokens)], device=model_device(self._model)),
                              past_key_values=self._own_cache(), use_cache=True)
        sequence = self._prompt_ids + list(self._output_ids) + list(tokens)
        self._cache, self._consumed = out.past_key_values, len(sequence)
        self._ahead = Ahead(start, sequence, torch.cat([before.unsqueeze(0), out.logits[0].float()]))
        self._last = self._ahead.rows[-1]

    def next_logits(self) -> torch.Tensor:
        """The assistant's next-token logits after the request's tokens so far (V,)."""
        total = len(self._prompt_ids) + len(self._output_ids)
        if self._ahead is not None:
            if not self._ahead.agrees(self._prompt_ids, self._output_ids):
                self._start_over()  # its cache holds tokens the request does not have
            elif (row := self._ahead.row(total)) is not None:
                return row
            else:
                self._ahead = None  # past the expected tokens, which its cache holds: go on from there
        if total < self._consumed:  # the request was rewound (should not happen): start over rather than be wrong
            self._start_over()
        if total == self._consumed and self._last is not None:
            return self._last
        tokens = (self._prompt_ids + list(self._output_ids))[self._consumed:total]
        with torch.inference_mode():
            out = self._model(input_ids=torch.tensor([tokens], device=model_device(self._model)),
                              past_key_values=self._own_cache(), use_cache=True)
        self._cache, self._consumed = out.past_key_values, total
        self._last = out.logits[0, -1].float()
        return self._last


class Ahead:
    """The assistant's logits along a session's expected tokens (``AssistantSession.expect``): ``rows[i]`` follows
    ``sequence[:start + i]``; ``sequence`` holds the request's tokens when ``expect`` ran, then the expected ones."""

    def __init__(self, start: int, sequence: list[int], rows: torch.Tensor) -> None:
        self.start, self.sequence, self.rows = start, sequence, rows

    def agrees(self, prompt_ids: list[int], output_ids: list[int]) -> bool:
        """Whether the request's tokens so far are the expected ones, as far as both go."""
        end = min(len(prompt_ids) + len(output_ids), len(self.sequence))
        return list(output_ids[:end - len(prompt_ids)]) == self.sequence[len(prompt_ids):end]

    def row(self, total: int) -> torch.Tensor | None:
        """The logits after the request's first ``total`` tokens, if the expected ones reach that far."""
        index = total - self.start
        return self.rows[index] if 0 <= index < len(self.rows) else None


class RowBatch:
    """Sessions of one assistant that decode in step: one KV cache whose rows are theirs, right-aligned (row ``i``
    holds its ``lengths[i]`` positions in the last columns; the columns before are padding, masked out).

    The rows' caches have different lengths, so a batched step needs them padded into one tensor. Kept from step to
    step, the batch costs one forward per step; rebuilt each step, the padding copied every cache every step and
    doubled the assistant's time (measured on the bench model: 41 ms against 20 ms a step at 8 rows). It is rebuilt
    only when its sessions change: a request joins or ends, or a session ran alone.
    """

    def __init__(self, model: Any, sessions: Sequence[AssistantSession]) -> None:
        self.model = model
        self.sessions = list(sessions)
        self._rows = {id(session): row for row, session in enumerate(self.sessions)}
        parts = [session.kv() for session in self.sessions]
        self.lengths = [part[0][0].shape[2] for part in parts]
        self.width = max(self.lengths)
        self.cache = growing_cache()
        for layer in range(len(parts[0])):
            keys = torch.cat([_left_pad(part[layer][0], self.width) for part in parts])
            values = torch.cat([_left_pad(part[layer][1], self.width) for part in parts])
            self.cache.update(keys, values, layer)
        device = model_device(model)
        self.mask = torch.zeros(len(self.sessions), self.width, dtype=torch.long, device=device)
        for row, length in enumerate(self.lengths):
            self.mask[row, self.width - length:] = 1
        for session in self.sessions:
            if session.batch is not None:
                session.batch.leave(session)
            session.joined(self)

    def holds_exactly(self, sessions: Sequence[AssistantSession]) -> bool:
        """Whether a step of ``sessions`` is a step of every row here: none left (``step`` feeds every row)."""
        return (len(sessions) == len(self._rows) == len(self.sessions)
                and all(session.batch is self for session in sessions))

    def row_kv(self, session: AssistantSession) -> list[tuple[torch.Tensor, torch.Tensor]]:
        row = self._rows[id(session)]
        start = self.width - self.lengths[row]
        return [(layer.keys[row:row + 1, :, start:], layer.values[row:row + 1, :, start:])
                for layer in self.cache.layers]

    def leave(self, session: AssistantSession) -> None:
        """The session no longer decodes here; its row stays until the batch is rebuilt."""
        self._rows.pop(id(session), None)

    def step(self, tokens: Mapping[int, int]) -> None:
        """Feed each session its token (``tokens``: id(session) -> token), one forward for all rows."""
        device = model_device(self.model)
        self.mask = torch.cat([self.mask, torch.ones(len(self.sessions), 1, dtype=torch.long, device=device)], 1)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[tokens[id(s)]] for s in self.sessions], device=device),
                             attention_mask=self.mask,
                             position_ids=torch.tensor([[length] for length in self.lengths], device=device),
                             past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.width += 1
        self.lengths = [length + 1 for length in self.lengths]
        for row, session in enumerate(self.sessions):
            session.stepped(out.logits[row, -1].float())


def advance_together(sessions: Sequence[AssistantSession]) -> None:
    """Feed every session that is one token behind its request, one batched forward per assistant model.

    The decoding step is ULD's whole per-token cost, and one forward for B rows costs about what one row's does on CPU
    (measured 3.6x less time for 8 rows than 8 single-row forwards). Sessions of one model share a ``RowBatch``, kept
    while the same sessions decode together. Sessions with more to feed (the prompt, at a request's first step) run
    alone.
    """
    groups: dict[int, list[tuple[AssistantSession, int]]] = {}
    for session in sessions:
        token = session.next_token_if_one_behind()
        if token is not None:
            groups.setdefault(id(session.model), []).append((session, token))
    for group in groups.values():
        if len(group) > 1:
            members = [session for session, _ in group]
            batch = members[0].batch
            if batch is None or not batch.holds_exactly(members):
                batch = RowBatch(members[0].model, members)
            batch.step({id(session): token for session, token in group})


def _left_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    """(1, heads, n, head_dim) -> (1, heads, length, head_dim), zeros first (masked out)."""
    return torch.nn.functional.pad(states, (0, 0, length - states.shape[2], 0))


class UldRowHook:
    """Applies ULD to one row: ``l_target - sum_i alpha_i * l_assistant_i`` on the tokens ULD's filter keeps."""

    def __init__(self, sessions: Sequence[tuple[AssistantSession, float]], tau: float) -> None:
        self._sessions = list(sessions)
        self._tau = tau

    @staticmethod
    def prepare_rows(hooks: Sequence[UldRowHook]) -> None:
        """Before the row loop: every row's assistant step, batched (``advance_together``)."""
        advance_together([session for hook in hooks for session, _ in hook._sessions])

    def expect(self, tokens: Sequence[int]) -> None:
        """Teacher forcing (``AssistantSession.expect``): every assistant of the row reads ``tokens`` in one pass."""
        for session, _ in self._sessions:
            session.expect(tokens)

    def apply(self, logits_row: torch.Tensor) -> None:
        logits_row.copy_(combine_logits(logits_row, self._subtrahend(logits_row.shape[-1]), alpha=1.0, tau=self._tau))

    @staticmethod
    def apply_rows(logits: torch.Tensor, rows: Sequence[tuple[int, UldRowHook]]) -> None:
        """Every listed row's combination as one (rows, V) computation per ``tau``: per row it was a dozen small ops,
        7 % of the engine worker's time at 8 ULD rows on the bench model. Computed in full before any row is
        written, so a failure changes nothing (the rows' own ``apply`` then runs)."""
        by_tau: dict[float, list[tuple[int, UldRowHook]]] = {}
        for row, hook in rows:
            by_tau.setdefault(hook._tau, []).append((row, hook))
        vocab = logits.shape[-1]
        updates = []
        for tau, members in by_tau.items():
            index = torch.tensor([row for row, _ in members], device=logits.device)
            subtrahends = torch.stack([hook._subtrahend(vocab) for _, hook in members])
            updates.append((index, combine_logits(logits.index_select(0, index), subtrahends, alpha=1.0, tau=tau)))
        for index, combined in updates:
            logits.index_copy_(0, index, combined)

    def _subtrahend(self, vocab: int) -> torch.Tensor:
        """``sum_i alpha_i * l_assistant_i`` over the row's assistants, in float32, fitted to ``vocab``."""
        scaled = [alpha * _fit_vocab(session.next_logits(), vocab).float() for session, alpha in self._sessions]
        total = scaled[0]
        for more in scaled[1:]:
            total = total + more
        return total


def _fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The assistant shares the served vocabulary; vLLM may pad the row, and padded tokens are never kept anyway."""
    if logits.shape[-1] == vocab:
        return logits
    if logits.shape[-1] > vocab:
        return logits[:vocab]
    return torch.nn.functional.pad(logits, (0, vocab - logits.shape[-1]))


def validate_uld_section(section: Mapping[str, Any]) -> None:
    """Front-end check of ``extra_args["lethe"]["uld"]``: a list of {assistant: path, alpha: float, tau: float}."""
    entries = section.get(ULD_KEY)
    if entries is None:
        return
    if not isinstance(entries, list) or not entries:
        raise ValueError("lethe.uld must be a non-empty list")
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("assistant"), str):
            raise ValueError("each lethe.uld entry needs an `assistant` path")
        for key in ("alpha", "tau"):
            if key in entry and not isinstance(entry[key], (int, float)):
                raise ValueError(f"lethe.uld.{key} must be a number")


def uld_row_hook(section: Mapping[str, Any], prompt_ids: Sequence[int] | None, output_ids: list[int],
                 assistants: AssistantModels) -> UldRowHook | None:
    """The ULD hook of a request whose plan names assistants; raises if the prompt ids are missing (fail closed)."""
    entries = section.get(ULD_KEY)
    if not entries:
        return None
    if prompt_ids is None:
        raise ValueError("ULD needs the prompt token ids (sent alongside prompt_embeds)")
    sessions = [(AssistantSession(assistants.get(entry["assistant"]), prompt_ids, output_ids),
                 float(entry.get("alpha", DEFAULT_ALPHA))) for entry in entries]
    tau = min(float(entry.get("tau", DEFAULT_TAU)) for entry in entries)
    return UldRowHook(sessions, tau)
