"""GUARD's ban, calibrated against the served model on an invented stand-in of the target (``guards.never_seen``).

GUARD's published form bans every token that would spell a forbidden phrase (−inf). That stops the phrase, but a
memorised answer then scores as impossible, far *less* likely than a never-seen author's answer would be (measured on
forget01: the gold answer's NLL 53 under GUARD against 14.7 for a never-seen author; Forget Quality 4·10⁻¹²): the
over-forgetting a reader of logprobs, and TOFU's truth ratio, notice. The ``guard_calibrate`` job finds a finite ban
penalty instead: the one at which the real answers are as likely as a stranger's, raised until the greedy replies say
no more of them than a stranger's would, or than the strongest ban does (``guards.never_seen.calibrate_strength``).

It runs after registration beside ``guard_phrases`` (which protects within seconds, with −inf bans) and publishes
``ban`` with the digest of the phrase table it was calibrated on: the planner applies it only to that very table, so a
patched target is banned outright again until its own calibration ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from classifiers.types import TargetSpec
from guards.devices import Placement
from guards.guard.payload import PhraseTable
from guards.guard.phrase_matcher import PhraseGuardHook, Vocabulary
from guards.guard.phrases import alias_phrases
from guards.never_seen import calibrate_hooks, calibration_sample, entity_names, measure_reference, sample_key
from guards.probe import HookFactory, ModelProbe

MAX_BAN = 40.0  # a logit penalty this large already removes a token as surely as -inf at any realistic margin


def phrase_table(spec: TargetSpec) -> PhraseTable:
    """The table ``guard_phrases`` stores for this registration (the same extraction, so the same digest)."""
    from guards.guard.mechanism import forget_item_phrases

    return PhraseTable(tuple(alias_phrases(spec.aliases)), tuple(forget_item_phrases(spec)))


def calibrate_ban(model_dir: Path, spec: TargetSpec, max_phrases: int, soft_penalty: float, seed: int,
                  placement: Placement | None = None,
                  progress: Callable[[str], None] = lambda message: None,
                  checkpoint: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """The ban penalty for ``spec``'s phrase table and the figures that justify it (JSON-safe, for the state);
    ``checkpoint`` runs before each forward pass (``ModelProbe``)."""
    table = phrase_table(spec)
    forget = [(item.question or "", item.answer or "") for item in spec.forget]
    if not any(question and answer for question, answer in forget):
        # Text-only forget items (a book's passages): there is no question to ask the invented stand-in. The ban
        # stays -inf and the target is not held "preparing" or "failed" for a calibration that cannot exist.
        return {"ban": None, "ban_table": table.digest,
                "calibration": {"skipped": "no question/answer forget items to calibrate on"}}
    probe = ModelProbe(model_dir, placement, checkpoint)
    vocabulary = Vocabulary.from_tokenizer(probe.tokenizer)
    names = entity_names(spec.name, spec.aliases)
    pairs = calibration_sample(forget, sample_key(seed, names))
    item_of = {question: index for index, (question, _) in enumerate(forget)}
    progress("measuring the served model on an invented stand-in")
    reference = measure_reference(probe, pairs, names, seed)

    def hooks(ban: float) -> Callable[[int], HookFactory]:
        def for_pair(index: int) -> HookFactory:
            # As the planner ranks a registered question's phrases: its own item first (retrieval finds it).
            own = item_of[pairs[index].question]
            phrases = table.ranked([own, *(i for i in range(len(forget)) if i != own)], max_phrases)

            def factory(prompt_ids: Sequence[int], output_ids: list[int]) -> list[Any]:
                return [PhraseGuardHook(phrases, soft_penalty, vocabulary, prompt_ids, output_ids, ban)]

            return factory

        return for_pair

    calibration = calibrate_hooks(probe, reference, hooks, 0.0, MAX_BAN, progress)
    return {"ban": round(calibration.strength, 4), "ban_table": table.digest,
            "calibration": {**reference.figures(), **calibration.figures()}}
