"""Saved LoRA adapters as plain tensors: reading them, merging them into a model, and rank-stacking them into one.

O3 serves one adapter per registry revision though every forget target has its own: ``stack_adapters`` concatenates
the targets' adapters along the rank dimension, which computes exactly the sum of their updates,
Σ_i scale_i B_i A_i x. Training a new target's adapter needs the same reading (its penalty keeps off the earlier A
matrices) and merging (it is trained on the model the server runs under the earlier ones), so both live here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's saved keys: base_model.model.<module path>.lora_A.weight


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's scaling, rank and per-module A and B matrices."""

    scale: float
    rank: int
    base_model: str | None
    a: dict[str, torch.Tensor]  # module path -> A (r, in)
    b: dict[str, torch.Tensor]  # module path -> B (out, r)


def stack_adapters(adapter_dirs: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """Rank-stack LoRA adapters into one PEFT adapter in ``out_dir`` that computes Σ_i scale_i B_i A_i x.

    A = [A_1; A_2; ...] (rows), B = [s_1 B_1, s_2 B_2, ...] (columns) with each adapter's scaling s_i folded into its
    B block, and lora_alpha = r_total so the stacked scaling is 1. A module one adapter lacks gets zero blocks there.
    """
    if not adapter_dirs:
        raise ValueError("no adapters to stack")
    adapters = [read_adapter(Path(d)) for d in adapter_dirs]
    modules = sorted(set().union(*(adapter.a for adapter in adapters)))
    dtype = next(iter(adapters[0].a.values())).dtype
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        in_features = _feature_size(adapters, module, lambda ad: ad.a[module].shape[1])
        out_features = _feature_size(adapters, module, lambda ad: ad.b[module].shape[0])
        a_blocks, b_blocks = [], []
        for adapter in adapters:
            if module in adapter.a:
                a_blocks.append(adapter.a[module].float())  # (r_i, in)
                b_blocks.append(adapter.b[module].float() * adapter.scale)  # (out, r_i)
            else:
                a_blocks.append(torch.zeros(adapter.rank, in_features))
                b_blocks.append(torch.zeros(out_features, adapter.rank))
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.cat(a_blocks, dim=0).to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.cat(b_blocks, dim=1).to(dtype).contiguous()

    rank = sum(adapter.rank for adapter in adapters)
    target_modules = sorted({module.rsplit(".", 1)[-1] for module in modules})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=adapters[0].base_model,
    ).save_pretrained(out_dir)
    save_file(tensors, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return {"rank": rank, "adapters": len(adapters), "modules": target_modules}


def read_adapter(adapter_dir: Path) -> LoraWeights:
    """A saved plain LoRA adapter (per-module ranks, DoRA, biases and full modules are refused, not ignored)."""
    config = LoraConfig.from_pretrained(adapter_dir)
    unsupported = [
        feature
        for feature, used in (
            ("rank_pattern", bool(config.rank_pattern)),
            ("alpha_pattern", bool(config.alpha_pattern)),
            ("use_dora", config.use_dora),
            ("bias", config.bias != "none"),
            ("lora_bias", getattr(config, "lora_bias", False)),
            ("modules_to_save", bool(config.modules_to_save)),
        )
        if used
    ]
    if unsupported:
        raise ValueError(f"unsupported LoRA adapter {adapter_dir}: uses {', '.join(unsupported)}")
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    a = {module_path(k): t for k, t in tensors.items() if k.endswith(".lora_A.weight")}
    b = {module_path(k): t for k, t in tensors.items() if k.endswith(".lora_B.weight")}
    if a.keys() != b.keys() or not a:
        raise ValueError(f"unsupported LoRA adapter {adapter_dir}: it has no LoRA weights or unpaired lora_A/lora_B")
    ranks = {t.shape[0] for t in a.values()} | {t.shape[1] for t in b.values()}
    if ranks != {config.r}:
        raise ValueError(f"unsupported LoRA adapter {adapter_dir}: weight ranks {sorted(ranks)}, config r={config.r}")
    return LoraWeights(scale=scale, rank=config.r, base_model=config.base_model_name_or_path, a=a, b=b)


def _feature_size(adapters: Sequence[LoraWeights], module: str, size: Callable[[LoraWeights], int]) -> int:
    sizes = {size(adapter) for adapter in adapters if module in adapter.a}
    if len(sizes) != 1:
        raise ValueError(f"cannot stack: the adapters disagree on the shape of {module} ({sorted(sizes)})")
    return sizes.pop()


def load_lora_a(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """A saved adapter's LoRA-A matrices, module path ("model.layers.0.self_attn.q_proj") -> A (r, in)."""
    return {module: a.float() for module, a in read_adapter(Path(adapter_dir)).a.items()}


def merge_into(model: torch.nn.Module, adapters: Sequence[LoraWeights]) -> None:
    """Add the adapters' updates scale·B·A into the model's weights: the served model under their stack."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for adapter in adapters:
            for module, a in adapter.a.items():
                if module not in modules:
                    raise ValueError(f"an earlier adapter has weights for {module}, which the model does not have")
                weight = modules[module].weight  # (out, in)
                update = adapter.scale * (adapter.b[module].to(weight.device, torch.float32)
                                          @ a.to(weight.device, torch.float32))  # in float32 even for a bf16 model
                weight += update.to(weight.dtype)


def module_path(key: str) -> str:
    """"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" -> "model.layers.0.mlp.up_proj"."""
    return key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]
