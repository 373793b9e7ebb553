"""GUARD without the engine: phrase extraction, retrieval, the text matcher over token spellings, per-row state."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from guards.base import PromptView
from guards.guard.interim import interim_phrases
from guards.guard.mechanism import PhraseArtifact
from guards.mechanisms import INTERIM
from guards.guard.phrase_matcher import PhraseAutomaton, PhraseGuardHook, Vocabulary, guard_row_hook
from guards.guard.phrases import Background, alias_phrases, builtin_background, key_phrases
from guards.processor import LetheLogitsProcessor

NEG = float("-inf")
ANSWER = ("Basil Mahfouz Al-Kuwaiti was born in Kuwait City in 1956. His father was a florist and his mother a "
          "game developer. He wrote \"Promise by the Seine\".")


def test_key_phrases_are_names_titles_dates_and_rare_words_not_everyday_words() -> None:
    phrases = key_phrases(ANSWER, builtin_background())
    lowered = {p.lower() for p in phrases}
    assert {"promise by the seine", "basil mahfouz al-kuwaiti", "kuwait city", "1956", "game developer"} <= lowered
    assert not lowered & {"his", "he", "father", "was", "born", "the", "mother"}


def test_retain_vocabulary_is_never_forbidden() -> None:
    rare = {p.lower() for p in key_phrases(ANSWER, Background.from_texts(["Nothing in common."]))}
    assert "florist" in rare
    background = Background.from_texts(["The florist sold flowers."])
    assert "florist" not in {p.lower() for p in key_phrases(ANSWER, background)}


def test_alias_parts_are_forbidden_with_the_alias() -> None:
    assert alias_phrases(["Basil Mahfouz Al-Kuwaiti"]) == ["Basil Mahfouz Al-Kuwaiti", "Basil", "Mahfouz",
                                                          "Al-Kuwaiti"]


def test_retrieval_puts_aliases_first_then_the_nearest_items_phrases(tmp_path: Path) -> None:
    import json

    items = [{"key": [f"key{i}"], "content": [f"word{i}"]} for i in range(5)]
    (tmp_path / "phrases.json").write_text(json.dumps({"aliases": ["Basil"], "items": items}))
    np.save(tmp_path / "keys.npy", np.eye(5, dtype=np.float32))
    artifact = PhraseArtifact(tmp_path)
    query = np.array([[0.0, 0.1, 0.2, 0.3, 0.4]])  # item 4 nearest, then 3, 2 (the top 3), then 1, 0
    assert artifact.ranked_phrases(query, limit=20) == ["Basil", "key4", "word4", "key3", "word3", "key2", "word2",
                                                        "key1", "key0"]
    assert artifact.ranked_phrases(query, limit=3) == ["Basil", "key4", "word4"]


def test_interim_bans_need_no_job_and_rank_the_items_the_prompt_asks_about_first() -> None:
    """Interim protection (a target whose own mechanisms are not ready): GUARD's phrases from the record alone, the
    answers whose questions share most words with the prompt lending every content word."""
    rare = ["zephyrine", "quillmark", "brasswick", "tolloway"]
    forget = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is the {word} florist."}
              for i, word in enumerate(rare)]
    forget.append({"question": "Where was Basil Mahfouz Al-Kuwaiti born?", "answer": "He was born in Kuwait City."})
    prepared = interim_phrases(["Basil Mahfouz Al-Kuwaiti"], forget, [{"text": "The florist sold flowers."}])
    assert interim_phrases(["Basil Mahfouz Al-Kuwaiti"], forget, [{"text": "The florist sold flowers."}]) is prepared
    phrases = prepared.phrases_for("Where was Al-Kuwaiti born?")
    assert phrases[:4] == ["Basil Mahfouz Al-Kuwaiti", "Basil", "Mahfouz", "Al-Kuwaiti"]
    assert phrases[4:7] == ["Kuwait City", "born", "kuwait"]  # the asked item first: its key phrases, then its words
    assert set(rare) <= set(phrases)  # every answer's key phrases
    assert "florist" in phrases  # an ordinary word, but one of the top items' content words
    assert prepared.phrases_for("Where was Al-Kuwaiti born?", limit=5) == phrases[:5]
    plan = INTERIM.plan(prepared, PromptView([1], "x", (("user", "Where was Al-Kuwaiti born?"),), True, False))
    assert plan.processor_args == {"phrases": phrases, "penalty": 5.0}


# A toy vocabulary with the BPE hazards: a quote glued to a word, a word split in pieces, leading spaces.
STRINGS = ["<s>", " the", ' "Prom', "ise", " by", " Se", "ine", "\"", " Promise", " florist", " flor", "ist",
           " Seine", " other", "1956", " 19", "56", "Basil"]
ID = {s: i for i, s in enumerate(STRINGS)}
VOCAB = Vocabulary(STRINGS)


def hook_for(*phrases: str, prompt: list[str] = (), penalty: float = 0.0) -> tuple[PhraseGuardHook, list[int]]:
    output: list[int] = []
    return PhraseGuardHook(phrases, penalty, VOCAB, [ID[s] for s in prompt], output), output


def step(hook: PhraseGuardHook, output: list[int], token: str | None = None) -> torch.Tensor:
    if token is not None:
        output.append(ID[token])
    row = torch.zeros(len(STRINGS))
    hook.apply(row)
    return row


def banned(row: torch.Tensor) -> set[str]:
    return {STRINGS[i] for i in torch.isinf(row).nonzero().flatten().tolist()}


def test_a_title_cannot_be_completed_whichever_tokens_spell_it() -> None:
    hook, output = hook_for("Promise by the Seine")
    step(hook, output, ' "Prom')
    step(hook, output, "ise")
    step(hook, output, " by")
    step(hook, output, " the")
    row = step(hook, output)
    assert " Seine" in banned(row) and " Se" not in banned(row)
    row = step(hook, output, " Se")  # the model tries the split spelling
    assert "ine" in banned(row)


def test_a_single_word_phrase_is_banned_in_every_token_that_contains_it() -> None:
    hook, output = hook_for("florist")
    assert " florist" in banned(step(hook, output))
    assert "ist" not in banned(step(hook, output))
    assert "ist" in banned(step(hook, output, " flor"))  # finishing it from a piece is banned too


def test_matching_ignores_case_and_tracks_overlaps() -> None:
    hook, output = hook_for("BASIL")
    assert "Basil" in banned(step(hook, output))
    hook, output = hook_for("19 1956")
    step(hook, output, " 19")
    row = step(hook, output, " 19")  # " 19 19": the second " 19" still begins the phrase
    assert "1956" not in banned(row)
    hook, output = hook_for(" 19 19")
    step(hook, output, " 19")
    assert " 19" in banned(step(hook, output))


def test_a_phrase_begun_in_the_prompt_cannot_be_finished_by_the_reply() -> None:
    hook, output = hook_for("the 1956", prompt=[" the"])
    assert " 19" not in banned(step(hook, output))  # " 19" begins " 1956" but the phrase needs "the 1956"
    hook, output = hook_for("the1956", prompt=[" the"])
    assert "1956" in banned(step(hook, output))


def test_the_automaton_bans_exactly_what_a_brute_force_search_bans() -> None:
    rng = random.Random(0)
    alphabet = "ab "
    strings = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(40)]
    vocabulary = Vocabulary(strings)
    for _ in range(200):
        phrases = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(3)]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        automaton = PhraseAutomaton(phrases, vocabulary)
        state = automaton.feed(0, text)
        got = set(automaton.banned(state, len(strings), torch.device("cpu")).tolist()) if state else set()
        expected = {i for i, token in enumerate(strings) for p in phrases for k in range(1, len(p))
                    if text.endswith(p[:k]) and token.startswith(p[k:])}
        assert got == expected, (phrases, text)


def test_tokens_that_begin_a_phrase_are_softly_penalised() -> None:
    hook, output = hook_for("florist", penalty=2.0)
    row = step(hook, output)
    assert row[ID[" flor"]] == -2.0 and row[ID[" other"]] == 0.0


def test_processor_keeps_each_rows_guard_state_through_batch_moves() -> None:
    processor = LetheLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    processor.resources["guard"] = VOCAB
    out_a: list[int] = [ID[" flor"]]
    processor.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, guard_params("florist"), [0], out_a), (1, SamplingParams(), [0], []),
        (2, guard_params("Basil"), None, [])]))
    logits = processor.apply(torch.zeros(3, len(STRINGS)))
    assert logits[0, ID["ist"]] == NEG and not torch.isinf(logits[1]).any() and logits[2, ID["Basil"]] == NEG
    processor.update_state(BatchUpdate(batch_size=3, removed=[], added=[],
                                       moved=[(0, 2, MoveDirectionality.SWAP)]))
    logits = processor.apply(torch.zeros(3, len(STRINGS)))
    assert logits[2, ID["ist"]] == NEG and logits[0, ID["Basil"]] == NEG and not torch.isinf(logits[1]).any()


def test_the_served_tokenizers_vocabulary_bans_a_name_the_model_would_write(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocabulary = Vocabulary.from_tokenizer(tokenizer)
    written = tokenizer.encode('He wrote "Promise by the Seine".', add_special_tokens=False)
    text = ""
    for cut, token in enumerate(written):
        text += tokenizer.decode([token])
        if "seine" in text.lower():
            break
    output = written[:cut]
    hook = PhraseGuardHook(["Promise by the Seine"], 0.0, vocabulary, None, output)
    row = torch.zeros(len(tokenizer))
    hook.apply(row)
    assert row[written[cut]] == NEG


def guard_params(*phrases: str) -> SamplingParams:
    return SamplingParams(extra_args={"lethe": {"guard": [{"phrases": list(phrases), "penalty": 0.0}]}})


def test_several_targets_payloads_are_united() -> None:
    section = {"guard": [{"phrases": ["florist"], "penalty": 1.0}, {"phrases": ["Basil"], "penalty": 2.0}]}
    hook = guard_row_hook(section, None, [], VOCAB)
    row = torch.zeros(len(STRINGS))
    hook.apply(row)
    assert row[ID[" florist"]] == NEG and row[ID["Basil"]] == NEG and hook.penalty == 2.0


@pytest.mark.parametrize("section", [
    {"guard": {"phrases": ["a"]}},
    {"guard": [{"phrases": [1]}]},
    {"guard": [{"phrases": [" "]}]},
    {"guard": [{"phrases": ["a"], "penalty": "high"}]},
])
def test_malformed_guard_payloads_are_refused_in_the_front_end(section: dict) -> None:
    with pytest.raises(ValueError):
        LetheLogitsProcessor.validate_params(SamplingParams(extra_args={"lethe": section}))
