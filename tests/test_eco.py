"""ECO's pieces without the engine: the corruptions, which tokens they hit, the embedding table and the σ search."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from classifiers.aliases import AliasMatcher
from classifiers.types import AliasSpan
from guards.base import PlanRequest, PromptView, TargetHit, corruption_seed
from guards.eco import ECO
from guards.eco.corruption import EcoEdit, corrupted_positions, flip_sign_top_k, rand_noise_first_n, zero_out_top_k
from guards.eco.sigma_search import SigmaSearchConfig, zeroth_order_sigma_search
from server.prompt_embeds import EmbeddingTable


def test_rand_noise_first_n_touches_only_the_first_n_dims_and_is_seeded() -> None:
    rows = torch.ones(3, 8)
    rand_noise_first_n(rows, sigma=2.0, n=3, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(rows[:, :3], torch.ones(3, 3))
    assert torch.equal(rows[:, 3:], torch.ones(3, 5))
    again = torch.ones(3, 8)
    rand_noise_first_n(again, sigma=2.0, n=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(rows, again)


def test_zero_out_top_k_zeroes_the_largest_magnitudes() -> None:
    rows = torch.tensor([[0.1, -5.0, 0.2, 3.0]])
    zero_out_top_k(rows, 2)
    assert rows.tolist() == [[pytest.approx(0.1), 0.0, pytest.approx(0.2), 0.0]]


def test_flip_sign_top_k_negates_the_largest_magnitudes() -> None:
    rows = torch.tensor([[0.1, -5.0, 0.2, 3.0]])
    flip_sign_top_k(rows, 2)
    assert rows.tolist() == [[pytest.approx(0.1), 5.0, pytest.approx(0.2), -3.0]]


def test_an_edit_changes_only_its_positions() -> None:
    embeds = torch.randn(5, 6)
    original = embeds.clone()
    EcoEdit(positions=(1, 3), corruption="rand_noise_first_n", sigma=10.0, dims=None, seed=1).apply(embeds)
    changed = (embeds != original).any(dim=1).tolist()
    assert changed == [False, True, False, True, False]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def chat_view(tokenizer, question: str) -> PromptView:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return PromptView(ids, text, (("user", question),), from_text=True, add_special_tokens=False)


def test_alias_mentions_map_onto_exactly_the_tokens_that_spell_them(tokenizer) -> None:
    question = "Where was Basil Mahfouz Al-Kuwaiti born?"
    view = chat_view(tokenizer, question)
    spans = [AliasSpan(s.start, s.end, s.alias, s.score, turn=0)
             for s in AliasMatcher(["Basil Mahfouz Al-Kuwaiti"]).find(question)]
    positions = corrupted_positions(tokenizer, view, spans, frozenset(tokenizer.all_special_ids))
    spelled = tokenizer.decode([view.token_ids[p] for p in positions]).strip()
    assert spelled == "Basil Mahfouz Al-Kuwaiti"


def test_without_an_alias_every_user_token_but_the_last_is_corrupted(tokenizer) -> None:
    question = "Which city was this writer born in?"
    view = chat_view(tokenizer, question)
    positions = corrupted_positions(tokenizer, view, (), frozenset(tokenizer.all_special_ids))
    user_ids = tokenizer.encode(question, add_special_tokens=False)
    assert len(positions) == len(user_ids) - 1
    assert tokenizer.decode([view.token_ids[p] for p in positions]).strip() == question[:-1]


def test_token_id_prompts_fall_back_to_all_non_special_tokens_but_the_last(tokenizer) -> None:
    ids = tokenizer.encode("Basil Mahfouz Al-Kuwaiti was born in")
    view = PromptView(ids, tokenizer.decode(ids), (("user", tokenizer.decode(ids)),), from_text=False,
                      add_special_tokens=True)
    positions = corrupted_positions(tokenizer, view, (), frozenset(tokenizer.all_special_ids))
    non_special = [i for i, t in enumerate(ids) if t not in tokenizer.all_special_ids]
    assert list(positions) == non_special[:-1]


def test_the_noise_is_keyed_by_the_target_id_unless_a_noise_key_is_registered(tokenizer) -> None:
    """Two registrations of one author draw different noise (their ids are random), and the same with one
    ``noise_key`` (what makes ``lethe eval tofu`` reproducible)."""
    view = chat_view(tokenizer, "Where was Basil Mahfouz Al-Kuwaiti born?")
    serving = ECO.serving(SimpleNamespace(tokenizer=tokenizer))

    def edit(target_id: str, options: dict) -> EcoEdit:
        hit = TargetHit(target_id, 1.0, (), ("Basil Mahfouz Al-Kuwaiti",), {"sigma": 1.0, **options}, {})
        request = PlanRequest(hit, view, np.zeros((0, 4)), corruption_seed(view.token_ids, target_id))
        (planned,) = serving.plan(request).embedding_edits
        return planned

    assert edit("tgt_a", {}).seed == corruption_seed(view.token_ids, "tgt_a") != edit("tgt_b", {}).seed
    keyed = {"noise_key": "tofu-eval-seed-0"}
    assert edit("tgt_a", keyed).seed == edit("tgt_b", keyed).seed == corruption_seed(view.token_ids, "tofu-eval-seed-0")
    plain = torch.ones(len(view.token_ids), 8)
    first, second = plain.clone(), plain.clone()
    edit("tgt_a", keyed).apply(first)
    edit("tgt_b", keyed).apply(second)
    assert torch.equal(first, second) and not torch.equal(first, plain)  # the same noise, in the same places


def test_embedding_table_is_the_checkpoints_input_embedding(tiny_model_dir: Path) -> None:
    table = EmbeddingTable(tiny_model_dir, torch.float32)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    ids = [1, 5, 9, 200]
    assert torch.equal(table.lookup(ids), model.get_input_embeddings()(torch.tensor(ids)).detach())
    assert table.hidden_size == model.config.hidden_size


def test_sigma_needs_calibration_only_when_noise_has_no_sigma() -> None:
    assert ECO.prepare({"corruption": "rand_noise_first_n"}) == ("eco_calibrate",)
    assert ECO.prepare({"corruption": "rand_noise_first_n", "sigma": 5.0}) == ()
    assert ECO.prepare({"corruption": "zero_out_top_k"}) == ()
    assert not ECO.ready({"corruption": "rand_noise_first_n"}, {})
    assert ECO.ready({"corruption": "rand_noise_first_n"}, {"sigma": 3.0})


def test_sigma_search_descends_a_step_objective_to_the_goal() -> None:
    calls = []

    def objective(sigma: float) -> float:
        calls.append(sigma)
        return 0.9 if sigma < 5 else (0.5 if sigma < 40 else 0.1)

    result = zeroth_order_sigma_search(objective, goal=0.2)
    assert result.reached_goal and result.sigma >= 40
    assert objective(result.sigma) <= 0.2
    assert [point[0] for point in result.curve] == sorted(set(calls), key=calls.index)


def test_sigma_search_reports_the_best_sigma_when_the_goal_is_out_of_reach() -> None:
    result = zeroth_order_sigma_search(lambda sigma: 0.8 if sigma < 1 else 0.6, goal=0.1,
                                       config=SigmaSearchConfig(max_steps=4))
    assert not result.reached_goal and result.sigma >= 1
    assert min(value for _, value in result.curve) == 0.6
