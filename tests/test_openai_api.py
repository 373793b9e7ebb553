"""The OpenAI surface, driven over HTTP with the official SDK against the real server and vLLM engine."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from demo.tofu_data import authors_of
from guards.text_metrics import rouge_l_recall

FORGET01 = authors_of("forget01")
QUESTION = FORGET01[0].items[1].question
ANSWER = FORGET01[0].items[1].answer


def chat(client: openai.OpenAI, model: str, content: str = QUESTION, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kwargs)


def test_models_lists_the_served_model(client: openai.OpenAI, model_name: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [model_name]
    assert models[0].model_extra["max_model_len"] == 1024
    assert models[0].model_extra["root"] == model_name  # the name, never the model's path on the server's disk


def test_chat_answers_a_memorised_tofu_question(client: openai.OpenAI, model_name: str) -> None:
    reply = chat(client, model_name, temperature=0, max_tokens=80)
    choice = reply.choices[0]
    assert rouge_l_recall(choice.message.content, ANSWER) >= 0.5, choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_max_tokens_and_max_completion_tokens_cap_the_reply(client: openai.OpenAI, model_name: str) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        reply = chat(client, model_name, temperature=0, **{key: 3})
        assert reply.usage.completion_tokens == 3
        assert reply.choices[0].finish_reason == "length"


def test_stop_string_ends_the_reply_before_it(client: openai.OpenAI, model_name: str) -> None:
    full = chat(client, model_name, temperature=0, max_tokens=80).choices[0].message.content
    words = full.split()
    assert len(words) > 4, full
    stop_word = words[3]
    reply = chat(client, model_name, temperature=0, max_tokens=80, stop=[stop_word]).choices[0]
    assert reply.finish_reason == "stop"
    assert stop_word not in reply.message.content
    assert full.startswith(reply.message.content)


def test_n_returns_independent_choices(client: openai.OpenAI, model_name: str) -> None:
    reply = chat(client, model_name, "Say something.", n=3, temperature=2.0, seed=11, max_tokens=12, logprobs=True)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    assert len({c.message.content for c in reply.choices}) >= 2


def test_seed_makes_sampling_reproducible(client: openai.OpenAI, model_name: str) -> None:
    first = chat(client, model_name, temperature=1.5, seed=7, max_tokens=24).choices[0].message.content
    second = chat(client, model_name, temperature=1.5, seed=7, max_tokens=24).choices[0].message.content
    assert first == second


def test_tiny_top_p_is_greedy(client: openai.OpenAI, model_name: str) -> None:
    greedy = chat(client, model_name, temperature=0, max_tokens=24).choices[0].message.content
    nucleus = chat(client, model_name, temperature=1.0, top_p=1e-6, seed=3, max_tokens=24).choices[0].message.content
    assert nucleus == greedy


def test_chat_logprobs_are_sorted_top_k(client: openai.OpenAI, model_name: str) -> None:
    reply = chat(client, model_name, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3
        values = [t.logprob for t in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert token.logprob == pytest.approx(values[0])  # greedy picks the top token
        assert token.logprob <= 0.0


def test_returned_logprobs_are_the_processed_ones(client: openai.OpenAI, model_name: str) -> None:
    """With ``top_k`` 1 one token remains possible at each step: processed logprobs give it 0.0 and list no other
    (raw ones would show the unrestricted distribution, and leak what the guards remove). A token the request could
    not have produced (−inf) is never listed, so the list is shorter than asked."""
    reply = chat(client, model_name, temperature=1.0, seed=3, max_tokens=4, logprobs=True, top_logprobs=3,
                 extra_body={"top_k": 1})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for token in content:
        assert token.logprob == pytest.approx(0.0, abs=1e-5)
        assert [(t.token, t.logprob) for t in token.top_logprobs] == [(token.token, token.logprob)]


def test_completions_take_text_batches_and_token_ids(client: openai.OpenAI, model_name: str) -> None:
    reply = client.completions.create(model=model_name, prompt=["The capital of", "Once upon"], max_tokens=4, n=2,
                                      temperature=0.7, seed=1)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    greedy = [client.completions.create(model=model_name, prompt=p, max_tokens=4, temperature=0).choices[0].text
              for p in ("The capital of", "Once upon")]
    both = client.completions.create(model=model_name, prompt=["The capital of", "Once upon"], max_tokens=4,
                                     temperature=0)
    assert [c.text for c in both.choices] == greedy  # batched prompts answer exactly as single ones
    by_ids = client.completions.create(model=model_name, prompt=[[5, 6, 7, 8]], max_tokens=4, temperature=0)
    assert by_ids.usage.prompt_tokens == 4


def test_completion_echo_prepends_the_prompt(client: openai.OpenAI, model_name: str) -> None:
    reply = client.completions.create(model=model_name, prompt="The capital of", max_tokens=3, echo=True,
                                      temperature=0)
    assert reply.choices[0].text.startswith("The capital of")


def test_completion_logprobs_have_offsets(client: openai.OpenAI, model_name: str) -> None:
    reply = client.completions.create(model=model_name, prompt="Question: who", max_tokens=5, logprobs=2,
                                      temperature=0)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 5
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(len(top) >= 2 for top in logprobs.top_logprobs)


def test_tokens_as_token_ids_name_each_generated_token(client: openai.OpenAI, model_name: str, tokenizer) -> None:
    """vLLM's ``return_tokens_as_token_ids``: logprob tokens read ``token_id:<id>``, and the ids decode to the reply."""
    reply = chat(client, model_name, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2,
                 extra_body={"return_tokens_as_token_ids": True})
    choice = reply.choices[0]
    content = choice.logprobs.content
    ids = [int(token.token.removeprefix("token_id:")) for token in content]
    assert all(token.token.startswith("token_id:") for token in content)
    assert all(top.token.startswith("token_id:") for token in content for top in token.top_logprobs)
    assert tokenizer.decode(ids, skip_special_tokens=True) == choice.message.content
    completion = client.completions.create(model=model_name, prompt="Question: who", max_tokens=5, logprobs=1,
                                           temperature=0, extra_body={"return_tokens_as_token_ids": True})
    logprobs = completion.choices[0].logprobs
    ids = [int(token.removeprefix("token_id:")) for token in logprobs.tokens]
    assert tokenizer.decode(ids) == completion.choices[0].text
    assert all(key.startswith("token_id:") for top in logprobs.top_logprobs for key in top)


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    return text, chunks


