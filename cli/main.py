"""The ``lethe`` command line: ``serve`` and ``demo-model build|path``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.config import Settings, get_settings
from server.logs import configure_logging

logger = logging.getLogger(__name__)


def resolve_model(settings: Settings, model: str | None) -> tuple[Path, str]:
    """The model directory to serve and its public name; builds the demo model when none is given."""
    chosen = model or settings.model
    if chosen:
        path = Path(chosen).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"lethe: {path} is not a Hugging Face model directory (no config.json)")
        return path, settings.served_model_name or path.name
    from demo.builder import DEMO_MODEL_NAME, build_demo_model

    path = build_demo_model(settings.cache_dir, settings.demo_variant, progress=True)
    return path, settings.served_model_name or DEMO_MODEL_NAME


def training_model(settings: Settings, model: str | None) -> Path | None:
    """The model a worker trains ULD/O3 artifacts on: as ``serve`` would serve it, without building anything."""
    if model or settings.model:
        return resolve_model(settings, model)[0]
    from demo.builder import find_demo_model

    return find_demo_model(settings.cache_dir, settings.demo_variant)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    overrides = {key: value for key in ("host", "port") if (value := getattr(args, key)) is not None}
    if args.demo_variant:
        overrides["demo_variant"] = args.demo_variant
    settings = get_settings().model_copy(update=overrides)
    model_path, name = resolve_model(settings, args.model)
    server: uvicorn.Server | None = None

    def request_exit() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, model_path, name, request_exit=request_exit)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, timeout_keep_alive=30,
                            access_log=False)
    server = uvicorn.Server(config)
    server.run()
    return int(app.state.exit_code) or (0 if server.started else 1)


def cmd_demo_model(args: argparse.Namespace) -> int:
    from demo.builder import build_demo_model, find_demo_model

    settings = get_settings()
    if args.action == "build":
        path = build_demo_model(settings.cache_dir, args.variant, args.exclude, progress=True, force=args.force)
        print(path)
        return 0
    found = find_demo_model(settings.cache_dir, args.variant, args.exclude)
    if found is None:
        print("lethe: demo model not built; run `lethe demo-model build`", file=sys.stderr)
        return 1
    print(found)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from evals.eval_report import markdown_table, plot
    from evals.lethe_client import LetheClient, LetheError
    from evals.reference_model import ReferenceModel
    from demo.builder import build_demo_model, demo_model_authors
    from evals.tofu_eval import configurations, eval_sets, evaluate, summary

    settings = get_settings()
    if not settings.admin_key:
        raise SystemExit("lethe: set LETHE_ADMIN_KEY: the evaluation registers targets and scores answers")
    retain_dir = Path(args.retain_model) if args.retain_model else build_demo_model(
        settings.cache_dir, args.demo_variant, args.split, progress=True)
    try:
        sets = eval_sets(args.split, args.limit, demo_model_authors(retain_dir))
        runs = configurations(args.mechanisms.split(",") if args.mechanisms else None, args.matrix)
    except ValueError as exc:
        raise SystemExit(f"lethe: {exc}") from exc
    api_key = settings.api_keys[0] if settings.api_keys else None
    steps = 2 + sum(3 if mechanisms else 2 for mechanisms in runs)  # (register,) replies, scores per run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tofu-{args.split}"
    json_path = Path(args.json or f"{stem}.json")
    with LetheClient(args.base_url, api_key, settings.admin_key) as client, tqdm(total=steps, unit="step") as bar:
        def progress(message: str) -> None:
            bar.set_description(message)
            bar.update(1)

        def write_json(results_so_far: list) -> None:  # after every run: a later failure keeps what was measured
            report = summary(args.split, results_so_far)
            report["model"], report["retain_model"], report["limit"] = model, str(retain_dir), args.limit
            report["complete"] = len(results_so_far) == len(runs) + 1
            json_path.write_text(json.dumps(report, indent=2))

        try:
            model = client.model()
            results = evaluate(client, sets, runs, ReferenceModel(retain_dir, args.max_tokens), args.max_tokens,
                               args.job_timeout, progress, on_run=write_json)
        except (LetheError, ValueError) as exc:
            raise SystemExit(f"lethe: {exc} (the runs measured before this are in {json_path})") from exc
    table = markdown_table(args.split, model, results)
    Path(f"{stem}.md").write_text(table)
    plot(args.split, results, Path(f"{stem}.png"))
    print(table)
    print(f"written: {json_path}, {stem}.md, {stem}.png")
    return 0


def _admin_client(args: argparse.Namespace):
    import httpx

    settings = get_settings()
    if not settings.admin_key:
        raise SystemExit("lethe: set LETHE_ADMIN_KEY to use the admin API")
    return httpx.Client(base_url=args.url.rstrip("/"), headers={"Authorization": f"Bearer {settings.admin_key}"},
                        timeout=60)


def _check(response) -> dict:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = error["message"]
            details = error.get("details")
        except (ValueError, KeyError, TypeError):
            message, details = response.text, None
        print(f"lethe: HTTP {response.status_code}: {message}", file=sys.stderr)
        for detail in details or []:
            print(f"  {'.'.join(detail['loc'])}: {detail['msg']}", file=sys.stderr)
        raise SystemExit(1)
    return response.json()


def _print_json(data: object) -> None:
    import json

    print(json.dumps(data, indent=2))


def follow_job(client, job_id: str, *, poll_s: float = 0.5) -> dict:
    """Show a job's progress bar until it ends; returns the final job."""
    import time

    from tqdm import tqdm

    with tqdm(total=100, desc=job_id, unit="%", bar_format="{desc} {bar} {n:.0f}% {postfix}") as bar:
        while True:
            job = _check(client.get(f"/admin/v1/jobs/{job_id}"))
            bar.n = round(job["progress"] * 100)
            bar.set_postfix_str(f"{job['status']}: {job['message'][:60]}")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(poll_s)


