"""``lethe serve`` and ``lethe worker``: one replica, or a job worker, on the model given or the demo model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from server.config import Settings, get_settings

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
    from server.app import create_app
    from server.http_server import LetheServer, make_server

    overrides = {key: value for key in ("host", "port") if (value := getattr(args, key)) is not None}
    if args.demo_variant:
        overrides["demo_variant"] = args.demo_variant
    settings = get_settings().model_copy(update=overrides)
    model_path, name = resolve_model(settings, args.model)
    server: LetheServer | None = None

    def request_exit() -> None:
        if server is not None:
            server.request_stop()

    app = create_app(settings, model_path, name, request_exit=request_exit)
    server = make_server(app, settings)
    server.run()
    return int(app.state.exit_code) or (0 if server.started else 1)


def worker_lanes(value: str | None) -> list[str]:
    """``--lanes gate,training`` as a list of known lanes (default: every lane)."""
    from guards.base import LANES

    if value is None:
        return list(LANES)
    lanes = [lane.strip() for lane in value.split(",") if lane.strip()]
    if not lanes or set(lanes) - set(LANES):
        raise SystemExit(f"lethe: --lanes takes a comma-separated subset of {','.join(LANES)}, not {value!r}")
    return lanes


def cmd_worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from server.control_plane import LazyEmbedder, make_workers, offline_handlers, open_registry

    lanes = worker_lanes(args.lanes)
    settings = get_settings()
    model_path = training_model(settings, args.model)
    if model_path is None:
        logger.warning("worker.no_model", extra={"detail": "no --model / LETHE_MODEL and no built demo model: this "
                                                           "worker leaves ULD/O3 training to workers that have one"})
    registry = open_registry(settings)
    handlers = offline_handlers(settings, LazyEmbedder(settings.embedding_model), registry, model_path)
    workers = make_workers(settings, registry, handlers, lanes)
    if not workers:
        raise SystemExit(f"lethe: this worker has no job to run in the lanes {lanes}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for worker in workers:
        worker.start()
    stop.wait()
    for worker in workers:
        worker.stop()
    return 0
