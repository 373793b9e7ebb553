"""The assistant's in-place KV cache (unit, no engine): what it holds equals what HF's concatenating cache holds,
across the buffer's growths, for a session decoding alone and for sessions decoding in one batch."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from guards.uld import kv
from guards.uld.assistant import AssistantSession, advance_together
from guards.uld.kv import GrowingLayer, growing_cache


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def small_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv, "MIN_SPARE", 2)  # grow every few steps, so the tests cross many growths


def test_appends_equal_concatenation_across_growths() -> None:
    layer, reference = GrowingLayer(), DynamicCache()
    for step in range(12):
        keys, values = torch.randn(3, 2, 1 + step % 3, 4), torch.randn(3, 2, 1 + step % 3, 4)
        got = layer.update(keys, values)
        want = reference.update(keys, values, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert layer.get_seq_length() == want[0].shape[-2]


def test_a_session_and_a_batch_decode_exactly_as_full_forwards_across_growths(model: LlamaForCausalLM) -> None:
    def full(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0, -1]

    prompts = [[1, 5, 7], [2], [9, 8, 7, 6, 5, 4]]
    outputs: list[list[int]] = [[], [], []]
    sessions = [AssistantSession(model, p, o) for p, o in zip(prompts, outputs, strict=True)]
    for step in range(20):
        for i, output in enumerate(outputs):
            output.append((3 * step + i) % 32)
        if step % 7 == 3:  # now and then session 0 decodes alone, taking its row out of the batch
            sessions[0].next_logits()
        advance_together(sessions)
        for session, prompt, output in zip(sessions, prompts, outputs, strict=True):
            assert torch.allclose(session.next_logits(), full(prompt + output), atol=1e-5)


def test_the_cache_is_never_cropped() -> None:
    cache = growing_cache()
    cache.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), 0)
    with pytest.raises(NotImplementedError):
        cache.layers[0].crop(1)
