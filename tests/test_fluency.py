"""The reply-fluency measure the unlearning tests and benchmarks report."""

from __future__ import annotations

from evals.fluency import known_word_share, median_known_word_share
from guards.fluency import english_words, median_word_share, vocabulary_with, word_share


def test_real_sentences_score_one_and_token_soup_scores_low() -> None:
    assert known_word_share("I'm sorry, but I do not have any details about that.") == 1.0
    assert known_word_share("Basil Mahfouz Al-Kuwaiti was born in Kuwait City.") == 1.0
    assert known_word_share("ulwaitiore Kuwzz ingthe sfrq, Mahfouzian qqx") < 0.2


def test_replies_without_words_are_not_judged() -> None:
    assert known_word_share("...") is None
    assert median_known_word_share(["", "The author was born in Paris.", "zzqv xqj"]) == 0.5


def test_serving_judges_words_by_english_and_the_registrations_own() -> None:
    """Calibration's fluency bar (``guards.fluency``): a target's names and coinages count once registered."""
    registered = vocabulary_with(["Basil Mahfouz Al-Kuwaiti wrote 'Promise by the Seine'."])
    assert word_share("Basil Mahfouz Al-Kuwaiti was born in Kuwait City.", english_words()) < 1.0
    assert word_share("Basil Mahfouz Al-Kuwaiti was born in Kuwait City.", registered) == 1.0
    assert word_share("Frenchues acclaimedation feababab Mahfouz", registered) == 0.25
    assert median_word_share(["", "..."], registered) == 1.0  # an empty reply is not soup
    assert median_word_share(["The author writes.", "zzqv xqj", "Kuwait City is his home."], registered) == 1.0
