"""``make deploy-test``: build the images, bring the compose stack up, and check it the way an operator would.

Registers a forget01 author through replica 1 and times until replica 2 enforces it (its audit record names the
target: SPEC's 2 s budget); checks that Prometheus scrapes both replicas' ``lethe_*`` and ``vllm:*`` series and
evaluates every query of the Grafana dashboard; starts a ULD training job, ``docker kill``s replica 1 and the worker
mid-job, restarts them, and checks that nothing was lost (targets present, the job finishes on the restarted worker,
both replicas serve). Prints the timings and image sizes and writes them to ``bench/results/deploy_test.json``; always
removes the stack and its volumes. Needs a running Docker daemon (root) and ``docker-compose``; where no public
registry can be reached the base image is made from Debian's packages with ``debootstrap`` (``--base`` names another).

    python deploy/stack_test.py [--base IMAGE] [--cold] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from demo.tofu_data import authors_of

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROJECT = "lethe-deploytest"
LOCAL_BASE = "lethe-base:bookworm"
LOCAL_WHEELS = Path("/opt/wheels")  # this machine's +cpu torch (PyTorch's index cannot be reached from here)
PIP_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # the bundle pip here trusts (a TLS-intercepting proxy)
IMAGES = {"lethe": "lethe:cpu", "postgres": "lethe-postgres:15", "balancer": "lethe-balancer:1",
          "prometheus": "lethe-prometheus:1"}
PROPAGATION_BUDGET_S = 2.0
JOB_STALE_AFTER_S = 20  # a killed worker's job is taken over this long after its last heartbeat
RESULTS = ROOT / "bench" / "results" / "deploy_test.json"


def run(*command: str, env: dict[str, str] | None = None, capture: bool = False, echo: bool = True) -> str:
    """Run a command, echoing it; its stdout when ``capture``. Fails loudly."""
    if echo:
        print("+", " ".join(command), flush=True)
    completed = subprocess.run(command, env={**os.environ, **(env or {})}, check=True, text=True,
                               stdout=subprocess.PIPE if capture else None)
    return completed.stdout if capture else ""


def ensure_docker() -> None:
    """Docker's daemon and tools on a Debian host: installed from Debian's packages and started when missing (as
    root), else a clear message saying what is missing."""
    missing = [tool for tool in ("dockerd", "docker-compose", "debootstrap") if shutil.which(tool) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        run("apt-get", "install", "-y", "-qq", "docker.io", "docker-compose", "debootstrap",
            env={"DEBIAN_FRONTEND": "noninteractive"})
    elif missing:
        raise SystemExit(f"deploy-test: install {', '.join(missing)} (Debian: docker.io docker-compose debootstrap)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        if os.geteuid() != 0:
            raise SystemExit("deploy-test: no Docker daemon answers; start dockerd")
        log = open("/var/tmp/dockerd.log", "ab")
        subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
        wait_for("dockerd answering", lambda: subprocess.run(["docker", "info"], capture_output=True).returncode == 0,
                 60)


def docker_cli() -> str:
    """A docker client that can pass build secrets (BuildKit): Debian's docker.io client can, a client without the
    buildx plugin cannot."""
    for candidate in (shutil.which("docker"), "/usr/bin/docker"):
        if candidate and Path(candidate).exists():
            help_text = subprocess.run([candidate, "build", "--help"], text=True, capture_output=True,
                                       env={**os.environ, "DOCKER_BUILDKIT": "1"}).stdout
            if "--secret" in help_text:
                return candidate
    raise SystemExit("deploy-test: no docker client with BuildKit's --secret (install docker.io, or buildx)")


class Stack:
    """The compose project under test, reached from the host at its containers' addresses."""

    def __init__(self, docker: str, env_file: Path) -> None:
        self.docker = docker
        self.env_file = env_file
        self.env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
        self._urls: dict[str, str] = {}

    def compose(self, *args: str, capture: bool = False) -> str:
        return run("docker-compose", "-p", PROJECT, "--env-file", str(self.env_file),
                   "-f", str(DEPLOY / "docker-compose.yml"), *args, capture=capture, echo=not capture)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service, capture=True).strip()

    def url(self, service: str) -> str:
        """The service's address on the stack's network (looked up again after a restart: it may change)."""
        if service not in self._urls:
            address = run(self.docker, "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                          self.container(service), capture=True, echo=False).strip()
            if not address:
                raise subprocess.CalledProcessError(1, "docker inspect", f"{service} has no address yet")
            self._urls[service] = f"http://{address}:8000"
        return self._urls[service]

    def restart(self, *services: str) -> None:
        """``docker kill`` the services' containers, then start them again."""
        containers = [self.container(service) for service in services]
        run(self.docker, "kill", *containers)
        run(self.docker, "start", *containers)
        for service in services:
            self._urls.pop(service, None)

    def admin(self, service: str) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url(service)}/admin/v1", timeout=60,
                            headers={"Authorization": f"Bearer {self.env['LETHE_ADMIN_KEY']}"})

    def exit_code(self, service: str) -> int | None:
        state = json.loads(run(self.docker, "inspect", "-f", "{{json .State}}", self.container(service),
                               capture=True, echo=False))
        return None if state["Running"] else int(state["ExitCode"])


