"""Shared by the end-to-end unlearning tests: the forget01 questions, replies through the real server, the
"forgotten" criterion, and target registration helpers.

A forget question counts as "answered" when the unprotected reply has ROUGE-L recall >= 0.5 of the gold answer;
protected, >= 95 % of those must fall below 0.3 (the issue's criterion). Recall is taken over the gold answer's
content words that the question does not already contain (`evals.metrics.answer_recall`): a guarded reply that echoes
"The full name of the author born in ..." gives away nothing, yet holds 30 % of that gold answer by plain ROUGE-L.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import openai
from openai.types import CompletionChoice
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChatChunkChoice

from demo.tofu_data import authors_of, demo_authors
from evals.metrics import answer_recall
from tests.conftest import API_KEY, RunningServer

FORGET01 = authors_of("forget01")
TINY_RETAIN_AUTHORS = [author for author in demo_authors() if author.index in (0, 1, 2)]
JOB_TIMEOUT_S = 600
MAX_TOKENS = 60
ANSWERED = 0.5
FORGOTTEN = 0.3
CONCURRENCY = 8


@dataclass(frozen=True)
class Question:
    text: str
    gold: str


FORGET_QUESTIONS = [Question(item.question, item.answer) for author in FORGET01 for item in author.items]
PARAPHRASES = [Question(item.paraphrased_question, item.answer) for author in FORGET01 for item in author.items]
RETAIN_QUESTIONS = [Question(item.question, item.answer) for author in TINY_RETAIN_AUTHORS for item in author.items[:8]]


@dataclass(frozen=True)
class Request:
    """One request to the server: a chat conversation (OpenAI messages) or, with `prompt`, a raw /v1/completions
    prompt. With `continue_final`, the conversation's last turn is an assistant prefill that the model continues."""

    messages: tuple[dict[str, str], ...] = ()
    prompt: str | None = None
    continue_final: bool = False


def user_turn(text: str) -> Request:
    return Request(messages=({"role": "user", "content": text},))


async def replies_with_ids(server: RunningServer, model: str, questions: list[Question], *,
                   stream: bool = False) -> list[tuple[str, str]]:
    """(reply text, response id) per question, asked as one user turn."""
    return await requests_with_ids(server, model, [user_turn(q.text) for q in questions], stream=stream)


async def requests_with_ids(server: RunningServer, model: str, requests: list[Request], *,
                            stream: bool = False) -> list[tuple[str, str]]:
    """(reply text, response id) per request, greedy, MAX_TOKENS, at most CONCURRENCY requests in flight.

    A client per call: an async client's connections belong to the event loop that opened them.
    """
    limit = asyncio.Semaphore(CONCURRENCY)
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    async def send(request: Request) -> tuple[str, str]:
        async with limit:
            if request.prompt is not None:
                reply = await client.completions.create(model=model, prompt=request.prompt, temperature=0,
                                                        max_tokens=MAX_TOKENS, stream=stream)
            else:
                continued = {"add_generation_prompt": False, "continue_final_message": True}
                reply = await client.chat.completions.create(
                    model=model, messages=list(request.messages), temperature=0, max_tokens=MAX_TOKENS,
                    stream=stream, extra_body=continued if request.continue_final else None)
            if not stream:
                return _choice_text(reply.choices[0]), reply.id
            parts, response_id = [], ""
            async for chunk in reply:
                response_id = chunk.id
                parts.extend(_choice_text(choice) for choice in chunk.choices)
            return "".join(parts), response_id

    async with client:
        return list(await asyncio.gather(*(send(r) for r in requests)))


def _choice_text(choice: CompletionChoice | ChatChoice | ChatChunkChoice) -> str:
    """The text of a completions choice (whole or streamed), a chat choice or a streamed chat delta."""
    if isinstance(choice, CompletionChoice):
        return choice.text
    if isinstance(choice, ChatChunkChoice):
        return choice.delta.content or ""
    return choice.message.content or ""