def cmd_targets(args: argparse.Namespace) -> int:
    import json

    with _admin_client(args) as client:
        if args.action == "list":
            for target in _check(client.get("/admin/v1/targets"))["data"]:
                classifier = target["classifier"]
                print(f"{target['id']}  {target['status']:<9} {target['name']}  "
                      f"fpr={classifier['false_positive_rate']}  mechanisms={','.join(target['mechanisms'])}")
            return 0
        if args.action == "show":
            _print_json(_check(client.get(f"/admin/v1/targets/{args.ref}")))
            return 0
        if args.action == "rm":
            _print_json(_check(client.delete(f"/admin/v1/targets/{args.ref}")))
            return 0
        with open(args.file) as handle:
            body = json.load(handle)
        target = _check(client.post("/admin/v1/targets", json=body))
        print(f"created {target['id']} ({target['name']}) at revision {target['revision']}")
        if args.wait:
            failed = [job for job in target["jobs"] if follow_job(client, job["id"])["status"] != "succeeded"]
            _print_json(_check(client.get(f"/admin/v1/targets/{target['id']}"))["classifier"])
            return 1 if failed else 0
        return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _admin_client(args) as client:
        job = follow_job(client, args.job_id) if args.follow else _check(client.get(f"/admin/v1/jobs/{args.job_id}"))
        _print_json(job)
        return 0 if job["status"] != "failed" else 1


def cmd_worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from server.control_plane import LazyEmbedder, make_worker, offline_handlers, open_store

    settings = get_settings()
    model_path = training_model(settings, args.model)
    if model_path is None:
        logger.warning("worker.no_model", extra={"detail": "no --model / LETHE_MODEL and no built demo model: this "
                                                           "worker leaves ULD/O3 training to workers that have one"})
    store = open_store(settings)
    handlers = offline_handlers(settings, LazyEmbedder(settings.embedding_model), store, model_path)
    worker = make_worker(settings, store, handlers)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    stop.wait()
    worker.stop()
    return 0


