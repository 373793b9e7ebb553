"""Static checks of the packaging: the docs' settings table, the set-up commands, the package layout (the container
recipe: tests/test_deploy_files.py)."""

from __future__ import annotations

import fnmatch
import importlib
import re
import tomllib
from pathlib import Path

import pytest

from server.config import settings_table

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_lethe_script_is_the_cli_packages_main() -> None:
    project = _pyproject()
    assert project["project"]["scripts"]["lethe"] == "cli.main:main"
    assert {"cli*", "demo*"} <= set(project["tool"]["setuptools"]["packages"]["find"]["include"])
    assert callable(importlib.import_module("cli.main").main)


@pytest.mark.parametrize("package", ["classifiers", "demo"])
def test_every_data_file_a_package_reads_is_package_data(package: str) -> None:
    patterns = _pyproject()["tool"]["setuptools"]["package-data"][package]
    root = REPO / package
    files = [path.relative_to(root).as_posix() for path in (root / "data").rglob("*") if path.is_file()]
    assert files, f"{package}/data/ is empty"
    unpackaged = [name for name in files if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    assert not unpackaged, f"{package}/data files the wheel would leave out: {unpackaged}"


def test_the_packaged_data_is_where_the_code_reads_it() -> None:
    from classifiers.negatives import NEGATIVE_POOL_FILE
    from demo.phrasings import PHRASINGS_FILE
    from demo.tofu_data import TOFU_DIR

    assert NEGATIVE_POOL_FILE.is_file() and NEGATIVE_POOL_FILE.is_relative_to(REPO / "classifiers" / "data")
    assert PHRASINGS_FILE.is_file() and PHRASINGS_FILE.is_relative_to(REPO / "demo" / "data")
    assert (TOFU_DIR / "full.json").is_file() and TOFU_DIR.is_relative_to(REPO / "demo" / "data")


def test_the_configuration_table_matches_the_settings_class() -> None:
    documented = (REPO / "docs" / "configuration.md").read_text()
    assert settings_table() in documented, "regenerate docs/configuration.md's table with `lethe settings`"


def test_readme_gives_exactly_two_setup_commands() -> None:
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^make \w+", setup, flags=re.MULTILINE)
    assert commands == ["make serve", "make test"]


def test_ci_runs_make_test() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


def test_numeric_choices_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.config import Settings

    monkeypatch.setenv("LETHE_MAX_LORA_RANK", "128")
    assert Settings(_env_file=None).max_lora_rank == 128
    monkeypatch.setenv("LETHE_MAX_LORA_RANK", "100")
    with pytest.raises(ValueError, match="max_lora_rank"):
        Settings(_env_file=None)
