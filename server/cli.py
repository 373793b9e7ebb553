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
    from evals.tinytofu import DEMO_MODEL_NAME, build_demo_model

    path = build_demo_model(settings.cache_dir, settings.demo_variant, progress=True)
    return path, settings.served_model_name or DEMO_MODEL_NAME


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
    from evals.tinytofu import build_demo_model, find_demo_model

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

    settings = commands.add_parser("settings", help="print the LETHE_* settings table (markdown)")
    settings.set_defaults(handler=cmd_settings)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    sys.exit(args.handler(args))


if __name__ == "__main__":
    main()
