"""A fifth mechanism needs nothing outside its own folder and one entry in the list of mechanisms: the admin API's
options, the registry's catalog, the planner and the logits processor all pick it up from that list."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate

from classifiers.types import Hit
from guards import processor as processor_module
from guards.mechanisms import MECHANISMS
from server.admin.protocol import mechanisms_model
from server.control_plane import mechanism_catalog
from server.metrics import Metrics
from server.planner import Classification, Planner, RenderedPrompt
from server.registry.snapshot import RegistrySnapshot
from server.registry.records import TargetRecord
from tests.example_mechanism import SILENCE

WITH_SILENCE = (*MECHANISMS, SILENCE)


def test_the_admin_api_takes_the_new_mechanisms_options_from_the_mechanism() -> None:
    model = mechanisms_model(WITH_SILENCE)
    assert model.model_validate({"silence": {}, "guard": {}}).enabled() == {
        "guard": {"seed": 0, "soft_penalty": 5.0, "max_phrases": 64, "calibrate": True}, "silence": {}}
    with pytest.raises(ValidationError):
        model.model_validate({"silence": {"volume": 0}})
    with pytest.raises(ValidationError):
        mechanisms_model(MECHANISMS).model_validate({"silence": {}})  # not in this build's list


def test_the_registry_catalog_lists_the_new_mechanism_and_its_jobs() -> None:
    catalog = mechanism_catalog(SimpleNamespace(max_lora_rank=64), WITH_SILENCE)  # type: ignore[arg-type]
    assert "silence" in catalog.implemented and catalog.jobs_for("silence", {}) == []
    assert catalog.admit({"silence": {}}, []) is None


def test_the_planner_applies_the_new_mechanism_to_a_hit_target_after_the_others() -> None:
    servings = {mechanism.name: mechanism.serving(None) for mechanism in (SILENCE,)}  # type: ignore[arg-type]
    planner = Planner(WITH_SILENCE, servings, None, None, Metrics())  # type: ignore[arg-type]
    record = TargetRecord(id="t", name="t", aliases=[], forget=[], retain=[],
                          mechanisms={"silence": {"options": {}, "state": {}}}, classifier={}, status="active")
    snapshot = RegistrySnapshot(revision=1, targets={"t": record})
    prompt = RenderedPrompt(token_ids=[1, 2, 3], text="abc")
    hit = Classification(hits=(Hit("t", 0.9),), embeddings=np.zeros((1, 4), np.float32))
    plan = planner.plan(prompt, hit, snapshot, request_id="r")
    assert plan.mechanisms == ("silence",) and plan.extra_args == {"lethe": {"silence": [{}]}}
    assert planner.plan(prompt, Classification(), snapshot, "r").extra_args is None  # not hit: plain


def test_the_logits_processor_runs_the_new_mechanisms_row_hook_on_its_rows_only(monkeypatch) -> None:
    monkeypatch.setattr(processor_module, "ROW_HOOKS", [("silence", SILENCE.row_hooks)])
    processor = processor_module.LetheLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    silenced = SamplingParams(extra_args={"lethe": {"silence": [{}]}})
    processor.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                       added=[(0, silenced, [1], []), (1, SamplingParams(), [1], [])]))
    logits = processor.apply(torch.zeros(2, 5))
    assert torch.isinf(logits[0, 1:]).all() and logits[0, 0] == 0.0 and not torch.isinf(logits[1]).any()
