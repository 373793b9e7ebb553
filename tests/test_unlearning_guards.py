"""ECO and GUARD end to end: the real server and vLLM engine, the tiny TinyTOFU model, the forget01 authors.

The unprotected model's answers are measured first; then both authors are registered (ECO + GUARD, σ calibrated by
the job), and the same questions are asked with both mechanisms, ECO only and GUARD only (switched by PATCHing the
targets' mechanisms, which re-uses the published σ and phrases). A forget question counts as "answered" when the
unprotected reply has ROUGE-L recall >= 0.5 of the gold answer; protected, >= 95 % of those must fall below 0.3.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from evals.metrics import answer_recall
from guards.guard.calibration import MAX_BAN
from guards.never_seen import RECALL_MARGIN
from tests.conftest import API_KEY, RunningServer, remove_targets, unfinished_requests
from tests.unlearning import (
    ANSWERED,
    FORGET01,
    FORGET_QUESTIONS,
    FORGOTTEN,
    MAX_TOKENS,
    PARAPHRASES,
    RETAIN_QUESTIONS,
    Baseline,
    assert_protects,
    replies,
    replies_with_ids,
    target_body,
    use_mechanisms,
    wait_until_served,
)


@pytest.fixture(scope="module")
def targets(baseline: Baseline, admin: httpx.Client) -> Iterator[list[dict]]:
    created = []
    for author in FORGET01:
        response = admin.post("/targets", json=target_body(author, {"eco": {}, "guard": {}}))
        assert response.status_code == 201, response.text
        created.append(response.json()["id"])
    yield wait_until_served(admin, created)
    remove_targets(admin, created)


def test_the_unprotected_tiny_model_knows_the_forget01_authors(baseline: Baseline) -> None:
    assert sum(value >= ANSWERED for value in baseline.forget) >= 0.9 * len(FORGET_QUESTIONS)


def test_eco_sigma_is_calibrated_against_the_served_model_and_shown(targets: list[dict]) -> None:
    for target in targets:
        eco = target["mechanisms"]["eco"]
        assert eco["status"] == "ready" and target["mechanisms"]["guard"]["status"] == "ready"
        state = eco["state"]
        assert state["sigma"] > 0 and state["unprotected_rouge_l"] > state["goal"]
        assert state["scope"] in ("entities", "prompt")
        curve = state["curves"][state["scope"]]
        chosen = [value for sigma, value in curve if sigma == state["sigma"]][0]
        if state["reached_goal"]:
            assert chosen <= state["goal"]
        else:
            # The question sample and the noise are seeded by the (random) target id; in one CI run in ~10 the prompt
            # scope plateaued at 0.21 against a goal of 0.14. Then both scopes were tried and the best point serves.
            assert state["scope"] == "prompt" and set(state["curves"]) == {"entities", "prompt"}, state["curves"]
            assert chosen == min(value for _, value in curve) < state["unprotected_rouge_l"] / 2, state["curves"]
        assert target["mechanisms"]["guard"]["state"]["phrases"] > 0


def test_eco_and_guard_together_protect_forget_and_paraphrased_questions(
    targets: list[dict], baseline: Baseline, lethe_server: RunningServer, model_name: str
) -> None:
    assert_protects(lethe_server, model_name, baseline, "ECO+GUARD")


def test_unflagged_retain_questions_are_answered_exactly_as_before(
    targets: list[dict], baseline: Baseline, lethe_server: RunningServer, model_name: str, admin: httpx.Client
) -> None:
    answered = asyncio.run(replies_with_ids(lethe_server, model_name, RETAIN_QUESTIONS))
    time.sleep(0.6)  # audit records are flushed in batches
    audit = {r["request_id"]: r for r in admin.get("/audit", params={"limit": 500}).json()["data"]}
    flagged = [i for i, (_, rid) in enumerate(answered) if audit[rid]["targets"]]
    assert len(flagged) <= 0.1 * len(RETAIN_QUESTIONS), flagged
    for i, (text, _) in enumerate(answered):
        if i not in flagged:
            assert text == baseline.retain_texts[i], RETAIN_QUESTIONS[i].text


def test_protectedreplies_with_ids_stream_exactly_as_they_return(
    targets: list[dict], lethe_server: RunningServer, model_name: str
) -> None:
    sample = FORGET_QUESTIONS[::5] + PARAPHRASES[::7]
    assert replies(lethe_server, model_name, sample, stream=True) == replies(lethe_server, model_name, sample)


def speculative_prefills(server: RunningServer) -> dict[str, float]:
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return {outcome: next((float(line.split()[1]) for line in metrics.splitlines()
                           if line.startswith(f'lethe_speculative_prefills_total{{outcome="{outcome}"}}')), 0.0)
            for outcome in ("kept", "discarded")}


def test_flagged_prompts_plain_requests_are_aborted_unread_and_clean_ones_are_kept(
    targets: list[dict], baseline: Baseline, lethe_server: RunningServer, model_name: str
) -> None:
    """Speculative prefill (on in the shared server) through the real engine: each flagged prompt's plain request is
    aborted and the reply is the protected one; each clean prompt's is the reply, token for token as before
    registration."""
    before = speculative_prefills(lethe_server)
    flagged, clean = FORGET_QUESTIONS[:4], RETAIN_QUESTIONS[:4]
    texts = replies(lethe_server, model_name, flagged + clean)
    after = speculative_prefills(lethe_server)
    assert after["discarded"] - before["discarded"] >= len(flagged)
    assert after["kept"] - before["kept"] >= 3  # the gate may flag a retain question (the test above allows 10 %)
    assert all(answer_recall(text, q.gold, q.text) < FORGOTTEN for text, q in zip(texts, flagged, strict=False))
    assert sum(text == baseline.retain_texts[i] for i, text in enumerate(texts[len(flagged):])) >= 3
    deadline = time.monotonic() + 10  # aborted requests leave the engine
    while unfinished_requests(lethe_server.base_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert unfinished_requests(lethe_server.base_url) == 0


def test_completions_endpoint_is_protected_too(
    targets: list[dict], lethe_server: RunningServer, model_name: str, admin: httpx.Client
) -> None:
    with httpx.Client(base_url=f"{lethe_server.base_url}/v1", headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as http:
        for question in FORGET_QUESTIONS[::4]:
            body = {"model": model_name, "prompt": question.text, "max_tokens": MAX_TOKENS, "temperature": 0}
            reply = http.post("/completions", json=body).json()
            assert answer_recall(reply["choices"][0]["text"], question.gold, question.text) < FORGOTTEN, question.text
            streamed = http.post("/completions", json={**body, "stream": True}).text
            assert '"finish_reason"' in streamed and "data: [DONE]" in streamed
    time.sleep(0.6)
    records = admin.get("/audit", params={"limit": 20}).json()["data"]
    completions = [r for r in records if r["endpoint"] == "completions" and r["targets"]]
    assert completions and all(r["mechanisms"] == ["eco", "guard"] for r in completions)


def test_concurrent_prompts_classified_in_one_batch_get_the_verdicts_they_get_alone(
    targets: list[dict], lethe_server: RunningServer, model_name: str, admin: httpx.Client
) -> None:
    """Concurrent requests share one embedding call (server/classifier_batcher.py); none may get another's verdict.

    The prompts carry a fresh suffix so that the concurrent run embeds them (in batches) rather than reading the
    embedding cache; the one-at-a-time run then reads what the batches cached, so a verdict that differs can only come
    from results handed to the wrong request.
    """
    mixed = [q for pair in zip(FORGET_QUESTIONS[:12], RETAIN_QUESTIONS[:12], strict=True) for q in pair]
    suffix = f" (batch check {time.time_ns()})"
    prompts = [question.text + suffix for question in mixed]
    batches_before = _batches_over_one(lethe_server)
    together = asyncio.run(_targets_hit(lethe_server, model_name, admin, prompts, concurrency=len(prompts)))
    assert _batches_over_one(lethe_server) > batches_before, "no two prompts were classified together"
    alone = asyncio.run(_targets_hit(lethe_server, model_name, admin, prompts, concurrency=1))
    assert together == alone
    assert sum(map(bool, alone[0::2])) >= 10 and sum(map(bool, alone[1::2])) <= 2, alone


async def _targets_hit(server: RunningServer, model: str, admin: httpx.Client, prompts: list[str],
                       concurrency: int) -> list[list[str]]:
    """The targets each prompt hit, read back from the audit trail by response id."""
    limit = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0,
                                  timeout=120) as client:
        async def ask(prompt: str) -> str:
            async with limit:
                reply = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=1)
                return reply.id

        response_ids = await asyncio.gather(*(ask(p) for p in prompts))
    await asyncio.sleep(0.6)  # audit records are flushed in batches
    audit = {r["request_id"]: r for r in admin.get("/audit", params={"limit": 500}).json()["data"]}
    return [sorted(audit[rid]["targets"]) for rid in response_ids]


def _batches_over_one(server: RunningServer) -> float:
    """Classification batches of more than one request so far, from the server's Prometheus histogram."""
    values = {}
    for line in httpx.get(f"{server.base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("lethe_classifier_batch_size_count", 'lethe_classifier_batch_size_bucket{le="1.0"}')):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values["lethe_classifier_batch_size_count"] - values['lethe_classifier_batch_size_bucket{le="1.0"}']


def test_eco_alone_protects_the_authors(
    targets: list[dict], baseline: Baseline, lethe_server: RunningServer, model_name: str, admin: httpx.Client
) -> None:
    use_mechanisms(admin, targets, {"eco": {}})
    # Known shortfall (README): calibrated ECO destroys the whole prompt of these memorised questions, and a reply to a
    # destroyed prompt still overlaps some short, generic gold answers at ROUGE-L 0.31-0.35. The noise draw depends on
    # the target id, so the share varies between registrations: measured 90-100 % (forget), 84-100 % (paraphrases).
    assert_protects(lethe_server, model_name, baseline, "ECO", required=0.85, paraphrases_required=0.8)


def test_guard_alone_protects_the_authors(
    targets: list[dict], baseline: Baseline, lethe_server: RunningServer, model_name: str, admin: httpx.Client
) -> None:
    use_mechanisms(admin, targets, {"guard": {}})
    for target in targets:  # the patch kept GUARD's options: its published calibration still serves
        state = admin.get(f"/targets/{target['id']}").json()["mechanisms"]["guard"]["state"]
        figures = state["calibration"]
        assert state["ban"] is not None and 0 < state["ban"] < MAX_BAN, figures
        # Whichever bar decided (calibrate_strength's order: the gap, then fluency, then no leak), the replies at the
        # chosen ban say no more of the answers than a stranger's or the strongest ban's do; the gap matches the
        # stranger's when it decided. Fluency decides on some CPUs and not others: on an Intel Xeon (AMX) the word
        # share at the gap's ban was 0.887 against a bar of 0.9, and the leak bar then raised the ban from 10 to 12.
        leak_bar = max(figures["reference_recall"], dict(figures["leak_curve"])[MAX_BAN]) + RECALL_MARGIN
        assert figures["recall"] <= leak_bar + 1e-4, figures  # both rounded to 4 places
        assert figures["limited_by"] != "reference" or figures["gap"] >= figures["reference_gap"], figures
    # GUARD acts only where the prompt classifier fires. Measured on two tiny-model builds: 24/25 and 24/26 paraphrases
    # forgotten. On the second build's machine one leak is a gate miss (a paraphrase that names no author, "the writer
    # born on September 8, 1956, in Kuwait City", scored 0.86, under its target's threshold: the gate's recall is
    # issue 15's), the other a reply that only shares the word "writes" with the gold answer (recall 0.33).
    assert_protects(lethe_server, model_name, baseline, "GUARD", paraphrases_required=0.9)


def test_guards_calibrated_ban_scores_the_gold_answers_as_unlikely_not_as_impossible(
    targets: list[dict], admin: httpx.Client
) -> None:
    """Issue 16: with the published -inf ban the gold answers scored at the floor (impossible), far below what a
    stranger's true answers score; through the server's scoring path (the engine's own hooks) the calibrated ban
    leaves them unlikely, yet far less likely than unprotected (mean NLL well above the memorised ~0.1)."""
    use_mechanisms(admin, targets, {"guard": {}})
    for target, author in zip(targets, FORGET01, strict=True):

        def mean_loss(calibrate: bool) -> float:
            use_mechanisms(admin, [target], {"guard": {"calibrate": calibrate}})
            losses = []
            for item in author.items:
                response = admin.post("/score", json={"messages": [{"role": "user", "content": item.question}],
                                                      "continuations": [item.answer]})
                assert response.status_code == 200, response.text
                losses.append(response.json()["scores"][0]["mean_loss"])
            return sum(losses) / len(losses)

        outright, calibrated = mean_loss(False), mean_loss(True)
        assert outright > calibrated + 2.0, (outright, calibrated)
        assert calibrated > 1.0, calibrated


def test_prompt_logprobs_are_refused_outright(lethe_server: RunningServer, model_name: str) -> None:
    response = httpx.post(f"{lethe_server.base_url}/v1/completions",
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": model_name, "prompt": FORGET_QUESTIONS[0].text, "echo": True,
                                "logprobs": 1, "max_tokens": 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "echo"
