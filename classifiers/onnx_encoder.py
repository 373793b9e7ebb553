"""The sentence-transformers model's forward pass on ONNX Runtime.

Every prompt pays a MiniLM embedding before it reaches the engine, on the CPU cores the engine uses. ONNX Runtime runs
the same network in 0.45x PyTorch's time for one prompt and 0.77-0.84x for batches of 8-32 on 2 cores
(``bench/classifier_latency.py``, one thread), with the same vectors (cosine >= 0.99999): a classifier fitted on
either backend scores the same on the other. The graph is exported in memory from the loaded PyTorch weights when the
embedder starts (a few seconds), so there is no second copy of the model to keep in step.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class UnsupportedModel(ValueError):
    """The sentence-transformers pipeline is not Transformer -> mean Pooling [-> Normalize]."""


class _LastHiddenState(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state


class OnnxEncoder:
    """Tokenise, run the exported transformer, mean-pool over real tokens, L2-normalise (what the
    sentence-transformers pipeline of all-MiniLM-L6-v2 does)."""

    def __init__(self, model: Any, threads: int) -> None:
        import onnxruntime

        names = [type(module).__name__ for module in model]
        if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            raise UnsupportedModel(f"no ONNX path for the module pipeline {names}")
        pooling = model[1]  # sentence-transformers 6 names the mode; 3.x-5.x set one flag per mode
        if getattr(pooling, "pooling_mode", None) != "mean" and not getattr(pooling, "pooling_mode_mean_tokens", False):
            raise UnsupportedModel("only mean pooling has an ONNX path")
        self._tokenizer = model.tokenizer
        self._max_length = int(model.max_seq_length)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle pool threads would otherwise spin waiting for work, on the cores the engine needs between requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: the exported graph's shape warnings are expected
        self._session = onnxruntime.InferenceSession(_export(model[0].auto_model, self._tokenizer), options,
                                                     providers=["CPUExecutionProvider"])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        batch = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self._max_length,
                                return_tensors="np", return_token_type_ids=True)
        feeds = {name: batch[name].astype(np.int64) for name in INPUT_NAMES}
        hidden = self._session.run(None, feeds)[0]  # [B, T, H]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return (pooled / norms).astype(np.float32)


def _export(transformer: torch.nn.Module, tokenizer: Any) -> bytes:
    example = tokenizer(["an example", "a longer example sentence"], padding=True, return_tensors="pt",
                        return_token_type_ids=True)
    dynamic = {name: {0: "batch", 1: "tokens"} for name in (*INPUT_NAMES, "last_hidden_state")}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow that is shape-independent here
        torch.onnx.export(_LastHiddenState(transformer.eval()), tuple(example[name] for name in INPUT_NAMES), buffer,
                          input_names=list(INPUT_NAMES), output_names=["last_hidden_state"], dynamic_axes=dynamic,
                          opset_version=17, dynamo=False)
    logger.info("embedding model exported to ONNX (%d bytes)", buffer.tell())
    return buffer.getvalue()
