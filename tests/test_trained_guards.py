"""ULD and O3 end to end: training jobs, then protection through the real server and vLLM engine (tiny model).

Order (each step reuses what the previous one trained): author 1 is registered with O3 alone and measured; author 2
is registered with O3 alone — its LoRA is trained orthogonal to author 1's and the two are served as one rank-stacked
adapter — and both are measured (author 1 must stay forgotten: the continual property; by default the adapters answer
as the served model does about an invented author, never with a refusal). Both are retrained with O3's refusal style
and measured again, then switch to ULD alone (PATCH: the assistant is trained, the classifier refitted without O3's
gate), then to all four mechanisms (ECO σ calibrated, GUARD phrases extracted and its ban calibrated, O3 retrained; the
ULD assistant is kept and its α calibrated again on top of GUARD: ``guards/stacking.py``). The last step is also the
regression test for batches that mix prompt_embeds (ECO) and LoRA (O3) requests, which once killed the EngineCore.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import httpx
import openai
import pytest

from evals.fluency import median_known_word_share
from guards.never_seen import FLUENCY_MARGIN, RECALL_MARGIN
from guards.o3.pairs import REFUSALS
from guards.probe import LOGPROB_FLOOR

from tests.conftest import RunningServer, remove_targets
from tests.unlearning import (
    FORGET01,
    FORGET_QUESTIONS,
    PARAPHRASES,
    RETAIN_QUESTIONS,
    Baseline,
    Question,
    assert_forgotten,
    assert_protects,
    recalls,
    replies,
    target_body,
    use_mechanisms,
    wait_until_served,
)

# ULD alone, α calibrated per target (issue 16). On the tiny memorising model it is the weakest mechanism: the α that
# matches a stranger's gap turns the replies into token soup because the tiny model has no plausible second answer
# to fall back on, so calibration lowers α until the replies are language again (guards.never_seen: 1.10 and 0.87
# for the two authors, word share 0.91 and 0.87, docs/mechanisms.md "The fluency bar"; with ULD's old -inf filter
# 0.75 and 1.14, 95 % of the forget questions forgotten, word share 0.92). At the paper's 0.8 over
# assistant seeds and training lengths 87-100 % and 84-96 % of the paraphrases (78 % on a tiny model built on another
# host, whose one-layer assistant starts from another forget NLL). So ULD alone is held to a relaxed bar; combined with
# the other three it must meet the full 95 %. (Until O3's CPU LoRA fix, this test's requests were also served through
# the O3 adapter the earlier tests left in vLLM's LoRA slot, which hid the soup.)
ULD_ALONE_REQUIRED = 0.85
ULD_ALONE_PARAPHRASES_REQUIRED = 0.75
FIRST_AUTHOR_QUESTIONS = [Question(item.question, item.answer) for item in FORGET01[0].items]
# Replies must stay language: the median reply has at least this share of real words (unprotected: 1.0; token soup:
# well under 0.5). ULD's subtraction leaves some broken words in place (measured 0.92-0.95 at alpha 0.8, 0.92 at the
# calibrated alphas).
FLUENT_WORD_SHARE = 0.9
ULD_FLUENT_WORD_SHARE = 0.88


def refusal_share(texts: list[str]) -> float:
    """The share of replies that carry one of O3's refusals (the unprotected tiny model gives none)."""
    return statistics.fmean(any(refusal in text for refusal in REFUSALS) for text in texts)


@pytest.fixture(scope="module")
def o3_targets(baseline: Baseline, admin: httpx.Client, lethe_server: RunningServer,
               model_name: str) -> Iterator[tuple[list[dict], list[float]]]:
    """Both authors with O3 only, registered one after the other; also author 1's recall before author 2 existed."""
    created: list[str] = []
    first_alone: list[float] = []
    try:
        for author in FORGET01:
            response = admin.post("/targets", json=target_body(author, {"o3": {}}))
            assert response.status_code == 201, response.text
            created.append(response.json()["id"])
            wait_until_served(admin, created)
            if not first_alone:
                first_alone = recalls(FIRST_AUTHOR_QUESTIONS, replies(lethe_server, model_name, FIRST_AUTHOR_QUESTIONS))
        yield wait_until_served(admin, created), first_alone
    finally:
        remove_targets(admin, created)


