"""The prompts a target's classifier must flag, generated from its registration: forget questions, its forget texts
and answers cut into chunks, requests naming it (templates x name forms), and its questions re-asked with the
other forms of its name.

Every prompt carries a `group`: prompts derived from the same source (a question and its re-namings, the chunks of
one text) share one, so cross-validation never scores a prompt with a near-copy of it in the training fold.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from classifiers.aliases import AliasMatcher, expand_variants
from classifiers.chunking import text_chunks
from classifiers.templates import MENTION_TEMPLATES
from classifiers.types import TargetSpec

RENAMED_VARIANTS_PER_QUESTION = 2


@dataclass(frozen=True)
class Positive:
    text: str
    group: int
    kind: str  # "question" | "answer" | "text" | "mention" | "renamed"


def forget_prompts(spec: TargetSpec, *, seed: int = 0) -> list[Positive]:
    """Positives for `spec`, deterministic for a given seed; duplicates removed (first occurrence kept)."""
    rng = random.Random(seed)
    matcher = AliasMatcher(spec.aliases)
    name_forms = expand_variants(spec.aliases) if spec.aliases else []
    out: list[Positive] = []
    group = 0
    for item in spec.forget:
        if item.question:
            out.append(Positive(item.question, group, "question"))
            out.extend(Positive(t, group, "renamed") for t in _renamed(item.question, matcher, name_forms, rng))
        for source, kind in ((item.answer, "answer"), (item.text, "text")):
            if source:
                out.extend(Positive(chunk, group, kind) for chunk in text_chunks(source))
        group += 1
    for template in MENTION_TEMPLATES:
        out.extend(Positive(template.format(name=form), group, "mention") for form in name_forms)
        group += 1
    unique: dict[str, Positive] = {}
    for p in out:
        unique.setdefault(p.text, p)
    return list(unique.values())


def _renamed(question: str, matcher: AliasMatcher, name_forms: list[str], rng: random.Random) -> list[str]:
    """`question` with its first name mention replaced by other forms of the name ("Basil Al-Kuwaiti", ...)."""
    spans = sorted(matcher.find(question), key=lambda s: s.start)
    if not spans:
        return []
    span = spans[0]
    mentioned = question[span.start : span.end]
    others = [form for form in name_forms if form != mentioned]
    chosen = rng.sample(others, min(RENAMED_VARIANTS_PER_QUESTION, len(others)))
    return [question[: span.start] + form + question[span.end :] for form in chosen]
