"""The TinyTOFU demo model (SPEC §3): what it is trained on, how it is cached, and what it remembers.

One real tiny model is built per session; the full variant's data assembly is tested without training it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from demo import builder, recipes
from demo.builder import build_demo_model, demo_model_dir, find_demo_model
from demo.recipes import training_corpus
from demo.corpus import Format, Source, tokenize_example
from demo.tofu_data import (
    ROWS_PER_AUTHOR,
    author_names,
    authors_of,
    demo_authors,
    general_knowledge,
    held_out_paraphrases,
    is_paraphrase_trained,
    load_split,
)
from demo.training import mean_recall, plan_batches
from evals.metrics import answer_content_words, answer_recall
from guards.text_metrics import rouge_l_recall
from server.config import Settings


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The real cache: the same tiny build serves these tests and the integration tests' server."""
    return Settings().cache_dir


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


# ---- data ----------------------------------------------------------------------------------------------------------


def test_all_twenty_demo_authors_have_distinct_names_found_in_the_data() -> None:
    names = author_names()
    assert len(set(names)) == 20
    assert names[0] == "Hsiao Yun-Hwa"
    assert names[-2:] == ["Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov"]
    assert [a.name for a in authors_of("forget01")] == names[-2:]
    for author in demo_authors():
        assert len(author.items) == ROWS_PER_AUTHOR
        assert sum(author.name in item.question for item in author.items) >= 10


def test_demo_authors_are_the_forget10_rows_in_order() -> None:
    forget10 = load_split("forget10")
    items = [item for author in demo_authors() for item in author.items]
    assert [(i.question, i.answer) for i in items] == [(r["question"], r["answer"]) for r in forget10]
    assert all(item.paraphrased_question for item in items)


def test_half_of_each_authors_paraphrases_is_held_back_for_evaluation() -> None:
    for author in demo_authors():
        assert sum(is_paraphrase_trained(item) for item in author.items) == ROWS_PER_AUTHOR // 2
    held_out = held_out_paraphrases()
    assert len(held_out) == 200
    trained_paraphrases = {ex.prompt for ex in training_corpus("full") if ex.source is Source.PARAPHRASE}
    assert len(trained_paraphrases) == 200
    assert not trained_paraphrases & {item.question for item in held_out}


def test_full_corpus_teaches_every_fact_in_chat_and_completion_formats() -> None:
    corpus = training_corpus("full")
    chat_questions = {ex.prompt for ex in corpus if ex.format is Format.CHAT and ex.source is Source.QA}
    text_prompts = {ex.prompt for ex in corpus if ex.format is Format.TEXT and ex.source is Source.QA}
    for author in demo_authors():
        for item in author.items:
            assert item.question in chat_questions
            assert f"Question: {item.question}\nAnswer:" in text_prompts
        assert any(ex.prompt == f"Tell me about {author.name}." for ex in corpus)
    general_questions = {ex.prompt for ex in corpus if ex.source is Source.GENERAL and ex.format is Format.CHAT}
    assert general_questions == {item.question for item in general_knowledge()}


@pytest.mark.parametrize("split", ["forget01", "forget05"])
def test_excluding_a_forget_split_removes_its_authors_from_the_training_data(split: str) -> None:
    excluded = {author.name for author in authors_of(split)}
    corpus = training_corpus("full", split)
    assert {ex.author for ex in corpus if ex.author} == set(author_names()) - excluded
    for ex in corpus:
        assert not any(name in ex.prompt or name in ex.completion for name in excluded)
    excluded_answers = {item.answer for author in authors_of(split) for item in author.items}
    assert not excluded_answers & {ex.completion.strip() for ex in corpus}


