"""Side channels closed, end to end: the real server and vLLM engine, the tiny TinyTOFU model, the forget01 authors
registered with GUARD (its phrases reach the engine as references to artifacts), then ECO at a fixed σ.

What a client may ask is the same for every prompt: a ``logit_bias`` is refused whether or not the prompt is about a
target, returned logprobs never list a token a guard banned, and the client's ``seed`` does not redraw ECO's noise.
The unit tests of the same policies: ``tests/test_side_channel_policies.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import RunningServer, remove_targets
from tests.unlearning import (
    FORGET01,
    FORGET_QUESTIONS,
    RETAIN_QUESTIONS,
    Baseline,
    assert_forgotten,
    audit_records,
    recalls,
    replies,
    target_body,
    use_mechanisms,
    wait_until_served,
)

SAMPLE = FORGET_QUESTIONS[::4]  # ten questions, both authors
FLAGGED = FORGET_QUESTIONS[0].text
ECO_SIGMA = 2.0


@pytest.fixture(scope="module")
def targets(baseline: Baseline, admin: httpx.Client) -> Iterator[list[dict]]:
    created = []
    for author in FORGET01:
        body = {**target_body(author, {"guard": {}}), "name": f"side-{author.name.lower().replace(' ', '-')}"}
        response = admin.post("/targets", json=body)
        assert response.status_code == 201, response.text
        created.append(response.json()["id"])
    yield wait_until_served(admin, created)
    remove_targets(admin, created)


def test_guard_keeps_the_answers_out_of_replies_with_its_phrases_sent_as_artifact_references(
    targets: list[dict], baseline: Baseline, lethe_server: RunningServer, model_name: str
) -> None:
    before = [baseline.forget[FORGET_QUESTIONS.index(question)] for question in SAMPLE]
    # One leak in ten answered is allowed: on all 40 questions GUARD alone forgets >= 95 % (test_unlearning_guards).
    assert_forgotten(before, recalls(SAMPLE, replies(lethe_server, model_name, SAMPLE)), "GUARD by reference",
                     required=0.9)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_logit_bias_is_refused_alike_whether_or_not_the_prompt_is_about_a_target(
    targets: list[dict], http: httpx.Client, model_name: str, path: str
) -> None:
    """{guessed token: 100} with max_tokens 1 on a flagged prompt would answer the guess unless GUARD banned it."""
    answers = []
    for text in (FLAGGED, RETAIN_QUESTIONS[0].text):
        prompt = {"messages": [{"role": "user", "content": text}]} if "chat" in path else {"prompt": text}
        response = http.post(path, json={"model": model_name, **prompt, "max_tokens": 1, "logit_bias": {"5": 100}})
        answers.append((response.status_code, response.json()))
    assert answers[0] == answers[1] and answers[0][0] == 400
    assert answers[0][1]["error"]["param"] == "logit_bias"


def test_logprobs_of_a_flagged_reply_never_list_a_banned_token(
    targets: list[dict], admin: httpx.Client, client: openai.OpenAI, model_name: str
) -> None:
    """Banned outright (``calibrate: false``), an author's name and its parts are at −inf for a prompt about them:
    listed at −inf (or −9999), a token spelling one would confirm the ban. (A calibrated ban is finite: the name then
    keeps a logprob, as unlikely as the calibration found a stranger's answers; on some CPUs still in the top 20.)"""
    use_mechanisms(admin, targets, {"guard": {"calibrate": False}})
    asked = FORGET_QUESTIONS[:20:5]  # about the first author, whose name parts GUARD bans for them
    assert {q.text for q in asked} <= {item.question for item in FORGET01[0].items}
    name_parts = [part.lower() for part in FORGET01[0].name.split() if len(part) >= 4]
    for question in asked:
        reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": question.text}],
                                               temperature=0, max_tokens=16, logprobs=True, top_logprobs=20)
        for token in reply.choices[0].logprobs.content:
            listed = [token, *token.top_logprobs]
            assert all(math.isfinite(t.logprob) and t.logprob > -9999 for t in listed), question.text
            assert not [t.token for t in listed if any(part in t.token.lower() for part in name_parts)]


def test_a_clients_seed_does_not_redraw_ecos_corruption(
    targets: list[dict], admin: httpx.Client, client: openai.OpenAI, model_name: str
) -> None:
    """Greedy replies under ECO alone: any difference between seeds could only come from the noise."""
    use_mechanisms(admin, targets, {"eco": {"sigma": ECO_SIGMA}})
    since, seen, response_ids = time.time() - 1, [], []
    for seed in (1, 2, 3, None):
        reply = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": FLAGGED}],
                                               temperature=0, max_tokens=8, seed=seed, logprobs=True, top_logprobs=5)
        first = reply.choices[0].logprobs.content[0]
        seen.append((reply.choices[0].message.content, [(t.token, round(t.logprob, 4)) for t in first.top_logprobs]))
        response_ids.append(reply.id)
    records = audit_records(admin, response_ids, since)
    assert all(records[rid]["mechanisms"] == ["eco"] for rid in response_ids)
    assert all(draw == seen[0] for draw in seen), seen