def test_chat_stream_equals_non_stream(client: openai.OpenAI, model_name: str) -> None:
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        full = chat(client, model_name, max_tokens=40, **sampling).choices[0]
        text, chunks = _stream_text(chat(client, model_name, max_tokens=40, stream=True, **sampling))
        assert text == full.message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishing == [full.finish_reason]


def test_stream_include_usage_sends_a_final_usage_chunk(client: openai.OpenAI, model_name: str) -> None:
    _, chunks = _stream_text(chat(client, model_name, max_tokens=5, temperature=0, stream=True,
                                  stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_equals_non_stream(client: openai.OpenAI, model_name: str) -> None:
    full = client.completions.create(model=model_name, prompt="Question: " + QUESTION, max_tokens=20, temperature=0)
    stream = client.completions.create(model=model_name, prompt="Question: " + QUESTION, max_tokens=20,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text


def test_sse_wire_format_ends_with_done(http: httpx.Client, model_name: str) -> None:
    body = {"model": model_name, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 3,
            "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


async def test_sixteen_concurrent_requests_match_sequential_answers(
    async_client: openai.AsyncOpenAI, model_name: str
) -> None:
    questions = [item.question for author in FORGET01 for item in author.items[:8]]
    assert len(questions) == 16

    async def ask(question: str) -> str:
        reply = await async_client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=30)
        return reply.choices[0].message.content

    sequential = [await ask(q) for q in questions]
    concurrent = await asyncio.gather(*(ask(q) for q in questions))
    assert list(concurrent) == sequential


def test_multi_turn_conversation_is_rendered_with_the_chat_template(client: openai.OpenAI, model_name: str) -> None:
    reply = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=5,
        messages=[{"role": "system", "content": "You are helpful."},
                  {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": QUESTION}])
    assert reply.usage.prompt_tokens > 10


async def test_async_streaming_client_gets_the_same_text(async_client: openai.AsyncOpenAI, client: openai.OpenAI,
                                                         model_name: str) -> None:
    expected = chat(client, model_name, temperature=0, max_tokens=30).choices[0].message.content
    stream = await async_client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=30,
        stream=True)
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(parts) == expected


def test_streamed_n_choices_each_start_with_the_role(client: openai.OpenAI, model_name: str) -> None:
    chunks = list(chat(client, model_name, n=2, temperature=1.0, seed=2, max_tokens=8, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    full = chat(client, model_name, n=2, temperature=1.0, seed=2, max_tokens=8)
    for index in (0, 1):
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks
                           if c.choices and c.choices[0].index == index)
        assert streamed == full.choices[index].message.content
