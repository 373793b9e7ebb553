"""Artifacts on disk as two plain files, `arrays.npz` (numbers) and `meta.json` (everything else), never pickle:
artifacts are shared between replicas through `LETHE_ARTIFACTS_DIR`, and loading one must not execute code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

ARRAYS_FILE = "arrays.npz"
META_FILE = "meta.json"


def save_artifact(directory: str | Path, kind: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write `arrays` and `meta` (tagged with `kind`) into `directory`, created if needed; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ARRAYS_FILE).open("wb") as f:
        np.savez(f, **arrays)
    (directory / META_FILE).write_text(json.dumps({"kind": kind, **meta}, indent=2, sort_keys=True), encoding="utf-8")
    return directory


def load_artifact(directory: str | Path, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an artifact written by `save_artifact`; refuses one of another kind."""
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    if meta.get("kind") != kind:
        raise ValueError(f"{directory} holds a {meta.get('kind')!r} artifact, not {kind!r}")
    with np.load(directory / ARRAYS_FILE, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return arrays, meta


def content_hash(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes and the canonical JSON of `meta`: the artifact's id."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
