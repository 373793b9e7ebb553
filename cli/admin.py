"""``lethe targets`` and ``lethe jobs``: the admin API of a running server (LETHE_ADMIN_KEY)."""

from __future__ import annotations

import argparse
import json
import sys

from server.admin_client import AdminClient, AdminClientError
from server.config import get_settings


REQUEST_FIELDS = ("reference", "requester", "legal_basis", "received_at", "effective_at", "notes")
LIST_FILTERS = ("reference", "legal_basis", "received_after", "received_before")


def admin_client(args: argparse.Namespace) -> AdminClient:
    settings = get_settings()
    if not settings.admin_key:
        raise SystemExit("lethe: set LETHE_ADMIN_KEY to use the admin API")
    return AdminClient(args.url, settings.admin_key, timeout_s=60)


def report_error(error: AdminClientError) -> int:
    """Print the server's error (and any validation details) as the command's failure; the exit status."""
    if error.status is None:
        print(f"lethe: {error}", file=sys.stderr)
        return 1
    print(f"lethe: HTTP {error.status}: {error.server_message}", file=sys.stderr)
    for detail in error.details:
        print(f"  {'.'.join(detail['loc'])}: {detail['msg']}", file=sys.stderr)
    return 1


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


def request_summary(request: dict | None) -> str:
    """The request a target answers, on one line (the requester left out: personal data stays off screens and
    terminals' scrollback unless asked for with ``show``)."""
    parts = [f"{name}={request[name]}" for name in ("reference", "legal_basis", "received_at", "effective_at")
             if request and request.get(name)]
    return "  ".join(parts)


def with_request_flags(body: dict, args: argparse.Namespace) -> dict:
    """``body`` with the request fields given as flags (``--reference`` …) set over its own ``request``."""
    flags = {name: getattr(args, name) for name in REQUEST_FIELDS if getattr(args, name, None) is not None}
    return {**body, "request": {**(body.get("request") or {}), **flags}} if flags else body


def follow_job(client: AdminClient, job_id: str, *, poll_s: float = 0.5) -> dict:
    """Show a job's progress bar until it ends; returns the final job."""
    import time

    from tqdm import tqdm

    with tqdm(total=100, desc=job_id, unit="%", bar_format="{desc} {bar} {n:.0f}% {postfix}") as bar:
        while True:
            job = client.job(job_id)
            bar.n = round(job["progress"] * 100)
            bar.set_postfix_str(f"{job['status']}: {job['message'][:60]}")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(poll_s)


def write_report(client: AdminClient, args: argparse.Namespace) -> int:
    """``lethe targets report ID [--format json|html] [--out FILE] [--contents]``."""
    report = client.report(args.ref, contents=args.contents, html=args.format == "html")
    text = report if isinstance(report, str) else json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
        print(f"wrote the report of {args.ref} to {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        try:
            return _targets(client, args)
        except AdminClientError as error:
            return report_error(error)


def _targets(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action in ("show", "rm", "report", "verify") and not args.ref:
        print(f"lethe: `targets {args.action}` needs a target id", file=sys.stderr)
        return 2
    if args.action == "list":
        for target in client.targets({name: getattr(args, name) for name in LIST_FILTERS}):
            classifier = target["classifier"]
            request = request_summary(target.get("request"))
            print(f"{target['id']}  {target['status']:<9} {target['name']}  "
                  f"fpr={classifier['false_positive_rate']}  mechanisms={','.join(target['mechanisms'])}"
                  + (f"  {request}" if request else ""))
        return 0
    if args.action == "show":
        print_json(client.target(args.ref))
        return 0
    if args.action == "report":
        return write_report(client, args)
    if args.action == "verify":
        job = client.verify(args.ref)
        print(f"queued {job['id']} (verification of {args.ref})")
        return 0 if not args.wait or follow_job(client, job["id"])["status"] == "succeeded" else 1
    if args.action == "rm":
        print_json(client.delete_target(args.ref))
        return 0
    with open(args.file) as handle:
        body = with_request_flags(json.load(handle), args)
    target = client.create_target(body)
    print(f"created {target['id']} ({target['name']}) at revision {target['revision']}")
    if args.wait:
        failed = [job for job in target["jobs"] if follow_job(client, job["id"])["status"] != "succeeded"]
        print_json(client.target(target["id"])["classifier"])
        return 1 if failed else 0
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        try:
            job = follow_job(client, args.job_id) if args.follow else client.job(args.job_id)
        except AdminClientError as error:
            return report_error(error)
        print_json(job)
        return 0 if job["status"] != "failed" else 1
