"""The artifact store's garbage collector: what the erasure pass (``server/erasure.py``) deletes on disk.

Three kinds of leftovers, each with its own rule:

- **Artifacts** (``<root>/<digest>``) that no live target references, and **derived artifacts**
  (``<root>/<folder>/<key>`` in a folder a mechanism declares, ``Mechanism.derived_artifacts``: O3's stacks) built
  from one of those or not saying what they were built from (``guards.base.DERIVED_MEMBERS``). The caller decides
  *whether* they may go (no live replica may still serve a revision that used them); this module only refuses those
  written within ``grace_s``: a job publishes its artifact moments after storing it, and a commit of content already
  present touches it (``ArtifactStore.commit``).
- **Staging folders** (``.staging-*``): a job's goes as soon as its job is over; one without a job (an O3 stack
  being built, or written before staging folders carried their job) once untouched for ``staging_grace_s``.
- **Trash** (``.trash-*``) of an interrupted pass, after the same grace.

Removal is safe against a concurrent commit and a concurrent pass: the directory is first renamed into the trash
(atomic; a second pass then finds nothing to rename), its time is checked again (a commit that touched it in between
wins: it is put back), and only then deleted. Everything here is idempotent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from guards.base import DERIVED_MEMBERS
from server.artifacts import STAGING_PREFIX, subfolders

logger = logging.getLogger(__name__)

DIGEST_NAME = re.compile(r"[0-9a-f]{64}")
JOB_STAGING = re.compile(re.escape(STAGING_PREFIX) + r"(job_[0-9a-f]+)\.\d+-")
TRASH_PREFIX = ".trash-"


@dataclass
class Sweep:
    """What one sweep did: names removed, and how many unreferenced ones it had to keep (too recent, or failed)."""

    removed: list[str] = field(default_factory=list)
    kept: int = 0

    @property
    def complete(self) -> bool:
        """Nothing unreferenced is left."""
        return self.kept == 0


class ArtifactCollector:
    def __init__(self, root: Path, grace_s: float, staging_grace_s: float,
                 derived_folders: Collection[str] = ()) -> None:
        self.root = root
        self._grace_s = grace_s
        self._staging_grace_s = staging_grace_s
        self._derived_folders = tuple(derived_folders)

    def sweep_artifacts(self, referenced: Collection[str], now: float | None = None) -> Sweep:
        """Delete every artifact not in ``referenced`` and every derived artifact not wholly built from them."""
        cutoff = (time.time() if now is None else now) - self._grace_s
        sweep = Sweep()
        for path in self._unreferenced(set(referenced)):
            if self._discard(path, cutoff):
                sweep.removed.append(path.relative_to(self.root).as_posix())
            else:
                sweep.kept += 1
        return sweep

    def sweep_staging(self, open_jobs: Callable[[list[str]], set[str]], now: float | None = None) -> list[str]:
        """Delete staging folders of jobs that are over (``open_jobs`` says which of some job ids still run or wait),
        job-less ones untouched for ``staging_grace_s``, and old trash."""
        cutoff = (time.time() if now is None else now) - self._staging_grace_s
        leftovers = [path for folder in (self.root, *self._namespaces()) for path in subfolders(folder)
                     if path.name.startswith((STAGING_PREFIX, TRASH_PREFIX))]
        owners = {path: match.group(1) for path in leftovers if (match := JOB_STAGING.match(path.name))}
        running = open_jobs(sorted(set(owners.values()))) if owners else set()
        removed = []
        for path in leftovers:
            if _abandoned(path, owners.get(path), running, cutoff):
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(path.relative_to(self.root).as_posix())
        return removed

    def _unreferenced(self, referenced: set[str]) -> Iterator[Path]:
        for path in subfolders(self.root):
            if DIGEST_NAME.fullmatch(path.name) and path.name not in referenced:
                yield path
        for namespace in self._namespaces():
            for path in subfolders(namespace):
                if not path.name.startswith(".") and not _members(path) <= referenced:
                    yield path

    def _namespaces(self) -> list[Path]:
        """The mechanisms' folders of derived artifacts (nothing else there is touched: the volume may be shared)."""
        return [self.root / folder for folder in self._derived_folders if (self.root / folder).is_dir()]

    def _discard(self, path: Path, cutoff: float) -> bool:
        """Delete ``path`` if it was last written before ``cutoff``; False if it was kept."""
        try:
            if path.stat().st_mtime >= cutoff:
                return False
            trash = path.parent / f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}"
            os.rename(path, trash)
        except FileNotFoundError:
            return True  # a concurrent pass took it
        try:
            touched = trash.stat().st_mtime >= cutoff
        except FileNotFoundError:
            return True
        if touched:  # committed again while we looked: it stays
            try:
                os.rename(trash, path)
            except OSError:  # the committer wrote it anew meanwhile
                shutil.rmtree(trash, ignore_errors=True)
            return False
        shutil.rmtree(trash, ignore_errors=True)
        if trash.exists():
            logger.error("erasure.remove_failed", extra={"path": path.relative_to(self.root).as_posix()})
            return False
        return True


def _abandoned(path: Path, owner: str | None, running: set[str], cutoff: float) -> bool:
    """Whether a staging or trash folder is no one's any more."""
    if owner is not None:
        return owner not in running
    try:
        if path.name.startswith(TRASH_PREFIX):  # its change time is when a pass moved it there
            return path.stat().st_ctime < cutoff
        return _newest_mtime(path) < cutoff
    except FileNotFoundError:  # a concurrent pass removed it
        return False


def _members(path: Path) -> set[str]:
    """The digests a derived artifact was built from; one that does not say (or says it unreadably) matches nothing
    and is collected."""
    try:
        members = json.loads((path / DERIVED_MEMBERS).read_text())
    except (OSError, ValueError):
        return {"<unknown>"}
    return {str(member) for member in members} if isinstance(members, list) else {"<unknown>"}


def _newest_mtime(path: Path) -> float:
    """The last time anything under ``path`` was written (a job writing into a file deep inside a staging folder
    does not touch the folder itself)."""
    newest = path.stat().st_mtime
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                continue
        newest = max(newest, os.stat(dirpath).st_mtime)
    return newest
