"""The alias index's lookup cost is bounded per token of the text, whatever the text holds: its fuzzy step (the
deletion neighbourhood of each run of tokens) is counted here on pathological inputs, not timed."""

from __future__ import annotations

import random
import string

import pytest

import classifiers.aliases as aliases
from classifiers.aliases import AliasIndex

NAMES = {"basil": ["Basil Mahfouz Al-Kuwaiti"], "nikolai": ["Nikolai Abilov"]}


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> tuple[AliasIndex, list[int]]:
    """An index, and the size of every deletion neighbourhood its lookups build from then on (the fuzzy step)."""
    index = AliasIndex(NAMES, common_words=frozenset())
    sizes: list[int] = []
    build = aliases._deletions

    def counting(word: str, depth: int) -> set[str]:
        variants = build(word, depth)
        sizes.append(len(variants))
        return variants

    monkeypatch.setattr(aliases, "_deletions", counting)
    return index, sizes


@pytest.mark.parametrize("length", [400, 1250])
def test_a_huge_word_costs_no_fuzzy_lookup(counted: tuple[AliasIndex, list[int]], length: int) -> None:
    index, sizes = counted
    index.find("Tell me about please.")
    without = sum(sizes)
    sizes.clear()
    word = "".join(random.Random(length).choices(string.ascii_lowercase, k=length))
    assert index.find(f"Tell me about {word} please.") == {}
    assert sum(sizes) == without  # the word adds nothing; unbounded, 400 letters built ~80,000 variants, 1,250 ~780,000


def test_lookup_work_grows_linearly_with_the_text(counted: tuple[AliasIndex, list[int]]) -> None:
    index, sizes = counted
    sentence = "Where was Basil Mahfous Al Kuwaity born, and what did Nikolai Abilof write? "
    assert set(index.find(sentence)) == {"basil", "nikolai"}
    once = sum(sizes)
    sizes.clear()
    index.find(sentence * 40)
    assert once > 0 and sum(sizes) <= 41 * once


def test_a_long_spaced_out_run_costs_no_fuzzy_lookup(counted: tuple[AliasIndex, list[int]]) -> None:
    """A run of single letters is read as one word ("B a s i l"): 5,000 of them make one word too long for any name,
    which is looked up exactly (a hash) and never fuzzily."""
    index, sizes = counted
    index.find("Tell me about please.")
    without = sum(sizes)
    sizes.clear()
    letters = " ".join(random.Random(5).choices(string.ascii_lowercase, k=5000))
    assert index.find(f"Tell me about {letters} please.") == {}
    assert sum(sizes) == without


def test_lookup_work_stays_linear_with_spelling_tricks(counted: tuple[AliasIndex, list[int]]) -> None:
    """Run-together names, spaced-out letters, digits for letters (two readings of "1") and look-alikes: the work per
    token stays bounded, so a text 40 times as long costs at most 41 times as much."""
    index, sizes = counted
    sentence = ("Was B a s i l  M a h f o u z born in Kuwait, did N1k0la1 Ab1l0v write, and what of "
                "basilmahfouzalkuwaiti or NikolaiAbilov or Nіkоlаі\u200b Аbіlоv? ")
    assert set(index.find(sentence)) == {"basil", "nikolai"}
    once = sum(sizes)
    sizes.clear()
    index.find(sentence * 40)
    assert once > 0 and sum(sizes) <= 41 * once