def test_o3_trains_each_target_orthogonal_to_the_earlier_ones(o3_targets: tuple[list[dict], list[float]]) -> None:
    targets, _ = o3_targets
    first, second = (target["mechanisms"]["o3"]["state"] for target in targets)
    assert first["earlier_adapters"] == 0 and second["earlier_adapters"] == 1
    for state in (first, second):  # the default: the served model's own replies about an invented author
        assert state["style"] == "generic" and state["generic_source"] == "served_model", state
        assert state["generic_replies"] >= 1 and "generic_fallback" not in state, state
    assert second["max_overlap"] < 0.2, second
    for target in targets:
        gate = target["classifier"]["ood_gate"]
        assert gate["heldout_recall"] >= 0.9 and gate["false_positive_rate"] <= 0.05, gate


def test_o3_alone_protects_both_authors_and_the_first_stays_forgotten(
    o3_targets: tuple[list[dict], list[float]], baseline: Baseline, lethe_server: RunningServer, model_name: str,
) -> None:
    _, first_alone = o3_targets
    first_baseline = baseline.forget[:len(FIRST_AUTHOR_QUESTIONS)]
    assert_forgotten(first_baseline, first_alone, "O3 author 1 before author 2")
    forget_replies = replies(lethe_server, model_name, FORGET_QUESTIONS)
    assert_forgotten(baseline.forget, recalls(FORGET_QUESTIONS, forget_replies), "O3 forget questions (both)")
    assert_forgotten(first_baseline, recalls(FIRST_AUTHOR_QUESTIONS, forget_replies[:len(FIRST_AUTHOR_QUESTIONS)]),
                     "O3 author 1 after author 2 was trained")
    # Generic replies (what the model says of a stranger) share some words with the gold answers, as a model that
    # never saw the author would: with the generic style 21/23 paraphrases were forgotten on this tiny build, the two
    # others at recall 0.33 and 0.40, just past FORGOTTEN (the refusal style forgot 23/23).
    assert_forgotten(baseline.paraphrase, recalls(PARAPHRASES, replies(lethe_server, model_name, PARAPHRASES)),
                     "O3 paraphrased questions", required=0.9)
    assert median_known_word_share(forget_replies) >= FLUENT_WORD_SHARE, forget_replies
    # no refusal signature: the registered authors' questions get answers, as about a stranger, not refusals
    assert refusal_share(forget_replies) == 0.0, forget_replies


def retain_ratio(baseline: Baseline, texts: list[str]) -> float:
    before = statistics.fmean(recalls(RETAIN_QUESTIONS, baseline.retain_texts))
    return statistics.fmean(recalls(RETAIN_QUESTIONS, texts)) / before


def test_o3_leaves_retain_authors_answered(o3_targets, baseline: Baseline, lethe_server: RunningServer,
                                           model_name: str) -> None:
    assert retain_ratio(baseline, replies(lethe_server, model_name, RETAIN_QUESTIONS)) >= 0.95


