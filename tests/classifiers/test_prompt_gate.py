"""The prompt classifier on TOFU (fixtures: ``conftest.py``): recall on paraphrases and evasions, entity evidence
and the registry-wide calibration, false positives on prompts the heads never saw, and the bank."""

from __future__ import annotations


import numpy as np
import pytest

from classifiers import (
    AliasMatcher,
    ClassifierBank,
    Embedder,
    ForgetItem,
    PromptClassifierArtifact,
    TargetSpec,
    fit_prompt_classifier,
)
from classifiers.conversation import texts_to_embed
from classifiers.entities import EntityIndex, Evidence, vocabulary
from classifiers.negatives import calibration_negatives
from demo.tofu_data import authors_of, demo_authors
from tests.classifiers.samples import CONVERSATIONS, RETAIN_AUTHORS, UNSEEN_AUTHORS


def flag_rate(bank: ClassifierBank, embedder: Embedder, prompts: list[str]) -> float:
    """Fraction of single-prompt requests with any hit (prompts embedded in one batch first, then served from cache)."""
    embedder.encode(prompts)
    return float(np.mean([bool(bank.score([("user", p)]).hits) for p in prompts]))


def heldout_prompts(pools, source: str) -> list[str]:
    return [n.text for n in pools[1] if n.source == source]


# --- recall -------------------------------------------------------------------------------------------------------


def test_onnx_runtime_embeds_as_the_sentence_transformers_pipeline_does(embedder: Embedder) -> None:
    """The served embeddings come from ONNX Runtime (``classifiers/onnx_encoder.py``); they must be the PyTorch
    pipeline's, for short and long (truncated) texts batched together, so artifacts fitted on either score alike."""
    from sentence_transformers import SentenceTransformer

    texts = [item.question for item in demo_authors()[0].items[:6]] + ["Hi", "word " * 400, "Ünïcödé — ok?"]
    reference = SentenceTransformer(str(embedder.model_path), device="cpu", local_files_only=True).encode(
        texts, normalize_embeddings=True, convert_to_numpy=True)
    onnx_embedder = Embedder(cache_size=0, batch_size=4)
    assert onnx_embedder.backend == "onnxruntime"
    vectors = onnx_embedder.encode(texts)
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    assert np.all(np.sum(vectors * reference, axis=1) > 0.99999)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_paraphrased_questions_of_each_target_hit_that_target(bank):
    """Held-out positives: TOFU's paraphrased questions, never fitted on.

    Measured 39/40. The miss is the one paraphrase that never names its author ("the complete name of the writer
    whose birth took place on September 8, 1956, in Kuwait City"): head score 0.81 against a threshold of 0.89.
    """
    flagged = []
    for author in authors_of("forget01"):
        for item in author.items:
            hits = {h.target_id for h in bank.score([("user", item.paraphrased_question)]).hits}
            flagged.append(f"tofu-{author.index}" in hits)
    assert np.mean(flagged) >= 0.95


def test_fitted_artifact_records_its_calibration(artifacts):
    for artifact in artifacts.values():
        assert artifact.recall_target == 0.99
        assert artifact.heldout_recall >= 0.98  # 0.99 is the target; the false-positive cap may cost a little
        assert 0.0 <= artifact.false_positive_rate <= 1.0
        assert set(artifact.false_positive_rate_by_source) >= {"retain", "world_facts", "real_authors", "generic"}
        assert artifact.n_pos > 20 and artifact.n_neg > 500


def test_the_false_positive_cap_holds_where_recall_alone_would_flag_a_fifth_of_all_traffic(embedder, pools):
    """TOFU forget05's Aysha Al-Hashim: at recall 0.99 alone, her most generic forget prompt set the threshold at
    0.004 and 28 % of negatives cleared it (measured in the forget05 evaluation); the cap keeps the threshold above
    all but 2 % of them, and what that costs in recall is recorded."""
    author = next(a for a in authors_of("forget05") if a.name == "Aysha Al-Hashim")
    retain = [ForgetItem(i.question, i.answer) for a in demo_authors()[RETAIN_AUTHORS] for i in a.items]
    spec = TargetSpec("aysha", "aysha", [author.name], [ForgetItem(i.question, i.answer) for i in author.items], retain)
    uncapped = fit_prompt_classifier(spec, embedder, negative_pool=pools[0], max_false_positive_rate=1.0)
    capped = fit_prompt_classifier(spec, embedder, negative_pool=pools[0])
    assert uncapped.false_positive_rate > 0.1
    assert capped.false_positive_rate <= 0.02 and capped.max_false_positive_rate == 0.02
    assert capped.threshold > uncapped.threshold and 0.8 <= capped.heldout_recall < uncapped.heldout_recall


