"""Interim protection: GUARD's bans for a hit target none of whose own gated mechanisms is ready yet.

A target is served from the revision that registers it (SPEC §4: within the 2 s propagation budget), but its
classifier, its GUARD phrases and its trained mechanisms come from jobs that take seconds to minutes, and a classifier
fit can fail for good. Meanwhile the live bank detects it by its aliases alone, and a prompt that hits it would
otherwise have to be refused (a 503 would tell the client who is registered) or served unguarded. Instead it gets
the bans GUARD would apply, computed when the snapshot loads from the target's record alone, without any job:

- its aliases and their distinctive parts (``phrases.alias_phrases``);
- for the ``TOP_ITEMS`` forget items whose question (or text) shares most words with the prompt, every key phrase and
  content word of their answers: GUARD's retrieval, lexical instead of SBERT, since no embedding may be fitted yet;
- the key phrases of every other forget answer (``phrases.key_phrases``, against the built-in background and the
  target's retain data), up to ``MAX_PHRASES`` in all.

The phrases travel to GUARD's row hook (``extra_args["lethe"]["guard"]``, ``phrase_matcher.py``); the audit record
and the metrics name the protection ``interim``. It applies until the target's own gate and a gated mechanism are
ready; a ready mechanism that raises still refuses the request (fail closed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

from guards.base import JobTarget, MechanismPlan, PromptView, target_spec
from guards.guard.mechanism import GuardOptions, ItemPhrases, forget_item_phrases, ranked_phrases
from guards.guard.phrase_matcher import GUARD_KEY
from guards.guard.phrases import alias_phrases, stopwords, words

INTERIM = "interim"
MAX_PHRASES = 256  # no retrieval keys to rank by: room for every forget answer's key phrases of a TOFU-sized target
SOFT_PENALTY = GuardOptions().soft_penalty


def topic_words(text: str) -> frozenset[str]:
    """The lower-cased words of a text that say what it is about (no stopwords, no one- or two-letter words)."""
    stop = stopwords()
    return frozenset(w.lower() for w in words(text) if len(w) >= 3 and w.lower() not in stop)


@dataclass(frozen=True)
class InterimPhrases:
    """A target's interim bans, prepared once per snapshot: its alias phrases and, per forget item, the words of its
    question (for ranking) and the phrases of its answer."""

    aliases: tuple[str, ...]
    item_words: tuple[frozenset[str], ...]
    items: tuple[ItemPhrases, ...]

    def phrases_for(self, prompt_text: str, limit: int = MAX_PHRASES) -> list[str]:
        """Aliases, then the phrases of the items whose questions the prompt is most about (see the module doc)."""
        asked = topic_words(prompt_text)
        overlap = [len(asked & item_words) for item_words in self.item_words]
        order = sorted(range(len(self.items)), key=lambda i: -overlap[i])  # stable: ties keep registration order
        return ranked_phrases(self.aliases, self.items, order, limit)


def interim_phrases(aliases: Sequence[str], forget: Sequence[Mapping[str, str]],
                    retain: Sequence[Mapping[str, str]] = ()) -> InterimPhrases:
    """A target's interim bans from its contents; cached on them, so a snapshot reload recomputes only the targets
    that changed."""
    return _interim_phrases(json.dumps([list(aliases), [dict(i) for i in forget], [dict(i) for i in retain]]))


@lru_cache(maxsize=1024)
def _interim_phrases(contents: str) -> InterimPhrases:
    aliases, forget, retain = json.loads(contents)
    spec = target_spec(SimpleNamespace(id="", name="", aliases=aliases, forget=forget, retain=retain, mechanisms={}))
    return InterimPhrases(
        aliases=tuple(alias_phrases(spec.aliases)),
        item_words=tuple(topic_words(item.question or item.text or "") for item in spec.forget),
        items=tuple(forget_item_phrases(spec)),
    )


def _user_text(prompt: PromptView) -> str:
    return "\n".join(content for role, content in prompt.turns if role == "user") or prompt.text


class InterimProtection:
    """``guards.base.InterimGuard`` on GUARD's row hook."""

    name = INTERIM
    row_hook_key = GUARD_KEY

    def prepare(self, target: JobTarget) -> InterimPhrases:
        return interim_phrases(target.aliases, target.forget, target.retain)

    def plan(self, prepared: InterimPhrases, prompt: PromptView) -> MechanismPlan:
        phrases = prepared.phrases_for(_user_text(prompt))
        if not phrases:
            raise ValueError("the target has no phrase to ban")  # the planner then refuses the request (fail closed)
        return MechanismPlan(processor_args={"phrases": phrases, "penalty": SOFT_PENALTY})