def audit_records(admin: httpx.Client, response_ids: list[str], since: float) -> dict[str, dict]:
    """The audit records of these responses (created at or after `since`, Unix time), by response id; waits for
    the batched writes."""
    deadline = time.monotonic() + 10
    while True:
        records = {r["request_id"]: r
                   for r in admin.get("/audit", params={"since": since, "limit": 10_000}).json()["data"]}
        missing = set(response_ids) - set(records)
        if not missing:
            return records
        assert time.monotonic() < deadline, f"{len(missing)} responses not audited after 10 s"
        time.sleep(0.2)


def replies(server: RunningServer, model: str, questions: list[Question], stream: bool = False) -> list[str]:
    return [text for text, _ in asyncio.run(replies_with_ids(server, model, questions, stream=stream))]


def recalls(questions: list[Question], texts: list[str]) -> list[float]:
    return [answer_recall(text, question.gold, question.text) for question, text in zip(questions, texts, strict=True)]


@dataclass(frozen=True)
class Baseline:
    forget: list[float]
    paraphrase: list[float]
    retain_texts: list[str]


def measure_baseline(lethe_server: RunningServer, model_name: str, admin: httpx.Client) -> Baseline:
    """The unprotected model's replies; call it with no target registered."""
    assert_no_targets(admin)
    return Baseline(forget=recalls(FORGET_QUESTIONS, replies(lethe_server, model_name, FORGET_QUESTIONS)),
                    paraphrase=recalls(PARAPHRASES, replies(lethe_server, model_name, PARAPHRASES)),
                    retain_texts=replies(lethe_server, model_name, RETAIN_QUESTIONS))


def assert_no_targets(admin: httpx.Client) -> None:
    """What the unprotected model says is measured with no target registered (modules remove theirs)."""
    assert admin.get("/targets").json()["data"] == [], "another module left targets behind"


def target_body(author, mechanisms: dict) -> dict:
    return {
        "name": f"e2e-{author.name.lower().replace(' ', '-')}",
        "aliases": [author.name],
        "forget": [{"question": item.question, "answer": item.answer} for item in author.items],
        "retain": [{"question": item.question, "answer": item.answer}
                   for other in TINY_RETAIN_AUTHORS for item in other.items],
        "mechanisms": mechanisms,
    }


def wait_until_served(admin: httpx.Client, target_ids: list[str]) -> list[dict]:
    """Every target active and this replica serving a revision that includes the last change."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        targets = [admin.get(f"/targets/{tid}").json() for tid in target_ids]
        summary = admin.get("/registry").json()
        if all(t["status"] == "active" for t in targets) and summary["serving_revision"] == summary["revision"]:
            return targets
        assert not any(t["status"] in ("failed", "degraded") for t in targets), targets
        time.sleep(1)
    raise AssertionError(f"targets not served in time: {targets}")


def use_mechanisms(admin: httpx.Client, targets: list[dict], mechanisms: dict) -> None:
    for target in targets:
        response = admin.patch(f"/targets/{target['id']}", json={"mechanisms": mechanisms})
        assert response.status_code == 200, response.text
    wait_until_served(admin, [t["id"] for t in targets])


def assert_forgotten(before: list[float], after: list[float], label: str, required: float = 0.95) -> None:
    answered = [i for i, value in enumerate(before) if value >= ANSWERED]
    assert answered, f"{label}: the unprotected model answered none of these"
    forgotten = [i for i in answered if after[i] < FORGOTTEN]
    share = len(forgotten) / len(answered)
    assert share >= required, (f"{label}: {len(forgotten)}/{len(answered)} forgotten; still answered: "
                               f"{[(i, round(after[i], 2)) for i in answered if after[i] >= FORGOTTEN]}")


def assert_protects(server: RunningServer, model: str, baseline: Baseline, label: str,
                    required: float = 0.95, paraphrases_required: float = 0.95) -> None:
    assert_forgotten(baseline.forget, recalls(FORGET_QUESTIONS, replies(server, model, FORGET_QUESTIONS)),
                     f"{label} forget questions", required)
    assert_forgotten(baseline.paraphrase, recalls(PARAPHRASES, replies(server, model, PARAPHRASES)),
                     f"{label} paraphrased questions", paraphrases_required)
