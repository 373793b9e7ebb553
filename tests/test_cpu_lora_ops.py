"""O3's replacement of vLLM's CPU LoRA ops (guards/o3/cpu_lora_ops.py): vLLM's results for every token with an
adapter slot, nothing for a token without one (vLLM's own ops give it the last slot's adapter)."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops import torch_ops as vllm_ops
from vllm.lora.punica_wrapper import punica_cpu

from guards.o3 import cpu_lora_ops as ours
from guards.o3.cpu_lora_ops import NO_LORA

SLOTS, RANK, WIDTH, OUT = 2, 4, 6, 10


@pytest.fixture()
def weights() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(SLOTS, 1, RANK, WIDTH, generator=generator),
            torch.randn(SLOTS, 1, OUT, RANK, generator=generator))


def test_shrink_and_expand_match_vllms_ops_where_every_token_has_an_adapter(weights) -> None:
    lora_a, lora_b = weights
    x = torch.randn(5, WIDTH)
    slots = torch.tensor([0, 1, 1, 0, 1])
    expected, got = torch.zeros(5, RANK), torch.zeros(5, RANK)
    vllm_ops.bgmv_shrink(x, lora_a, expected, slots, 0.5)
    ours.bgmv_shrink(x, lora_a, got, slots, 0.5)
    assert torch.allclose(got, expected, atol=1e-6)
    base = torch.randn(5, OUT + 3)
    expected_out, got_out = base.clone(), base.clone()
    vllm_ops.bgmv_expand_slice(expected, lora_b, expected_out, slots, 3, OUT, True)
    ours.bgmv_expand_slice(got, lora_b, got_out, slots, 3, OUT, True)
    assert torch.allclose(got_out, expected_out, atol=1e-5)
    expected_full, got_full = base.clone(), base.clone()
    vllm_ops.bgmv_expand(expected, lora_b, expected_full, slots, True)
    ours.bgmv_expand(got, lora_b, got_full, slots, True)
    assert torch.allclose(got_full, expected_full, atol=1e-5)


def test_a_token_without_an_adapter_gets_no_lora_contribution(weights) -> None:
    lora_a, lora_b = weights
    x = torch.randn(4, WIDTH)
    slots = torch.tensor([0, NO_LORA, 0, NO_LORA])
    shrunk = torch.zeros(4, RANK)
    ours.bgmv_shrink(x, lora_a, shrunk, slots, 1.0)
    base = torch.randn(4, OUT)
    out = base.clone()
    ours.bgmv_expand(shrunk, lora_b, out, slots, True)
    assert torch.equal(out[1], base[1]) and torch.equal(out[3], base[3])
    assert not torch.allclose(out[0], base[0])
    # vLLM's reference op hands the plain token the last slot's adapter: the bug these ops exist for
    leaked = torch.zeros(4, RANK)
    vllm_ops.bgmv_shrink(x, lora_a, leaked, slots, 1.0)
    assert leaked[1].abs().sum() > 0


def test_prefill_ops_expand_per_sequence_slots_to_tokens(weights) -> None:
    lora_a, _ = weights
    x = torch.randn(6, WIDTH)
    per_sequence, lengths = torch.tensor([NO_LORA, 1]), torch.tensor([2, 4])
    got = torch.zeros(6, RANK)
    ours.sgmv_shrink(x, lora_a, got, torch.tensor([0, 2]), lengths, per_sequence, 2, 4, 6, 1.0)
    assert not got[:2].any()
    assert torch.allclose(got[2:], x[2:] @ lora_a[1, 0].T, atol=1e-6)


def test_install_puts_the_ops_where_the_cpu_punica_wrapper_calls_them() -> None:
    originals = {name: getattr(punica_cpu, name) for name in ours.OPS}
    try:
        assert ours.install()
        assert all(getattr(punica_cpu, name) is op for name, op in ours.OPS.items())
    finally:
        for name, op in originals.items():
            setattr(punica_cpu, name, op)


def test_the_slot_plan_follows_the_slots_content_not_the_tensor(weights) -> None:
    """vLLM refills one slot buffer in place every step: a plan kept for the buffer's old content would give this
    step's plain tokens the adapter (or take it from the O3 ones)."""
    lora_a, _ = weights
    x = torch.randn(4, WIDTH)
    slots = torch.tensor([0, 0, 0, 0])
    first = torch.zeros(4, RANK)
    ours.bgmv_shrink(x, lora_a, first, slots, 1.0)
    assert torch.allclose(first, x @ lora_a[0, 0].T, atol=1e-6)
    slots.copy_(torch.tensor([NO_LORA, 1, NO_LORA, 0]))  # the same tensor, this step's slots
    second = torch.full((4, RANK), 7.0)
    ours.bgmv_shrink(x, lora_a, second, slots, 1.0)
    assert not second[0].any() and not second[2].any()  # set, not accumulated: no stale 7s, no adapter
    assert torch.allclose(second[1], x[1] @ lora_a[1, 0].T, atol=1e-6)
    assert torch.allclose(second[3], x[3] @ lora_a[0, 0].T, atol=1e-6)
    expected = torch.zeros(4, RANK)
    vllm_ops.bgmv_shrink(x, lora_a, expected, torch.tensor([1, 1, 0, 0]), 2.0)
    got = torch.zeros(4, RANK)
    ours.bgmv_shrink(x, lora_a, got, torch.tensor([1, 1, 0, 0]), 2.0)
    assert torch.allclose(got, expected, atol=1e-5)


