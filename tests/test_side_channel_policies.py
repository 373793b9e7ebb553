"""Side channels closed, without the engine: what the engine is sent for a flagged prompt, and what a client may ask.

Each policy applies to every request alike; a refusal on flagged requests alone would itself say which prompts are
about a forget target. The same behaviours through the real engine: ``tests/test_side_channels.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError
from vllm.sampling_params import SamplingParams

from classifiers.types import Hit
from guards.base import MechanismPlan, PlanRequest, PromptView, ServingContext, corruption_seed
from guards.job_interface import target_spec
from guards.eco.calibration import EcoCalibrator
from guards.guard.mechanism import build_phrase_artifact
from guards.guard.payload import resolve_phrases
from guards.mechanisms import INTERIM, MECHANISMS, mechanism_named
from guards.processor import LetheLogitsProcessor
from server.admission import Admission
from server.artifacts import ArtifactStore, interim_store
from server.config import Settings
from server.engine import engine_args
from server.errors import InvalidRequest
from server.metrics import Metrics
from server.openai.protocol import ChatCompletionRequest, CompletionRequest
from server.openai.serving import OpenAIServing
from server.pipeline import _choice_event
from server.planner import Classification, Planner, RenderedPrompt
from server.registry.records import TargetRecord
from server.registry.snapshot import RegistrySnapshot
from tests.pipeline_fakes import TARGET, FakeEngine, FakeMechanism, guarded, make

ALIASES = ["Tess Marlowe"]
FORGET = [{"question": "Where was Tess Marlowe born?", "answer": "Tess Marlowe was born in Reykjavik in 1961."},
          {"question": "What does Tess Marlowe write?", "answer": "She writes maritime thrillers for Harbourlight."}]
FORGET_WORDS = ("tess", "marlowe", "reykjavik", "1961", "writes", "maritime", "thrillers", "harbourlight")

# ---- forget text never travels in the engine's parameters ----------------------------------------------------------


class OneHotEmbedder:
    """Item i's retrieval key is the i-th unit vector."""

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.eye(len(texts), 8, dtype=np.float32)


def record(mechanisms: dict, classifier: str = "ready") -> TargetRecord:
    return TargetRecord(id=TARGET, name="tess", aliases=ALIASES, forget=FORGET, retain=[], mechanisms=mechanisms,
                        classifier={"status": classifier}, status="active" if classifier == "ready" else "preparing")


def guard_and_uld_snapshot(root: Path) -> tuple[Planner, RegistrySnapshot]:
    """A planner with the real GUARD and ULD serving halves, and a snapshot whose target has a real GUARD artifact."""
    store = ArtifactStore(root / "artifacts")
    staging = store.staging_dir()
    spec = target_spec(SimpleNamespace(id=TARGET, name="tess", aliases=ALIASES, forget=FORGET, retain=[],
                                       mechanisms={}))
    build_phrase_artifact(spec, OneHotEmbedder(), staging)
    mechanisms = {"guard": {"options": {"soft_penalty": 5.0, "max_phrases": 64},
                            "state": {"artifact": store.commit(staging)}},
                  "uld": {"options": {"alpha": 0.8, "tau": 0.01, "gate": "classifier"},
                          "state": {"assistant": "d" * 64}}}
    context = ServingContext(tokenizer=None, artifact_path=store.path, artifacts_root=store.root, settings=None)
    chosen = [mechanism_named(name) for name in ("guard", "uld")]
    planner = Planner(chosen, {m.name: m.serving(context) for m in chosen}, None, None, Metrics(),  # type: ignore
                      interim=INTERIM)
    target = record(mechanisms)
    return planner, RegistrySnapshot(revision=1, targets={TARGET: target},
                                     interim={TARGET: INTERIM.prepare(target, interim_store(root, TARGET))})


def engine_parameters_text(extra_args: dict) -> str:
    """Every form in which the engine's parameters can reach a log: msgpack's payload as JSON, vLLM's dump."""
    return (json.dumps(extra_args) + repr(SamplingParams(extra_args=extra_args))).lower()


@pytest.mark.parametrize("case", ["guard and uld ready", "interim"])
def test_a_flagged_prompts_engine_parameters_name_artifacts_and_carry_no_forget_text(tmp_path: Path,
                                                                                      case: str) -> None:
    planner, snapshot = guard_and_uld_snapshot(tmp_path)
    if case == "interim":  # registered a moment ago: neither mechanism ready, the classifier not yet fitted
        snapshot = RegistrySnapshot(revision=2, targets={TARGET: record({"guard": {"options": {}, "state": {}}},
                                                                        classifier="preparing")},
                                    interim=snapshot.interim)
    prompt = RenderedPrompt(token_ids=[1, 2, 3], text="Where was Tess Marlowe born?")
    query = np.eye(1, 8, dtype=np.float32)  # nearest to the first forget item
    plan = planner.plan(prompt, Classification(hits=(Hit(TARGET, 0.9),), embeddings=query), snapshot, "req")
    assert plan.mechanisms == (("guard", "uld") if case != "interim" else ("interim",))
    logged = engine_parameters_text(plan.extra_args)
    assert [word for word in FORGET_WORDS if word in logged] == []
    LetheLogitsProcessor.validate_params(SamplingParams(extra_args=plan.extra_args))
    phrases = {phrase.lower() for phrase in resolve_phrases(plan.extra_args["lethe"]["guard"][0])}
    assert {"tess marlowe", "marlowe", "reykjavik", "1961", "maritime thrillers"} <= phrases  # what the engine bans


