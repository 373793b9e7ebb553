"""Side channels closed, without the engine: what the engine is sent for a flagged prompt, and what a client may ask.

Each policy applies to every request alike; a refusal on flagged requests alone would itself say which prompts are
about a forget target. The same behaviours through the real engine: ``tests/test_side_channels.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

from guards.base import MechanismPlan, PlanRequest, PromptView, corruption_seed
from guards.eco.calibration import EcoCalibrator
from server.openai.protocol import ChatCompletionRequest
from server.openai.serving import OpenAIServing
from tests.test_pipeline import TARGET, FakeEngine, FakeMechanism, guarded

ALIASES = ["Tess Marlowe"]


# ---- ECO's noise does not follow the client's seed ------------------------------------------------------------------


class RecordingEco(FakeMechanism):
    """ECO's place in the mechanism order, recording the seed each plan is given."""

    def __init__(self) -> None:
        super().__init__("eco")
        self.seeds: list[int] = []

    def plan(self, request: PlanRequest) -> MechanismPlan:
        self.seeds.append(request.seed)
        return MechanismPlan()


async def test_a_clients_seed_seeds_sampling_but_never_the_corruption_of_its_prompt() -> None:
    """Were the client's seed in ECO's noise seed, a client could redraw the corruption until one draw leaked."""
    engine, eco = FakeEngine(), RecordingEco()
    serving = OpenAIServing(guarded(engine, eco), engine.info)
    for seed in (1, 2, None):
        await serving.chat(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Tess Marlowe?"}],
                                                 seed=seed, max_tokens=2))
    prompt_ids = engine.calls[0][0]["prompt_token_ids"]
    assert eco.seeds == [corruption_seed(prompt_ids, TARGET)] * 3
    assert [params.seed for _, params, _ in engine.calls] == [1, 2, None]


def test_eco_calibration_measures_sigma_on_the_noise_served_for_the_same_prompt() -> None:
    calibrator = EcoCalibrator(SimpleNamespace(tokenizer=SimpleNamespace(all_special_ids=[])), 1, 8)  # type: ignore
    eco = RecordingEco()
    calibrator._eco = eco  # type: ignore[assignment]
    prompt = PromptView([5, 6, 7], "Where was Tess Marlowe born?", (("user", "Where was Tess Marlowe born?"),), True,
                        False)
    calibrator._plan(prompt, SimpleNamespace(id=TARGET, aliases=ALIASES), (), {"sigma": 1.0})  # type: ignore
    assert eco.seeds == [corruption_seed([5, 6, 7], TARGET)]
