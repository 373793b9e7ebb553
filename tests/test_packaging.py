"""Static checks of what cannot run here: the container recipe, the docs' settings table, the set-up commands."""

from __future__ import annotations

import fnmatch
import importlib
import re
import tomllib
from pathlib import Path

import pytest

from server.config import settings_table

REPO = Path(__file__).resolve().parent.parent


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_runs_lethe_as_non_root_with_a_health_check() -> None:
    instructions = _dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    assert kinds[0] in ("ARG", "FROM") and "FROM" in kinds
    users = [arg for kind, arg in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("EXPOSE", "8000") in instructions
    healthcheck = next(arg for kind, arg in instructions if kind == "HEALTHCHECK")
    assert "/health" in healthcheck
    assert ("ENTRYPOINT", '["lethe"]') in instructions


def test_dockerfile_builds_cpu_by_default_and_gpu_by_build_arg() -> None:
    instructions = _dockerfile_instructions()
    assert ("ARG", "VARIANT=cpu") in instructions
    install = " ".join(arg for kind, arg in instructions if kind == "RUN" and "pip install" in arg)
    assert '".[gpu]"' in install and '".[cpu]"' in install
    assert "pip uninstall -y torchvision torchaudio torchcodec" in install


def test_dockerfile_copies_every_package_directory() -> None:
    copied = {arg.split()[0] for kind, arg in _dockerfile_instructions() if kind == "COPY"}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:
        directory = pattern.rstrip("*")
        assert directory in copied, f"{directory}/ is packaged but not copied into the image"
        assert (REPO / directory).is_dir()


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


def test_readme_settings_table_matches_the_settings_class() -> None:
    readme = (REPO / "README.md").read_text()
    assert settings_table() in readme, "regenerate the table with `lethe settings`"


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