def wait_for(what: str, check: Callable[[], bool], timeout_s: float, every_s: float = 1.0) -> float:
    """Seconds until ``check()`` holds (exceptions count as not yet); fails after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if check():
                return time.monotonic() - started
        except (httpx.HTTPError, subprocess.CalledProcessError, json.JSONDecodeError):
            pass
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def ready(stack: Stack, service: str) -> bool:
    return httpx.get(f"{stack.url(service)}/health/ready", timeout=5).status_code == 200


def build_images(docker: str, base: str, cold: bool) -> dict[str, float]:
    """Build the four images (``cold``: without Docker's layer cache); seconds each."""
    wheels = DEPLOY / "wheels"
    copied = [shutil.copy2(wheel, wheels) for wheel in LOCAL_WHEELS.glob("*.whl")] if LOCAL_WHEELS.is_dir() else []
    env = {"DOCKER_BUILDKIT": "1"}
    no_cache = ["--no-cache"] if cold else []
    timings = {}
    try:
        started = time.monotonic()
        secret = ["--secret", f"id=pip_ca,src={PIP_CA}"] if PIP_CA.is_file() else []
        torch_index = ["--build-arg", "TORCH_INDEX_URL="] if copied else []
        run(docker, "build", *no_cache, *secret, *torch_index, "--build-arg", f"BASE={base}", "-t", IMAGES["lethe"],
            str(ROOT), env=env)
        timings["lethe"] = time.monotonic() - started
    finally:
        for wheel in copied:
            Path(wheel).unlink()
    for target in ("postgres", "balancer", "prometheus"):
        started = time.monotonic()
        run(docker, "build", *no_cache, "-f", str(DEPLOY / "services.Dockerfile"), "--target", target,
            "--build-arg", f"BASE={base}", "-t", IMAGES[target], str(DEPLOY), env=env)
        timings[target] = time.monotonic() - started
    return timings


def local_base(docker: str) -> str:
    """A Debian bookworm image with Python 3.11, made from Debian's packages (once)."""
    if subprocess.run([docker, "image", "inspect", LOCAL_BASE], capture_output=True).returncode == 0:
        return LOCAL_BASE
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        root = Path(scratch) / "root"
        run("debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(root),
            "http://deb.debian.org/debian")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run([docker, "import", "-", LOCAL_BASE], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()
    return LOCAL_BASE


def image_sizes(docker: str) -> dict[str, float]:
    return {name: int(run(docker, "image", "inspect", "-f", "{{.Size}}", image, capture=True)) / 2**30
            for name, image in IMAGES.items()}


def write_env_file(directory: Path, base: str) -> Path:
    path = directory / "lethe.env"
    path.write_text("\n".join([
        f"POSTGRES_PASSWORD={secrets.token_urlsafe(24)}",
        f"LETHE_ADMIN_KEY={secrets.token_urlsafe(24)}",
        f"LETHE_BASE={base}", f"LETHE_SERVICES_BASE={base}",
        "LETHE_DEMO_VARIANT=tiny", f"LETHE_JOB_STALE_AFTER_S={JOB_STALE_AFTER_S}",
        "LETHE_PORT=18000", "PROMETHEUS_PORT=19090",
    ]) + "\n")
    path.chmod(0o600)
    return path


def chat(client: httpx.Client, model: str, question: str) -> str:
    response = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 8, "temperature": 0,
                                                         "messages": [{"role": "user", "content": question}]})
    response.raise_for_status()
    return response.json()["id"]


