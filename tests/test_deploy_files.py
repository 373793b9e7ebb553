"""The deployment files hold together without Docker: the compose stack's wiring, the image's layering and state, and
the dashboard's queries against the metrics Lethe and vLLM really export. ``make deploy-test`` runs them for real."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
LETHE_SERVICES = ("migrate", "model", "lethe-1", "lethe-2", "worker")
SECRET_NAMES = re.compile(r"PASSWORD|KEY|SECRET|TOKEN|DATABASE_URL")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def stages(dockerfile: str) -> dict[str, str]:
    """Each build stage's text by its name."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", dockerfile, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_stack_has_a_database_two_replicas_a_worker_a_balancer_and_prometheus(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", *LETHE_SERVICES, "balancer", "prometheus"}
    assert [services[name]["command"] for name in ("lethe-1", "lethe-2", "worker", "migrate")] == [
        ["serve"], ["serve"], ["worker"], ["migrate"]]
    for replica in ("lethe-1", "lethe-2", "worker"):
        assert services[replica]["depends_on"] == {"migrate": {"condition": "service_completed_successfully"},
                                                   "model": {"condition": "service_completed_successfully"}}
        assert services[replica]["environment"]["LETHE_EMBEDDED_WORKER"] == "false"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert re.findall(r"server (lethe-\d):8000", nginx) == ["lethe-1", "lethe-2"]
    scraped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert scraped["scrape_configs"][0]["static_configs"][0]["targets"] == ["lethe-1:8000", "lethe-2:8000"]


def test_every_secret_comes_from_the_env_file_and_state_lives_in_named_volumes(compose: dict) -> None:
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAMES.search(key):
                assert "${" in str(value), f"{name}: {key} is written in the compose file"
    for name in LETHE_SERVICES:
        assert compose["services"][name]["volumes"] == ["lethe:/var/lib/lethe"]
        assert compose["services"][name]["read_only"] is True, f"{name}: the root filesystem must be read-only"
    assert compose["services"]["postgres"]["volumes"] == ["registry:/var/lib/postgresql/data"]
    assert set(compose["volumes"]) == {"registry", "lethe", "prometheus"}
    example = (DEPLOY / "lethe.env.example").read_text()
    assert {"POSTGRES_PASSWORD", "LETHE_ADMIN_KEY"} <= set(re.findall(r"^([A-Z_]+)=", example, re.MULTILINE))
    assert "lethe.env" in (DEPLOY / ".gitignore").read_text().split()


def test_the_image_caches_dependencies_before_the_source_and_keeps_state_on_its_volume() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    built = stages(dockerfile)
    assert list(built) == ["builder", "runtime"]
    builder, runtime = built["builder"], built["runtime"]
    assert builder.index("pip install") < builder.index("COPY server"), "dependencies must install before the source"
    assert builder.index("COPY pyproject.toml") < builder.index("pip install")
    assert "--mount=type=secret,id=pip_ca" in builder
    assert not re.search(r"build-essential|\bgcc\b|\bg\+\+", runtime), "no compiler in the final stage"
    assert "COPY --from=builder /opt/lethe /opt/lethe" in runtime
    assert re.search(r"^USER lethe$", runtime, re.MULTILINE) and "--uid 10001" in runtime
    assert 'VOLUME ["/var/lib/lethe"]' in runtime
    for setting in ("LETHE_DATA_DIR", "LETHE_CACHE_DIR"):
        assert re.search(rf"{setting}=/var/lib/lethe/", runtime), f"{setting} must live on the volume"
    assert "ARG BASE=python:3.11-slim-bookworm" in dockerfile and "ARG VARIANT=cpu" in builder
    assert "ca-certificates.crt" not in dockerfile, "the CA bundle comes in as a build secret only"
    assert "/health/ready" in runtime
    assert "pip uninstall -y torchvision torchaudio torchcodec" in builder


def test_the_image_copies_every_package_directory() -> None:
    copied = set(re.findall(r"^COPY (\S+) ", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:
        directory = pattern.rstrip("*")
        assert directory in copied, f"{directory}/ is packaged but not copied into the image"


def test_the_shell_entrypoints_parse() -> None:
    for script in (DEPLOY / "entrypoint.sh", DEPLOY / "postgres" / "entrypoint.sh"):
        assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0, script
        assert script.stat().st_mode & 0o111, f"{script} is not executable"


def exported_names(exposition: str) -> set[str]:
    return {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")}


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "lethe-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(dashboard["panels"]) >= 12 and len({panel["id"] for panel in dashboard["panels"]}) == len(
        dashboard["panels"])
    queried = {name for expr in expressions for name in re.findall(r"\b((?:lethe_|vllm:)[a-z_:]+)", expr)}
    lethe = exported_names(Metrics().render().decode())
    vllm_source = (Path(find_spec("vllm").submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py").read_text()
    vllm = set(re.findall(r'name="(vllm:[a-z_]+)"', vllm_source))
    for name in queried:
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        known = lethe if name.startswith("lethe_") else vllm
        assert base in known or name in known, f"the dashboard queries {name}, which nothing exports"
    assert any(name.startswith("vllm:") for name in queried) and any(name.startswith("lethe_") for name in queried)
