"""The configurable bounds on one inference request's size: prompts, messages and sequences.

Checked on the parsed request before any prompt is rendered or tokenised, so that the work a request can ask for is
bounded by settings rather than by the body limit alone (16 MiB once held about four million one-letter prompts,
which stalled the server for minutes). Fixed bounds (``stop``, ``logit_bias``, ``stop_token_ids``, ``top_k``) are
part of the request models in ``protocol.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.config import Settings
from server.errors import RequestTooLarge
from server.openai.protocol import ChatCompletionRequest, CompletionRequest
from server.run import completion_items


@dataclass(frozen=True)
class RequestLimits:
    max_prompts: int = 64
    max_sequences: int = 128
    max_messages: int = 256

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(max_prompts=settings.max_prompts_per_request, max_sequences=settings.max_sequences_per_request,
                   max_messages=settings.max_messages)

    def check_chat(self, request: ChatCompletionRequest) -> int:
        """Refuse a chat request over the limits (400); returns the sequences it asks for."""
        if len(request.messages) > self.max_messages:
            raise RequestTooLarge(f"`messages` has {len(request.messages)} messages; this server accepts at most "
                                  f"{self.max_messages}.", param="messages")
        return self._sequences(1, request.n)

    def check_completion(self, request: CompletionRequest) -> int:
        """Refuse a completion request over the limits (400); returns the sequences it asks for."""
        prompts = len(completion_items(request.prompt))
        if prompts > self.max_prompts:
            raise RequestTooLarge(f"`prompt` has {prompts} prompts; this server accepts at most {self.max_prompts} "
                                  "per request.", param="prompt")
        return self._sequences(prompts, request.n)

    def _sequences(self, prompts: int, n: int) -> int:
        if prompts * n > self.max_sequences:
            raise RequestTooLarge(f"{prompts} prompt(s) × `n` = {n} asks for {prompts * n} sequences; this server "
                                  f"generates at most {self.max_sequences} per request.", param="n")
        return prompts * n