def measure_propagation(stack: Stack, author: Any) -> tuple[str, float]:
    """Register ``author`` through replica 1; seconds from its 201 until replica 2 flags a question naming it (the
    2 s budget is the alias index's: the classifier heads' fit comes later, from the worker)."""
    question = next(item.question for item in author.items if author.name in item.question)
    replica_2 = httpx.Client(base_url=stack.url("lethe-2"), timeout=60)
    model = replica_2.get("/v1/models").json()["data"][0]["id"]
    chat(replica_2, model, question)  # warm
    with stack.admin("lethe-1") as admin:
        created = admin.post("/targets", json={
            "name": f"deploy-{author.name.lower().replace(' ', '-')}", "aliases": [author.name],
            "forget": [{"question": item.question, "answer": item.answer} for item in author.items],
            "mechanisms": {"eco": {}, "guard": {}}})
        assert created.status_code == 201, created.text
    committed = time.monotonic()
    sent: list[tuple[float, str]] = []
    while time.monotonic() - committed < PROPAGATION_BUDGET_S + 3:
        sent.append((time.monotonic() - committed, chat(replica_2, model, question)))
    target_id = created.json()["id"]
    with stack.admin("lethe-2") as admin:
        def flagged() -> dict[str, list[str]]:
            records = admin.get("/audit", params={"limit": 1000}).json()["data"]
            return {record["request_id"]: record["targets"] for record in records}

        wait_for("audit records written", lambda: all(request_id in flagged() for _, request_id in sent), 30, 0.5)
        hits = flagged()
    first = next((at for at, request_id in sent if target_id in hits[request_id]), None)
    assert first is not None, "replica 2 never enforced the target registered on replica 1"
    assert all(target_id in hits[request_id] for at, request_id in sent if at > first), "enforcement flapped"
    return target_id, first


def kill_mid_job(stack: Stack, author: Any) -> dict[str, float]:
    """A ULD target's training job running on the worker; replica 1 and the worker killed and restarted."""
    with stack.admin("lethe-2") as admin:
        created = admin.post("/targets", json={
            "name": f"deploy-uld-{author.name.lower().replace(' ', '-')}", "aliases": [author.name],
            "forget": [{"question": item.question, "answer": item.answer} for item in author.items],
            "mechanisms": {"uld": {}}})
        assert created.status_code == 201, created.text
        job_id = next(job["id"] for job in created.json()["jobs"] if job["kind"] == "uld_train")
        def training() -> bool:
            job = admin.get(f"/jobs/{job_id}").json()
            return job["status"] == "running" and job["progress"] > 0

        wait_for("the ULD job training", training, 300, 0.5)
    killed = time.monotonic()
    stack.restart("worker", "lethe-1")
    with stack.admin("lethe-2") as admin:
        at_kill = admin.get(f"/jobs/{job_id}").json()
    assert at_kill["status"] == "running", f"the job was not running when its worker was killed: {at_kill}"
    wait_for("replica 1 ready again", lambda: ready(stack, "lethe-1"), 600)
    timings = {"replica_ready_after_kill_s": time.monotonic() - killed, "job_progress_at_kill": at_kill["progress"]}
    with stack.admin("lethe-1") as admin:
        def job_done() -> bool:
            status = admin.get(f"/jobs/{job_id}").json()["status"]
            assert status != "failed", f"the job failed after the kill: {admin.get(f'/jobs/{job_id}').json()}"
            return status == "succeeded"

        wait_for("the killed job finished", job_done, 900, 2)
        timings["job_done_after_kill_s"] = time.monotonic() - killed
        target = admin.get(f"/targets/{created.json()['id']}").json()
        assert target["status"] == "active", target
    return timings


