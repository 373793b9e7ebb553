"""One digest of what a model's files compute (weights, architecture, tokenizer), so an artifact trained on the served
model is reused only while that model is the one served: ULD's assistant is initialised from the model's first layers
and shares its vocabulary (``guards.uld.mechanism.training_key``).

Metadata that changes nothing the model computes (``generation_config.json``, the demo builder's ``lethe_demo.json``,
modification times) is left out, so a copied or rebuilt-identical model keeps its artifacts.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

NAMED_FILES = frozenset({"config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                         "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
CHUNK_BYTES = 1 << 20


def identifying_files(model_dir: Path) -> list[Path]:
    """The files of ``model_dir`` that decide what the model computes, sorted by name."""
    return sorted(path for path in model_dir.iterdir()
                  if path.is_file() and (path.name in NAMED_FILES or path.name.endswith(WEIGHT_SUFFIXES)))


def model_identity(model_dir: Path) -> str:
    """The sha256 of the model's files, names and contents; computed once per process while their sizes and
    modification times stay the same (hashing a 7 B-parameter model's weights reads 14 GB)."""
    files = identifying_files(Path(model_dir))
    if not files:
        raise ValueError(f"{model_dir} holds no model files (config.json, tokenizer, weights)")
    stats = [(path, path.stat()) for path in files]
    return _digest(tuple((str(path), stat.st_size, stat.st_mtime_ns) for path, stat in stats))


@lru_cache(maxsize=8)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, size, _ in files:
        digest.update(f"{Path(name).name}\0{size}\0".encode())
        with open(name, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()
