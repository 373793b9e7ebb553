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
