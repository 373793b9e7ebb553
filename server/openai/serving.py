"""OpenAI semantics on top of the pipeline: request -> SamplingParams, choice events -> responses or SSE chunks.

Every check that can fail runs before the first byte is sent, so a bad request is always a 4xx JSON error and never a
broken stream. Both endpoints consume the same ``Pipeline.events`` stream; a non-streaming response is the fold of the
events a streaming one would send, which is why the two are identical for the same seed.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from server.admission import AdmissionSlot
from server.engine import EngineInfo
from server.errors import InvalidRequest, LetheError, ModelNotFound
from server.openai.limits import RequestLimits
from server.openai.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobToken,
    ChatLogprobTop,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from server.pipeline import Pipeline, check_in_vocabulary
from server.planner import ChatTurn, RenderedPrompt
from server.run import ChatPrompt, ChoiceEvent, Run, RunRequest, TokenLogprob

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    body = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


def sampling_params(request: SamplingFields, max_tokens: int | None, logprobs: int | None, vocab_size: int) -> Any:
    """Map the OpenAI fields a client set onto vLLM's SamplingParams; unset fields keep vLLM's defaults. There is no
    ``logit_bias`` to map: the protocol refuses it (``SamplingFields._refuse_logit_bias``)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    kwargs: dict[str, Any] = {
        "n": request.n,
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "stop": request.stop_list,
        "min_tokens": request.min_tokens,
        "ignore_eos": request.ignore_eos,
        "skip_special_tokens": request.skip_special_tokens,
        "output_kind": RequestOutputKind.DELTA,
    }
    optional = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty,
        "stop_token_ids": request.stop_token_ids,
    }
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    check_in_vocabulary(request.stop_token_ids or (), vocab_size, "stop_token_ids")
    try:
        return SamplingParams(**kwargs)
    except (ValueError, VLLMValidationError) as exc:
        raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from exc


