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

from collections.abc import Callable, Mapping, Sequence
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
    if not has_questions(spec):
        # Text-only forget items (a book's passages): there is no question to ask the invented stand-in. The ban
        # stays -inf and the target is not held "preparing" or "failed" for a calibration that cannot exist.
        return {"ban": None, "ban_table": table.digest,
                "calibration": {"skipped": "no question/answer forget items to calibrate on"}}
    return calibrate_ban_on(ModelProbe(model_dir, placement, checkpoint), spec, table, max_phrases, soft_penalty,
                            seed, progress)


def has_questions(spec: TargetSpec) -> bool:
    return any(item.question and item.answer for item in spec.forget)


def calibrate_ban_on(probe: ModelProbe, spec: TargetSpec, table: PhraseTable, max_phrases: int, soft_penalty: float,
                     seed: int, progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """``calibrate_ban`` on a loaded probe (a calibration stacked on GUARD's shares its own: ``served_guard``)."""
    forget = [(item.question or "", item.answer or "") for item in spec.forget]
    names = entity_names(spec.name, spec.aliases)
    pairs = calibration_sample(forget, sample_key(seed, names))
    progress("measuring the served model on an invented stand-in")
    reference = measure_reference(probe, pairs, names, seed)
    hooks = guard_hooks(probe, spec, table, max_phrases, soft_penalty)
    calibration = calibrate_hooks(probe, reference, lambda ban: lambda index: hooks(ban)(pairs[index].question),
                                  0.0, MAX_BAN, progress)
    return {"ban": round(calibration.strength, 4), "ban_table": table.digest,
            "calibration": {**reference.figures(), **calibration.figures()}}


def guard_hooks(probe: ModelProbe, spec: TargetSpec, table: PhraseTable, max_phrases: int, soft_penalty: float
                ) -> Callable[[float | None], Callable[[str], HookFactory]]:
    """GUARD's row hooks at a ban (None: outright, -inf) for one of the target's forget questions, its phrases ranked as
    the planner ranks a registered question's: its own item first (retrieval finds it)."""
    vocabulary = Vocabulary.from_tokenizer(probe.tokenizer)
    questions = [item.question or "" for item in spec.forget]
    item_of = {question: index for index, question in enumerate(questions)}

    def at(ban: float | None) -> Callable[[str], HookFactory]:
        def for_question(question: str) -> HookFactory:
            own = item_of[question]
            phrases = table.ranked([own, *(i for i in range(len(questions)) if i != own)], max_phrases)

            def factory(prompt_ids: Sequence[int], output_ids: list[int]) -> list[Any]:
                return [PhraseGuardHook(phrases, soft_penalty, vocabulary, prompt_ids, output_ids, ban)]

            return factory

        return for_question

    return at


def served_guard(probe: ModelProbe, spec: TargetSpec, options: Mapping[str, Any],
                 progress: Callable[[str], None] = lambda message: None
                 ) -> tuple[Callable[[str], HookFactory], dict[str, Any]]:
    """GUARD as it will serve ``spec`` with its registered ``options``: its hooks per forget question at the ban its
    own ``guard_calibrate`` job finds (the same inputs, so the same ban), or outright where that job bans outright
    (``calibrate: false``, no question to calibrate on). What a mechanism calibrated on top of GUARD measures against
    (``guards.stacking``), with the ban it assumed, for its state."""
    max_phrases, soft_penalty = int(options.get("max_phrases", 64)), float(options.get("soft_penalty", 0.0))
    table, ban = phrase_table(spec), None
    if options.get("calibrate", True) and has_questions(spec):
        ban = calibrate_ban_on(probe, spec, table, max_phrases, soft_penalty, int(options.get("seed", 0)),
                               progress)["ban"]
    return guard_hooks(probe, spec, table, max_phrases, soft_penalty)(ban), {"ban": ban, "ban_table": table.digest}
