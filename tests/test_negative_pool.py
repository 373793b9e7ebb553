"""The classifiers' built-in negative pool: its packaged TOFU part is exactly what `python -m demo.negative_pool`
writes, and the pool is that part followed by the hand-written everyday prompts."""

from __future__ import annotations

from pathlib import Path

from classifiers.negatives import GENERIC_PROMPTS, NEGATIVE_POOL_FILE, builtin_negative_pool, load_negatives
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
