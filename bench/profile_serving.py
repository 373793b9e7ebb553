"""Where serving time goes: py-spy on every process of a replica under load, per mechanism and for the gate (issue 19).

One replica runs in-process on the bench model with the targets of ``bench/mechanism_cost.py`` (the same options).
For each profile, requests run back to back at concurrency 8 for ``--seconds`` while ``py-spy record`` samples the
front end (this process: the pipeline, the gate, ECO's embedding), vLLM's engine core (the scheduler) and its worker
(the model and Lethe's logits processor: GUARD and ULD), without pausing them. Profiles:

* ``gate``: unflagged questions with 100 targets registered (``bench/unflagged_traffic.py``'s snapshot);
* one per mechanism: flagged questions re-planned with that mechanism alone.

For each process the table lists the frames holding the most samples, inclusive (the frame or anything it called)
and Lethe's own code first: a frame of ``guards/``, ``server/`` or ``classifiers/`` that holds a large share is a
cost Lethe can cut. Idle threads are left out (py-spy's default), so shares are of busy samples.

    python bench/profile_serving.py [--variant bench|tiny | --model DIR] [--seconds 20] [--profiles gate,guard]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.mechanism_cost import COST_OPTIONS  # noqa: E402
from bench.registration import VARIANTS, hundred_targets, replan_run, target_body, wait_until_served  # noqa: E402
from bench.runtime_harness import run_with_runtime  # noqa: E402
from bench.unflagged_traffic import unflagged_questions  # noqa: E402
from bench.workload import BENCH_VARIANT, UniqueQuestions, sampling_params  # noqa: E402
from demo.tofu_data import authors_of, demo_authors  # noqa: E402
from server.planner import ChatTurn  # noqa: E402
from server.run import ChatPrompt, RunRequest  # noqa: E402
from server.runtime import Runtime  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "profile_serving.json"
PROFILES = ("gate", "eco", "guard", "uld", "o3")
CONCURRENCY = 8
TOP = 8
LETHE_PACKAGES = ("guards/", "server/", "classifiers/")


def processes() -> dict[str, int]:
    """This replica's processes by role: the front end (this one) and vLLM's engine core and worker(s)."""
    import psutil

    found = {"front end": os.getpid()}
    for child in psutil.Process().children(recursive=True):
        name = child.name()
        if "EngineCore" in name:
            found["engine core"] = child.pid
        elif "Worker" in name:
            found["worker" if "worker" not in found else f"worker {child.pid}"] = child.pid
    return found


def frame_name(frame: str) -> str:
    """``apply (/x/site-packages/guards/processor.py:120)`` -> ``apply (guards/processor.py)``."""
    function, _, location = frame.partition(" (")
    path = location.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", str(Path(__file__).resolve().parent.parent) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{function} ({path})"


def top_frames(raw: str) -> dict:
    """Busy samples, the most inclusive frames of Lethe's code and overall, and the most frequent leaf frames."""
    inclusive, leaves, total = Counter(), Counter(), 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(frame) for frame in stack.split(";")]
        samples = int(count)
        total += samples
        leaves[frames[-1]] += samples
        for frame in dict.fromkeys(frames):  # a recursive frame counts once per sample
            inclusive[frame] += samples

    def share(counter: Counter, keep=lambda frame: True) -> list[list]:
        return [[frame, round(samples / total, 3)] for frame, samples in counter.most_common() if keep(frame)][:TOP]

    lethe = lambda frame: any(f"({package}" in frame for package in LETHE_PACKAGES)  # noqa: E731
    return {"samples": total, "lethe_inclusive": share(inclusive, lethe) if total else [],
            "inclusive": share(inclusive) if total else [], "leaf": share(leaves) if total else []}


def record(pids: dict[str, int], seconds: float, scratch: Path) -> list[tuple[str, subprocess.Popen, Path]]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    started = []
    for role, pid in pids.items():
        out = scratch / f"{role.replace(' ', '-')}-{pid}.txt"
        command = [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "50",
                   "--format", "raw", "--nonblocking", "--output", str(out)]
        started.append((role, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out))
    return started


