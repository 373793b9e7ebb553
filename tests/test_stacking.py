"""Combinations calibrated as combinations (issue 16, ``guards/stacking.py``): ULD's α measured on top of GUARD, the
registry re-running ULD's job when what it stands on changes, and an assistant kept when only α must be redone
(unit and the real tiny demo model, no engine; through the server: ``tests/test_trained_guards.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from demo.tofu_data import authors_of
from guards.guard.calibration import phrase_table, served_guard
from guards.job_interface import target_spec
from guards.mechanisms import MECHANISMS
from guards.model_identity import model_identity
from guards.probe import ModelProbe, stacked
from guards.stacking import beneath_of
from guards.uld import mechanism as uld_mechanism
from server.artifacts import ArtifactStore
from server.control_plane import mechanism_catalog

GUARD_OPTIONS = {"soft_penalty": 5.0, "max_phrases": 64, "calibrate": True, "seed": 0}
ULD_OPTIONS = {"alpha": None, "tau": 0.1, "gate": "classifier", "seed": 0, "layers": None, "epochs": None}


class Recorder:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def apply(self, row: Any) -> None:
        self.log.append(self.name)


def test_stacked_hooks_apply_in_the_order_given() -> None:
    log: list[str] = []
    first = lambda prompt, output: [Recorder(log, "guard")]  # noqa: E731
    second = lambda prompt, output: [Recorder(log, "uld-a"), Recorder(log, "uld-b")]  # noqa: E731
    for hook in stacked(first, second)([1, 2], []):
        hook.apply(None)
    assert log == ["guard", "uld-a", "uld-b"]


def catalog() -> Any:
    return mechanism_catalog(SimpleNamespace(max_lora_rank=64))  # type: ignore[arg-type]


def mechanisms(**options: dict[str, Any]) -> dict[str, Any]:
    return {name: {"options": opts, "state": {}} for name, opts in options.items()}


def test_a_change_beneath_uld_reruns_its_calibration_and_nothing_else_does() -> None:
    def changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
        return set(catalog().changed_mechanism_kinds(before, after))

    uld_alone = mechanisms(uld=ULD_OPTIONS)
    with_guard = mechanisms(uld=ULD_OPTIONS, guard=GUARD_OPTIONS)
    assert changed(uld_alone, with_guard) == {"guard_phrases", "guard_calibrate", "uld_train"}  # GUARD added
    assert changed(with_guard, uld_alone) == {"uld_train"}  # removed: α was calibrated on a GUARD that is gone
    assert "uld_train" in changed(with_guard, mechanisms(uld=ULD_OPTIONS, guard={**GUARD_OPTIONS, "seed": 1}))
    assert changed(uld_alone, mechanisms(uld=ULD_OPTIONS, eco={"sigma": 1.0})) == set()  # ECO is not beneath ULD
    fixed = {**ULD_OPTIONS, "alpha": 0.8}  # a registered α is calibrated on nothing
    assert changed(mechanisms(uld=fixed), mechanisms(uld=fixed, guard=GUARD_OPTIONS)) == {"guard_phrases",
                                                                                          "guard_calibrate"}


def forget01_target(mechanism_options: dict[str, Any]) -> SimpleNamespace:
    """The first forget01 author with 4 of its 20 questions (each calibration step decodes every one of them)."""
    author = authors_of("forget01")[0]
    return SimpleNamespace(id="t", name="ticket-1", aliases=[author.name], retain=[],
                           forget=[{"question": i.question, "answer": i.answer} for i in author.items[:4]],
                           mechanisms=mechanism_options)


def run_uld_job(tiny_model_dir: Path, target: SimpleNamespace, store: ArtifactStore) -> dict[str, Any]:
    context = SimpleNamespace(target=target, job_id="job_1", artifacts=store, check_cancelled=lambda: None,
                              progress=lambda fraction, message: None)
    handler = uld_mechanism.training_job(SimpleNamespace(model_files=lambda kind: tiny_model_dir,
                                                         settings=SimpleNamespace(compute_device="cpu"),
                                                         beneath=beneath_of(MECHANISMS)))
    return handler(context)


def test_uld_is_calibrated_on_top_of_guard_and_keeps_its_assistant_when_only_alpha_changes(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``uld_train`` handler on the tiny model (an untrained assistant: the composition is under test, the
    assistant's quality is ``test_trained_guards``'): α is searched with GUARD's hooks at GUARD's own calibrated ban
    beneath, and that ban is recorded; run again with only α changed, the stored assistant is kept, not retrained."""
    store = ArtifactStore(tmp_path / "artifacts")
    target = forget01_target({"uld": {"options": {**ULD_OPTIONS, "epochs": 0}, "state": {}},
                              "guard": {"options": GUARD_OPTIONS, "state": {}}})
    state = run_uld_job(tiny_model_dir, target, store)
    beneath = state["calibration"]["stacked_on"]["guard"]
    assert beneath["ban_table"] == phrase_table(target_spec(target)).digest
    assert beneath["ban"] is not None and 0 < beneath["ban"] <= 40, beneath
    assert 0 < state["alpha"] <= 5 and state["assistant_kept"] is False and (store.path(state["assistant"]).is_dir())

    def no_training(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("the stored assistant was trained from the same inputs: keep it")

    monkeypatch.setattr("guards.uld.training.train_assistant", no_training)
    target.mechanisms["uld"] = {"options": {**ULD_OPTIONS, "epochs": 0, "alpha": 1.5}, "state": state}
    again = run_uld_job(tiny_model_dir, target, store)
    assert again["assistant"] == state["assistant"] and again["assistant_kept"] is True
    assert again["training_key"] == state["training_key"] and again["layers"] == state["layers"]
    assert "calibration" not in again  # a registered α is not calibrated

    other_model = tmp_path / "other-model"  # another model served in its place: same files, one weight changed
    shutil.copytree(tiny_model_dir, other_model)
    weights = load_file(other_model / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, other_model / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.undo()
    retrained = run_uld_job(other_model, target, store)
    assert retrained["assistant_kept"] is False and retrained["training_key"] != state["training_key"]
    assert retrained["assistant"] != state["assistant"]
    assert (state["model"], retrained["model"]) == (model_identity(tiny_model_dir), model_identity(other_model))


def test_guard_beneath_bans_outright_where_its_own_job_would(tiny_model_dir: Path) -> None:
    """``calibrate: false`` (and text-only targets) serve GUARD's −inf bans: ULD then stands on those, unsearched."""
    probe = ModelProbe(tiny_model_dir)
    spec = target_spec(forget01_target({}))
    hooks, assumed = served_guard(probe, spec, {**GUARD_OPTIONS, "calibrate": False})
    assert assumed == {"ban": None, "ban_table": phrase_table(spec).digest}
    question = spec.forget[3].question or ""
    (hook,) = hooks(question)(probe.prompt_ids(question), [])
    assert hook.ban is None  # PhraseGuardHook: None is the outright (−inf) ban
