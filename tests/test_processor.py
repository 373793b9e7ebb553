"""LetheLogitsProcessor's per-row bookkeeping under vLLM's batch add / remove / move updates (unit, no engine)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from guards import processor as processor_module
from guards.base import RowHooks
from guards.processor import LetheLogitsProcessor

VOCAB = 8


class BanToken:
    """A stand-in guard hook: bans one token id."""

    def __init__(self, token: int) -> None:
        self.token = token

    def apply(self, logits_row: torch.Tensor) -> None:
        logits_row[self.token] = float("-inf")


def ban_factory(section: Mapping[str, Any], prompt_ids: Sequence[int] | None, output_ids: list[int],
                vocabulary: Any) -> BanToken | None:
    return BanToken(section["ban"]) if "ban" in section else None


def banning(build) -> RowHooks:
    """A stand-in mechanism's decoding-time half: no per-process state, every payload accepted."""
    return RowHooks(resources=lambda tokenizer, placement: None, validate=lambda section: None, build=build)


@pytest.fixture
def processor(monkeypatch: pytest.MonkeyPatch) -> LetheLogitsProcessor:
    monkeypatch.setattr(processor_module, "ROW_HOOKS", [("ban", banning(ban_factory))])
    return LetheLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]


def flagged(ban: int) -> SamplingParams:
    return SamplingParams(extra_args={"lethe": {"ban": ban}})


def update(batch_size: int, added=(), removed=(), moved=()) -> BatchUpdate:
    return BatchUpdate(batch_size=batch_size, added=list(added), removed=list(removed), moved=list(moved))


def banned_rows(processor: LetheLogitsProcessor, rows: int) -> dict[int, list[int]]:
    logits = processor.apply(torch.zeros(rows, VOCAB))
    return {row: torch.isinf(logits[row]).nonzero().flatten().tolist() for row in range(rows)}


def test_unflagged_requests_get_no_state_and_logits_are_untouched(processor: LetheLogitsProcessor) -> None:
    processor.update_state(update(2, added=[(0, SamplingParams(), [1, 2], []), (1, SamplingParams(), None, [])]))
    assert processor.rows == {}
    logits = torch.randn(2, VOCAB)
    assert torch.equal(processor.apply(logits.clone()), logits)


def test_only_flagged_rows_are_modified(processor: LetheLogitsProcessor) -> None:
    processor.update_state(update(3, added=[(0, SamplingParams(), [1], []), (1, flagged(5), [1], []),
                                            (2, flagged(3), None, [])]))
    assert banned_rows(processor, 3) == {0: [], 1: [5], 2: [3]}


