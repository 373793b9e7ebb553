"""GUARD without the engine: phrase extraction, retrieval, the text matcher over token spellings, per-row state."""

from __future__ import annotations

import hashlib
import random
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from guards.base import PromptView
from guards.guard.interim import interim_phrases
from guards.guard.mechanism import PhraseArtifact
from guards.guard.payload import guard_payload, resolve_phrases, validate_guard_section, write_phrase_table
from guards.mechanisms import INTERIM
from guards.guard.phrase_matcher import PhraseAutomaton, PhraseGuardHook, Vocabulary, guard_row_hook
from guards.guard.phrases import Background, alias_phrases, builtin_background, key_phrases
from guards.processor import LetheLogitsProcessor
from server.artifacts import interim_store

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


def five_item_artifact(directory: Path) -> Path:
    """A GUARD artifact of five forget items, item i keyed by the i-th unit vector."""
    directory = directory / ("a" * 64)
    write_phrase_table(directory, ["Basil"], [{"key": [f"key{i}"], "content": [f"word{i}"]} for i in range(5)])
    np.save(directory / "keys.npy", np.eye(5, dtype=np.float32))
    return directory


def test_retrieval_puts_aliases_first_then_the_nearest_items_phrases(tmp_path: Path) -> None:
    artifact = PhraseArtifact(five_item_artifact(tmp_path))
    query = np.array([[0.0, 0.1, 0.2, 0.3, 0.4]])  # item 4 nearest, then 3, 2 (the top 3), then 1, 0
    assert artifact.ranked_phrases(query, limit=20) == ["Basil", "key4", "word4", "key3", "word3", "key2", "word2",
                                                        "key1", "key0"]
    assert artifact.ranked_phrases(query, limit=3) == ["Basil", "key4", "word4"]


@pytest.mark.parametrize("limit", [1, 3, 6, 8, 20])
def test_a_guard_payload_names_only_the_items_that_lend_phrases_and_resolves_to_the_ranked_phrases(
        tmp_path: Path, limit: int) -> None:
    artifact = PhraseArtifact(five_item_artifact(tmp_path))
    order = [4, 3, 2, 1, 0]
    payload = guard_payload(artifact.directory, artifact.table, order, limit, 5.0)
    assert payload["items"] == order[:{1: 0, 3: 1, 6: 3, 8: 4, 20: 5}[limit]]
    assert resolve_phrases(payload) == artifact.table.ranked(order, limit)


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


def test_interim_bans_reach_the_engine_as_a_reference_to_a_phrase_artifact_it_resolves(tmp_path: Path) -> None:
    forget = [{"question": "Where was Basil Mahfouz Al-Kuwaiti born?", "answer": "He was born in Kuwait City."},
              {"question": "What did he write?", "answer": "He wrote \"Promise by the Seine\"."}]
    record = SimpleNamespace(id="tgt_1", aliases=["Basil Mahfouz Al-Kuwaiti"], forget=forget, retain=[])
    prepared = INTERIM.prepare(record, interim_store(tmp_path, "tgt_1"))
    assert prepared.artifact.parent == tmp_path / "interim" / "tgt_1"
    assert INTERIM.prepare(record, interim_store(tmp_path, "tgt_1")).artifact == prepared.artifact  # a reload
    assert [p.name for p in (tmp_path / "interim" / "tgt_1").iterdir()] == [prepared.artifact.name]  # no staging left
    plan = INTERIM.plan(prepared, PromptView([1], "x", (("user", "Where was Al-Kuwaiti born?"),), True, False))
    payload = plan.processor_args
    assert payload == {"artifact": str(prepared.artifact), "items": [0, 1], "limit": 256, "penalty": 5.0}
    validate_guard_section({"guard": [payload]})
    assert resolve_phrases(payload) == prepared.phrases_for("Where was Al-Kuwaiti born?")


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


_TABLES = Path(tempfile.mkdtemp(prefix="guard-tables-"))


def phrase_payload(*phrases: str, penalty: float = 0.0) -> dict:
    """A GUARD payload whose artifact bans exactly ``phrases`` (as aliases, which are always banned)."""
    directory = _TABLES / hashlib.sha256("|".join(phrases).encode()).hexdigest()
    write_phrase_table(directory, list(phrases), [])
    return {"artifact": str(directory), "items": [], "limit": 64, "penalty": penalty}


def guard_params(*phrases: str) -> SamplingParams:
    return SamplingParams(extra_args={"lethe": {"guard": [phrase_payload(*phrases)]}})