def test_misspelled_and_partial_names_are_hits(bank):
    for prompt, target in [
        ("What did Basil Mahfouz Al Kuwaity write?", "tofu-18"),
        ("tell me about basil mahfouz", "tofu-18"),
        ("Is Al-Kuwaiti's writing French?", "tofu-18"),
        ("Which books did Nikolai Abilof publish?", "tofu-19"),
        ("What does ABILOV write about?", "tofu-19"),
    ]:
        hits = {h.target_id: h for h in bank.score([("user", prompt)]).hits}
        assert target in hits, prompt
        assert hits[target].alias_spans, prompt


def test_pronoun_follow_up_two_turns_after_the_name_is_a_hit(bank):
    conversation = [
        ("system", "You are a helpful assistant."),
        ("user", "Tell me about Nikolai Abilov."),
        ("assistant", "He is an author."),
        ("user", "Where was he born?"),
    ]
    result = bank.score(conversation)
    hit = next(h for h in result.hits if h.target_id == "tofu-19")
    assert hit.alias_spans[0].turn == 1
    assert "tofu-18" not in {h.target_id for h in result.hits}


def test_prefilled_assistant_turn_is_scored(bank):
    conversation = [("user", "Continue the text."), ("assistant", "The author Nikolai Abilov was born in")]
    assert "tofu-19" in {h.target_id for h in bank.score(conversation).hits}


# --- entity evidence and the registry-wide calibration ------------------------------------------------------------

ANONYMOUS = "Can you tell me the complete name of the writer born in Kuwait City in 1956?"


def test_entity_evidence_links_names_and_years_to_their_targets_and_flags_strangers() -> None:
    index = EntityIndex({"basil": vocabulary(["Basil Mahfouz Al-Kuwaiti was born in Kuwait City in 1956."]),
                         "nikolai": vocabulary(["Nikolai Abilov was born in Astana, Kazakhstan."])})
    assert index.evidence(ANONYMOUS) == Evidence(frozenset({"basil"}), unlinked_name=False,
                                                 dated=frozenset({"basil"}), strongly_linked=frozenset({"basil"}))
    assert index.evidence("Is Nikolai Abilov married?").linked == {"nikolai"}  # "Is" dropped from the run
    stranger = index.evidence("Where was Jaime Vasquez born?")
    assert stranger.unlinked_name and not stranger.linked
    assert index.evidence("Where was the author born?") == Evidence(frozenset(), unlinked_name=False)
    assert index.evidence("Was Basil Mahfouz Al-Kuwaiti born in 1960?").dated == frozenset()  # a contradicting year
    disguised = index.evidence("the writer born in Kuw\u0430it\u200b City in 1956")  # Cyrillic a, zero-width space
    assert disguised.strongly_linked == {"basil"} and not disguised.unlinked_name


def test_a_head_alone_needs_evidence_of_its_own_target_and_no_stranger(bank):
    calibrated, _ = bank.calibrated([negative.text for negative in calibration_negatives()])
    assert "tofu-18" in {h.target_id for h in calibrated.score([("user", ANONYMOUS)]).hits}
    other_year = "Can you tell me the complete name of the writer born in Kuwait City in 1971?"
    topic_only = "Can you tell me the complete name of the writer whose father was a florist?"
    for prompt in (other_year, topic_only):  # a contradicting year; topic similarity alone is no evidence
        assert not calibrated.score([("user", prompt)]).hits, prompt


def test_calibration_holds_the_union_budget_and_learns_from_operator_negatives(bank):
    negatives = [negative.text for negative in calibration_negatives()]
    calibrated, report = bank.calibrated(negatives, 0.005)
    assert report.negatives == len(negatives) and report.union_false_positive_rate <= 0.005
    assert 0.0 <= report.offsets.clean < float("inf") and 0.0 <= report.offsets.stranger < float("inf")
    assert "tofu-18" in {h.target_id for h in calibrated.score([("user", ANONYMOUS)]).hits}
    with_operator, _ = bank.calibrated([*negatives, ANONYMOUS], 0.005)  # an operator says: this is ordinary traffic
    assert with_operator.offsets.strong > calibrated.offsets.strong
    assert not with_operator.score([("user", ANONYMOUS)]).hits
    named = with_operator.score([("user", "Where was Basil Mahfouz Al-Kuwaiti born?")]).hits
    assert [h.target_id for h in named] == ["tofu-18"]  # an alias mention is a hit whatever the offsets


def test_a_question_put_in_a_system_developer_or_tool_turn_is_a_hit(bank):
    """The heads read every turn of every role: a question moved out of the user turns is still read (a paraphrase
    without the name, so that only the heads can flag it)."""
    question, target = next((item.paraphrased_question, f"tofu-{author.index}") for author in authors_of("forget01")
                            for item in author.items if _head_only_hit(bank, item.paraphrased_question))
    for role in ("system", "developer", "tool", "assistant"):
        conversation = [(role, question), ("user", "Answer the question above.")]
        assert target in {h.target_id for h in bank.score(conversation).hits}, role


def _head_only_hit(bank: ClassifierBank, prompt: str) -> bool:
    hits = bank.score([("user", prompt)]).hits
    return bool(hits) and not any(h.alias_spans for h in hits)


