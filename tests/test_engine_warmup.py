"""Through the real engine: the front end warms more than eight ULD assistants in vLLM's worker process
(``collective_rpc`` into the worker extension), requests cycling over all of them are served with ULD and without a
load in a step, and a request naming an assistant the engine has not loaded ends at once (fail closed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

ASSISTANTS = 10


def test_more_than_eight_warmed_assistants_serve_requests_in_a_cycle_without_loading_in_a_step(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    assistants = tmp_path / "assistants"
    for i in range(ASSISTANTS):  # the served model itself shares its vocabulary: a valid (if unhelpful) assistant
        shutil.copytree(tiny_model_dir, assistants / f"assistant-{i}")
    (assistants / "never-warmed").mkdir()
    shutil.copytree(tiny_model_dir, assistants / "never-warmed", dirs_exist_ok=True)
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(REPO / "tests" / "engine_warmup_check.py"), str(tiny_model_dir),
                    str(assistants), str(out)], check=True, cwd=REPO, timeout=600)
    result = json.loads(out.read_text())
    assert len(result["warmed"]) == result["wanted"] == ASSISTANTS
    assert all(reply["tokens"] > 0 for reply in result["cycled"])  # served with ULD, not ended by fail-closed
    slowest = max(reply["seconds"] for reply in result["cycled"][ASSISTANTS:])  # the second round: all cached
    assert slowest < 5 * min(reply["seconds"] for reply in result["cycled"][ASSISTANTS:]) + 0.5
    assert result["unloaded"]["tokens"] <= 1 and result["unloaded"]["seconds"] < 2  # ended at once, not loaded
