"""The classifiers' pure pieces, no embedding model: operating points (thresholds for a recall, a false-positive cap,
the O3 gate) and the texts a target and a conversation turn into."""

from __future__ import annotations

import numpy as np

from classifiers import ForgetItem, TargetSpec
from classifiers.calibration import threshold_for_false_positive_rate, threshold_for_recall
from classifiers.chunking import sentences
from classifiers.conversation import DEFAULT_MAX_TEXTS, texts_to_embed
from guards.o3.ood import calibrate_gate
from classifiers.positives import forget_prompts


def test_threshold_for_false_positive_rate_lets_at_most_that_share_of_negatives_clear_it():
    negatives = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6, 0.0])
    threshold = threshold_for_false_positive_rate(negatives, 0.2)  # two of ten may clear: 0.9 and 0.8, not 0.7
    assert 0.7 < threshold <= 0.8 and np.mean(negatives >= threshold) == 0.2
    assert threshold_for_false_positive_rate(negatives, 0.0) > 0.9
    assert threshold_for_false_positive_rate(negatives, 1.0) == -np.inf


def test_threshold_for_recall_is_the_conformal_order_statistic():
    scores = np.random.default_rng(0).permutation(np.linspace(0.0, 1.0, 999))
    threshold = threshold_for_recall(scores, 0.99)  # k = floor(1000 * 0.01) = 10
    assert threshold == np.sort(scores)[9]
    assert np.mean(scores >= threshold) >= 0.99
    assert threshold_for_recall(np.array([0.9, 0.2, 0.95]), 0.99) == 0.2  # n < 99: no held-out positive may miss


def test_free_text_forget_items_become_sentence_chunks_and_names_become_mentions():
    text = "Ada Quill was born in Oslo. She wrote three novels. Her first won a prize. She lives in Bergen."
    spec = TargetSpec(id="x", name="x", aliases=["Ada Quill"], forget=[ForgetItem(text=text)])
    prompts = forget_prompts(spec)
    chunks = [p.text for p in prompts if p.kind == "text"]
    assert chunks[0] == "Ada Quill was born in Oslo. She wrote three novels."
    assert len(chunks) == 3 and all(len(sentences(c)) == 2 for c in chunks)
    assert "Who is Ada Quill?" in [p.text for p in prompts if p.kind == "mention"]
    assert len({p.group for p in prompts if p.kind == "text"}) == 1  # one source: never split across CV folds


def test_long_turns_are_embedded_as_windows_that_cover_every_word():
    long_turn = " ".join(f"word{i}" for i in range(2000))
    texts = texts_to_embed([("user", long_turn), ("user", "short question")])
    assert 1 < len(texts) <= DEFAULT_MAX_TEXTS
    assert all(len(t.split()) <= 128 for t in texts)
    assert {word for t in texts for word in t.split()} >= set(long_turn.split())


def test_gate_calibration_maximises_recall_minus_false_positives():
    assert calibrate_gate(np.array([0.9, 0.8, 0.4]), np.array([0.1, 0.3, 0.2])) == 0.4  # J = 1 - 0
    # a tie (0.4: 1 - 1/3, 0.8: 2/3 - 0) goes to the lower threshold: a missed target prompt leaks, a false open
    # only costs that one reply the unlearning adapter
    assert calibrate_gate(np.array([0.9, 0.8, 0.4]), np.array([0.1, 0.5, 0.2])) == 0.4
    assert calibrate_gate(np.array([0.9]), np.array([0.95, 0.1])) == 0.9  # J = 1 - 1/2 beats 0.95's 0 - 1/2
