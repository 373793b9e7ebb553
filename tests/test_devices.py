"""Where Lethe's own torch work runs (unit, no engine, no GPU): the one placement helper, ULD's combination keeping
the logits' dtype and device, the assistants loading where their logits are, and the engine forcing the V1 runner."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from guards import devices
from guards.devices import assistant_placement, compute_placement, placement_for
from guards.uld.assistant import AssistantSession
from guards.uld.cache import AssistantModels
from guards.uld.logits import combine_logits
from server.config import Settings

REPO = Path(__file__).resolve().parent.parent


def test_auto_is_the_cpu_in_float32_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    placement = compute_placement("auto")
    assert (placement.device, placement.dtype, placement.on_cuda) == (torch.device("cpu"), torch.float32, False)


def test_auto_is_cuda_in_bfloat16_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    placement = compute_placement("auto")
    assert (placement.device, placement.dtype, placement.on_cuda) == (torch.device("cuda", 0), torch.bfloat16, True)
    assert compute_placement("cpu") == placement_for("cpu")  # the setting overrides the GPU


def test_asking_for_cuda_without_one_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA"):
        compute_placement("cuda")


def test_a_device_gets_its_default_dtype_unless_one_is_given() -> None:
    assert placement_for("cuda:1").dtype is torch.bfloat16
    assert placement_for("cpu").dtype is torch.float32
    assert placement_for(torch.device("cuda", 0), torch.float16).dtype is torch.float16


@pytest.mark.parametrize("native", [True, False])
def test_the_assistant_runs_in_bfloat16_on_a_cpu_that_multiplies_it_natively(monkeypatch: pytest.MonkeyPatch,
                                                                            native: bool) -> None:
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: native)
    assert assistant_placement(placement_for("cpu")).dtype is (torch.bfloat16 if native else torch.float32)
    assert assistant_placement(placement_for("cuda:0")) == placement_for("cuda:0")  # bf16 already
    assert assistant_placement(placement_for("cuda:0", torch.float32)).dtype is torch.float32  # as the operator chose


def test_a_bfloat16_assistant_keeps_its_logits_close_and_hands_them_over_in_float32(tmp_path: Path) -> None:
    """What the engine loads on such a CPU: the same assistant, logits within bfloat16's rounding of float32's."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    full = AssistantSession(AssistantModels().get(str(tmp_path)), [1, 2, 3], []).next_logits()
    half = AssistantSession(AssistantModels(placement=placement_for("cpu", torch.bfloat16)).get(str(tmp_path)),
                            [1, 2, 3], []).next_logits()
    assert half.dtype is torch.float32
    assert torch.allclose(half, full, atol=0.05 * float(full.abs().max()) + 1e-3)


def test_the_compute_device_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_COMPUTE_DEVICE", "cpu")
    assert Settings().compute_device == "cpu"
    monkeypatch.setenv("LETHE_COMPUTE_DEVICE", "tpu")
    with pytest.raises(ValueError):
        Settings()


def test_the_combination_of_bfloat16_logits_is_bfloat16_and_computed_in_float32() -> None:
    generator = torch.Generator().manual_seed(0)
    target = (torch.randn(2, 300, generator=generator) * 5).to(torch.bfloat16)
    assistant = torch.randn(2, 300, generator=generator)  # a float32 assistant, as on the CPU
    combined = combine_logits(target, assistant, alpha=0.8, tau=0.05)
    assert combined.dtype is torch.bfloat16 and combined.device == target.device
    exact = combine_logits(target.float(), assistant, alpha=0.8, tau=0.05)
    assert torch.equal(torch.isfinite(combined), torch.isfinite(exact))
    # one rounding to bfloat16 at the end, not one per operation
    assert torch.equal(combined, exact.to(torch.bfloat16))


def test_the_combination_happens_on_the_logits_device() -> None:
    target = torch.empty(3, 128, device="meta")  # a device that is not the CPU, where the assistant's logits are
    combined = combine_logits(target, [torch.zeros(3, 128)], alpha=1.0, tau=0.1)
    assert combined.device.type == "meta" and combined.dtype is torch.float32


@pytest.fixture(scope="module")
def assistant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("assistant")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_assistants_load_in_the_placements_dtype_and_run_there(assistant_dir: Path) -> None:
    cache = AssistantModels(placement=placement_for("cpu", torch.bfloat16))
    model = cache.get(str(assistant_dir))
    assert next(model.parameters()).dtype is torch.bfloat16
    session = AssistantSession(model, [1, 2, 3], [])
    logits = session.next_logits()
    assert logits.shape == (128,) and logits.dtype is torch.float32
    float32 = AssistantSession(AssistantModels().get(str(assistant_dir)), [1, 2, 3], []).next_logits()
    assert torch.allclose(logits, float32, atol=0.05 * float32.abs().max().item())


def test_the_engine_runs_the_v1_model_runner_whatever_the_environment_said(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.engine import force_v1_model_runner

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    force_v1_model_runner()
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_the_processor_is_registered_explicitly_never_by_entry_point() -> None:
    from server.engine import LOGITS_PROCESSOR, engine_args

    args = engine_args(Settings(), REPO, "lethe-test")
    assert args.logits_processors == [LOGITS_PROCESSOR]
    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("entry-points", {})
    assert "vllm.logits_processors" not in entry_points  # it would see async scheduling's -1 placeholders