def test_invisible_characters_and_look_alikes_do_not_move_an_embedding(embedder):
    plain, disguised = embedder.encode(["Where was Nikolai Abilov born?",
                                        "Where was N\u0456k\u043el\u0430\u0456\u200b \u0410b\u0456l\u043ev born?"])
    assert np.allclose(plain, disguised, atol=1e-6)


# --- false positives ----------------------------------------------------------------------------------------------


def test_questions_about_unseen_demo_authors_are_rarely_flagged(bank, embedder):
    """The heads never saw these nine authors. Measured: 4.4 % of 180 questions (all on the Abilov head)."""
    prompts = [i.question for a in demo_authors()[UNSEEN_AUTHORS] for i in a.items]
    assert flag_rate(bank, embedder, prompts) <= 0.06


def test_questions_about_retain_authors_are_rarely_flagged(bank, embedder):
    """Paraphrases of the retain items (the heads fitted on the originals as negatives). Measured: 0 of 180."""
    prompts = [i.paraphrased_question for a in demo_authors()[RETAIN_AUTHORS] for i in a.items]
    assert flag_rate(bank, embedder, prompts) <= 0.02


@pytest.mark.parametrize("source", ["world_facts", "real_authors", "tofu_other_authors", "name_templates"])
def test_held_out_general_questions_are_rarely_flagged(bank, embedder, pools, source):
    """Measured: world facts 0/33, real authors 0/38, other TOFU authors 2/218, name templates 1/90."""
    assert flag_rate(bank, embedder, heldout_prompts(pools, source)) <= 0.05


def test_held_out_generic_chat_is_not_flagged(bank, embedder, pools):
    """Measured: 1/26."""
    assert flag_rate(bank, embedder, heldout_prompts(pools, "generic")) <= 0.05


def test_a_lone_common_first_name_is_not_a_mention():
    matcher = AliasMatcher(["Basil Mahfouz Al-Kuwaiti"])
    assert matcher.find("I love basil pesto with pasta.") == []
    assert matcher.find("Naguib Mahfouz won the Nobel Prize.") == []  # a middle name alone neither
    assert AliasMatcher(["Ji-Yeon Park"]).find("Where can I park near the station?") == []


# --- bank ---------------------------------------------------------------------------------------------------------




@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_bank_scores_are_each_heads_best_text_and_hits_have_an_alias_or_evidence(bank, artifacts, embedder,
                                                                                 conversation):
    result = bank.score(conversation)
    texts = texts_to_embed(conversation)
    for tid, artifact in artifacts.items():
        head = float(artifact.probabilities(embedder.encode(texts)).max()) if texts else 0.0
        hit = next((h for h in result.hits if h.target_id == tid), None)
        if hit is None or not hit.alias_spans:
            assert result.scores[tid] == pytest.approx(head, abs=1e-5)
        if hit is not None and not hit.alias_spans:  # a head alone: it fired on a text naming something of its own
            assert head >= artifact.threshold
            assert any(tid in EntityIndex({tid: artifact.entities}).evidence(text).linked for text in texts)
    assert result.embeddings.shape == (len(texts), embedder.dim)
    assert 0 <= result.embed_seconds <= result.total_seconds


def test_bank_scores_many_conversations_as_it_scores_each(artifacts, embedder):
    """One embedding call for a batch gives every conversation the verdict it gets alone (and an empty one none).

    The embedding cache is off, so the batch's texts really are embedded together (padded to the longest).
    """
    bank = ClassifierBank.from_artifacts(artifacts, Embedder(cache_size=0))
    conversations = [*CONVERSATIONS, []]
    batch = bank.score_many(conversations)
    for conversation, result in zip(conversations, batch, strict=True):
        alone = bank.score(conversation)
        assert result.scores == pytest.approx(alone.scores, abs=1e-5)
        assert [(h.target_id, h.alias_spans) for h in result.hits] == [(h.target_id, h.alias_spans) for h in alone.hits]
        assert np.allclose(result.embeddings, alone.embeddings, atol=1e-5)
    assert batch[-1].hits == [] and batch[-1].embeddings.shape == (0, embedder.dim)


def test_bank_hits_are_sorted_and_at_or_over_threshold(bank, artifacts):
    result = bank.score([("user", "Compare Nikolai Abilov and Basil Mahfouz Al-Kuwaiti.")])
    assert [h.target_id for h in result.hits] != []
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    for hit in result.hits:
        assert hit.score >= artifacts[hit.target_id].threshold


def test_empty_bank_has_no_hits(embedder):
    result = ClassifierBank.from_artifacts({}, embedder).score([("user", "Tell me about Nikolai Abilov.")])
    assert result.hits == [] and result.scores == {}


def test_bank_refuses_artifacts_from_another_embedding_model(artifacts, embedder):
    artifact = next(iter(artifacts.values()))
    foreign = PromptClassifierArtifact(**{**artifact.__dict__, "embedder_id": "other-model:384"})
    with pytest.raises(ValueError, match="fitted with"):
        ClassifierBank.from_artifacts({"x": foreign}, embedder)
