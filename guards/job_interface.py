"""The registration-time jobs' side of the mechanism interface: what a job gets and what a mechanism declares.

A mechanism lists its jobs as ``JobSpec``s (``guards.base.Mechanism.jobs``): the kind, what a worker needs to run it
(``ANY_WORKER``, ``MODEL_FILES`` or ``SERVED_MODEL``), its handler and its lane. A handler gets a ``JobContext`` (its
target, the artifact store, progress) and the ``JobResources`` its worker lends; it never sees the database or HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from classifiers.types import ForgetItem, TargetSpec

if TYPE_CHECKING:
    from guards.base import ComposedPlan, PromptView, TargetEntry

ANY_WORKER = "any_worker"  # needs the sentence embedder only: any worker, ``lethe worker`` included
MODEL_FILES = "model_files"  # trains on the served model's files: a worker that has them
SERVED_MODEL = "served_model"  # measures the served model: a serving replica, through its engine

# Job lanes: each lane has its own worker thread (``lethe serve``) or ``lethe worker --lanes``, so the seconds-long
# jobs that build a target's gate never queue behind the minutes-long jobs that train on, or measure, the model.
GATE_LANE = "gate"  # the classifier fit and cheap gate-building jobs (GUARD's phrases)
TRAINING_LANE = "training"  # ULD/O3 training, ECO's calibration: anything needing MODEL_FILES or SERVED_MODEL
LANES = (GATE_LANE, TRAINING_LANE)


class JobTarget(Protocol):
    """The registered target a job prepares (the registry's record of it)."""

    id: str
    name: str
    aliases: list[str]
    forget: list[dict[str, Any]]  # {question, answer} or {text}
    retain: list[dict[str, Any]]
    mechanisms: dict[str, Any]  # name -> {"options": ..., "state": ...}


class ArtifactSink(Protocol):
    """Content-addressed artifact storage: write into a staging directory, commit it, get its digest."""

    def staging_dir(self) -> Path: ...

    def commit(self, staging: Path) -> str: ...

    def path(self, digest: str) -> Path: ...


class JobContext(Protocol):
    """What a job handler gets: its target, where to put artifacts, and a progress callback (raises if cancelled)."""

    @property
    def target(self) -> JobTarget: ...

    @property
    def artifacts(self) -> ArtifactSink: ...

    @property
    def job_id(self) -> str: ...

    def progress(self, fraction: float, message: str) -> None: ...

    def check_cancelled(self) -> None:
        """Raise if the run is known to be cancelled (from its last heartbeat); reads no database, so a handler may
        call it before every forward pass."""
        ...


def target_spec(target: JobTarget) -> TargetSpec:
    """The registered target as the classifiers (and the jobs that fit on its texts) read it."""

    def items(rows: list[dict[str, Any]]) -> list[ForgetItem]:
        return [ForgetItem(question=r.get("question"), answer=r.get("answer"), text=r.get("text")) for r in rows]

    return TargetSpec(id=target.id, name=target.name, aliases=list(target.aliases), forget=items(target.forget),
                      retain=items(target.retain))


def registered_options(target: JobTarget, mechanism: str) -> dict[str, Any]:
    """The options a target registered ``mechanism`` with (defaults filled in by the admin API)."""
    return dict((target.mechanisms.get(mechanism) or {}).get("options") or {})


JobHandler = Callable[[JobContext], dict[str, Any]]
"""Runs one job and returns the state to publish on the target's mechanism (artifact digests, figures)."""


class ServedModel(Protocol):
    """The served model as a job that measures it sees it: a serving replica's engine, through its request pipeline."""

    tokenizer: Any

    def render_question(self, question: str) -> PromptView:
        """One user question in the served chat format."""
        ...

    def greedy_replies(self, prompts: Sequence[PromptView], plans: Sequence[ComposedPlan | None], max_tokens: int,
                       tag: str) -> list[str]:
        """Greedy replies to the prompts, each with its plan applied (None: unprotected); blocks until all are done."""
        ...


@dataclass(frozen=True)
class JobResources:
    """What a worker lends the handlers it runs; a handler uses only what its ``JobSpec.needs`` promises."""

    settings: Any  # the server's settings, read by attribute
    embedder: Callable[[], Any]  # the classifiers' sentence embedder (loaded on first use)
    model_path: Path | None = None  # the served model's directory (MODEL_FILES, SERVED_MODEL)
    served: ServedModel | None = None  # SERVED_MODEL; a MODEL_FILES job may use it where present (a serving replica)
    registrations: Callable[[str], list[TargetEntry]] = lambda mechanism: []  # every target's entry of a mechanism
    # (target, mechanism) -> what that mechanism's calibration measures on top of (``guards.stacking.Beneath``), or None
    beneath: Callable[[JobTarget, str], Any] = lambda target, mechanism: None

    def model_files(self, kind: str) -> Path:
        """The served model's directory, for a job that trains on it (a worker without it cannot run ``kind``)."""
        if self.model_path is None:
            raise ValueError(f"{kind} trains on the served model's files, which this worker does not have")
        return self.model_path

    def served_model(self, kind: str) -> ServedModel:
        """The served model, for a job that measures it (only a serving replica can run ``kind``)."""
        if self.served is None:
            raise ValueError(f"{kind} measures the served model: it runs in a serving replica")
        return self.served


@dataclass(frozen=True)
class JobSpec:
    """A registration-time job a mechanism can run: its kind, what a worker needs to run it, its handler, and the
    lane its workers claim it in."""

    kind: str
    needs: str  # ANY_WORKER | MODEL_FILES | SERVED_MODEL
    handler: Callable[[JobResources], JobHandler]
    lane: str = TRAINING_LANE  # GATE_LANE only for a cheap job that needs the embedder at most

    def __post_init__(self) -> None:
        if self.lane not in LANES:
            raise ValueError(f"job {self.kind}: unknown lane {self.lane!r} (lanes: {LANES})")
        if self.lane == GATE_LANE and self.needs != ANY_WORKER:
            raise ValueError(f"job {self.kind} needs {self.needs}: it belongs in the {TRAINING_LANE} lane")