def test_expanding_into_a_slice_only_writes_the_slice_and_keeps_plain_tokens_as_they_were(weights) -> None:
    _, lora_b = weights
    shrunk = torch.randn(3, RANK)
    base = torch.randn(3, OUT + 4)
    out = base.clone()
    ours.bgmv_expand_slice(shrunk, lora_b, out, torch.tensor([1, NO_LORA, 1]), 2, OUT, True)
    assert torch.equal(out[:, :2], base[:, :2]) and torch.equal(out[:, 2 + OUT:], base[:, 2 + OUT:])
    assert torch.equal(out[1], base[1])
    assert torch.allclose(out[0, 2:2 + OUT], base[0, 2:2 + OUT] + lora_b[1, 0] @ shrunk[0], atol=1e-5)


class PaddedLayer:
    """Stands in for a vLLM LoRA layer: adapters stored padded to the max rank, written only by set/reset_lora."""

    def __init__(self, max_rank: int) -> None:
        self.lora_a_stacked = (torch.zeros(SLOTS, 1, max_rank, WIDTH),)
        self.lora_b_stacked = (torch.zeros(SLOTS, 1, OUT, max_rank),)

    def reset_lora(self, index: int) -> None:
        self.lora_a_stacked[0][index] = 0
        self.lora_b_stacked[0][index] = 0

    def set_lora(self, index: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        self.reset_lora(index)
        self.lora_a_stacked[0][index, 0, : lora_a.shape[0]].copy_(lora_a)
        self.lora_b_stacked[0][index, 0, :, : lora_b.shape[1]].copy_(lora_b)


def test_products_use_only_the_ranks_an_adapter_fills_and_equal_the_padded_ones(monkeypatch, weights) -> None:
    """Slot 0 holds a rank-4 adapter, slot 1 a rank-2 one, both padded to 16: the results equal vLLM's ops over the
    whole padding, and a cleared slot adds nothing."""
    used = ours.UsedRanks()
    monkeypatch.setattr(ours, "USED_RANKS", used)
    used.watch(PaddedLayer)
    layer = PaddedLayer(max_rank=16)
    lora_a, lora_b = weights
    layer.set_lora(0, lora_a[0, 0], lora_b[0, 0])
    layer.set_lora(1, lora_a[1, 0, :2], lora_b[1, 0, :, :2])
    a, b = layer.lora_a_stacked[0], layer.lora_b_stacked[0]
    assert (used.of(a, 0), used.of(a, 1), used.of(b, 0), used.of(b, 1)) == (RANK, 2, RANK, 2)
    assert used.of(a.clone(), 0) is None  # another tensor, however alike, has no record

    x = torch.randn(5, WIDTH)
    for slots in (torch.tensor([0, 1, 1, 0, NO_LORA]), torch.zeros(5, dtype=torch.long)):
        expected, got = torch.zeros(5, 16), torch.full((5, 16), 7.0)
        vllm_ops.bgmv_shrink(x, a, expected, slots, 0.5)
        expected[slots == NO_LORA] = 0
        ours.bgmv_shrink(x, a, got, slots, 0.5)
        assert torch.allclose(got, expected, atol=1e-6)
        base = torch.randn(5, OUT + 3)
        expected_out, got_out = base.clone(), base.clone()
        vllm_ops.bgmv_expand_slice(expected, b, expected_out, slots, 3, OUT, True)
        expected_out[slots == NO_LORA] = base[slots == NO_LORA]
        ours.bgmv_expand_slice(got, b, got_out, slots, 3, OUT, True)
        assert torch.allclose(got_out, expected_out, atol=1e-5)

    layer.reset_lora(0)
    assert used.of(a, 0) == 0
    cleared = torch.full((2, 16), 7.0)
    ours.bgmv_shrink(x[:2], a, cleared, torch.zeros(2, dtype=torch.long), 1.0)
    assert torch.equal(cleared, torch.zeros(2, 16))


def test_install_has_vllms_lora_layers_report_what_they_write() -> None:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedQKVParallelLinearWithLoRA

    originals = {name: getattr(punica_cpu, name) for name in ours.OPS}
    try:
        assert ours.install()
    finally:
        for name, op in originals.items():
            setattr(punica_cpu, name, op)
    for cls in (BaseLinearLayerWithLoRA, MergedQKVParallelLinearWithLoRA):
        assert getattr(cls.set_lora, "_lethe_records_ranks", False)
        assert getattr(cls.reset_lora, "_lethe_records_ranks", False)
