"""The ``lethe`` command line: the parser and ``main``; each command group's handlers live in their own module."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ValidationError

from cli.admin import cmd_jobs, cmd_targets
from cli.records import add_record_commands
from cli.demo_model import cmd_demo_model
from cli.eval import cmd_eval, cmd_eval_membership
from cli.migrate import cmd_migrate
from cli.serve import add_serve_arguments, cmd_serve, cmd_worker
from server.config import Settings, get_settings
from server.logs import configure_logging

# Every package whose log records the command shows: the serving core's and its consumers'.
LOGGERS = ("server", "guards", "classifiers", "cli", "demo", "evals")


def cmd_settings(_: argparse.Namespace) -> int:
    from server.config import settings_table

    print(settings_table())
    return 0


def load_settings() -> Settings:
    """The settings, or an exit with one line per invalid one (never their values: a key is a secret)."""
    try:
        return get_settings()
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise SystemExit(f"lethe: invalid settings: {problems}") from None


def _problem(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"LETHE_{str(error['loc'][0]).upper()}: {message}" if error.get("loc") else message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lethe", description="Inference-time unlearning proxy in front of vLLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible server")
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser("demo-model", help="build or locate the TinyTOFU demo model")
    demo.add_argument("action", choices=["build", "path"])
    demo.add_argument("--variant", choices=["full", "tiny", "bench"], default="full",
                      help="full: served by default; tiny: for tests; bench: untrained, ~88 M parameters, for costs")
    demo.add_argument("--exclude", choices=["forget01", "forget05"], default=None,
                      help="build the retain-only model without these authors")
    demo.add_argument("--force", action="store_true", help="rebuild even if cached")
    demo.set_defaults(handler=cmd_demo_model)

    default_url = "http://127.0.0.1:8000"
    targets = commands.add_parser("targets", help="manage forget targets on a running server (LETHE_ADMIN_KEY)")
    targets.add_argument("action", choices=["add", "list", "show", "rm", "report", "verify"])
    targets.add_argument("ref", nargs="?", help="target id (show, rm, report, verify)")
    targets.add_argument("--file", help="target JSON (add)")
    targets.add_argument("--wait", action="store_true", help="follow the new target's jobs (add, verify)")
    targets.add_argument("--format", choices=["json", "html"], default="json", help="report: JSON or an HTML page")
    targets.add_argument("--out", help="report: write it to this file instead of stdout")
    targets.add_argument("--contents", action="store_true", help="report: include the registered contents")
    targets.add_argument("--url", default=default_url, help=f"server base URL (default {default_url})")
    request = targets.add_argument_group("the request a target answers (add: set over the file's `request`)")
    request.add_argument("--reference", help="the request's reference, e.g. a ticket id (add; list: filter)")
    request.add_argument("--requester", help="who asked (personal data: never logged, not kept after deletion)")
    request.add_argument("--legal-basis", dest="legal_basis", help="gdpr_art17, copyright, hazard, contract, "
                                                                   "court_order or other (add; list: filter)")
    request.add_argument("--received-at", dest="received_at", help="date or date-time the request was received")
    request.add_argument("--effective-at", dest="effective_at", help="date or date-time it takes effect (recorded "
                                                                     "only: enforcement starts at registration)")
    request.add_argument("--notes", help="free text about the request")
    request.add_argument("--received-after", dest="received_after", help="list: requests received at or after")
    request.add_argument("--received-before", dest="received_before", help="list: requests received at or before")
    targets.set_defaults(handler=cmd_targets)

    jobs = commands.add_parser("jobs", help="show a job, optionally following its progress")
    jobs.add_argument("action", choices=["show"])
    jobs.add_argument("job_id")
    jobs.add_argument("--follow", action="store_true")
    jobs.add_argument("--url", default=default_url)
    jobs.set_defaults(handler=cmd_jobs)

    add_record_commands(commands, default_url)

    worker = commands.add_parser("worker", help="run the job worker in this process (shares LETHE_DATABASE_URL)")
    worker.add_argument("--model", help="the served model's HF directory, for ULD/O3 training (default: as serve)")
    worker.add_argument("--lanes", help="comma-separated job lanes to run, one thread each (default: all): `gate` "
                                        "(classifier fits, GUARD phrases), `training` (ULD/O3 training)")
    worker.set_defaults(handler=cmd_worker)

    evaluation = commands.add_parser("eval", help="evaluate a running Lethe (LETHE_ADMIN_KEY)")
    benchmarks = evaluation.add_subparsers(dest="benchmark", required=True)
    tofu = benchmarks.add_parser("tofu", help="TOFU forget quality, model utility, ROUGE-L, detections, per mechanism")
    tofu.add_argument("--base-url", default=default_url, help=f"server base URL (default {default_url})")
    tofu.add_argument("--split", choices=["forget01", "forget05"], default="forget01")
    chosen = tofu.add_mutually_exclusive_group()
    chosen.add_argument("--mechanisms", action="append",
                        help="comma-separated mechanism set to evaluate (default eco,guard); repeat it to measure "
                             "several sets side by side")
    chosen.add_argument("--matrix", action="store_true",
                        help="each mechanism alone, the default set (eco,guard) and all four combined")
    tofu.add_argument("--retain-model", help="the retain-only model's HF directory (default: build the demo one)")
    tofu.add_argument("--demo-variant", choices=["full", "tiny"], default="full",
                      help="retain-only demo model to build when --retain-model is unset (match the served one)")
    tofu.add_argument("--limit", type=int, help="first N questions of each set only (a quick look)")
    tofu.add_argument("--max-tokens", type=int, default=60, help="reply length for ROUGE-L (default 60)")
    tofu.add_argument("--job-timeout", type=float, default=1800.0, help="seconds to wait for targets' jobs")
    tofu.add_argument("--out", default="eval-results", help="directory for the JSON, markdown and PNG")
    tofu.add_argument("--json", help="write the JSON here instead")
    tofu.add_argument("--seeds", type=int, default=1,
                      help="register each protected configuration this many times, with preparation seeds 0, 1, … "
                           "(calibration questions, invented stand-ins, initial weights); the report adds each "
                           "figure's median and range over them (default 1)")
    tofu.add_argument("--membership", action="store_true",
                      help="also each run's membership AUC (see `lethe eval membership`; --limit caps its questions "
                           "per author)")
    tofu.set_defaults(handler=cmd_eval)

    membership = benchmarks.add_parser(
        "membership", help="can replies tell forgotten authors from never-seen ones? (a distinguisher's AUC)")
    membership.add_argument("--base-url", default=default_url, help=f"server base URL (default {default_url})")
    membership.add_argument("--split", choices=["forget01", "forget05"], default="forget05",
                            help="registered authors: the split's (10 or 2), against as many never-seen TOFU authors")
    chosen = membership.add_mutually_exclusive_group()
    chosen.add_argument("--mechanisms", action="append",
                        help="comma-separated mechanism set to evaluate (default eco,guard); repeat it to measure "
                             "several sets side by side")
    chosen.add_argument("--matrix", action="store_true",
                        help="each mechanism alone, the default set (eco,guard) and all four combined")
    membership.add_argument("--questions-per-author", type=int,
                            help="first N questions of each author (default all 20)")
    membership.add_argument("--max-tokens", type=int, default=60, help="reply length (default 60)")
    membership.add_argument("--job-timeout", type=float, default=1800.0, help="seconds to wait for targets' jobs")
    membership.add_argument("--out", default="eval-results", help="directory for the JSON and markdown")
    membership.add_argument("--json", help="write the JSON here instead")
    membership.set_defaults(handler=cmd_eval_membership)

    migrate = commands.add_parser("migrate", help="bring the registry database (LETHE_DATABASE_URL) to the newest "
                                                  "schema and exit (every replica also does at start)")
    migrate.set_defaults(handler=cmd_migrate)

    settings = commands.add_parser("settings", help="print the LETHE_* settings table (markdown)")
    settings.set_defaults(handler=cmd_settings)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as ``parser`` reads it, but for the words after ``--``: ``lethe serve``'s vLLM engine
    arguments (``engine_args``), which vLLM's own parser reads."""
    words = sys.argv[1:] if argv is None else list(argv)
    cut = words.index("--") if "--" in words else len(words)
    args = parser.parse_args(words[:cut])
    if cut < len(words):
        if args.command != "serve":
            parser.error("only `lethe serve` takes arguments after `--` (vLLM engine arguments)")
        args.engine_args = words[cut + 1:]
    return args


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command == "targets" and (args.action == "add") != bool(args.file):
        parser.error("`targets add` needs --file, and only `add` takes it")
    if args.command == "targets" and args.action in ("show", "rm") and not args.ref:
        parser.error(f"`targets {args.action}` needs a target id")
    if args.command == "admin-keys" and args.action in ("create", "revoke") and not args.key_id:
        parser.error(f"`admin-keys {args.action}` needs a key id")
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_json, LOGGERS)
    sys.exit(args.handler(args))


if __name__ == "__main__":
    main()