def test_state_follows_requests_when_rows_move_and_swap(processor: LetheLogitsProcessor) -> None:
    processor.update_state(update(3, added=[(0, flagged(1), [1], []), (2, flagged(2), [1], [])]))
    processor.update_state(update(3, moved=[(0, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert banned_rows(processor, 3) == {0: [], 1: [1], 2: [2]}
    processor.update_state(update(3, moved=[(1, 2, MoveDirectionality.SWAP)]))
    assert banned_rows(processor, 3) == {0: [], 1: [2], 2: [1]}


def test_removed_requests_drop_their_state(processor: LetheLogitsProcessor) -> None:
    processor.update_state(update(2, added=[(0, flagged(1), [1], []), (1, flagged(2), [1], [])]))
    processor.update_state(update(1, removed=[1]))
    assert banned_rows(processor, 2) == {0: [1], 1: []}
    processor.update_state(update(0, removed=[0]))
    assert processor.rows == {}


def test_an_added_request_replaces_the_state_of_its_row(processor: LetheLogitsProcessor) -> None:
    processor.update_state(update(1, added=[(0, flagged(1), [1], [])]))
    processor.update_state(update(1, added=[(0, SamplingParams(), [1], [])]))
    assert processor.rows == {}


def test_malformed_lethe_section_is_rejected_in_the_front_end() -> None:
    with pytest.raises(ValueError):
        LetheLogitsProcessor.validate_params(SamplingParams(extra_args={"lethe": [1, 2]}))
    LetheLogitsProcessor.validate_params(SamplingParams(extra_args={"lethe": {"ban": 1}}))


def test_processor_must_run_for_greedy_batches(processor: LetheLogitsProcessor) -> None:
    assert processor.is_argmax_invariant() is False


class BatchedBan(BanToken):
    """A hook whose batched preparation runs once per step for all its rows (or fails, when told to)."""

    prepared: list[list[int]] = []
    fail = False

    @staticmethod
    def prepare_rows(hooks: Sequence[BatchedBan]) -> None:
        if BatchedBan.fail:
            raise RuntimeError("batched step failed")
        BatchedBan.prepared.append(sorted(hook.token for hook in hooks))


@pytest.mark.parametrize("fail", [False, True])
def test_batched_preparation_runs_once_per_step_and_its_failure_leaves_the_rows_to_themselves(
    monkeypatch: pytest.MonkeyPatch, fail: bool
) -> None:
    monkeypatch.setattr(BatchedBan, "prepared", [])
    monkeypatch.setattr(BatchedBan, "fail", fail)
    monkeypatch.setattr(processor_module, "ROW_HOOKS",
                        [("ban", banning(lambda section, *_: BatchedBan(section["ban"]) if "ban" in section
                                         else None))])
    processor = LetheLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    processor.update_state(update(3, added=[(0, flagged(1), [1], []), (1, SamplingParams(), [1], []),
                                            (2, flagged(5), [1], [])]))
    assert banned_rows(processor, 3) == {0: [1], 1: [], 2: [5]}
    assert BatchedBan.prepared == ([] if fail else [[1, 5]])


class SetOne:
    """A row-by-row hook: token 0's logit becomes 1 (or it fails, when told to)."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def apply(self, logits_row: torch.Tensor) -> None:
        if self.fail:
            raise RuntimeError("hook failed")
        logits_row[0] = 1.0


class TripleInBatch:
    """A hook applied to all its rows at once: token 0's logit tripled; records which rows each call had."""

    calls: list[list[int]] = []

    def apply(self, logits_row: torch.Tensor) -> None:
        raise AssertionError("a batched hook's rows are applied together")

    @staticmethod
    def apply_rows(logits: torch.Tensor, rows: Sequence[tuple[int, TripleInBatch]]) -> None:
        TripleInBatch.calls.append(sorted(row for row, _ in rows))
        for row, _ in rows:
            logits[row, 0] *= 3


def test_batched_hooks_run_position_by_position_in_each_rows_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batched hook that comes second in one row and first in another is applied after the first row's first hook
    (1 * 3, not 3 * 0 + 1); a row whose hook failed is ended and gets no later hook."""
    monkeypatch.setattr(TripleInBatch, "calls", [])
    monkeypatch.setattr(processor_module, "ROW_HOOKS", [
        ("one", banning(lambda section, *_: SetOne(section["one"] == "fail") if "one" in section else None)),
        ("triple", banning(lambda section, *_: TripleInBatch() if "triple" in section else None)),
    ])
    processor = LetheLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    processor.eos_token_id = 7
    rows = [{"one": "ok", "triple": True}, {"triple": True}, {"one": "fail", "triple": True}]
    processor.update_state(update(3, added=[(row, SamplingParams(extra_args={"lethe": section}), [1], [])
                                            for row, section in enumerate(rows)]))
    logits = processor.apply(torch.zeros(3, VOCAB))
    assert logits[0, 0].item() == 3.0 and logits[1, 0].item() == 0.0
    assert logits[2].argmax().item() == 7 and torch.isinf(logits[2]).sum().item() == VOCAB - 1
    assert TripleInBatch.calls == [[1], [0]]
