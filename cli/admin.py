"""``lethe targets`` and ``lethe jobs``: the admin API of a running server (LETHE_ADMIN_KEY)."""

from __future__ import annotations

import argparse
import json
import sys

from server.config import get_settings


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
