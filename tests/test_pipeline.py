"""The request pipeline's own logic with a small fake engine (the real engine is covered by the HTTP tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from vllm.sampling_params import RequestOutputKind, SamplingParams

from server.engine import EngineInfo
from server.errors import ContextLengthExceeded, InvalidRequest, RequestTimeout
from server.metrics import Metrics
from server.pipeline import ChatTurn, Pipeline


class CharTokenizer:
    """One token per character; chat rendered as 'role: content\\n' lines."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(ch) % 100 for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 32) for i in ids)

    def apply_chat_template(self, conversation: list[dict[str, str]], **_: Any) -> str:
        return "".join(f"{turn['role']}: {turn['content']}\n" for turn in conversation)


@dataclass
class FakeEngine:
    """Echoes 'ab' per request in two steps, or hangs forever when ``hang`` is set."""

    hang: bool = False
    calls: list[tuple[dict, SamplingParams, str]] = field(default_factory=list)
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)
    info: EngineInfo = EngineInfo("m", "m", max_model_len=32, vocab_size=100, device="cpu")

    async def generate(self, prompt: dict, params: SamplingParams, request_id: str,
                       lora_request: Any = None) -> AsyncIterator[Any]:
        self.calls.append((prompt, params, request_id))
        if self.hang:
            await asyncio.sleep(3600)
        for step, (text, finish) in enumerate((("a", None), ("b", "length"))):
            outputs = [SimpleNamespace(index=i, text=text, token_ids=[step], logprobs=None, finish_reason=finish,
                                       stop_reason=None) for i in range(params.n)]
            yield SimpleNamespace(outputs=outputs)


def make(engine: FakeEngine, timeout_s: float = 5) -> Pipeline:
    return Pipeline(engine, timeout_s, Metrics())  # type: ignore[arg-type]


def params(**kwargs: Any) -> SamplingParams:
    return SamplingParams(output_kind=RequestOutputKind.DELTA, **kwargs)


async def collect(pipeline: Pipeline, prompts, n: int = 1, **kwargs: Any):
    run = await pipeline.start("req-1", "completions", prompts, n)
    return run, [event async for event in pipeline.events(run, params(n=n, **kwargs))]


async def test_unflagged_prompt_reaches_the_engine_as_plain_token_ids() -> None:
    engine = FakeEngine()
    pipeline = make(engine)
    prompt = pipeline.render_chat([ChatTurn("user", "hi")])
    await collect(pipeline, [prompt], max_tokens=4)
    sent_prompt, sent_params, _ = engine.calls[0]
    assert sent_prompt == {"prompt_token_ids": prompt.token_ids}
    assert sent_params.extra_args is None


async def test_batched_prompts_get_choice_indices_prompt_major() -> None:
    engine = FakeEngine()
    pipeline = make(engine)
    run, events = await collect(pipeline, pipeline.render_completion(["x", "yy"]), n=2, max_tokens=2)
    assert sorted({e.index for e in events}) == [0, 1, 2, 3]
    assert {e.prompt_index for e in events if e.index >= 2} == {1}
    assert run.completion_tokens == 8 and run.prompt_tokens == 3
    assert [call[2] for call in engine.calls] == ["req-1-0", "req-1-1"]


async def test_unset_max_tokens_defaults_to_the_rest_of_the_context() -> None:
    engine = FakeEngine()
    pipeline = make(engine)
    await collect(pipeline, pipeline.render_completion("hello"), max_tokens=None)
    assert engine.calls[0][1].max_tokens == 32 - 5


async def test_generation_past_the_timeout_is_a_504_error() -> None:
    pipeline = make(FakeEngine(hang=True), timeout_s=0.2)
    with pytest.raises(RequestTimeout):
        await collect(pipeline, pipeline.render_completion("x"), max_tokens=1)


def test_prompts_that_do_not_fit_the_context_are_refused() -> None:
    pipeline = make(FakeEngine())
    with pytest.raises(ContextLengthExceeded):
        pipeline.check_budget(pipeline.render_completion("z" * 32), None, "max_tokens")
    with pytest.raises(ContextLengthExceeded) as info:
        pipeline.check_budget(pipeline.render_completion("z" * 10), 30, "max_completion_tokens")
    assert info.value.param == "max_completion_tokens"
    pipeline.check_budget(pipeline.render_completion("z" * 10), 22, "max_tokens")


def test_token_id_prompts_are_checked_against_the_vocabulary() -> None:
    pipeline = make(FakeEngine())
    with pytest.raises(InvalidRequest):
        pipeline.render_completion([1, 2, 100])
    with pytest.raises(InvalidRequest):
        pipeline.render_completion([[1], []])
    assert [p.token_ids for p in pipeline.render_completion([[1, 2], [3]])] == [[1, 2], [3]]
