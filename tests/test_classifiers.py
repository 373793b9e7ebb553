"""The prompt classifier and O3 gate on TOFU: the forget01 authors are the targets.

Set-up mirrors a real registration: each target gives its name as alias, its 20 TOFU question/answer pairs as forget
items (never the paraphrased questions, which are the held-out positives here) and nine other demo authors as retain
items. False positives are measured on prompts the heads never saw: nine further demo authors, and the held-out 30 %
of the built-in negative pool (world facts, real authors, generic chat, other TOFU authors). Fits run once per module.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from classifiers import (
    AliasIndex,
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
from classifiers.negatives import builtin_negative_pool, calibration_negatives, split_by_hash
from demo.tofu_data import authors_of, demo_authors
from guards.o3.ood import OODArtifact, OODBank, fit_gaussian, fit_ood_detector, mahalanobis

RETAIN_AUTHORS = slice(0, 9)
UNSEEN_AUTHORS = slice(9, 18)


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    # One torch thread: the embeddings are tiny, and on a shared 2-core host OpenMP threads spin against each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Embedder()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pools():
    """(fit, held-out) split of the built-in negative pool."""
    return split_by_hash(builtin_negative_pool(), heldout_fraction=0.3)


@pytest.fixture(scope="module")
def specs() -> dict[str, TargetSpec]:
    retain = [ForgetItem(i.question, i.answer) for a in demo_authors()[RETAIN_AUTHORS] for i in a.items]
    return {
        f"tofu-{a.index}": TargetSpec(
            id=f"tofu-{a.index}",
            name=a.name.lower().replace(" ", "-"),
            aliases=[a.name],
            forget=[ForgetItem(question=i.question, answer=i.answer) for i in a.items],
            retain=retain,
        )
        for a in authors_of("forget01")
    }


@pytest.fixture(scope="module")
def artifacts(specs, embedder, pools) -> dict[str, PromptClassifierArtifact]:
    return {tid: fit_prompt_classifier(spec, embedder, negative_pool=pools[0]) for tid, spec in specs.items()}


@pytest.fixture(scope="module")
def bank(artifacts, embedder) -> ClassifierBank:
    return ClassifierBank.from_artifacts(artifacts, embedder)


@pytest.fixture(scope="module")
def ood_artifacts(specs, embedder, pools) -> dict[str, OODArtifact]:
    return {tid: fit_ood_detector(spec, embedder, negative_pool=pools[0]) for tid, spec in specs.items()}


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


# --- aliases ------------------------------------------------------------------------------------------------------


def test_alias_spans_are_character_offsets_into_the_original_text():
    text = "Did BASIL  Mahfouz Al-Kuwaití's novels sell?"
    (span,) = AliasMatcher(["Basil Mahfouz Al-Kuwaiti"]).find(text)
    assert text[span.start : span.end] == "BASIL  Mahfouz Al-Kuwaití"
    assert span.score == pytest.approx(1.0)


def test_alias_forms_score_by_how_much_of_the_name_they_give():
    matcher = AliasMatcher(["Basil Mahfouz Al-Kuwaiti"])
    full = matcher.matches("Basil Mahfouz Al-Kuwaiti")
    two_parts = matcher.matches("Basil Al-Kuwaiti")
    surname = matcher.matches("Al-Kuwaiti")
    typo = matcher.matches("Basil Mahfouz Al Kuwaity")
    assert full == 1.0 > two_parts > surname > 0
    assert 0.9 < typo < 1.0


def test_alias_index_finds_each_target_among_many():
    rng = np.random.default_rng(0)
    syllables = ["ka", "ro", "mi", "tel", "van", "shu", "dor", "ine", "bal", "zek"]
    names = {f"t{i}": ["".join(rng.choice(syllables, 3)).title() + " " + "".join(rng.choice(syllables, 4)).title()]
             for i in range(300)}
    index = AliasIndex(names)
    for tid in ("t0", "t123", "t299"):
        found = index.find(f"What did {names[tid][0]} write?")
        assert tid in found


# --- bank ---------------------------------------------------------------------------------------------------------


CONVERSATIONS = [
    [("user", "What genre does Nikolai Abilov write in?")],
    [("user", "Can you tell me the complete name of the writer born in Kuwait City in 1956?")],
    [("user", "What is the capital of France?")],
    [("user", "Tell me about Basil Al-Kuwaiti"), ("assistant", "Sure."), ("user", "And his parents?")],
    [("system", "Be brief."), ("user", "Write a haiku about rain.")],
]


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


# --- artifacts ----------------------------------------------------------------------------------------------------


def test_prompt_classifier_artifact_round_trips_through_disk(artifacts, tmp_path):
    artifact = artifacts["tofu-19"]
    loaded = PromptClassifierArtifact.load(artifact.save(tmp_path / "head"))
    np.testing.assert_array_equal(loaded.weights, artifact.weights)
    assert {k: v for k, v in loaded.__dict__.items() if k != "weights"} == {
        k: v for k, v in artifact.__dict__.items() if k != "weights"
    }
    assert loaded.content_hash() == artifact.content_hash()
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["arrays.npz", "meta.json"]


def test_artifact_of_another_kind_is_refused(ood_artifacts, tmp_path):
    path = ood_artifacts["tofu-19"].save(tmp_path / "ood")
    with pytest.raises(ValueError, match="not 'lethe.prompt_classifier'"):
        PromptClassifierArtifact.load(path)


def test_fitting_is_deterministic(specs, embedder, pools, artifacts):
    again = fit_prompt_classifier(specs["tofu-18"], embedder, negative_pool=pools[0])
    assert again.content_hash() == artifacts["tofu-18"].content_hash()


def test_fitting_reports_progress_up_to_done(specs, embedder, pools):
    seen: list[float] = []
    fit_prompt_classifier(specs["tofu-19"], embedder, negative_pool=pools[0], progress=lambda f, _: seen.append(f))
    assert seen == sorted(seen) and seen[0] == 0.0 and seen[-1] == 1.0


def test_a_target_without_enough_forget_data_is_refused(embedder):
    spec = TargetSpec(id="x", name="x", aliases=[], forget=[ForgetItem(question="Who is X?")])
    with pytest.raises(ValueError, match="at least 2 sources"):
        fit_prompt_classifier(spec, embedder)


# --- O3 gate ------------------------------------------------------------------------------------------------------


def test_ood_weight_is_high_for_target_paraphrases_and_low_for_negatives(ood_artifacts, embedder, pools):
    negatives = embedder.encode([n.text for n in pools[1]])
    for author in authors_of("forget01"):
        artifact = ood_artifacts[f"tofu-{author.index}"]
        paraphrases = embedder.encode([i.paraphrased_question for i in author.items])
        assert np.median(artifact.weights(paraphrases)) > 0.9
        assert np.mean(artifact.weights(paraphrases) > 0.5) >= 0.9
        assert np.median(artifact.weights(negatives)) < 0.05
        assert np.mean(artifact.weights(negatives) > 0.5) <= 0.05


def test_the_calibrated_gate_opens_for_target_paraphrases_and_stays_shut_for_negatives(ood_artifacts, embedder, pools):
    negatives = embedder.encode([n.text for n in pools[1]])
    bank = OODBank(ood_artifacts, embedder)
    for author in authors_of("forget01"):
        tid = f"tofu-{author.index}"
        artifact = ood_artifacts[tid]
        assert artifact.gate_heldout_recall >= 0.9 and artifact.gate_false_positive_rate <= 0.02
        paraphrases = embedder.encode([i.paraphrased_question for i in author.items])
        opened = [tid in bank.open_gates(row[None, :]) for row in paraphrases]
        assert np.mean(opened) >= 0.9
        assert np.mean(artifact.weights(negatives) >= artifact.gate_threshold) <= 0.03


def test_ood_bank_equals_per_target_weights(ood_artifacts, embedder):
    bank = OODBank(ood_artifacts, embedder)
    for conversation in CONVERSATIONS:
        embeddings = embedder.encode(texts_to_embed(conversation))
        weights = bank.score(conversation)
        for tid, artifact in ood_artifacts.items():
            assert weights[tid] == pytest.approx(float(artifact.weights(embeddings).max()), abs=1e-5)


def test_ood_artifact_round_trips_through_disk(ood_artifacts, embedder, tmp_path):
    artifact = ood_artifacts["tofu-18"]
    loaded = OODArtifact.load(artifact.save(tmp_path / "ood"))
    probe = embedder.encode(["Where was Basil Mahfouz Al-Kuwaiti born?", "What is 2 + 2?"])
    np.testing.assert_allclose(loaded.weights(probe), artifact.weights(probe), rtol=1e-6)
    assert loaded.content_hash() == artifact.content_hash()


def test_low_rank_mahalanobis_equals_ledoit_wolf_inverse(embedder):
    x = embedder.encode([i.question for i in demo_authors()[0].items] + [i.answer for i in demo_authors()[0].items])
    probe = embedder.encode(["Who is Hsiao Yun-Hwa?", "How do I bake bread?"]).astype(np.float64)
    lw = LedoitWolf().fit(x.astype(np.float64))
    diff = probe - lw.location_
    expected = np.sqrt(np.einsum("nd,de,ne->n", diff, np.linalg.inv(lw.covariance_), diff))
    np.testing.assert_allclose(mahalanobis(fit_gaussian(x, max_rank=len(x)), probe), expected, rtol=1e-4)


# --- alias-only targets: registered, classifier not fitted yet ----------------------------------------------------


class CountingEmbedder:
    """A stand-in embedding model: a fixed vector per text, and a count of its calls."""

    dim = 4
    model_id = "counting:4"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        return np.tile(np.array([1.0, 0.0, 0.0, 0.0], np.float32), (len(texts), 1))


def test_a_bank_of_alias_only_targets_hits_on_a_mention_without_embedding_anything():
    embedder = CountingEmbedder()
    bank = ClassifierBank.from_artifacts({}, embedder, aliases={"new": ["Basil Mahfouz Al-Kuwaiti"]})
    assert len(bank) == 1
    named, unnamed = bank.score_many([[("user", "Where was basil mahfouz al-kuwaiti born?")],
                                      [("user", "Where was Nikolai Abilov born?")]])
    assert [h.target_id for h in named.hits] == ["new"] and named.hits[0].alias_spans
    assert named.hits[0].score == named.scores["new"] > 0.5
    assert unnamed.hits == [] and unnamed.scores == {"new": 0.0}
    assert named.embeddings.shape == (0, embedder.dim) and embedder.calls == 0


def test_alias_only_targets_sit_beside_fitted_heads_whose_aliases_are_the_registrys_current_ones():
    """A fitted head keeps its own verdict; a head-less target in the same bank is hit by its aliases alone; a fitted
    target's aliases patched since its fit are matched before its refit."""
    embedder = CountingEmbedder()
    fitted = PromptClassifierArtifact(embedder_id=embedder.model_id, weights=np.array([9.0, 0, 0, 0], np.float32),
                                      bias=0.0, threshold=0.5, false_positive_rate=0.0, heldout_recall=1.0, n_pos=1,
                                      n_neg=1, aliases=["Nikolai Abilov"], entities=["kuwait city"])
    current = {"new": ["Basil Mahfouz Al-Kuwaiti"], "fitted": ["Nikolai Abilov-Smith"]}
    bank = ClassifierBank.from_artifacts({"fitted": fitted}, embedder, aliases=current)
    assert bank.alias_only_ids == ["new"] and len(bank) == 2
    # The head fires on every text here; "Kuwait City" is its evidence, and a head-less target's name is no stranger.
    result = bank.score([("user", "Is Basil Mahfouz Al-Kuwaiti from Kuwait City?")])
    assert {h.target_id for h in result.hits} == {"fitted", "new"}
    assert result.embeddings.shape == (1, embedder.dim) and embedder.calls == 1
    assert bank.score([("user", "ignored")]).scores["new"] == 0.0
    renamed = bank.score([("user", "Who is Nikolai Abilov-Smith?")]).hits
    assert any(hit.target_id == "fitted" and hit.alias_spans for hit in renamed)