def cmd_settings(_: argparse.Namespace) -> int:
    from server.config import settings_table

    print(settings_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lethe", description="Inference-time unlearning proxy in front of vLLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible server")
    serve.add_argument("--model", help="HF model directory (default: the TinyTOFU demo model, built if absent)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--demo-variant", choices=["full", "tiny"], help="demo model variant when --model is unset")
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser("demo-model", help="build or locate the TinyTOFU demo model")
    demo.add_argument("action", choices=["build", "path"])
    demo.add_argument("--variant", choices=["full", "tiny"], default="full")
    demo.add_argument("--exclude", choices=["forget01", "forget05"], default=None,
                      help="build the retain-only model without these authors")
    demo.add_argument("--force", action="store_true", help="rebuild even if cached")
    demo.set_defaults(handler=cmd_demo_model)

    default_url = "http://127.0.0.1:8000"
    targets = commands.add_parser("targets", help="manage forget targets on a running server (LETHE_ADMIN_KEY)")
    targets.add_argument("action", choices=["add", "list", "show", "rm"])
    targets.add_argument("ref", nargs="?", help="target id (show, rm)")
    targets.add_argument("--file", help="target JSON (add)")
    targets.add_argument("--wait", action="store_true", help="follow the new target's jobs (add)")
    targets.add_argument("--url", default=default_url, help=f"server base URL (default {default_url})")
    targets.set_defaults(handler=cmd_targets)

    jobs = commands.add_parser("jobs", help="show a job, optionally following its progress")
    jobs.add_argument("action", choices=["show"])
    jobs.add_argument("job_id")
    jobs.add_argument("--follow", action="store_true")
    jobs.add_argument("--url", default=default_url)
    jobs.set_defaults(handler=cmd_jobs)

    worker = commands.add_parser("worker", help="run the job worker in this process (shares LETHE_DATABASE_URL)")
    worker.add_argument("--model", help="the served model's HF directory, for ULD/O3 training (default: as serve)")
    worker.set_defaults(handler=cmd_worker)

    evaluation = commands.add_parser("eval", help="evaluate a running Lethe (LETHE_ADMIN_KEY)")
    benchmarks = evaluation.add_subparsers(dest="benchmark", required=True)
    tofu = benchmarks.add_parser("tofu", help="TOFU forget quality, model utility, ROUGE-L, detections, per mechanism")
    tofu.add_argument("--base-url", default=default_url, help=f"server base URL (default {default_url})")
    tofu.add_argument("--split", choices=["forget01", "forget05"], default="forget01")
    chosen = tofu.add_mutually_exclusive_group()
    chosen.add_argument("--mechanisms", help="comma-separated mechanism set to evaluate (default eco,guard)")
    chosen.add_argument("--matrix", action="store_true", help="each mechanism alone and all four combined")
    tofu.add_argument("--retain-model", help="the retain-only model's HF directory (default: build the demo one)")
    tofu.add_argument("--demo-variant", choices=["full", "tiny"], default="full",
                      help="retain-only demo model to build when --retain-model is unset (match the served one)")
    tofu.add_argument("--limit", type=int, help="first N questions of each set only (a quick look)")
    tofu.add_argument("--max-tokens", type=int, default=60, help="reply length for ROUGE-L (default 60)")
    tofu.add_argument("--job-timeout", type=float, default=1800.0, help="seconds to wait for targets' jobs")
    tofu.add_argument("--out", default="eval-results", help="directory for the JSON, markdown and PNG")
    tofu.add_argument("--json", help="write the JSON here instead")
    tofu.set_defaults(handler=cmd_eval)

    settings = commands.add_parser("settings", help="print the LETHE_* settings table (markdown)")
    settings.set_defaults(handler=cmd_settings)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "targets" and (args.action == "add") != bool(args.file):
        parser.error("`targets add` needs --file, and only `add` takes it")
    if args.command == "targets" and args.action in ("show", "rm") and not args.ref:
        parser.error(f"`targets {args.action}` needs a target id")
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    sys.exit(args.handler(args))


if __name__ == "__main__":
    main()
