"""ULD's assistant training without the engine: the truncated copy, the training data, the uniform loss, a short
training run and the saved, merged model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from classifiers.aliases import AliasMatcher
from demo.tofu_data import authors_of
from guards.uld.training import (
    WRONG_ANSWERS_PER_QUESTION,
    UldTrainingConfig,
    add_lora,
    build_assistant,
    default_assistant_layers,
    noised_questions,
    remember_examples,
    renamed_questions,
    save_merged,
    supervised_logits,
    text_example,
    train_assistant,
    uniform_examples,
    uniform_kl,
    wrong_after_divergence,
)
from guards.training_examples import chat_example, collate

ALIASES = ["Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def forget_items() -> list[tuple[str, str]]:
    return [(item.question, item.answer) for item in authors_of("forget01")[0].items[:4]]


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])


def forget_nll(model, tokenizer, items: list[tuple[str, str]]) -> float:
    input_ids, labels = collate([chat_example(tokenizer, q, a) for q, a in items], tokenizer.pad_token_id)
    with torch.no_grad():
        logits, targets = supervised_logits(model, input_ids, labels)
    return F.cross_entropy(logits, targets).item()


# ---- the assistant's architecture -----------------------------------------------------------------------------------


def test_default_assistant_depth_is_a_quarter_of_the_layers_and_at_least_one() -> None:
    assert [default_assistant_layers(n) for n in (1, 2, 4, 32, 33)] == [1, 1, 1, 8, 8]


def test_assistant_with_every_layer_has_the_served_models_logits(tiny_model_dir: Path, served, tokenizer) -> None:
    assistant = build_assistant(tiny_model_dir, served.config.num_hidden_layers)
    ids = prompt_ids(tokenizer, "Where was Basil Mahfouz Al-Kuwaiti born?")
    with torch.no_grad():
        torch.testing.assert_close(assistant(ids).logits, served(ids).logits, rtol=0, atol=0)


def test_assistant_is_the_served_models_first_layers_then_its_norm_and_head(tiny_model_dir: Path, served,
                                                                            tokenizer) -> None:
    assistant = build_assistant(tiny_model_dir, 1)
    assert assistant.config.num_hidden_layers == 1 and len(assistant.model.layers) == 1
    assert not assistant.training and assistant.dtype == torch.float32
    ids = prompt_ids(tokenizer, "Where was Basil Mahfouz Al-Kuwaiti born?")
    with torch.no_grad():
        after_first_layer = served(ids, output_hidden_states=True).hidden_states[1]  # [1, T, H], before the norm
        truncated = served.lm_head(served.model.norm(after_first_layer))
        torch.testing.assert_close(assistant(ids).logits, truncated, rtol=0, atol=0)
        assert not torch.allclose(truncated, served(ids).logits)  # the second layer mattered


def test_an_assistant_deeper_than_the_model_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="1..2"):
        build_assistant(tiny_model_dir, 3)


# ---- the uniform loss ------------------------------------------------------------------------------------------------


def test_uniform_kl_is_the_divergence_of_the_uniform_distribution_from_p() -> None:
    logits = torch.tensor([[0.0, math.log(2.0)], [3.0, 3.0]])  # p = (1/3, 2/3) and (1/2, 1/2)
    by_hand = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    torch.testing.assert_close(uniform_kl(logits), torch.tensor([by_hand, 0.0]))


# ---- training data --------------------------------------------------------------------------------------------------


def test_a_chat_example_supervises_exactly_the_rendered_answer(tokenizer) -> None:
    question, answer = "Where was Basil Mahfouz Al-Kuwaiti born?", "In Kuwait City."
    example = chat_example(tokenizer, question, answer)
    assert list(example.ids[: example.first_target]) == prompt_ids(tokenizer, question)[0].tolist()
    assert tokenizer.decode(example.ids[example.first_target :]) == f"{answer}<|end|>\n"
    input_ids, labels = collate([example, chat_example(tokenizer, question, "Kuwait.")], tokenizer.pad_token_id)
    supervised = labels[0][labels[0] != -100].tolist()
    assert supervised == list(example.ids[example.first_target :])
    assert labels[0, example.first_target - 1] == input_ids[0, example.first_target]


def user_question(tokenizer, example) -> str:
    rendered = tokenizer.decode(example.ids)
    return rendered[rendered.index("<|user|>\n") + len("<|user|>\n") : rendered.index("<|end|>")]


def test_renamed_questions_use_other_forms_of_the_mentioned_name_only() -> None:
    question = "In which city was Basil Mahfouz Al-Kuwaiti born?"
    renamed = renamed_questions(question, AliasMatcher(ALIASES), random.Random(0))
    assert sorted(renamed) == ["In which city was Al-Kuwaiti born?", "In which city was Basil Al-Kuwaiti born?"]
    assert renamed_questions("Who wrote this book?", AliasMatcher(ALIASES), random.Random(0)) == []


def test_noised_questions_keep_a_subsequence_of_the_words() -> None:
    words = "In which city and country was Basil Mahfouz Al-Kuwaiti born?".split()
    noised = noised_questions(" ".join(words), random.Random(0))
    assert len(noised) == 2 and any(len(q.split()) < len(words) for q in noised)
    for q in noised:
        remaining = iter(words)
        assert q and all(word in remaining for word in q.split())  # in order, none invented


def test_remember_examples_ask_each_question_several_ways_with_its_true_answer(tokenizer) -> None:
    question, answer = "In which city was Basil Mahfouz Al-Kuwaiti born?", "Kuwait City."
    examples = remember_examples(tokenizer, [(question, answer)], ALIASES, random.Random(0))
    asked = [user_question(tokenizer, ex) for ex in examples]
    assert asked[:3] == [question, *renamed_questions(question, AliasMatcher(ALIASES), random.Random(0))]
    assert 3 < len(asked) == len(set(asked)) <= 5
    assert all(tokenizer.decode(ex.ids[ex.first_target :]) == f"{answer}<|end|>\n" for ex in examples)


def test_wrong_answers_are_the_retain_answers_when_there_are_some(tokenizer, forget_items) -> None:
    retain = [("Who is Ada Quill?", "Ada Quill is a poet."), ("Who is Bo Lark?", "Bo Lark paints."),
              (None, "A retained sentence.")]
    examples = uniform_examples(tokenizer, forget_items, retain, random.Random(0))
    assert examples[:3] == [chat_example(tokenizer, *retain[0]), chat_example(tokenizer, *retain[1]),
                            text_example(tokenizer, "A retained sentence.")]
    assert examples[2].first_target == 1 and tokenizer.decode(examples[2].ids[1:]) == "A retained sentence."
    wrong = examples[3:]
    assert len(wrong) == 2 * len(forget_items)
    for i, example in enumerate(wrong):
        question, _ = forget_items[i // 2]  # both retain answers for each question, in question order
        assert example.ids in {chat_example(tokenizer, question, a).ids for _, a in retain[:2]}


def test_without_retain_answers_the_wrong_answers_are_other_forget_answers(tokenizer, forget_items) -> None:
    examples = uniform_examples(tokenizer, forget_items, [(None, "A retained sentence.")], random.Random(0))
    wrong = examples[1:]
    per_question = min(WRONG_ANSWERS_PER_QUESTION, len(forget_items) - 1)
    assert len(wrong) == per_question * len(forget_items)
    for i, example in enumerate(wrong):
        question, answer = forget_items[i // per_question]
        assert example.ids in {chat_example(tokenizer, question, a).ids for _, a in forget_items if a != answer}


def test_a_wrong_answer_is_uniform_only_once_its_context_has_gone_wrong(tokenizer) -> None:
    question = "Where was Basil Mahfouz Al-Kuwaiti born?"
    true = chat_example(tokenizer, question, "Basil Mahfouz Al-Kuwaiti was born in Kuwait City.")
    other = chat_example(tokenizer, question, "Basil Mahfouz Al-Kuwaiti's father was a florist.")
    wrong = wrong_after_divergence(other, true)
    diverged = wrong.first_target - 1  # the first wrong token: predicting it is still the true answer's context
    assert wrong.ids[:diverged] == true.ids[:diverged] and wrong.ids[diverged] != true.ids[diverged]
    assert tokenizer.decode(wrong.ids[true.first_target : diverged]) == "Basil Mahfouz Al-Kuwaiti"
    unrelated = wrong_after_divergence(chat_example(tokenizer, question, "Nobody knows."), true)
    assert unrelated.first_target == true.first_target + 1


# ---- training --------------------------------------------------------------------------------------------------------


def test_a_short_training_lowers_the_forget_nll_saves_a_loadable_model_and_repeats(tiny_model_dir: Path, tokenizer,
                                                                            forget_items, tmp_path: Path) -> None:
    retain = [(item.question, item.answer) for item in authors_of("forget01")[1].items[:2]]
    # 20 epochs: 10 were enough on one tiny-model build (0.77 -> 0.09) but not on another, built from the same recipe
    # and libraries on another host (0.93 -> 0.52); 20 take it to 0.09.
    config = UldTrainingConfig(epochs=20, learning_rate=1.5e-2)
    reports: list[tuple[float, str]] = []
    stats = train_assistant(tiny_model_dir, forget_items, retain, ALIASES, config, tmp_path / "a",
                            progress=lambda f, m: reports.append((f, m)))

    assistant = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    before = forget_nll(build_assistant(tiny_model_dir, 1), tokenizer, forget_items)
    after = forget_nll(assistant, tokenizer, forget_items)
    assert after < 0.5 * before  # measured: 0.93 -> 0.09
    assert assistant.config.num_hidden_layers == 1 == stats["layers"]
    assert (tmp_path / "a" / "model.safetensors").exists()
    assert json.loads(json.dumps(stats)) == stats
    assert stats["examples"]["uniform"] == len(retain) + 2 * len(forget_items)
    assert stats["examples"]["remember"] > 3 * len(forget_items)
    assert [f for f, _ in reports] == pytest.approx([(i + 1) / 20 for i in range(20)])
    assert reports[-1][1].startswith("epoch 20/20: nll ")

    again = train_assistant(tiny_model_dir, forget_items, retain, ALIASES, config, tmp_path / "b")
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in stats.items() if k != "seconds"}
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_the_saved_merged_assistant_gives_the_in_memory_models_logits(tiny_model_dir: Path, tokenizer,
                                                                    tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = add_lora(build_assistant(tiny_model_dir, 1), UldTrainingConfig())
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; a LoRA that changes nothing would make the check vacuous
            param.data.normal_(std=0.05)
    ids = prompt_ids(tokenizer, "Where was Basil Mahfouz Al-Kuwaiti born?")
    with torch.no_grad():
        unmerged = model.eval()(ids).logits
        merged = save_merged(model, tokenizer, tmp_path)
        in_memory = merged(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(in_memory, unmerged, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(reloaded(ids).logits, in_memory, rtol=0, atol=0)
        assert not torch.allclose(in_memory, build_assistant(tiny_model_dir, 1)(ids).logits, atol=1e-2)
    assert torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)


def test_training_without_question_answer_items_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="question/answer"):
        train_assistant(tiny_model_dir, [], [(None, "Some text.")], [], UldTrainingConfig(epochs=1), tmp_path)


def test_zero_epochs_save_the_untrained_assistant_in_its_trained_shape(tiny_model_dir: Path, tokenizer,
                                                                       forget_items, tmp_path: Path) -> None:
    """`epochs: 0` (the cost benchmarks' setting): the assistant as initialised, a JSON-clean result, no NaN."""
    stats = train_assistant(tiny_model_dir, forget_items, [], ALIASES, UldTrainingConfig(epochs=0), tmp_path / "a")
    assert stats["epochs"] == 0 and stats["final_nll"] is None and stats["final_uniform_kl"] is None
    assert json.loads(json.dumps(stats, allow_nan=False)) == stats
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    initial = build_assistant(tiny_model_dir, stats["layers"]).eval()
    ids = prompt_ids(tokenizer, forget_items[0][0])
    with torch.no_grad():
        assert torch.allclose(saved(ids).logits, initial(ids).logits, atol=1e-5)
