"""``lethe actions``, ``lethe tombstones`` and ``lethe admin-keys``: the compliance records of a running server (the
admin trail, what deleted targets left, the named admin keys), through its admin API (LETHE_ADMIN_KEY)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from cli.admin import admin_client, print_json, report_error
from server.admin_client import AdminClient, AdminClientError


def _run(args: argparse.Namespace, command: Callable[[AdminClient, argparse.Namespace], int]) -> int:
    with admin_client(args) as client:
        try:
            return command(client, args)
        except AdminClientError as error:
            return report_error(error)


def _print_records(records: Any, args: argparse.Namespace, line: Callable[[dict], str]) -> int:
    for record in records:
        print(json.dumps(record) if args.json else line(record))
    return 0


def _action_line(action: dict) -> str:
    subject = action["target_id"] or action["subject_id"] or "-"
    fields = ",".join(action["fields"]) or "-"
    count = f"  count={action['count']}" if action["count"] is not None else ""
    return f"{action['at']}  {action['actor']:<12} {action['action']:<16} {subject}  fields={fields}{count}"


def _tombstone_line(tombstone: dict) -> str:
    purged = tombstone["purged_at"] or "pending"
    return (f"{tombstone['target_id']}  deleted={tombstone['deleted_at']}  purged={purged}  "
            f"reference={tombstone['reference'] or '-'}  legal_basis={tombstone['legal_basis'] or '-'}  "
            f"mechanisms={','.join(tombstone['mechanisms']) or '-'}")


def cmd_actions(args: argparse.Namespace) -> int:
    filters = {"actor": args.actor, "action": args.action, "target_id": args.target, "since": args.since,
               "until": args.until}
    return _run(args, lambda client, a: _print_records(client.records("actions", filters, a.limit), a, _action_line))


def cmd_tombstones(args: argparse.Namespace) -> int:
    filters = {"target_id": args.target, "reference": args.reference, "legal_basis": args.legal_basis,
               "since": args.since, "until": args.until}
    return _run(args, lambda client, a: _print_records(client.records("tombstones", filters, a.limit), a,
                                                       _tombstone_line))


def _admin_keys(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        for key in client.admin_keys():
            state = f"revoked {key['revoked_at']} by {key['revoked_by']}" if key["revoked_at"] else "active"
            created = f"  created {key['created_at']} by {key['created_by']}" if key["created_at"] else ""
            print(f"{key['id']:<20} {key['source']:<12} {state}{created}")
        return 0
    if args.action == "create":
        created = client.create_admin_key(args.key_id)
        print(created["key"])
        print(f"lethe: created admin key `{created['id']}`; the key above is shown once and stored only as its hash",
              file=sys.stderr)
        return 0
    print_json(client.revoke_admin_key(args.key_id))
    return 0


def cmd_admin_keys(args: argparse.Namespace) -> int:
    return _run(args, _admin_keys)


def add_record_commands(commands: Any, default_url: str) -> None:
    """The parsers of ``actions``, ``tombstones`` and ``admin-keys``."""
    actions = commands.add_parser("actions", help="the admin trail: who changed what, newest first")
    actions.add_argument("--actor", help="an admin key's id")
    actions.add_argument("--action", help="e.g. target.create, target.patch, target.delete, admin_key.revoke")
    actions.add_argument("--target", help="a target id")
    _add_listing_arguments(actions, default_url)
    actions.set_defaults(handler=cmd_actions)

    tombstones = commands.add_parser("tombstones", help="what deleted targets left (no content), newest first")
    tombstones.add_argument("--target", help="a deleted target's id")
    tombstones.add_argument("--reference", help="the request's reference")
    tombstones.add_argument("--legal-basis", dest="legal_basis")
    _add_listing_arguments(tombstones, default_url)
    tombstones.set_defaults(handler=cmd_tombstones)

    keys = commands.add_parser("admin-keys", help="named admin keys: create (the key is printed once), list, revoke")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("key_id", nargs="?", help="the key's name, as the admin trail shows it (create, revoke)")
    keys.add_argument("--url", default=default_url, help=f"server base URL (default {default_url})")
    keys.set_defaults(handler=cmd_admin_keys)


def _add_listing_arguments(parser: argparse.ArgumentParser, default_url: str) -> None:
    parser.add_argument("--since", help="at or after this date-time (or Unix time)")
    parser.add_argument("--until", help="before this date-time (or Unix time)")
    parser.add_argument("--limit", type=int, default=100, help="at most this many records (default 100)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--url", default=default_url, help=f"server base URL (default {default_url})")
