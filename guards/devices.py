"""Where Lethe's own torch work runs, and in which dtype: the one place that decides.

Two kinds of torch work happen outside vLLM's model runner:

- inside the engine, on the logits (ULD's assistant and its combination, GUARD's bans): that work follows the logits,
  i.e. the device vLLM hands the logits processor and the served model's dtype (``placement_for``);
- next to the engine (training ULD's assistant and O3's LoRA, the ``/admin/v1/score`` path, the evaluation's reference
  model): ``compute_placement`` picks the CUDA device in bfloat16 when there is one, else the CPU in float32
  (``LETHE_COMPUTE_DEVICE`` overrides the choice).

bfloat16 because that is how the served checkpoints run on GPU (vLLM's ``auto`` dtype) and it halves the memory of a
training copy of the model; float32 on CPU because the CPU has no fast bfloat16 matmul everywhere (vLLM's bf16 kernels
died with SIGILL on one CPU class, VLLM_NOTES §5) and the CPU paths are what the test suite pins numerically.
Losses, log-softmaxes and ULD's combination are computed in float32 whatever the model's dtype.

Imports torch only: ``bench/device_check.py`` runs on a GPU machine that has no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DevicePreference = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class Placement:
    """A device and the floating dtype models are loaded in there."""

    device: torch.device
    dtype: torch.dtype

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def placement_for(device: torch.device | str, dtype: torch.dtype | None = None) -> Placement:
    """``device`` with ``dtype``, or the device's default dtype: bfloat16 on CUDA, float32 elsewhere."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Placement(device, dtype)


def assistant_placement(placement: Placement) -> Placement:
    """Where ULD's assistant runs and in which dtype, given the placement of the logits it is subtracted from.

    Beside those logits, in bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX: torch's oneDNN
    kernels, not vLLM's, so the SIGILL above does not apply), else in the logits' dtype. On the CPU the assistant's
    decoding step is memory-bound: its linears read every weight once per step whatever the batch, and in bfloat16
    they read half the bytes (bench model, 3 of 12 layers at 8 rows: 10.8 -> 5.6 ms a step). Its logits are then
    exact to about 0.2 (8 mantissa bits): what the served model gets on a GPU, where everything runs in bfloat16,
    and what ULD's calibration measures too (it loads the assistant through this placement), so the calibrated
    alpha is the served one's. ULD's combination itself stays in float32 (``guards/uld/logits.py``).
    """
    if placement.device.type == "cpu" and placement.dtype == torch.float32 and cpu_has_native_bfloat16():
        return Placement(placement.device, torch.bfloat16)
    return placement


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX), where a bf16 matmul is fast."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def compute_placement(preference: DevicePreference = "auto") -> Placement:
    """Where training and scoring run: ``auto`` is CUDA (bfloat16) when available, else CPU (float32).

    ``cuda`` without a CUDA device raises rather than silently training for hours on the CPU.
    """
    if preference == "cpu":
        return placement_for("cpu")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("LETHE_COMPUTE_DEVICE=cuda, but torch sees no CUDA device")
        return placement_for(torch.device("cuda", torch.cuda.current_device()))
    if preference != "auto":
        raise ValueError(f"unknown compute device {preference!r} (auto, cpu or cuda)")
    return placement_for("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's (first) parameters live on: where its inputs must be."""
    return next(model.parameters()).device