# ---- ECO's noise does not follow the client's seed ------------------------------------------------------------------


class RecordingEco(FakeMechanism):
    """ECO's place in the mechanism order, recording the seed each plan is given."""

    def __init__(self) -> None:
        super().__init__("eco")
        self.seeds: list[int] = []

    def plan(self, request: PlanRequest) -> MechanismPlan:
        self.seeds.append(request.seed)
        return MechanismPlan()


def slot():
    """An admission slot, as the middleware hands every inference request."""
    return Admission(max_requests=8, max_sequences=64).enter()


async def test_a_clients_seed_seeds_sampling_but_never_the_corruption_of_its_prompt() -> None:
    """Were the client's seed in ECO's noise seed, a client could redraw the corruption until one draw leaked."""
    engine, eco = FakeEngine(), RecordingEco()
    serving = OpenAIServing(guarded(engine, eco), engine.info)
    for seed in (1, 2, None):
        await serving.chat(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "Tess Marlowe?"}],
                                                 seed=seed, max_tokens=2), slot())
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


# ---- logit_bias ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [{"42": 100}, {"42": -100}, {"7": 0.5, "8": -0.5}])
def test_a_logit_bias_is_refused_on_every_request(bias: dict) -> None:
    """vLLM applies the bias before Lethe's processor: {guess: 100} with max_tokens 1 would answer the guess unless
    GUARD bans it. Refused for every prompt alike, before the prompt is even classified."""
    with pytest.raises(ValidationError, match="logit_bias"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], logit_bias=bias)
    with pytest.raises(ValidationError, match="logit_bias"):
        CompletionRequest(model="m", prompt="hi", logit_bias=bias)


def test_an_empty_logit_bias_is_no_bias_and_is_accepted() -> None:
    for bias in ({}, None):
        request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], logit_bias=bias)
        assert request.logit_bias is None


# ---- logprobs -------------------------------------------------------------------------------------------------------


def test_the_engine_returns_processed_logprobs_never_the_raw_distribution(tmp_path: Path) -> None:
    args = engine_args(Settings(data_dir=tmp_path, _env_file=None), tmp_path, "model")
    assert args.logprobs_mode == "processed_logprobs"


def step_logprob(logprob: float, rank: int, text: str) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=text)


def test_a_token_a_guard_banned_is_never_listed_among_the_top_logprobs() -> None:
    """Processed logprobs give a banned token −inf; listed (as −9999), it would name the ban."""
    step = {5: step_logprob(-0.1, 1, " the"), 9: step_logprob(-2.4, 2, " a"),
            7: step_logprob(-math.inf, 3, " Reykjavik"), 8: step_logprob(math.nan, 4, " x")}
    completion = SimpleNamespace(index=0, text=" the", token_ids=[5], logprobs=[step], finish_reason=None,
                                 stop_reason=None)
    (token,) = _choice_event(completion, 0, 1).logprobs
    assert token.logprob == -0.1 and [(tid, text) for tid, text, _ in token.top] == [(5, " the"), (9, " a")]


def test_a_non_finite_sampled_logprob_is_reported_at_the_floor() -> None:
    step = {3: step_logprob(-math.inf, 1, "</s>")}
    completion = SimpleNamespace(index=0, text="", token_ids=[3], logprobs=[step], finish_reason="stop",
                                 stop_reason=None)
    (token,) = _choice_event(completion, 0, 1).logprobs
    assert token.logprob == -9999.0 and token.top == ()


@pytest.mark.parametrize("fields", [{"prompt_logprobs": 1}, {"prompt_logprobs": 0}, {"echo": True, "logprobs": 0}])
async def test_prompt_logprobs_are_refused_on_every_request_before_it_is_classified(fields: dict) -> None:
    """vLLM computes prompt logprobs before any logits processor: they would score the unprotected model."""
    engine = FakeEngine()
    serving = OpenAIServing(make(engine), engine.info)
    with pytest.raises(InvalidRequest):
        await serving.completion(CompletionRequest(model="m", prompt="hi", max_tokens=1, **fields), slot())
    assert engine.calls == []


def test_every_mechanism_in_this_build_is_covered_by_these_checks() -> None:
    """ECO sends tensors, O3 a LoRA named by its stack's hash; GUARD and ULD, checked above, the only extra_args."""
    assert [m.name for m in MECHANISMS if m.row_hooks is not None] == ["guard", "uld"]
