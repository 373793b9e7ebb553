"""The scoring path (unit, tiny demo model, no engine): teacher-forced log-probabilities at the right positions,
prompt embeddings scored like the ids they embed, and the processor's row hooks applied at every answer position.
The end-to-end equality with the engine's processed logprobs under all four mechanisms is in test_trained_guards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from guards.guard.payload import write_phrase_table
from server.prompt_embeds import EmbeddingTable
from server.planner import EnginePlan
from guards.probe import LOGPROB_FLOOR
from server.guarded_scorer import ContinuationScore, GuardedScorer

QUESTION = "<|user|>\nWho wrote the book?\n<|assistant|>\n"
ANSWER = " The book was written by an author."


@pytest.fixture(scope="module")
def scorer(tiny_model_dir: Path, tokenizer) -> GuardedScorer:
    return GuardedScorer(tiny_model_dir, tokenizer)


@pytest.fixture(scope="module")
def ids(tokenizer) -> tuple[list[int], list[int]]:
    return tokenizer.encode(QUESTION, add_special_tokens=False), tokenizer.encode(ANSWER, add_special_tokens=False)


def test_each_answer_token_is_scored_by_the_logits_after_everything_before_it(
    tiny_model_dir: Path, scorer: GuardedScorer, ids: tuple[list[int], list[int]],
) -> None:
    prompt, answer = ids
    result = scorer.score(EnginePlan(prompt={"prompt_token_ids": prompt}), answer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    expected = []
    with torch.inference_mode():
        for i, token in enumerate(answer):  # one forward per prefix: no shared indexing with the scorer
            logits = model(input_ids=torch.tensor([prompt + answer[:i]])).logits[0, -1]
            expected.append(torch.log_softmax(logits, dim=-1)[token].item())
    assert result.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert result.mean_loss == pytest.approx(-sum(expected) / len(answer), abs=1e-4)


def test_prompt_embeddings_of_the_ids_score_as_the_ids_do(
    tiny_model_dir: Path, scorer: GuardedScorer, ids: tuple[list[int], list[int]],
) -> None:
    prompt, answer = ids
    embeds = EmbeddingTable(tiny_model_dir, torch.float32).lookup(prompt)
    by_ids = scorer.score(EnginePlan(prompt={"prompt_token_ids": prompt}), answer)
    by_embeds = scorer.score(EnginePlan(prompt={"prompt_embeds": embeds, "prompt_token_ids": prompt}), answer)
    assert by_embeds.token_logprobs == pytest.approx(by_ids.token_logprobs, abs=1e-4)
    corrupted = scorer.score(EnginePlan(prompt={"prompt_embeds": embeds + 5 * torch.randn_like(embeds),
                                                "prompt_token_ids": prompt}), answer)
    assert corrupted.token_logprobs != pytest.approx(by_ids.token_logprobs, abs=1e-2)


def test_the_guard_hook_bans_the_token_that_would_complete_a_forbidden_phrase(
    scorer: GuardedScorer, ids: tuple[list[int], list[int]], tokenizer, tmp_path: Path,
) -> None:
    prompt, answer = ids
    plain = scorer.score(EnginePlan(prompt={"prompt_token_ids": prompt}), answer)
    artifact = tmp_path / ("e" * 64)
    write_phrase_table(artifact, ["written by"], [])  # GUARD names a phrase artifact (guards/guard/payload.py)
    payload = {"artifact": str(artifact), "items": [], "limit": 8, "penalty": 0.0}
    guarded = scorer.score(EnginePlan(prompt={"prompt_token_ids": prompt}, extra_args={"lethe": {"guard": [payload]}}),
                           answer)
    spelled = [tokenizer.decode(answer[:i + 1]) for i in range(len(answer))]
    completing = next(i for i, text in enumerate(spelled) if "written by" in text)
    assert guarded.token_logprobs[completing] == LOGPROB_FLOOR
    assert guarded.token_logprobs[:completing] == pytest.approx(plain.token_logprobs[:completing], abs=1e-4)
    assert guarded.mean_loss > plain.mean_loss


def test_a_continuation_needs_a_token(scorer: GuardedScorer, ids: tuple[list[int], list[int]]) -> None:
    with pytest.raises(ValueError):
        scorer.score(EnginePlan(prompt={"prompt_token_ids": ids[0]}), [])


def test_mean_loss_is_the_length_normalised_negative_log_likelihood() -> None:
    score = ContinuationScore((1, 2), (-1.0, -3.0))
    assert score.logprob == -4.0 and score.mean_loss == 2.0  # -(-1 - 3) / 2
