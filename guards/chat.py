"""The served chat format: the one rendering of a conversation that serving, scoring, training and evaluation share.

The server sends vLLM exactly what ``render_chat`` produces for a request's messages, so an assistant or adapter
trained on ``chat_example`` learns on the very prompts it will see, and an evaluation that renders questions with
``chat_prompt_ids`` asks the model what a client would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Turn = tuple[str, str]  # (role, content)


def render_chat(tokenizer: Any, turns: Sequence[Turn], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> str:
    """The conversation as text, through the model's own chat template (raises what the template raises)."""
    return tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in turns],
                                         tokenize=False, add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message)


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered chat text: the template already wrote every special token."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """One user question as the server sends it to the engine (the generation prompt included)."""
    return encode_rendered(tokenizer, render_chat(tokenizer, [("user", question)]))
