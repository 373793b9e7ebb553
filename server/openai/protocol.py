"""Pydantic request/response models of the OpenAI surface Lethe serves.

Shapes follow the OpenAI API and vLLM's server so that existing clients work unchanged. Request models reject
unknown-but-dangerous vLLM extensions explicitly (``vllm_xargs``, ``prompt_embeds``): they would let a client tamper
with the per-request guard configuration or bypass the prompt classifier. A non-empty ``logit_bias`` is refused on
every request (``SamplingFields._refuse_logit_bias``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_N = 16
# Bounds on the size of one request's fields, checked before any prompt is read (the configurable ones, prompts,
# messages and sequences, are in ``server/openai/limits.py``).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_INT32 = 2**31 - 1  # integers the engine stores as int32; larger ones once broke its msgpack (a 500)


class OpenAIBase(BaseModel):
    """Unknown fields are ignored (OpenAI SDKs send extras), except the ones listed in ``REFUSED_FIELDS``. ``NaN`` and
    ``Infinity`` (which Python's JSON parser accepts) are refused in every number."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


REFUSED_FIELDS: dict[str, str] = {
    "vllm_xargs": "`vllm_xargs` is reserved for Lethe's guards and cannot be set by clients.",
    "prompt_embeds": "`prompt_embeds` is not accepted: prompts must be text or token ids.",
    "logits_processors": "Per-request logits processors are not supported.",
    "guided_json": "Guided decoding is not supported.",
    "guided_regex": "Guided decoding is not supported.",
    "guided_choice": "Guided decoding is not supported.",
    "structured_outputs": "Structured outputs are not supported.",
}


LOGIT_BIAS_REFUSED = ("`logit_bias` is not supported by this server: it would reveal which tokens its unlearning "
                      "guards ban.")


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(OpenAIBase):
    """Sampling parameters shared by both endpoints (OpenAI's plus vLLM's common extras)."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)  # past the vocabulary: every token (vLLM's reading)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, description="Not supported: a non-empty bias is refused with 400 on every request (docs/security.md).")
    min_tokens: int = Field(0, ge=0, le=MAX_INT32)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False  # vLLM's: logprob tokens as ``token_id:<id>``
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _refuse_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        """Refused on every request, flagged or not (a refusal on flagged requests alone would say which prompts are
        about a forget target). vLLM applies the bias before Lethe's logits processor, so a flagged prompt with
        ``{guessed_token: 100}`` and ``max_tokens: 1`` would answer that token unless a guard bans it: a yes/no oracle
        on a guessed answer. No bias that can raise a token above its rivals is safe, and negative biases over many
        tokens do the same; see docs/security.md."""
        if bias:
            raise ValueError(LOGIT_BIAS_REFUSED)
        return None

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"`stop` takes at most {MAX_STOP_STRINGS} non-empty strings of at most "
                             f"{MAX_STOP_CHARS} characters each.")
        return stop

    @model_validator(mode="after")
    def _refuse_reserved_fields(self) -> SamplingFields:
        for name, message in REFUSED_FIELDS.items():
            if (self.model_extra or {}).get(name) is not None:
                raise ValueError(message)
        if self.stream_options is not None and not self.stream:
            raise ValueError("`stream_options` is only allowed when `stream` is true.")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# ---------------------------------------------------------------- chat


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One conversation turn. Content parts other than text are refused (the served model is text-only)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("`top_logprobs` requires `logprobs` to be true.")
        if self.tools:
            raise ValueError("Tool calling is not supported by this server.")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("Only `response_format` of type `text` is supported.")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("`continue_final_message` requires `add_generation_prompt` to be false.")
        return self

    @property
    def completion_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatLogprobTop(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprobToken(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprobToken]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _without_unset(self) -> dict[str, str]:
        # OpenAI omits absent delta fields rather than sending nulls.
        return {key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- completions

PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: int | None = Field(16, ge=1, le=MAX_INT32)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    prompt_logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("`prompt` must not be empty.")
        if self.suffix:
            raise ValueError("`suffix` is not supported by this model.")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("`best_of` other than `n` is not supported.")
        return self


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


# ---------------------------------------------------------------- models and errors


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lethe"
    root: str
    parent: str | None = None
    max_model_len: int
    permission: list[dict[str, Any]] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
