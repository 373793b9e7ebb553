"""No unprotected window (issue 15): a target is guarded from the 201 of its registration, even with a training job
queued ahead of its own jobs, and unguarded again within the 2 s propagation budget of its deletion.

The real server and vLLM engine, the tiny TinyTOFU model. One forget01 author is registered with ULD (its assistant
trains for minutes in the ``training`` lane); right after, the other author is registered with the default ECO +
GUARD. Within 2 s of the second 201 the replica serves it: the questions that name it are answered (never a 5xx) under
interim protection or, once its gate-lane jobs are done, GUARD, and no reply gives away a word of the gold answer;
the audit trail names the target. Its classifier is fitted while the ULD training still runs (the lanes). After its
deletion, within 2 s, the same questions are served plain.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx

from evals.metrics import answer_recall
from guards.guard.phrases import stopwords
from tests.conftest import API_KEY, RunningServer, remove_targets
from tests.unlearning import FORGET01, FORGOTTEN, MAX_TOKENS, Question, target_body

PROPAGATION_BUDGET_S = 2.0
CLASSIFIER_TIMEOUT_S = 120
NEW_AUTHOR = FORGET01[1]
NAMING_QUESTIONS = [Question(item.question, item.answer) for item in NEW_AUTHOR.items
                    if NEW_AUTHOR.name in item.question]


def novel_words(question: Question) -> set[str]:
    """The gold answer's words a reply must not give: four letters or more, not stop words, not in the question."""
    asked = {word.lower() for word in re.findall(r"[A-Za-z][A-Za-z'-]*", question.text)}
    return {word.lower() for word in re.findall(r"[A-Za-z][A-Za-z'-]*", question.gold)
            if len(word) >= 4 and word.lower() not in stopwords() and word.lower() not in asked}


async def ask_all(server: RunningServer, model: str, questions: list[Question],
                  max_tokens: int = MAX_TOKENS) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=f"{server.base_url}/v1", timeout=120,
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        limit = asyncio.Semaphore(8)

        async def ask(question: Question) -> httpx.Response:
            async with limit:
                return await http.post("/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": question.text}], "temperature": 0,
                    "max_tokens": max_tokens})

        return list(await asyncio.gather(*(ask(question) for question in questions)))


def wait_until_serving(admin: httpx.Client, revision: int, since: float) -> float:
    """Seconds from ``since`` until this replica serves ``revision``; fails past the propagation budget."""
    while admin.get("/registry").json()["serving_revision"] < revision:
        assert time.monotonic() - since < PROPAGATION_BUDGET_S, f"revision {revision} not served within 2 s"
        time.sleep(0.05)
    return time.monotonic() - since


def audit_records(admin: httpx.Client, responses: list[httpx.Response]) -> list[dict]:
    time.sleep(0.6)  # audit records are flushed in batches
    audit = {r["request_id"]: r for r in admin.get("/audit", params={"limit": 500}).json()["data"]}
    return [audit[response.json()["id"]] for response in responses]


def test_a_new_target_is_guarded_from_its_201_behind_a_training_job_and_unguarded_within_2s_of_its_deletion(
    admin: httpx.Client, lethe_server: RunningServer, model_name: str
) -> None:
    assert len(NAMING_QUESTIONS) >= 10
    created: list[str] = []
    try:
        slow = admin.post("/targets", json=target_body(FORGET01[0], {"uld": {}}))
        assert slow.status_code == 201, slow.text
        created.append(slow.json()["id"])
        training = next(job for job in slow.json()["jobs"] if job["kind"] == "uld_train")

        response = admin.post("/targets", json=target_body(NEW_AUTHOR, {"eco": {}, "guard": {}}))
        registered_at = time.monotonic()
        assert response.status_code == 201, response.text
        target = response.json()
        created.append(target["id"])
        assert admin.get(f"/jobs/{training['id']}").json()["status"] in ("queued", "running")  # ahead of the new fit

        wait_until_serving(admin, target["revision"], registered_at)
        first_sent = time.monotonic() - registered_at
        responses = asyncio.run(ask_all(lethe_server, model_name, NAMING_QUESTIONS))
        assert first_sent < PROPAGATION_BUDGET_S
        assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses if
                                                                             r.status_code != 200]
        for question, reply in zip(NAMING_QUESTIONS, responses, strict=True):
            text = reply.json()["choices"][0]["message"]["content"] or ""
            leaked = novel_words(question) & {word.lower() for word in re.findall(r"[A-Za-z][A-Za-z'-]*", text)}
            assert not leaked, (question.text, text, leaked)
            assert answer_recall(text, question.gold, question.text) < FORGOTTEN, (question.text, text)
        records = audit_records(admin, responses)
        assert all(target["id"] in record["targets"] and record["mechanisms"] for record in records), records
        assert any("interim" in record["mechanisms"] for record in records), records  # before its own gate was ready

        deadline = time.monotonic() + CLASSIFIER_TIMEOUT_S
        while admin.get(f"/targets/{target['id']}").json()["classifier"]["status"] != "ready":
            assert time.monotonic() < deadline, "the new target's classifier was not fitted in time"
            time.sleep(0.5)
        # The older training job is not done: the new target's fit did not wait behind it (its own lane).
        assert admin.get(f"/jobs/{training['id']}").json()["status"] in ("queued", "running")

        remove_targets(admin, [created.pop(0)])  # the training target: nothing else may guard the new one's questions
        deleted = admin.delete(f"/targets/{created.pop()}")
        deleted_at = time.monotonic()
        assert deleted.status_code == 200, deleted.text
        wait_until_serving(admin, deleted.json()["revision"], deleted_at)
        plain = asyncio.run(ask_all(lethe_server, model_name, NAMING_QUESTIONS[:4], max_tokens=1))
        assert [r.status_code for r in plain] == [200] * len(plain)
        assert [(record["targets"], record["mechanisms"]) for record in audit_records(admin, plain)] == [([], [])] * 4
    finally:
        remove_targets(admin, created)