async def load_for(runtime: Runtime, questions: UniqueQuestions, seconds: float,
                   mechanisms: tuple[str, ...] | None, replan: bool) -> int:
    """Requests back to back at CONCURRENCY for ``seconds``; returns how many finished."""
    params, deadline, finished = sampling_params(), time.monotonic() + seconds, 0

    async def stream(text: str) -> AsyncIterator[None]:
        run = await runtime.pipeline.start(
            RunRequest("chat", f"profile-{uuid.uuid4().hex}", ChatPrompt((ChatTurn("user", text),)),
                       params=params))
        if replan:
            replan_run(runtime, run, mechanisms)
        async with run:
            async for _ in run.events():
                yield None

    async def client() -> None:
        nonlocal finished
        while time.monotonic() < deadline:
            async for _ in stream(questions.take(1)[0]):
                pass
            finished += 1

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return finished


async def measure(runtime: Runtime, seconds: float, profiles: list[str], model: str) -> dict:
    forget, retain_authors = authors_of("forget01"), demo_authors()[:3]
    ids = [runtime.control.registry.targets.create(target_body(a, retain_authors, COST_OPTIONS)).id for a in forget]
    await wait_until_served(runtime, ids)
    holder = runtime.control.snapshots
    registered = holder.current
    flagged = UniqueQuestions([item.question for a in forget for item in a.items])
    unflagged = UniqueQuestions(unflagged_questions())
    loaded = hundred_targets(registered, runtime)
    results = {}
    with tempfile.TemporaryDirectory(prefix="lethe-profile-") as scratch:
        for profile in profiles:
            gate = profile == "gate"
            holder.current = loaded if gate else registered
            questions, mechanisms = (unflagged, None) if gate else (flagged, VARIANTS[profile])
            await load_for(runtime, questions, 3, mechanisms, not gate)  # warm-up, not sampled
            recorders = record(processes(), seconds, Path(scratch))
            finished = await load_for(runtime, questions, seconds + 1, mechanisms, not gate)
            per_process = {}
            for role, recorder, out in recorders:
                _, errors = await asyncio.to_thread(recorder.communicate)
                if recorder.returncode != 0 or not out.exists():
                    raise RuntimeError(f"py-spy failed on the {role}: {errors.decode(errors='replace')[-500:]}")
                per_process[role] = top_frames(out.read_text())
            results[profile] = {"requests": finished, "processes": per_process}
            print(f"profile {profile}: {finished} requests", flush=True)
    holder.current = registered
    return {"model": model, "seconds": seconds, "concurrency": CONCURRENCY, "profiles": results}


def markdown(summary: dict) -> str:
    """Per profile and process: the busiest frames of Lethe's code, then the busiest leaf frames."""
    lines = [f"model {summary['model']}, concurrency {summary['concurrency']}, {summary['seconds']} s per profile, "
             "py-spy at 50 Hz; shares of busy samples"]
    for profile, result in summary["profiles"].items():
        lines += ["", f"### {profile} ({result['requests']} requests)", "",
                  "| process | samples | Lethe's frames (inclusive) | leaf frames |", "| --- | --: | --- | --- |"]
        for role, frames in result["processes"].items():
            lethe = "<br>".join(f"{share:.0%} {frame}" for frame, share in frames["lethe_inclusive"][:4]) or "—"
            leaf = "<br>".join(f"{share:.0%} {frame}" for frame, share in frames["leaf"][:4]) or "—"
            lines.append(f"| {role} | {frames['samples']} | {lethe} | {leaf} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["tiny", "full", "bench"], default=BENCH_VARIANT)
    parser.add_argument("--model", help="serve this model directory instead of a demo model")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--profiles", default=",".join(PROFILES))
    args = parser.parse_args()
    profiles = [p for p in args.profiles.split(",") if p]
    if unknown := set(profiles) - set(PROFILES):
        parser.error(f"unknown profiles {sorted(unknown)}; known: {', '.join(PROFILES)}")
    args.rounds = 0
    logging.basicConfig(level=logging.WARNING)
    summary = asyncio.run(run_with_runtime(
        args, lambda runtime, _rounds, model: measure(runtime, args.seconds, profiles, model)))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2))
    print("\n" + markdown(summary))


if __name__ == "__main__":
    main()
