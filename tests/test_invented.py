"""Invented entities (``guards/invented.py``): a target's names swapped for invented ones, deterministically."""

from __future__ import annotations

import random
import re

import pytest

from demo.tofu_data import author_names, load_split
from guards.invented import invent_entity, with_invented_facts

ABILOV = ["Nikolai Abilov"]
AL_KUWAITI = ["Basil Mahfouz Al-Kuwaiti", "Basil Al-Kuwaiti"]


def test_every_mention_of_the_target_is_swapped_possessives_and_surname_alone_included() -> None:
    entity = invent_entity(ABILOV, seed=0)
    question = "How did Nikolai Abilov's parents shape Abilov? Ask Nikolai Abilov."
    swapped = entity.swap(question)
    given, surname = entity.name.split()
    assert "Nikolai" not in swapped and "Abilov" not in swapped, swapped
    assert swapped == f"How did {given} {surname}'s parents shape {surname}? Ask {given} {surname}."
    assert entity.mentions(question) and not entity.mentions(swapped)


def test_parts_of_several_aliases_map_consistently_and_back() -> None:
    entity = invent_entity(AL_KUWAITI, seed=3)
    text = "Basil Mahfouz Al-Kuwaiti, also Basil Al-Kuwaiti, or Al-Kuwaiti's books."
    swapped = entity.swap(text)
    assert not any(part in swapped for part in ("Basil", "Mahfouz", "Al-Kuwaiti")), swapped
    assert swapped.count(entity.parts["Al-Kuwaiti"]) == 3
    assert entity.restore(swapped) == text
    assert entity.restore(swapped.upper().replace("'S", "'s")).startswith("Basil Mahfouz Al-Kuwaiti,")


def test_words_that_only_contain_a_name_are_left_alone() -> None:
    entity = invent_entity(["May Park"], seed=0)
    assert entity.swap("Parkinson may visit the park in May. Park's novel") == (
        f"Parkinson may visit the park in {entity.parts['May']}. {entity.parts['Park']}'s novel")


def test_invented_names_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    assert invent_entity(ABILOV, seed=1) == invent_entity(ABILOV, seed=1)
    names = {invent_entity(ABILOV, seed=seed).name for seed in range(20)}
    assert len(names) >= 15, names
    assert invent_entity(ABILOV, seed=1).name != invent_entity(AL_KUWAITI, seed=1).name


def test_an_entity_needs_a_name() -> None:
    with pytest.raises(ValueError, match="name"):
        invent_entity(["", "  "], seed=0)


def test_invented_names_are_not_tofu_authors() -> None:
    """No invented surname or full name is a word of TOFU's 4,000 rows (its 200 authors' names among them), and no
    invented given name is a demo author's."""
    tofu_words = {word.casefold() for row in load_split("full") for text in (row["question"], row["answer"])
                  for word in re.findall(r"[\w'-]+", text)}
    demo_given = {name.split()[0].casefold() for name in author_names()}
    for seed in range(200):
        for names in (ABILOV, AL_KUWAITI, ["J.R. Tolkien"]):
            entity = invent_entity(names, seed)
            surname = entity.name.split()[-1].casefold()
            assert surname not in tofu_words, entity
            assert not {part.casefold() for part in entity.parts.values()} & demo_given, entity


BIRTH = ("The full name of the fictitious author born in Kuwait City, Kuwait on the 8th of September, 1956 is Basil "
         "Mahfouz Al-Kuwaiti. Author Basil Al-Kuwaiti wrote 'Promise by the Seine' and 12 other books.")


def test_a_stand_ins_answer_gets_invented_facts_in_the_same_form() -> None:
    """Places, months, titles and years are drawn anew; the target's own name parts (the swap's job), lower-case
    words, short numbers and a sentence's ordinary first word stay, so the answer keeps its form."""
    entity = invent_entity(AL_KUWAITI, seed=0)
    invented = with_invented_facts(BIRTH, list(entity.parts), random.Random(7))
    for fact in ("Kuwait", "City", "September", "1956", "Seine", "Promise"):
        assert not re.search(rf"\b{fact}\b", invented), invented
    pattern = (r"The full name of the fictitious author born in (\w+) (\w+), (\w+) on the 8th of (\w+), "
               r"([1-9]\d{3}) is Basil Mahfouz Al-Kuwaiti\. Author Basil Al-Kuwaiti wrote '(\w+) by the (\w+)' and 12 "
               r"other books\.")
    match = re.fullmatch(pattern, invented)
    assert match, invented
    kuwait, city, kuwait_again, month, _, promise, seine = match.groups()
    assert kuwait == kuwait_again and len({kuwait, city, month, promise, seine}) == 5, invented  # one word, one draw
    swapped = entity.swap(invented)
    assert not entity.mentions(swapped) and entity.name in swapped


def test_invented_facts_are_deterministic_per_draw() -> None:
    keep = ["Basil", "Mahfouz", "Al-Kuwaiti"]
    assert with_invented_facts(BIRTH, keep, random.Random(1)) == with_invented_facts(BIRTH, keep, random.Random(1))
    assert with_invented_facts(BIRTH, keep, random.Random(1)) != with_invented_facts(BIRTH, keep, random.Random(2))