@dataclass
class ChoiceState:
    """Accumulates one choice's events into the final (non-streaming) choice."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, event: ChoiceEvent) -> None:
        self.text.append(event.text)
        if event.logprobs:
            self.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            self.finish_reason, self.stop_reason = event.finish_reason, event.stop_reason


class OpenAIServing:
    """The logic behind ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions``.

    A generation request is checked against the size limits (400), then reserves its sequences in its admission slot
    (429), both before its prompt is rendered.
    """

    def __init__(self, pipeline: Pipeline, info: EngineInfo, limits: RequestLimits | None = None) -> None:
        self._pipeline = pipeline
        self._info = info
        self._limits = limits or RequestLimits()
        self._created = int(time.time())

    def models(self) -> ModelList:
        card = ModelCard(
            id=self._info.served_model_name,
            created=self._created,
            root=self._info.served_model_name,  # vLLM shows the model's path here: not a client's business
            max_model_len=self._info.max_model_len,
        )
        return ModelList(data=[card])

    def _check_model(self, model: str) -> None:
        if model != self._info.served_model_name:
            raise ModelNotFound(model)

    # ------------------------------------------------------------ chat

    async def chat(self, request: ChatCompletionRequest,
                   slot: AdmissionSlot) -> ChatCompletionResponse | AsyncIterator[str]:
        self._check_model(request.model)
        slot.reserve(self._limits.check_chat(request))
        top = (request.top_logprobs or 0) if request.logprobs else None
        params = sampling_params(request, request.completion_budget, top, self._info.vocab_size)
        turns = tuple(ChatTurn(role=_template_role(m.role), content=m.text()) for m in request.messages)
        run = await self._pipeline.start(RunRequest(
            endpoint="chat", request_id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt=ChatPrompt(turns, request.add_generation_prompt, request.continue_final_message),
            n=request.n, max_tokens=request.completion_budget,
            budget_param="max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens",
            params=params))
        if request.stream:
            return self._chat_stream(request, run)
        return await self._chat_full(request, run)

    async def _chat_full(self, request: ChatCompletionRequest, run: Run) -> ChatCompletionResponse:
        states = [ChoiceState() for _ in range(run.n)]
        async with run:
            async for event in run.events():
                states[event.index].add(event)
        choices = [
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content="".join(state.text)),
                logprobs=_chat_logprobs(state.logprobs, request),
                finish_reason=state.finish_reason,
                stop_reason=state.stop_reason,
            )
            for i, state in enumerate(states)
        ]
        return ChatCompletionResponse(id=run.request_id, model=request.model, choices=choices, usage=_usage(run))

    async def _chat_stream(self, request: ChatCompletionRequest, run: Run) -> AsyncIterator[str]:
        async for line in self._framed(run, self._chat_chunks(request, run)):
            yield line

    async def _chat_chunks(self, request: ChatCompletionRequest, run: Run) -> AsyncIterator[str]:
        created = int(time.time())
        options = request.stream_options
        continuous = bool(options and options.continuous_usage_stats)

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=run.request_id, created=created, model=request.model,
                                           choices=choices, usage=usage))

        for index in range(run.n):
            yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))],
                        _usage(run) if continuous else None)
        async for event in run.events():
            if not event.text and event.finish_reason is None and not event.token_ids:
                continue
            choice = ChatChunkChoice(
                index=event.index,
                delta=ChatDelta(content=event.text),
                logprobs=_chat_logprobs(list(event.logprobs or ()), request),
                finish_reason=event.finish_reason,
                stop_reason=event.stop_reason,
            )
            yield chunk([choice], _usage(run) if continuous else None)
        if options and options.include_usage:
            yield chunk([], _usage(run))

    # ------------------------------------------------------------ completions

    async def completion(self, request: CompletionRequest,
                         slot: AdmissionSlot) -> CompletionResponse | AsyncIterator[str]:
        self._check_model(request.model)
        slot.reserve(self._limits.check_completion(request))
        if request.prompt_logprobs is not None or (request.echo and request.logprobs is not None):
            raise InvalidRequest(
                "Prompt logprobs (`prompt_logprobs`, or `echo` with `logprobs`) are not available on this server: "
                "they would bypass unlearning.",
                param="prompt_logprobs" if request.prompt_logprobs is not None else "echo",
            )
        params = sampling_params(request, request.max_tokens, request.logprobs, self._info.vocab_size)
        run = await self._pipeline.start(RunRequest(
            endpoint="completions", request_id=f"cmpl-{uuid.uuid4().hex}", prompt=request.prompt, n=request.n,
            max_tokens=request.max_tokens, params=params))
        if request.stream:
            return self._completion_stream(request, run)
        return await self._completion_full(request, run)

    async def _completion_full(self, request: CompletionRequest, run: Run) -> CompletionResponse:
        states = [ChoiceState() for _ in range(len(run.prompts) * run.n)]
        async with run:
            async for event in run.events():
                states[event.index].add(event)
        choices = []
        for index, state in enumerate(states):
            prefix = _echo_prefix(request, run.prompts[index // run.n])
            choices.append(
                CompletionChoice(
                    index=index,
                    text=prefix + "".join(state.text),
                    logprobs=_completion_logprobs(state.logprobs, 0, request),
                    finish_reason=state.finish_reason,
                    stop_reason=state.stop_reason,
                )
            )
        return CompletionResponse(id=run.request_id, model=request.model, choices=choices, usage=_usage(run))

    async def _completion_stream(self, request: CompletionRequest, run: Run) -> AsyncIterator[str]:
        async for line in self._framed(run, self._completion_chunks(request, run)):
            yield line

    async def _completion_chunks(self, request: CompletionRequest, run: Run) -> AsyncIterator[str]:
        created = int(time.time())
        options = request.stream_options
        continuous = bool(options and options.continuous_usage_stats)
        offsets = [0] * (len(run.prompts) * run.n)
        echoed = [False] * len(offsets)

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(CompletionResponse(id=run.request_id, created=created, model=request.model, choices=choices,
                                          usage=usage))

        async for event in run.events():
            if not event.text and event.finish_reason is None and not event.token_ids:
                continue
            prefix = "" if echoed[event.index] else _echo_prefix(request, run.prompts[event.prompt_index])
            echoed[event.index] = True
            logprobs = _completion_logprobs(list(event.logprobs or ()), offsets[event.index], request)
            offsets[event.index] += sum(len(lp.token) for lp in event.logprobs or ())
            choice = CompletionChoice(index=event.index, text=prefix + event.text, logprobs=logprobs,
                                      finish_reason=event.finish_reason, stop_reason=event.stop_reason)
            yield chunk([choice], _usage(run) if continuous else None)
        if options and options.include_usage:
            yield chunk([], _usage(run))

    # ------------------------------------------------------------ shared

    async def _framed(self, run: Run, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """SSE framing shared by both endpoints: an error after the first byte becomes a final error event."""
        try:
            async with run:
                async for line in chunks:
                    yield line
        except LetheError as exc:
            yield sse(exc.to_response())
        yield SSE_DONE


def _template_role(role: str) -> str:
    return "system" if role == "developer" else role


def _echo_prefix(request: CompletionRequest, prompt: RenderedPrompt) -> str:
    return prompt.text if request.echo else ""


def _usage(run: Run) -> Usage:
    return Usage(prompt_tokens=run.prompt_tokens, completion_tokens=run.completion_tokens,
                 total_tokens=run.prompt_tokens + run.completion_tokens)


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def _token_label(token_id: int, text: str, as_ids: bool) -> str:
    """vLLM's ``return_tokens_as_token_ids``: ``token_id:<id>`` names a token exactly, where its text may not (a
    reply a guard steered off BPE's usual spelling re-tokenises differently from what was generated)."""
    return f"token_id:{token_id}" if as_ids else text


def _chat_logprobs(tokens: list[TokenLogprob], request: ChatCompletionRequest) -> ChatChoiceLogprobs | None:
    if not request.logprobs:
        return None
    top, as_ids = request.top_logprobs or 0, request.return_tokens_as_token_ids
    content = [
        ChatLogprobToken(
            token=_token_label(lp.token_id, lp.token, as_ids),
            logprob=max(lp.logprob, -9999.0),
            bytes=_token_bytes(lp.token),
            top_logprobs=[
                ChatLogprobTop(token=_token_label(token_id, text, as_ids), logprob=max(value, -9999.0),
                               bytes=_token_bytes(text))
                for token_id, text, value in lp.top[:top]
            ],
        )
        for lp in tokens
    ]
    return ChatChoiceLogprobs(content=content)


def _completion_logprobs(tokens: list[TokenLogprob], start_offset: int,
                         request: CompletionRequest) -> CompletionLogprobs | None:
    if request.logprobs is None:
        return None
    as_ids = request.return_tokens_as_token_ids
    result = CompletionLogprobs()
    offset = start_offset
    for lp in tokens:
        result.tokens.append(_token_label(lp.token_id, lp.token, as_ids))
        result.token_logprobs.append(max(lp.logprob, -9999.0))
        result.text_offset.append(offset)
        result.top_logprobs.append({_token_label(token_id, text, as_ids): max(value, -9999.0)
                                    for token_id, text, value in lp.top})
        offset += len(lp.token)
    return result
