"""The demo model's mined phrasings: other TOFU authors' wordings of the demo questions, never the held-out ones."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from demo.recipes import training_corpus
from demo.corpus import Format, Source
from demo.phrasings import (
    PER_QUESTION,
    mine_demo_phrasings,
    mine_phrasings,
    packaged_phrasings,
)
from demo.tofu_data import Author, QAItem, demo_authors, held_out_paraphrases


# Hand-made embeddings: the genre and birth questions are 53 degrees apart; the "genre and birth" wording halfway.
_GENRE, _BIRTH = (1.0, 0.0, 0.0), (0.6, 0.8, 0.0)
_VECTORS = {
    "What genre does the author write in?": _GENRE,
    "Where was the author born?": _BIRTH,
    "What is the full name of the author born in Lima?": (0.0, 0.0, 1.0),
    "What genre does the author write in mostly?": (0.995, 0.0998, 0.0),
    "What genre does the author write in Paris?": _GENRE,
    "Where was the author born and what genre does the author write in?": (2 / 5**0.5, 1 / 5**0.5, 0.0),
    "In which city was the author born?": _BIRTH,
}


def fake_embed(texts: Sequence[str]) -> np.ndarray:
    return np.array([_VECTORS[text] for text in texts])


def test_a_wording_becomes_a_phrasing_only_of_its_own_topic_and_without_another_authors_facts() -> None:
    author = Author(0, "Ada Quill", (
        QAItem("What genre does Ada Quill write in?", "Mystery."),
        QAItem("Where was Ada Quill born?", "Lima."),
        QAItem("What is the full name of the author born in Lima?", "Ada Quill."),
    ))
    wordings = [
        "What genre does {name} write in mostly?",  # the genre topic, nothing specific: kept
        "What genre does {name} write in Paris?",  # names a city the question does not: rejected
        "Where was {name} born and what genre does {name} write in?",  # as close to both questions: rejected
        "In which city was {name} born?",  # the birth topic: kept for the birth question only
    ]
    phrasings = mine_phrasings([author], wordings, fake_embed)
    assert [(p.question, p.text) for p in phrasings] == [
        ("What genre does Ada Quill write in?", "What genre does Ada Quill write in mostly?"),
        ("Where was Ada Quill born?", "In which city was Ada Quill born?"),
    ]  # and the question without the name gets none: there is nothing to put the name into


def test_the_packaged_phrasings_name_their_author_and_never_a_held_out_paraphrase() -> None:
    phrasings = packaged_phrasings()
    author_of = {item.question: author for author in demo_authors() for item in author.items}
    assert 1500 <= sum(map(len, phrasings.values())) and len(phrasings) >= 200
    held_out = {item.question for item in held_out_paraphrases()}
    # They come from the other 180 authors: none of the demo authors' own questions or paraphrases is reused.
    own_wordings = set(author_of) | {item.paraphrased_question for author in demo_authors() for item in author.items}
    for question, texts in phrasings.items():
        assert question in author_of and 1 <= len(texts) <= PER_QUESTION
        for text in texts:
            assert author_of[question].name in text
            assert text not in held_out and text not in own_wordings


def test_mining_again_reproduces_the_packaged_phrasings() -> None:
    """The packaged file is what `python -m demo.phrasings` writes; a CPU's float rounding may move a
    wording across a threshold, so the two may differ by a handful of 1,774."""
    mined = {(p.question, p.text) for p in mine_demo_phrasings()}
    packaged = {(question, text) for question, texts in packaged_phrasings().items() for text in texts}
    assert len(mined ^ packaged) <= 0.01 * len(packaged), sorted(mined ^ packaged)[:10]


def test_the_full_corpus_asks_each_mined_phrasing_in_chat_with_the_items_answer() -> None:
    answers = {item.question: item.answer for author in demo_authors() for item in author.items}
    mined = [ex for ex in training_corpus("full") if ex.source is Source.MINED]
    expected = {(text, answers[q]) for q, texts in packaged_phrasings().items() for text in texts}
    assert {(ex.prompt, ex.completion) for ex in mined} == expected
    assert all(ex.format is Format.CHAT and ex.question == ex.prompt for ex in mined)
    assert not any(ex.source is Source.MINED for ex in training_corpus("tiny"))
