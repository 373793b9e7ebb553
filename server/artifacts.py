"""Content-addressed artifact storage shared by replicas (``LETHE_ARTIFACTS_DIR``, a shared volume in production).

An artifact is a directory of files named by the SHA-256 of its contents; it is written to a temporary sibling and
renamed into place, so a reader never sees a half-written artifact and two writers of the same content agree.

Interim protection's phrase artifacts (``guards/guard/interim.py``) are not kept here: every replica writes its own as
snapshots load, into a folder of its own in memory (``LocalInterim``), one store per target under
``interim/<target_id>/``, so a full artifacts volume never leaves a new target without interim protection.

A staging folder made for a job is named after the job and its attempt (``.staging-<job id>.<attempt>-…``), so the
erasure pass (``server/artifact_gc.py``) can tell an abandoned one (its job is over) from one still being written.
Committing touches the artifact's directory even when the content was already there: the erasure pass keeps an
unreferenced artifact written that recently, since the job that wrote it has yet to publish it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import psutil

INTERIM_DIR = "interim"
_TARGET_ID = re.compile(r"[A-Za-z0-9_-]+")
STAGING_PREFIX = ".staging-"


class ArtifactStore:
    def __init__(self, root: Path, owner: str | None = None) -> None:
        self.root = root
        self.owner = owner
        self.root.mkdir(parents=True, exist_ok=True)

    def owned_by(self, owner: str) -> ArtifactStore:
        """The same store, whose staging folders carry ``owner`` (a job id and attempt: ``job_….3``)."""
        return ArtifactStore(self.root, owner)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
            raise ValueError(f"not an artifact digest: {digest!r}")
        return self.root / digest

    def staging_dir(self) -> Path:
        """A fresh directory to write an artifact into before ``commit``."""
        prefix = f"{STAGING_PREFIX}{self.owner}-" if self.owner else STAGING_PREFIX
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))

    def discard_staging(self) -> None:
        """Remove this owner's staging folders (its job failed or was cancelled before committing them)."""
        if self.owner:
            for staging in self.root.glob(f"{STAGING_PREFIX}{self.owner}-*"):
                shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path) -> str:
        """Hash the staged directory's files, move it to its content address, return the digest."""
        digest = directory_digest(staging)
        final = self.path(digest)
        if _touch(final):
            shutil.rmtree(staging)
            return digest
        try:
            os.rename(staging, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(staging)  # another writer committed the same content first
        _touch(final)
        return digest


def _touch(directory: Path) -> bool:
    """Mark ``directory`` as just written; False if it does not exist (any more)."""
    try:
        os.utime(directory)
    except FileNotFoundError:
        return False
    return True


def directory_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(file.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def interim_dir(root: Path, target_id: str) -> Path:
    """The folder of one target's interim phrase artifacts (see the module doc)."""
    if not _TARGET_ID.fullmatch(target_id):
        raise ValueError(f"not a target id: {target_id!r}")
    return root / INTERIM_DIR / target_id


def interim_store(root: Path, target_id: str) -> ArtifactStore:
    """The content-addressed store of one target's interim phrase artifacts."""
    return ArtifactStore(interim_dir(root, target_id))


def default_runtime_dir() -> Path:
    """Memory-backed when the host has it (``/dev/shm``): files there never reach a disk."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class LocalInterim:
    """This replica's interim phrase artifacts, in a folder of its own under ``parent`` (``default_runtime_dir``).

    They hold a target's forget phrases, so they live no longer than needed: a target's folder goes when a snapshot
    without the target is served (``keep_only``), the whole folder when the replica stops (``close``), and a folder
    left by a replica that was killed is removed by the next replica started on the host.
    """

    PREFIX = "lethe-interim-"

    def __init__(self, parent: Path | None = None) -> None:
        parent = parent or default_runtime_dir()
        _remove_dead_replicas_folders(parent, self.PREFIX)
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.PREFIX}{os.getpid()}-", dir=parent))

    def keep_only(self, target_ids: set[str] | frozenset[str]) -> list[str]:
        """Remove the folders of targets not in ``target_ids``; returns their ids."""
        removed = []
        for folder in subfolders(self.root / INTERIM_DIR):
            if folder.name not in target_ids:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def subfolders(folder: Path) -> list[Path]:
    """The directories directly in ``folder`` (none if it does not exist); symlinks are never followed, so removing
    what this lists cannot reach outside the store."""
    try:
        return [path for path in folder.iterdir() if path.is_dir() and not path.is_symlink()]
    except FileNotFoundError:
        return []


def _remove_dead_replicas_folders(parent: Path, prefix: str) -> None:
    for folder in subfolders(parent):
        pid = folder.name.removeprefix(prefix).split("-", 1)[0]
        if folder.name.startswith(prefix) and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
