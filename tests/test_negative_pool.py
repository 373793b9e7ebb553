"""The classifiers' built-in negative pool: its packaged TOFU part is exactly what `python -m demo.negative_pool`
writes, and the pool is that part followed by the hand-written everyday prompts."""

from __future__ import annotations

from pathlib import Path

from classifiers.negatives import (
    GENERIC_PROMPTS,
    NEGATIVE_POOL_FILE,
    builtin_negative_pool,
    load_negatives,
    negatives_for,
)
from classifiers.types import ForgetItem, TargetSpec
from demo.author_split import HELDOUT_CHAT_PROMPTS, POOL, authors_in, general_questions, tofu_authors
from demo.negative_pool import tofu_negatives, write_negative_pool


def test_the_packaged_pool_is_what_the_generator_writes(tmp_path: Path) -> None:
    written = tmp_path / "negative_pool.jsonl"
    write_negative_pool(tofu_negatives(), written)
    assert written.read_bytes() == NEGATIVE_POOL_FILE.read_bytes(), "rewrite it with `python -m demo.negative_pool`"


def test_the_builtin_pool_is_the_packaged_negatives_then_the_everyday_prompts_each_text_once() -> None:
    pool = builtin_negative_pool()
    packaged = load_negatives()
    assert {n.source for n in packaged} == {"tofu_other_authors", "world_facts", "real_authors", "name_templates"}
    assert list(pool[: len(packaged)]) == packaged
    packaged_texts = {n.text for n in packaged}
    assert [n.text for n in pool[len(packaged) :]] == [text for text in GENERIC_PROMPTS if text not in packaged_texts]
    assert {n.source for n in pool[len(packaged) :]} == {"generic"}
    assert len({n.text for n in pool}) == len(pool)


def test_the_pool_holds_only_its_split_authors_and_a_third_is_kept_for_calibration() -> None:
    """Nothing of the held-out or registrable TOFU authors, nor of the held-out general questions, is in the pool;
    every text of a calibration author is marked for calibration, so no author is both fitted on and calibrated on."""
    pool = builtin_negative_pool()
    texts = {n.text for n in pool}
    for author in tofu_authors():
        if author.index not in POOL:
            assert not texts & {item.question for item in author.items}, author.index
    assert not texts & {question for _, question in general_questions("heldout")}
    assert not texts & set(HELDOUT_CHAT_PROMPTS)
    for author in authors_in(POOL):
        marks = {n.calibration for n in pool if n.text in {item.question for item in author.items}}
        assert len(marks) == 1, author.index
    share = sum(n.calibration for n in pool) / len(pool)
    assert 0.25 <= share <= 0.4
    assert not {n.text for n in pool if n.calibration} & {n.text for n in negatives_for(
        TargetSpec("t", "t", ["Nobody Registered"], [ForgetItem(text="x")]))}