def check_monitoring(stack: Stack) -> dict[str, int]:
    """Prometheus scrapes both replicas, sees vLLM's and Lethe's series from each, and evaluates every query of the
    Grafana dashboard without error; the number of series each replica-level query returned."""
    prometheus = httpx.Client(base_url=f"http://127.0.0.1:{stack.env['PROMETHEUS_PORT']}/api/v1", timeout=10)

    def series(query: str) -> list[dict]:
        answer = prometheus.get("/query", params={"query": query}).json()
        assert answer["status"] == "success", f"{query}: {answer}"
        return answer["data"]["result"]

    wait_for("Prometheus scraping both replicas", lambda: len(series('up{job="lethe"} == 1')) == 2, 120, 2)
    counts = {query: len(series(query)) for query in
              ("vllm:num_requests_running", "lethe_registry_staleness_seconds", "lethe_registry_revision")}
    assert all(count == 2 for count in counts.values()), counts
    dashboard = json.loads((DEPLOY / "grafana" / "lethe-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            series(target["expr"])
    return counts


def check_nothing_lost(stack: Stack, target_ids: list[str]) -> None:
    for service in ("lethe-1", "lethe-2"):
        with stack.admin(service) as admin:
            stored = {target["id"] for target in admin.get("/targets").json()["data"]}
        assert set(target_ids) <= stored, f"{service} lost targets: {set(target_ids) - stored}"
        client = httpx.Client(base_url=stack.url(service), timeout=60)
        model = client.get("/v1/models").json()["data"][0]["id"]
        chat(client, model, "What is the capital of France?")
    balancer = httpx.get(f"http://127.0.0.1:{stack.env['LETHE_PORT']}/health/ready", timeout=10)
    assert balancer.status_code == 200, balancer.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base image for every image (default: one made here with debootstrap)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running (remove it with `down -v`)")
    parser.add_argument("--cold", action="store_true", help="build without Docker's layer cache (times a first build)")
    args = parser.parse_args()
    ensure_docker()
    docker = docker_cli()
    base = args.base or local_base(docker)
    results: dict[str, Any] = {"build_s": build_images(docker, base, args.cold), "image_gib": image_sizes(docker)}
    with tempfile.TemporaryDirectory() as scratch:
        stack = Stack(docker, write_env_file(Path(scratch), base))
        started = time.monotonic()
        try:
            stack.compose("up", "-d", "--no-build")
            for one_shot in ("migrate", "model"):
                wait_for(f"{one_shot} finished", lambda s=one_shot: stack.exit_code(s) is not None, 900, 2)
                assert stack.exit_code(one_shot) == 0, f"{one_shot} failed"
            for replica in ("lethe-1", "lethe-2"):
                wait_for(f"{replica} ready", lambda r=replica: ready(stack, r), 900, 2)
            results["stack_up_s"] = time.monotonic() - started
            forget01 = authors_of("forget01")
            target_id, results["propagation_s"] = measure_propagation(stack, forget01[0])
            assert results["propagation_s"] <= PROPAGATION_BUDGET_S, results
            results["prometheus_series"] = check_monitoring(stack)
            results.update(kill_mid_job(stack, forget01[1]))
            check_nothing_lost(stack, [target_id])
            results["passed"] = True
        finally:
            if not args.keep:
                stack.compose("logs", "--tail", "40", "lethe-1", "lethe-2", "worker")
                stack.compose("down", "-v", "--remove-orphans")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
