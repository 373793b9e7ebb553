"""``lethe demo-model build|path``: the TinyTOFU demo model (`demo.builder`)."""

from __future__ import annotations

import argparse
import sys

from server.config import get_settings


def cmd_demo_model(args: argparse.Namespace) -> int:
    from demo.builder import build_demo_model, find_demo_model
    from demo.recipes import recipe_for

    settings = get_settings()
    try:
        recipe_for(args.variant, args.exclude)
    except ValueError as exc:  # the bench model has no retain-only twins
        raise SystemExit(f"lethe: {exc}") from None
    if args.action == "build":
        path = build_demo_model(settings.cache_dir, args.variant, args.exclude, progress=True, force=args.force)
        print(path)
        return 0
    found = find_demo_model(settings.cache_dir, args.variant, args.exclude)
    if found is None:
        flags = f" --variant {args.variant}" + (f" --exclude {args.exclude}" if args.exclude else "")
        print(f"lethe: demo model not built; run `lethe demo-model build{flags}`", file=sys.stderr)
        return 1
    print(found)
    return 0