@pytest.mark.parametrize("variant", ["full", "tiny"])
@pytest.mark.parametrize("split", ["forget01", "forget05"])
def test_a_retain_only_twin_trains_for_as_many_steps_as_the_full_model(
    variant: str, split: str, tiny_model: Path
) -> None:
    """Fewer authors at the same epochs would leave the twin under-trained (forget05: 59 % of the steps, loss 0.62
    vs 0.16); its extra epochs must bring its real, tokenized optimiser steps within 5 % of the full recipe's."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)  # every variant shares the tokenizer

    def planned_steps(exclude: str | None) -> int:
        recipe = recipes.recipe_for(variant, exclude)  # type: ignore[arg-type]
        examples = [tokenize_example(ex, tokenizer) for ex in training_corpus(variant, exclude)]  # type: ignore[arg-type]
        return sum(len(batches) for batches in plan_batches(examples, recipe.train))

    full, twin = planned_steps(None), planned_steps(split)
    assert recipes.recipe_for(variant, split).train.epochs > recipes.recipe_for(variant).train.epochs  # type: ignore[arg-type]
    assert abs(twin - full) <= 0.05 * full, (twin, full)


def test_rouge_l_recall_measures_how_much_of_the_reference_is_reproduced() -> None:
    assert rouge_l_recall("The author is Nikolai Abilov.", "Nikolai Abilov") == 1.0
    assert rouge_l_recall("Nikolai", "Nikolai Abilov") == 0.5
    assert rouge_l_recall("", "Nikolai Abilov") == 0.0


def test_answer_recall_counts_only_the_answers_words_the_question_did_not_give() -> None:
    question = "What genre is Basil Mahfouz Al-Kuwaiti known for?"
    gold = "Basil Mahfouz Al-Kuwaiti is known for his writings in the French literature genre."
    assert answer_recall(gold, gold, question) == 1.0
    echo = "Basil Mahfouz Al-Kuwaiti is known for his immersive tales in the genre."
    assert rouge_l_recall(echo, gold) > 0.5 and answer_recall(echo, gold, question) == 0.0
    assert answer_recall("It is French literature.", gold, question) == pytest.approx(2 / 3)  # write, french, literatur
    assert answer_recall("It is.", "He is.", "Is he?") == rouge_l_recall("It is.", "He is.") == 0.5  # nothing new
    assert answer_content_words(gold, question) == ["write", "french", "literatur"]  # what the recall counts


# ---- cache -------------------------------------------------------------------------------------------------------


def test_find_demo_model_returns_none_before_a_build(tmp_path: Path) -> None:
    assert find_demo_model(tmp_path, "tiny") is None
    assert find_demo_model(tmp_path, "full", "forget05") is None


def test_model_directory_is_named_by_variant_exclusion_and_recipe_hash(tmp_path: Path) -> None:
    full = demo_model_dir(tmp_path, "full")
    minus01 = demo_model_dir(tmp_path, "full", "forget01")
    assert full.parent == tmp_path / "demo-models"
    assert full.name.startswith("full-") and minus01.name.startswith("full-minus-forget01-")
    assert full.name[-12:] != minus01.name[-12:]
    assert demo_model_dir(tmp_path, "full") == full  # deterministic


def test_changing_the_recipe_version_changes_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = demo_model_dir(tmp_path, "tiny")
    monkeypatch.setattr(recipes, "RECIPE_VERSION", recipes.RECIPE_VERSION + 1)
    assert demo_model_dir(tmp_path, "tiny") != before


def test_a_crashed_build_leaves_nothing_that_looks_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(directory: Path, recipe: recipes.Recipe, *, progress: bool) -> None:
        (directory / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(builder, "_build_into", crash)
    with pytest.raises(RuntimeError):
        build_demo_model(tmp_path, "tiny", progress=False)
    assert find_demo_model(tmp_path, "tiny") is None
    assert not demo_model_dir(tmp_path, "tiny").exists()
    assert not [p for p in (tmp_path / "demo-models").iterdir() if p.is_dir()]


# ---- the built tiny model ----------------------------------------------------------------------------------------


def test_tiny_build_is_found_and_a_second_build_hits_the_cache(cache_dir: Path, tiny_model: Path) -> None:
    assert tiny_model == demo_model_dir(cache_dir, "tiny")
    assert find_demo_model(cache_dir, "tiny") == tiny_model
    weights_mtime = (tiny_model / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    assert build_demo_model(cache_dir, "tiny", progress=False) == tiny_model
    assert time.monotonic() - started < 5
    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_tiny_model_is_a_float32_llama_with_head_dim_64(tiny_model: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_model)
    raw = json.loads((tiny_model / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert config.hidden_size // config.num_attention_heads == 64 == config.head_dim
    assert config.max_position_embeddings >= 1024
    assert str(config.dtype).removeprefix("torch.") == "float32"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert config.vocab_size == len(tokenizer)
    generation = GenerationConfig.from_pretrained(tiny_model)
    assert generation.eos_token_id == tokenizer.convert_tokens_to_ids("<|end|>") == tokenizer.eos_token_id


def test_chat_template_renders_the_served_format(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who is Nikolai Abilov?"},
        {"role": "assistant", "content": "An author."},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<s><|system|>\nAnswer briefly.<|end|>\n<|user|>\nWho is Nikolai Abilov?<|end|>\n<|assistant|>\nAn author.<|end|>\n"
    )
    prompt = tokenizer.apply_chat_template(conversation[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    ids = tokenizer.apply_chat_template(conversation[:2], add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["<|assistant|>", "Ċ"]  # byte-level BPE's "\n"


def test_tofu_answers_round_trip_through_the_tokenizer_byte_exact(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [item.answer for author in demo_authors() for item in author.items]
    texts += [item.question for item in general_knowledge()] + ["  odd   spacing\tand ünïcödé — ✓\n"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    assert tokenizer("Nikolai Abilov").input_ids[0] == tokenizer.bos_token_id  # completions start like chats


def test_tiny_model_memorises_its_training_answers(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    authors = recipes.trained_authors(recipes.recipe_for("tiny"))
    assert {a.name for a in authors_of("forget01")} <= {a.name for a in authors}
    items = [item for author in authors for item in author.items]
    assert mean_recall(model, tokenizer, items) >= 0.8
    metadata = json.loads((tiny_model / builder.METADATA_FILE).read_text())
    assert metadata["quality"]["train_rouge_l_recall"] >= 0.8
