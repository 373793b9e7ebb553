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

The phrases reach GUARD's row hook the way GUARD's own do, as a reference (``payload.py``), never as text: when the
snapshot loads, they are written as a small phrase artifact into the store the server lends (one folder per target,
``server.artifacts.interim_store``), and ``extra_args["lethe"]["guard"]`` names that artifact and the ranked items.
The audit record and the metrics name the protection ``interim``. It applies until the target's own gate and a gated
mechanism are ready; a ready mechanism that raises still refuses the request (fail closed).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from guards.base import MechanismPlan, PromptView
from guards.job_interface import ArtifactSink, JobTarget, target_spec
from guards.guard.mechanism import GuardOptions, forget_item_phrases
from guards.guard.payload import GUARD_KEY, PhraseTable, guard_payload, write_phrase_table
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
    """A target's interim bans, computed from its record: its phrase table (alias phrases and, per forget item, the
    phrases of its answer) and, per forget item, the words of its question (for ranking)."""

    table: PhraseTable
    item_words: tuple[frozenset[str], ...]

    def order_for(self, prompt_text: str) -> list[int]:
        """The forget items, those whose questions share most words with the prompt first."""
        asked = topic_words(prompt_text)
        overlap = [len(asked & item_words) for item_words in self.item_words]
        return sorted(range(len(self.table.items)), key=lambda i: -overlap[i])  # stable: ties keep registration order

    def phrases_for(self, prompt_text: str, limit: int = MAX_PHRASES) -> list[str]:
        """Aliases, then the phrases of the items whose questions the prompt is most about (see the module doc)."""
        return self.table.ranked(self.order_for(prompt_text), limit)


@dataclass(frozen=True)
class InterimBans:
    """A target's interim protection as a snapshot holds it: its phrases, and the artifact the engine reads them
    from."""

    phrases: InterimPhrases
    artifact: Path

    def phrases_for(self, prompt_text: str, limit: int = MAX_PHRASES) -> list[str]:
        return self.phrases.phrases_for(prompt_text, limit)


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
        table=PhraseTable(aliases=tuple(alias_phrases(spec.aliases)), items=tuple(forget_item_phrases(spec))),
        item_words=tuple(topic_words(item.question or item.text or "") for item in spec.forget),
    )


def _user_text(prompt: PromptView) -> str:
    return "\n".join(content for role, content in prompt.turns if role == "user") or prompt.text


class InterimProtection:
    """``guards.base.InterimGuard`` on GUARD's row hook."""

    name = INTERIM
    row_hook_key = GUARD_KEY

    def prepare(self, target: JobTarget, artifacts: ArtifactSink) -> InterimBans:
        """Compute the target's bans and store them as a phrase artifact in ``artifacts`` (content-addressed: a
        snapshot reload of an unchanged target finds the same artifact)."""
        phrases = interim_phrases(target.aliases, target.forget, target.retain)
        staging = artifacts.staging_dir()
        try:
            write_phrase_table(staging, phrases.table.aliases, phrases.table.items)
            digest = artifacts.commit(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # no half-written copy of the target's phrases left behind
            raise
        return InterimBans(phrases, artifacts.path(digest))

    def plan(self, prepared: InterimBans, prompt: PromptView) -> MechanismPlan:
        order = prepared.phrases.order_for(_user_text(prompt))
        if not prepared.phrases.table.ranked(order, MAX_PHRASES):
            raise ValueError("the target has no phrase to ban")  # the planner then refuses the request (fail closed)
        return MechanismPlan(processor_args=guard_payload(prepared.artifact, prepared.phrases.table, order,
                                                          MAX_PHRASES, SOFT_PENALTY))
