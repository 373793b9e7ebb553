"""``bench/device_check.py`` (unit, no GPU, no engine): its CPU half runs, its comparison passes CPU bfloat16 against
CPU float32, and everything it imports works with only torch, transformers and peft (the GPU machine's packages)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "device_check.py"
# Lethe's dependencies that the GPU machine lacks; transformers and peft do without them.
ABSENT = ("vllm", "pydantic", "pydantic_settings", "fastapi", "sqlalchemy", "rapidfuzz", "sklearn",
          "sentence_transformers", "onnxruntime", "openai", "httpx")


@pytest.fixture(scope="module")
def device_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_cuda_the_cpu_half_runs_and_says_the_gpu_half_did_not(
    device_check: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_check.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA: GPU half not run" in out
    assert "uld_combination" in out and "o3_training_step" in out and "scoring" in out


def test_cpu_bfloat16_is_within_the_bfloat16_tolerances_of_cpu_float32(
    device_check: ModuleType, capsys: pytest.CaptureFixture[str],
) -> None:
    assert device_check.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "within bfloat16 tolerance" in out


def test_a_quantity_out_of_tolerance_fails(device_check: ModuleType) -> None:
    reference = device_check.Quantity(torch.tensor([10.0, -4.0]), "max_abs", 0.05)
    assert device_check.compare("c", "q", reference, device_check.Quantity(torch.tensor([10.2, -4.0]), "max_abs",
                                                                            0.05)).ok
    assert not device_check.compare("c", "q", reference, device_check.Quantity(torch.tensor([11.0, -4.0]),
                                                                               "max_abs", 0.05)).ok


def test_its_modules_import_with_only_torch_transformers_and_peft() -> None:
    code = (f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"
            "import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('device_check', {str(SCRIPT)!r})\n"
            "module = sys.modules['device_check'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "import guards.uld.logits, guards.uld.assistant, guards.uld.training, guards.o3.training, guards.o3.pairs\n"
            "import server.guarded_scorer, guards.devices\n"
            f"assert not any(sys.modules.get(name) for name in {ABSENT!r})\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
