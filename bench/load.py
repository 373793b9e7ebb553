"""Load: 64 concurrent streaming clients for a bounded time against `lethe serve` (the tiny demo model by default),
with a forget01 author registered (GUARD) and half the prompts naming it.

Prints how the streams ended (``[DONE]``, error event, cut off, refused by status), requests per second, latency
percentiles, and the server's resident memory (the server process and its vLLM engine core) before the load, right
after it and after a pause: memory that keeps growing under steady load is a leak.

    python bench/load.py [--clients 64] [--seconds 60] [--variant tiny|full]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stream_load import DONE, process_tree_rss_bytes, run_streams  # noqa: E402
from demo.builder import build_demo_model  # noqa: E402
from demo.tofu_data import authors_of  # noqa: E402
from server.config import Settings  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "load.json"
API_KEY = "bench-inference-key"
ADMIN_KEY = "bench-admin-key-0123456789"
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "LETHE_API_KEYS": API_KEY, "LETHE_ADMIN_KEY": ADMIN_KEY, "LETHE_DATA_DIR": str(data_dir),
           "LETHE_LOG_LEVEL": "WARNING", "LETHE_VERIFY_AFTER_CHANGES": "false"}
    process = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--model", str(model_dir), "--host",
                                "127.0.0.1", "--port", str(port)], env=env, cwd=ROOT, start_new_session=True,
                               stdout=(data_dir / "server.log").open("w"), stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((data_dir / "server.log").read_text()[-3000:])
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError("lethe serve did not become healthy")


def register_author(base_url: str) -> None:
    author = authors_of("forget01")[0]
    admin = httpx.Client(base_url=f"{base_url}/admin/v1", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=60)
    created = admin.post("/targets", json={"name": "load-author", "aliases": [author.name],
                                           "forget": [{"question": i.question, "answer": i.answer}
                                                      for i in author.items],
                                           "mechanisms": {"guard": {}}}).json()
    deadline = time.monotonic() + 300
    while admin.get(f"/targets/{created['id']}").json()["status"] != "active":
        if time.monotonic() > deadline:
            raise RuntimeError("the load target never became active")
        time.sleep(1)
    time.sleep(1)  # one registry poll, so the replica serves it


def prompts() -> list[tuple[str, bool]]:
    author = authors_of("forget01")[0]
    flagged = [(item.question, True) for item in author.items if author.name in item.question]
    plain = [(text, False) for text in ("What is the capital of France?", "Write a sentence about the sea.",
                                         "Name three colours.", "What do cats like to eat?")]
    return [pair for both in zip(flagged, plain * len(flagged), strict=False) for pair in both]


def measure(model_dir: Path, clients: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="lethe-load-") as data_dir:
        process, base_url = start_server(model_dir, Path(data_dir))
        try:
            register_author(base_url)
            model = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()[
                "data"][0]["id"]
            asyncio.run(run_streams(base_url, API_KEY, model, prompts(), 4, 5.0))  # warm-up
            before = process_tree_rss_bytes(process.pid)
            report = asyncio.run(run_streams(base_url, API_KEY, model, prompts(), clients, seconds))
            after = process_tree_rss_bytes(process.pid)
            time.sleep(10)
            settled = process_tree_rss_bytes(process.pid)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)
    done = [o for o in report.outcomes if o.ended == DONE]
    return {"clients": clients, "seconds": round(report.seconds, 1), "requests": len(report.outcomes),
            "requests_per_s": round(len(report.outcomes) / report.seconds, 2), "statuses": report.by_status,
            "endings": report.by_ending, "server_errors": len(report.server_errors),
            "p50_s": round(report.latency_percentile(0.5), 3), "p99_s": round(report.latency_percentile(0.99), 3),
            "completed": len(done), "rss_before_mib": round(before / MIB), "rss_after_mib": round(after / MIB),
            "rss_settled_mib": round(settled / MIB), "rss_growth_ratio": round(settled / before, 3)}


def markdown(summary: dict) -> str:
    return "\n".join([
        f"{summary['clients']} streaming clients for {summary['seconds']} s: {summary['requests']} requests "
        f"({summary['requests_per_s']}/s), statuses {summary['statuses']}, endings {summary['endings']}, "
        f"5xx {summary['server_errors']}.",
        "",
        "| latency p50 | latency p99 | RSS before | RSS right after | RSS 10 s later | settled / before |",
        "|---|---|---|---|---|---|",
        f"| {summary['p50_s']} s | {summary['p99_s']} s | {summary['rss_before_mib']} MiB | "
        f"{summary['rss_after_mib']} MiB | {summary['rss_settled_mib']} MiB | {summary['rss_growth_ratio']}× |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--variant", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--model", help="serve this model directory instead of a demo model")
    args = parser.parse_args()
    model_dir = Path(args.model) if args.model else build_demo_model(Settings().cache_dir, args.variant)
    summary = {"model": str(model_dir.name), **measure(model_dir, args.clients, args.seconds)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))


if __name__ == "__main__":
    main()
