"""The served model's input embedding matrix, read once from the checkpoint to build ``prompt_embeds``.

A mechanism that edits a prompt's embeddings (ECO) needs them before the model sees them, so the proxy needs
``embed_tokens`` — only that tensor, not a second copy of the model: it is read straight out of the safetensors file(s)
with ``safe_open``. The planner turns a plan's embedding edits into the engine's ``prompt_embeds`` with it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
INDEX_FILE = "model.safetensors.index.json"


def _embedding_location(model_dir: Path) -> tuple[Path, str]:
    """The safetensors file holding the input embeddings, and the tensor's key in it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        for key, filename in weight_map.items():
            if key.endswith(EMBEDDING_SUFFIXES):
                return model_dir / filename, key
        raise ValueError(f"{index} names no input embedding tensor (*{'|*'.join(EMBEDDING_SUFFIXES)})")
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(EMBEDDING_SUFFIXES):
                    return path, key
    raise ValueError(f"no safetensors file in {model_dir} holds an input embedding tensor")


class EmbeddingTable:
    """``embed_tokens`` of the served checkpoint in the dtype the engine runs, for building ``prompt_embeds``."""

    def __init__(self, model_dir: Path, dtype: torch.dtype) -> None:
        path, key = _embedding_location(Path(model_dir))
        with safe_open(str(path), framework="pt") as handle:
            weight = handle.get_tensor(key)
        if weight.ndim != 2:
            raise ValueError(f"{key} in {path} has shape {tuple(weight.shape)}, expected (vocab, hidden)")
        self.weight = weight.to(dtype).contiguous()  # (vocab, hidden)
        self.dtype = dtype
        logger.info("prompt_embeds.table_loaded", extra={"file": path.name, "shape": list(self.weight.shape)})

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def lookup(self, token_ids: Sequence[int]) -> torch.Tensor:
        """A fresh (T, hidden) tensor of the tokens' embeddings, safe to edit in place."""
        return self.weight[torch.as_tensor(list(token_ids), dtype=torch.long)].clone()
