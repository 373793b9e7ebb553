"""Content-addressed artifact storage shared by replicas (``LETHE_ARTIFACTS_DIR``, a shared volume in production).

An artifact is a directory of files named by the SHA-256 of its contents; it is written to a temporary sibling and
renamed into place, so a reader never sees a half-written artifact and two writers of the same content agree.

Interim protection's phrase artifacts (``guards/guard/interim.py``) are kept apart, one store per target under
``interim/<target_id>/``: they are written by every replica as snapshots load, referenced by no target's state, and
hold the target's forget phrases, so erasing a target removes its folder whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

INTERIM_DIR = "interim"
_TARGET_ID = re.compile(r"[A-Za-z0-9_-]+")


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
            raise ValueError(f"not an artifact digest: {digest!r}")
        return self.root / digest

    def staging_dir(self) -> Path:
        """A fresh directory to write an artifact into before ``commit``."""
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))

    def commit(self, staging: Path) -> str:
        """Hash the staged directory's files, move it to its content address, return the digest."""
        digest = directory_digest(staging)
        final = self.path(digest)
        if final.exists():
            shutil.rmtree(staging)
        else:
            try:
                os.rename(staging, final)
            except OSError:
                if not final.exists():
                    raise
                shutil.rmtree(staging)  # another writer committed the same content first
        return digest


def directory_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(file.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


class JobArtifacts:
    """One job's view of the store: remembers the staging directories it hands out, so that a job that fails or is
    cancelled half-way (a full disk, a crash in training, a deleted target) leaves no partial files behind. Committed
    artifacts are whole by construction (staged, then renamed into place)."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        self._staged: list[Path] = []

    def path(self, digest: str) -> Path:
        return self._store.path(digest)

    def staging_dir(self) -> Path:
        staging = self._store.staging_dir()
        self._staged.append(staging)
        return staging

    def commit(self, staging: Path) -> str:
        return self._store.commit(staging)

    def discard_uncommitted(self) -> None:
        """Remove what this job staged but never committed (a committed directory was moved away already)."""
        for staging in self._staged:
            shutil.rmtree(staging, ignore_errors=True)
        self._staged.clear()


def interim_dir(root: Path, target_id: str) -> Path:
    """The folder of one target's interim phrase artifacts (see the module doc)."""
    if not _TARGET_ID.fullmatch(target_id):
        raise ValueError(f"not a target id: {target_id!r}")
    return root / INTERIM_DIR / target_id


def interim_store(root: Path, target_id: str) -> ArtifactStore:
    """The content-addressed store of one target's interim phrase artifacts."""
    return ArtifactStore(interim_dir(root, target_id))