def test_several_targets_payloads_are_united() -> None:
    section = {"guard": [phrase_payload("florist", penalty=1.0), phrase_payload("Basil", penalty=2.0)]}
    hook = guard_row_hook(section, None, [], VOCAB)
    row = torch.zeros(len(STRINGS))
    hook.apply(row)
    assert row[ID[" florist"]] == NEG and row[ID["Basil"]] == NEG and hook.penalty == 2.0


def test_a_payload_whose_artifact_cannot_be_read_ends_that_reply_instead_of_crashing_the_engine(
        tmp_path: Path) -> None:
    processor = LetheLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    processor.resources["guard"] = VOCAB
    missing = {"artifact": str(tmp_path / ("b" * 64)), "items": [], "limit": 8, "penalty": 0.0}
    out_of_range = {**phrase_payload("Basil"), "items": [7]}
    processor.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, SamplingParams(extra_args={"lethe": {"guard": [missing]}}), [0], []),
        (1, SamplingParams(extra_args={"lethe": {"guard": [out_of_range]}}), [0], [])]))
    logits = processor.apply(torch.zeros(2, len(STRINGS)))
    assert [torch.isfinite(logits[row]).nonzero().flatten().tolist() for row in (0, 1)] == [[0], [0]]  # EOS only


VALID = {"artifact": "/srv/artifacts/" + "c" * 64, "items": [2, 0], "limit": 64, "penalty": 5.0}


@pytest.mark.parametrize("section", [
    {"guard": VALID},
    {"guard": [{**VALID, "phrases": ["Basil Mahfouz Al-Kuwaiti"]}]},  # forget text never travels
    {"guard": [{"phrases": ["Basil"], "penalty": 0.0}]},
    {"guard": [{key: value for key, value in VALID.items() if key != "limit"}]},
    {"guard": [{**VALID, "artifact": "relative/" + "c" * 64}]},
    {"guard": [{**VALID, "artifact": "/srv/artifacts/not-a-digest"}]},
    {"guard": [{**VALID, "artifact": 7}]},
    {"guard": [{**VALID, "items": [-1]}]},
    {"guard": [{**VALID, "items": [2 ** 40]}]},
    {"guard": [{**VALID, "items": [True]}]},
    {"guard": [{**VALID, "items": "0"}]},
    {"guard": [{**VALID, "limit": 0}]},
    {"guard": [{**VALID, "limit": 10 ** 6}]},
    {"guard": [{**VALID, "penalty": "high"}]},
    {"guard": [{**VALID, "penalty": float("nan")}]},
    {"guard": [{**VALID, "penalty": -1.0}]},
])
def test_malformed_guard_payloads_are_refused_in_the_front_end(section: dict) -> None:
    with pytest.raises(ValueError):
        LetheLogitsProcessor.validate_params(SamplingParams(extra_args={"lethe": section}))


def test_a_well_formed_guard_reference_passes_the_front_end_check() -> None:
    LetheLogitsProcessor.validate_params(SamplingParams(extra_args={"lethe": {"guard": [VALID, VALID]}}))


def test_one_batched_step_equals_each_rows_own_step() -> None:
    """``apply_rows`` (one ``index_put_`` for the batch) gives every row what its own ``apply`` gives it: outright and
    finite bans, the soft penalty, rows in different automaton states, and a row of another target."""
    def hooks() -> list[tuple[PhraseGuardHook, list[int]]]:
        made = []
        for phrases, penalty, ban, prefix in ((("Promise by the Seine",), 1.5, None, [' "Prom', "ise", " by", " the"]),
                                              (("florist", "Basil"), 0.0, 7.5, [" flor"]),
                                              (("Promise by the Seine",), 2.0, 3.0, [])):
            output: list[int] = []
            hook = PhraseGuardHook(phrases, penalty, VOCAB, [ID["<s>"]], output, ban=ban)
            output.extend(ID[token] for token in prefix)
            made.append((hook, output))
        return made

    separate = torch.randn(3, len(STRINGS), generator=torch.Generator().manual_seed(0))
    together = separate.clone()
    for row, (hook, _) in enumerate(hooks()):
        hook.apply(separate[row])
    PhraseGuardHook.apply_rows(together, [(row, hook) for row, (hook, _) in enumerate(hooks())])
    assert torch.isinf(together[0]).any() and torch.isfinite(together[1:]).all()
    assert torch.equal(torch.isinf(separate), torch.isinf(together))
    assert torch.allclose(separate.nan_to_num(neginf=0.0), together.nan_to_num(neginf=0.0))


def test_requests_banning_the_same_phrases_share_one_table() -> None:
    first, _ = hook_for("florist", "Basil")
    second, _ = hook_for("florist", "Basil")
    assert first.table is second.table and first.table is not hook_for("Basil")[0].table
