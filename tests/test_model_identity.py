"""``guards.model_identity``: the digest an artifact trained on the served model is keyed by."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from guards.model_identity import identifying_files, model_identity


def test_a_copy_with_other_metadata_is_the_same_model_and_a_changed_byte_is_another(tiny_model_dir: Path,
                                                                                    tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "lethe_demo.json").write_text('{"built_in_seconds": 1}')  # build metadata: not what the model computes
    (copy / "generation_config.json").write_text("{}")
    assert model_identity(copy) == model_identity(tiny_model_dir)
    assert {path.name for path in identifying_files(copy)} >= {"config.json", "model.safetensors", "tokenizer.json"}

    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of the last tensor
    (copy / "model.safetensors").write_bytes(bytes(weights))
    assert model_identity(copy) != model_identity(tiny_model_dir)

    tokenizer = copy / "tokenizer_config.json"
    before = model_identity(copy)
    tokenizer.write_text(tokenizer.read_text() + "\n")  # the tokenizer's files count too, and are re-read once changed
    assert model_identity(copy) != before


def test_a_folder_without_model_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="no model files"):
        model_identity(tmp_path)
