"""Lethe's extension of vLLM's worker (``AsyncEngineArgs.worker_extension_cls``): what the front end may ask of the
engine process through ``collective_rpc``.

The one logits processor lives in vLLM's worker process and is built by vLLM, so the front end has no handle on it.
vLLM mixes this class into its worker; ``lethe_warm`` finds the processor in the worker's persistent batch and hands
it the request (``LetheLogitsProcessor.warm``: e.g. load the served snapshot's ULD assistants in the background, so
that no decoding step ever waits on a disk load).

Loading this module in the worker also replaces vLLM's CPU LoRA ops with O3's (``guards/o3/cpu_lora_ops.py``): vLLM's
own apply an adapter to plain requests batched beside a LoRA request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from guards.o3.cpu_lora_ops import install as install_cpu_lora_ops
from guards.processor import LetheLogitsProcessor

install_cpu_lora_ops()


class LetheWorkerExtension:
    """Mixed into vLLM's worker class; every method name is prefixed ``lethe_`` (vLLM refuses clashes)."""

    def lethe_warm(self, mechanism: str, request: Mapping[str, Any]) -> list[str]:
        """Returns at once with the artifacts loaded now (the rest load in the background)."""
        return lethe_processor(self).warm(mechanism, request)


def lethe_processor(worker: Any) -> LetheLogitsProcessor:
    """The worker's instance of the processor (vLLM builds one per worker, in its input batch)."""
    for processor in worker.model_runner.input_batch.logitsprocs.all:
        if isinstance(processor, LetheLogitsProcessor):
            return processor
    raise RuntimeError("the Lethe logits processor is not registered in this engine")
