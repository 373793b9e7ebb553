"""Shared by the erasure tests: which files under a directory still hold a deleted target's text, as bytes."""

from __future__ import annotations

import json
from pathlib import Path


def byte_forms(text: str) -> list[bytes]:
    """``text`` as it can sit in a file: UTF-8, and escaped as in JSON (non-ASCII as \\u escapes, quotes escaped)."""
    return list(dict.fromkeys([text.encode(), json.dumps(text)[1:-1].encode()]))


def files_holding(root: Path, secrets: list[str]) -> dict[str, list[str]]:
    """{file under root: the secrets it holds as bytes, case-insensitively}; every file, hidden ones and the SQLite
    database's -wal and -shm included."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            data = path.read_bytes().lower()
        except FileNotFoundError:  # removed while we looked (a staging folder, a checkpointed WAL)
            continue
        hits = [secret for secret in secrets if any(form.lower() in data for form in byte_forms(secret))]
        if hits:
            found[path.relative_to(root).as_posix()] = hits
    return found
