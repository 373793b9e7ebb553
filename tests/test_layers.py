"""The layering holds (import-linter's contracts in pyproject.toml): ``server`` above ``guards`` above ``classifiers``;
none of them imports the command line, the evaluation, the benchmarks or the demo-model builder; only
``guards/mechanisms.py`` names a mechanism; mechanisms do not import one another."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parent.parent


def test_every_import_contract_is_kept(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True) == 0
