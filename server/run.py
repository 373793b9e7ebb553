"""One inference request's life as the pipeline runs it: what an endpoint asks for, and the run it gets back.

An endpoint hands ``Pipeline.start`` one ``RunRequest``; the run comes back rendered, classified and planned (or the
request is refused before any byte of a response exists). The endpoint then drives it as a context manager::

    run = await pipeline.start(RunRequest(..., params=sampling_params))
    async with run:
        async for event in run.events():
            ...

and the run is finished exactly once on the way out — metrics, a structured log line, one audit record — with the
outcome the way out implies: ``served``, ``error``, ``guard_failed`` or ``aborted`` (client gone). Serving and scoring
share this lifecycle; nothing else finishes a run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from server.errors import GuardFailed
from server.planner import ChatTurn, Classification, EnginePlan, RenderedPrompt
from server.registry.snapshot import RegistrySnapshot
from server.speculation import PlainStart

CompletionPrompt = str | list[str] | list[int] | list[list[int]]


def completion_items(prompt: CompletionPrompt) -> list[str | list[int]]:
    """The prompts of a completions ``prompt``: one text, a batch of texts, one token-id list or a batch of them."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render with the served model's chat template."""

    turns: tuple[ChatTurn, ...]
    add_generation_prompt: bool = True
    continue_final_message: bool = False


@dataclass(frozen=True)
class RunRequest:
    """What an endpoint asks of the pipeline: its prompt(s) as the client sent them, and the reply budget."""

    endpoint: str  # "chat", "completions", "score": the metrics' and the audit record's label
    request_id: str  # the response id ("chatcmpl-…"), also the engine request id
    prompt: ChatPrompt | CompletionPrompt
    n: int = 1
    max_tokens: int | None = None  # what must fit the context after the prompt
    budget_param: str = "max_tokens"  # the field named when it does not
    audited: bool = True  # False: no audit record (the server's own measurements: the erasure report's probes)
    # vLLM ``SamplingParams`` of the reply; None for a run that only scores. Given at the start, so that an unflagged
    # prompt's generation can start while it is classified (``server/speculation.py``).
    params: Any = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]  # (id, text, logprob), best first


@dataclass(frozen=True)
class ChoiceEvent:
    """New output of one choice: the text and tokens produced since the previous event of that choice."""

    index: int
    prompt_index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None
    stop_reason: int | str | None


def outcome_of(error: BaseException | None) -> str:
    """How a run ended, from what ended it."""
    if error is None:
        return "served"
    if isinstance(error, GuardFailed):
        return "guard_failed"
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "aborted"
    return "error"


@dataclass
class Run:
    """One inference request in flight; counters are final once its event stream is exhausted."""

    request_id: str
    endpoint: str
    prompts: list[RenderedPrompt]
    n: int
    snapshot: RegistrySnapshot
    generate: Callable[[Run], AsyncIterator[ChoiceEvent]] = field(repr=False)
    on_finish: Callable[[Run, str], None] = field(repr=False)
    classifications: list[Classification] = field(default_factory=list)
    plans: list[EnginePlan] = field(default_factory=list)
    mechanisms: list[str] = field(default_factory=list)  # applied to any of its prompts, in mechanism order
    started_at: float = field(default_factory=time.perf_counter)
    created: float = field(default_factory=time.time)
    first_token_at: float | None = None
    completion_tokens: int = 0
    outcome: str | None = None  # set once, when the run is finished
    audited: bool = True
    params: Any = None  # the request's SamplingParams
    plain_starts: dict[int, PlainStart] = field(default_factory=dict, repr=False)  # kept speculation, by prompt

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt.token_ids) for prompt in self.prompts)

    @property
    def hit_target_ids(self) -> list[str]:
        return sorted({hit.target_id for c in self.classifications for hit in c.hits})

    def events(self) -> AsyncIterator[ChoiceEvent]:
        """All choices' events, interleaved as the engine produces them, sampled with the request's ``params``."""
        if self.params is None:
            raise RuntimeError("a run started without sampling parameters generates nothing")
        return self.generate(self)

    def finish(self, outcome: str) -> None:
        """Account for the run once; later calls do nothing."""
        if self.outcome is None:
            self.outcome = outcome
            self.on_finish(self, outcome)

    async def __aenter__(self) -> Run:
        return self

    async def __aexit__(self, error_type: type[BaseException] | None, error: BaseException | None,
                        traceback: Any) -> None:
        try:
            for start in self.plain_starts.values():  # kept, but never read (the endpoint failed before generating)
                await start.discard()
        finally:
            self.finish(outcome_of(error))