def test_o3_with_the_refusal_style_refuses_the_forget_questions(
    o3_targets: tuple[list[dict], list[float]], baseline: Baseline, lethe_server: RunningServer, model_name: str,
    admin: httpx.Client,
) -> None:
    """``o3.style=refusal`` keeps O3's TOFU recipe: the forget questions get the refusal (an explicit choice: it tells
    a reader which people are registered)."""
    targets, _ = o3_targets
    use_mechanisms(admin, targets, {"o3": {"style": "refusal"}})
    for target in (admin.get(f"/targets/{t['id']}").json() for t in targets):
        assert target["mechanisms"]["o3"]["state"]["style"] == "refusal", target["mechanisms"]["o3"]
    forget_replies = replies(lethe_server, model_name, FORGET_QUESTIONS)
    assert_forgotten(baseline.forget, recalls(FORGET_QUESTIONS, forget_replies), "O3 refusal style")
    assert refusal_share(forget_replies) >= 0.7, forget_replies
    assert retain_ratio(baseline, replies(lethe_server, model_name, RETAIN_QUESTIONS)) >= 0.95


def test_plain_requests_batched_beside_o3_requests_are_served_without_the_adapter(
    o3_targets: tuple[list[dict], list[float]], baseline: Baseline, lethe_server: RunningServer, model_name: str,
) -> None:
    """Retain questions interleaved with refused forget questions, sent concurrently so that the engine batches them
    together: the plain ones get their unprotected replies. vLLM's own CPU LoRA ops gave a plain token the adapter of
    the last LoRA slot, so most of these replies were O3's refusal (guards/o3/cpu_lora_ops.py)."""
    mixed = [q for pair in zip(RETAIN_QUESTIONS, FORGET_QUESTIONS, strict=False) for q in pair]
    texts = dict(zip([q.text for q in mixed], replies(lethe_server, model_name, mixed), strict=True))
    beside = [texts[q.text] for q in RETAIN_QUESTIONS if q.text in texts]
    flagged = [texts[q.text] for q in FORGET_QUESTIONS if q.text in texts]
    assert len(beside) == len(flagged) >= 8
    assert refusal_share(flagged) >= 0.7, flagged  # the adapter was in the batch
    assert refusal_share(beside) == 0, beside
    same = sum(a == b for a, b in zip(beside, baseline.retain_texts, strict=False))
    assert same >= 0.9 * len(beside), list(zip(beside, baseline.retain_texts, strict=False))


def test_uld_alone_protects_the_authors_and_keeps_replies_fluent(
    o3_targets: tuple[list[dict], list[float]], baseline: Baseline, lethe_server: RunningServer, model_name: str,
    admin: httpx.Client,
) -> None:
    targets, _ = o3_targets
    use_mechanisms(admin, targets, {"uld": {}})
    for target in (admin.get(f"/targets/{t['id']}").json() for t in targets):
        state = target["mechanisms"]["uld"]["state"]
        assert state["layers"] >= 1 and state["final_nll"] < 1.0, state
        figures = state["calibration"]  # issue 16: α calibrated against an invented stand-in, not the paper's 0.8
        assert 0 < state["alpha"] <= 5 and figures["limited_by"] in ("reference", "fluency", "leak", "range"), figures
        assert figures["recall"] <= figures["reference_recall"] + RECALL_MARGIN, figures
        assert figures["limited_by"] == "leak" or figures["fluency"] >= figures["reference_fluency"] - FLUENCY_MARGIN
    assert_protects(lethe_server, model_name, baseline, "ULD", required=ULD_ALONE_REQUIRED,
                    paraphrases_required=ULD_ALONE_PARAPHRASES_REQUIRED)
    forget_replies = replies(lethe_server, model_name, FORGET_QUESTIONS)
    assert median_known_word_share(forget_replies) >= ULD_FLUENT_WORD_SHARE, forget_replies
    assert retain_ratio(baseline, replies(lethe_server, model_name, RETAIN_QUESTIONS)) >= 0.95


