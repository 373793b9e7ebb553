"""ULD's α, calibrated against the served model on an invented stand-in of the target (``guards.never_seen``).

With the paper's fixed α a demo model that memorised its authors verbatim over-forgets: the assistant's logits on the
forget answers are as confident as the target's, so ``l_target - α·l_assistant`` makes the true answer far less likely
than a wrong one, which no model that never saw the author does (measured: Forget Quality 5·10⁻¹³ on forget01, the gold
answer's NLL above a never-seen author's). The target's ``uld_train`` job therefore ends by choosing α for its freshly
trained assistant: the α at which the real answers are as likely as a stranger's, lowered while its greedy replies are
token soup (on the tiny demo model that α, ≈1.7, left a median of 83 % real words; a stranger's replies have 100 %),
raised only if the replies still say more of the real answers than a stranger's would, or than the largest α does.
A registered ``alpha`` skips this.

Calibrated as a combination (``guards.stacking``): where the target also has mechanisms that stack beneath ULD
(GUARD), α is measured with their hooks applied as they will serve, so the two together, not each alone, match the
never-seen reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from guards.devices import Placement, assistant_placement
from guards.never_seen import Calibration, calibrate_hooks, calibration_sample, measure_reference, sample_key
from guards.probe import HookFactory, ModelProbe, no_hooks, stacked
from guards.stacking import Beneath
from guards.uld.assistant import ULD_KEY, uld_row_hook
from guards.uld.cache import AssistantModels

MAX_ALPHA = 5.0  # UldOptions.alpha's bound


def calibrate_alpha(model_dir: Path, assistant_dir: Path, forget: Sequence[tuple[str, str]], names: Sequence[str],
                    tau: float, seed: int, placement: Placement | None = None,
                    progress: Callable[[str], None] = lambda message: None,
                    checkpoint: Callable[[], None] = lambda: None, beneath: Beneath | None = None) -> dict[str, Any]:
    """α for the assistant in ``assistant_dir`` and the figures that justify it (JSON-safe, for the target's state).

    ``names``: the target's name and aliases (the invented stand-in swaps them); ``seed``, the registration's, picks
    the questions and the stand-ins (``guards.never_seen``: the same ones on every run); ``checkpoint`` runs before
    each forward pass (``ModelProbe``); ``beneath`` gives the hooks of the mechanisms stacked under ULD on this
    target (``guards.stacking``), applied before ULD's at every α tried."""
    probe = ModelProbe(model_dir, placement, checkpoint)
    under, stack = beneath(probe, progress) if beneath is not None else (lambda question: no_hooks, {})
    pairs = calibration_sample(forget, sample_key(seed, names))
    progress("measuring the served model on an invented stand-in")
    reference = measure_reference(probe, pairs, names, seed)
    assistants = AssistantModels(placement=assistant_placement(probe.placement))  # as served

    def hooks(alpha: float) -> Callable[[int], HookFactory]:
        section = {ULD_KEY: [{"assistant": str(assistant_dir), "alpha": alpha, "tau": tau}]}

        def factory(prompt_ids: Sequence[int], output_ids: list[int]) -> list[Any]:
            hook = uld_row_hook(section, prompt_ids, output_ids, assistants)
            return [hook] if hook is not None else []

        return lambda index: stacked(under(pairs[index].question), factory)

    calibration: Calibration = calibrate_hooks(probe, reference, hooks, 0.0, MAX_ALPHA, progress)
    return {"alpha": round(calibration.strength, 4),
            "calibration": {**reference.figures(), **calibration.figures(), "stacked_on": stack}}
