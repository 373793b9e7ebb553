"""Alias matching, classifier artifacts on disk, O3's OOD gate, and targets detected by their aliases alone before
their classifier is fitted (fixtures: ``conftest.py``)."""

from __future__ import annotations


import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from classifiers import (
    AliasIndex,
    AliasMatcher,
    ClassifierBank,
    ForgetItem,
    PromptClassifierArtifact,
    TargetSpec,
    fit_prompt_classifier,
)
from classifiers.conversation import texts_to_embed
from demo.tofu_data import authors_of, demo_authors
from guards.o3.ood import OODArtifact, OODBank, fit_gaussian, mahalanobis
from tests.classifiers.samples import CONVERSATIONS


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
