"""``lethe demo-model build|path``: the TinyTOFU demo model (`demo.builder`)."""

from __future__ import annotations

import argparse
import sys

from server.config import get_settings


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
