"""``lethe serve`` and ``lethe worker``: one replica, or a job worker, on the model given or the demo model."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from server.config import ENGINE_SETTINGS, Settings, get_settings

logger = logging.getLogger(__name__)

SERVE_EPILOG = """\
Arguments after `--` go to vLLM's engine as `vllm serve` takes them, read by vLLM's own parser (`lethe serve -- --help`
lists them), e.g. `lethe serve MODEL -- --enable-prefix-caching --max-num-batched-tokens 4096`; LETHE_ENGINE_ARGS
holds more, given first. Those Lethe sets itself (--enable-lora, --logits-processors, --enable-prompt-embeds, ...)
are refused."""


class _ModelArgument(argparse.Action):
    """MODEL and --model name the same directory: given both, they must agree."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any,
                 option_string: str | None = None) -> None:
        if value is None:  # the positional, absent
            return
        earlier = getattr(namespace, self.dest, None)
        if earlier is not None and Path(earlier).expanduser().resolve() != Path(value).expanduser().resolve():
            parser.error(f"the model is given twice, as {earlier} and as {value}: give MODEL or --model")
        setattr(namespace, self.dest, value)


def _as_setting(name: str) -> Callable[[str], Any]:
    """An argparse ``type`` that reads a flag as the LETHE_* setting it overrides: same type, same bounds."""
    field = Settings.model_fields[name]
    adapter: TypeAdapter[Any] = TypeAdapter(Annotated[field.annotation, field])

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc.errors()[0]['msg']}") from None

    parse.__name__ = name
    return parse


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """``lethe serve [MODEL] [options] [-- vLLM engine arguments]``."""
    serve.epilog = SERVE_EPILOG
    serve.formatter_class = argparse.RawDescriptionHelpFormatter
    model_help = "HF model directory (default: LETHE_MODEL, else the TinyTOFU demo model, built if absent)"
    serve.add_argument("model", nargs="?", action=_ModelArgument, metavar="MODEL", help=model_help)
    serve.add_argument("--model", dest="model", action=_ModelArgument, help="the same as MODEL")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--demo-variant", choices=["full", "tiny", "bench"],
                       help="demo model variant when no model is given")
    engine = serve.add_argument_group("engine options", "vLLM's, with its meanings; each overrides its LETHE_* setting")
    engine.add_argument("--served-model-name", type=_as_setting("served_model_name"),
                        help="model id of the API (default: the model directory's name)")
    engine.add_argument("--max-model-len", type=_as_setting("max_model_len"), help="context length, prompt + output")
    engine.add_argument("--dtype", type=_as_setting("dtype"),
                        help="auto, half, float16, bfloat16, float, float32 (auto: float32 on CPU, else the model's)")
    engine.add_argument("--tensor-parallel-size", "-tp", type=_as_setting("tensor_parallel_size"),
                        help="GPUs to split the model across")
    engine.add_argument("--gpu-memory-utilization", type=_as_setting("gpu_memory_utilization"),
                        help="share of GPU memory vLLM may use (default: vLLM's)")
    engine.add_argument("--max-num-seqs", type=_as_setting("max_num_seqs"), help="most sequences in one batch")
    engine.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="skip CUDA graphs and torch.compile (Lethe's default: on)")
    serve.set_defaults(engine_args=[])


def serve_settings(settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings ``lethe serve`` runs with: the LETHE_* ones with the flags given instead, and the engine arguments
    after `--` after LETHE_ENGINE_ARGS; those vLLM's parser refuses, or Lethe must set itself, end the command."""
    from server.engine import EngineArgsRefused, parse_engine_args

    overrides = {key: value for key in ("host", "port", "demo_variant", *ENGINE_SETTINGS)
                 if (value := getattr(args, key)) is not None}
    if args.engine_args:
        overrides["engine_args"] = [*settings.engine_args, *args.engine_args]
    chosen = settings.model_copy(update=overrides)
    try:
        parse_engine_args(chosen.engine_args)  # before a demo model is built or the engine starts
    except EngineArgsRefused as exc:
        raise SystemExit(f"lethe: {exc}") from None
    return chosen


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

    settings = serve_settings(get_settings(), args)
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
    from guards.job_interface import LANES

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