def test_all_four_mechanisms_together_protect_the_authors(
    o3_targets: tuple[list[dict], list[float]], baseline: Baseline, lethe_server: RunningServer, model_name: str,
    admin: httpx.Client,
) -> None:
    targets, _ = o3_targets
    use_mechanisms(admin, targets, {"eco": {}, "guard": {}, "uld": {}, "o3": {}})
    for target in (admin.get(f"/targets/{t['id']}").json() for t in targets):
        # Calibrated as a combination (guards/stacking.py): GUARD came beneath ULD, so ULD's α was searched again
        # on top of GUARD at the ban GUARD's own job published (the same inputs), with the assistant kept.
        guard, uld = target["mechanisms"]["guard"]["state"], target["mechanisms"]["uld"]["state"]
        beneath = uld["calibration"]["stacked_on"]["guard"]
        assert uld["assistant_kept"] is True and beneath["ban_table"] == guard["ban_table"], (uld, guard)
        # a last-step flip of the 7-step bisection over [0, 40] moves a ban by 0.31
        assert beneath["ban"] == pytest.approx(guard["ban"], abs=0.35), (beneath, guard["ban"])
    assert_protects(lethe_server, model_name, baseline, "ECO+GUARD+ULD+O3")
    assert retain_ratio(baseline, replies(lethe_server, model_name, RETAIN_QUESTIONS)) >= 0.95


def engine_reply(client: openai.OpenAI, model: str, question: str) -> tuple[list[int], list[float]]:
    """The greedy reply's token ids and their processed log-probabilities, as the engine reports them."""
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=24, logprobs=True,
                                           extra_body={"return_tokens_as_token_ids": True})
    content = reply.choices[0].logprobs.content
    return [int(t.token.removeprefix("token_id:")) for t in content], [t.logprob for t in content]


def test_scoring_under_all_four_mechanisms_gives_the_engines_processed_logprobs(
    o3_targets: tuple[list[dict], list[float]], client: openai.OpenAI, model_name: str, admin: httpx.Client,
) -> None:
    """The evaluation's scoring path (``/admin/v1/score``) sees what the engine sees: ECO's embeddings, O3's LoRA, then
    GUARD and ULD in the logits processor. Scoring the engine's own greedy reply, token for token (a guard may steer it
    off BPE's usual spelling, so its text would re-tokenise differently), must give back the engine's processed
    log-probabilities, for flagged prompts and for an unflagged one (the plain path)."""
    for question in [FORGET_QUESTIONS[0], FORGET_QUESTIONS[-1], PARAPHRASES[3], RETAIN_QUESTIONS[0]]:
        token_ids, logprobs = engine_reply(client, model_name, question.text)
        response = admin.post("/score", json={"messages": [{"role": "user", "content": question.text}],
                                              "continuations": [token_ids]})
        assert response.status_code == 200, response.text
        body = response.json()
        flagged = question is not RETAIN_QUESTIONS[0]
        assert (set(body["mechanisms"]) == {"eco", "guard", "uld", "o3"}) == flagged, body["mechanisms"]
        assert body["scores"][0]["token_logprobs"] == pytest.approx(logprobs, abs=2e-3), question.text

    gold = admin.post("/score", json={"messages": [{"role": "user", "content": FORGET_QUESTIONS[0].text}],
                                      "continuations": [FORGET_QUESTIONS[0].gold]}).json()["scores"][0]
    retained = admin.post("/score", json={"messages": [{"role": "user", "content": RETAIN_QUESTIONS[0].text}],
                                          "continuations": [RETAIN_QUESTIONS[0].gold]}).json()["scores"][0]
    assert gold["mean_loss"] > retained["mean_loss"] + 1.0, (gold["mean_loss"], retained["mean_loss"])
    # GUARD's calibrated ban stays finite beneath ULD: no gold token is impossible (scored at the floor), as every
    # token GUARD pushed out of ULD's kept set was while ULD's filter removed such tokens (issue 16)
    for question in (FORGET_QUESTIONS[0], FORGET_QUESTIONS[-1]):
        scored = admin.post("/score", json={"messages": [{"role": "user", "content": question.text}],
                                            "continuations": [question.gold]}).json()["scores"][0]
        assert min(scored["token_logprobs"]) > LOGPROB_FLOOR + 1, (question.text, scored["token_logprobs"])
