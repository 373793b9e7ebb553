"""The one small interface every unlearning mechanism implements, and the data that crosses it.

A mechanism (ECO, GUARD, ULD, O3: one folder each under ``guards/``) is one object that tells the rest of Lethe all it
needs without being named anywhere else:

- ``options``: the pydantic model of its registration options (the admin API's ``mechanisms`` field is built from them);
- ``jobs``: the registration-time jobs it can run, each with what a worker needs to run it and its lane
  (``guards/job_interface.py``);
- ``prepare``/``ready``: which of those jobs a registration needs, and whether what they published is enough to serve;
- ``gate``/``gate_detector``: which detector's hit makes it apply, and its own detector if it brings one (O3's OOD
  gate);
- ``admit``: a registration-time admission check (O3's rank budget);
- ``serving``: its per-replica half, which ``share``s resources per registry snapshot and ``plan``s each request;
- ``row_hooks``: its decoding-time half, run per batch row by the one logits processor (``guards/processor.py``).

A hit target none of whose gated mechanisms is ready gets ``InterimGuard``'s protection (``guards.mechanisms.INTERIM``).

The server loops over ``guards.mechanisms.MECHANISMS`` in their fixed order and never branches on a name; a mechanism
never sees HTTP, the database or the engine (``JobContext``, ``ServedModel`` and ``ServingContext`` are what it gets).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from classifiers.types import CLASSIFIER_GATE, AliasSpan

if TYPE_CHECKING:
    from guards.job_interface import ArtifactSink, JobSpec, JobTarget

# ---- requests: what a mechanism reads and what it contributes ------------------------------------------------------


@dataclass(frozen=True)
class PromptView:
    """A rendered prompt as mechanisms see it: token ids, the text they were encoded from, the conversation turns."""

    token_ids: Sequence[int]
    text: str
    turns: tuple[tuple[str, str], ...]  # (role, content); one ("user", text) turn for /v1/completions
    from_text: bool  # False when the client sent token ids: then char offsets of `text` do not map onto tokens
    add_special_tokens: bool  # how `text` was encoded into `token_ids`


@dataclass(frozen=True)
class TargetHit:
    """One target a prompt is about, with everything a mechanism may read about it."""

    target_id: str
    score: float
    alias_spans: tuple[AliasSpan, ...]
    aliases: tuple[str, ...]
    options: Mapping[str, Any]  # the mechanism's options as registered (defaults filled in)
    state: Mapping[str, Any]  # what the mechanism's jobs published (artifact digests, calibrated values)


def corruption_seed(token_ids: Sequence[int], target_id: str) -> int:
    """The seed of a target's corruption of one prompt: the same prompt and target always get the same noise.

    Nothing else a client sends enters it. The client's ``seed`` seeds sampling only: were it part of this seed, a
    client could redraw the noise with each new ``seed`` until one draw let the answer through, while a retry now meets
    the same corruption. The target id (96 random bits drawn at registration, the same on every replica) makes the
    noise unpredictable to clients, and ECO's calibration measures σ on exactly the noise served for its questions.
    """
    digest = hashlib.sha256(f"{target_id}|{','.join(map(str, token_ids))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class PlanRequest:
    """What a mechanism's ``plan`` receives for one prompt and one hit target."""

    hit: TargetHit
    prompt: PromptView
    query_embeddings: np.ndarray  # (n, d) the classifier's embeddings of the prompt's texts, for retrieval
    seed: int  # ``corruption_seed`` of the prompt and target: never the client's sampling seed
    shared: Any = None  # what the mechanism's ``share`` built for the request's registry snapshot


class EmbeddingEdit(Protocol):
    """An in-place change of a prompt's input embeddings (ECO); ``embeds`` is (T, hidden)."""

    def apply(self, embeds: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class MechanismPlan:
    """One mechanism's contribution to one engine request.

    ``processor_args`` travels in ``SamplingParams.extra_args["lethe"][mechanism name]`` (msgpack-safe values only) to
    the logits processor's row hooks. It names artifacts (paths, indices, numbers) and never carries a target's
    contents: vLLM logs sampling parameters when its engine fails. ``embedding_edits`` turn the prompt into
    ``prompt_embeds``; ``lora`` attaches an adapter.
    """

    processor_args: Mapping[str, Any] | None = None
    embedding_edits: tuple[EmbeddingEdit, ...] = ()
    lora: Any = None


@dataclass
class ComposedPlan:
    """Every mechanism's contributions to one prompt, in mechanism order, before they become an engine request."""

    processor_args: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)
    embedding_edits: list[EmbeddingEdit] = field(default_factory=list)
    loras: list[Any] = field(default_factory=list)
    mechanisms: list[str] = field(default_factory=list)

    def add(self, name: str, plan: MechanismPlan, args_key: str | None = None) -> None:
        """Record ``name``'s contribution; its processor args go to the row hook of ``args_key`` (default: ``name``)."""
        if plan.processor_args is not None:
            self.processor_args.setdefault(args_key or name, []).append(dict(plan.processor_args))
        self.embedding_edits.extend(plan.embedding_edits)
        if plan.lora is not None:
            self.loras.append(plan.lora)
        if name not in self.mechanisms:
            self.mechanisms.append(name)


@dataclass(frozen=True)
class TargetEntry:
    """One target's registration of one mechanism, as ``share`` and the jobs see it."""

    target_id: str
    options: Mapping[str, Any]
    state: Mapping[str, Any]


DERIVED_MEMBERS = "members.json"
"""In a derived artifact's directory (``ServingContext.artifacts_root/<folder>/<key>``, the folder one of its
mechanism's ``derived_artifacts``): the JSON list of the artifact digests it was built from. The erasure pass
deletes a derived artifact once one of them is purged (a deleted target's adapter inside O3's stack), and one without
this file as unaccounted for."""


@dataclass(frozen=True)
class ServingContext:
    """What a serving replica lends its mechanisms' serving halves."""

    tokenizer: Any  # the served model's tokenizer
    artifact_path: Callable[[str], Path]  # digest -> directory of a content-addressed artifact
    # Where per-snapshot derived artifacts (O3's stacks) may be written: each in <folder>/<key>/ (the folder declared
    # in ``Mechanism.derived_artifacts``) with its ``DERIVED_MEMBERS`` file, written before it is renamed into place.
    artifacts_root: Path
    settings: Any  # the server's settings, read by attribute (e.g. ``max_lora_rank``)
    # Asks the engine process to load a mechanism's artifacts ahead of its requests (``RowHooks.warm`` there):
    # (mechanism name, request) -> the artifacts loaded now. Blocking: call it from ``share``, which runs off the event
    # loop. None where no engine runs (tests, evaluation), where artifacts load on first use.
    warm: Callable[[str, Mapping[str, Any]], list[str]] | None = None


class NotReady(Exception):
    """Raised by a serving half's ``plan`` when it cannot serve this target on this replica yet (ULD: its assistant is
    still loading in the engine). The planner then treats the mechanism as not ready for the target: its other
    mechanisms, or interim protection, protect it; never a refusal, never unguarded."""


def write_members(directory: Path, digests: Sequence[str]) -> None:
    """Record which artifacts the derived artifact in ``directory`` was built from (atomically: a reader sees the
    whole list or none)."""
    partial = directory / f".{DERIVED_MEMBERS}.partial"
    partial.write_text(json.dumps(sorted(digests)))
    partial.replace(directory / DERIVED_MEMBERS)


class MechanismServing(Protocol):
    """A mechanism's per-replica half.

    A serving half whose targets publish artifacts may also define ``check(entry: TargetEntry) -> None``, raising if
    this replica cannot read the artifacts of ``entry.state``. The snapshot then serves that target as if the
    mechanism were not ready yet (its other mechanisms, or interim protection), reports it ``degraded``, and loads
    every other target (``server/registry/readable.py``): one unreadable file never blocks the registry.
    """

    def share(self, entries: Sequence[TargetEntry]) -> Any:
        """Per-snapshot resources across every target that enables the mechanism (None if none needed)."""
        ...

    def plan(self, request: PlanRequest) -> MechanismPlan:
        """The mechanism's part of the engine request for a prompt that hit its target."""
        ...


# ---- gates and decoding-time hooks -----------------------------------------------------------------------------------


class GateDetector(Protocol):
    """A mechanism's own detector, fitted by the classifier job beside the prompt classifier (O3's OOD gate).

    Its artifact lives in the subdirectory ``name`` of the target's classifier artifact; ``bank`` stacks the loaded
    artifacts of a snapshot, and ``open_gates`` of that bank maps a prompt's embeddings to {target_id: score}.
    """

    name: str  # the gate's name in ``classifiers.types.Hit.gates``

    def fit(self, spec: Any, embedder: Any, directory: Path) -> dict[str, Any]:
        """Fit on a ``classifiers.types.TargetSpec``, save into ``directory``, return figures for the target's state."""
        ...

    def bank(self, directories: Mapping[str, Path], embedder: Any) -> Any:
        """A bank of the targets' saved detectors with ``open_gates(embeddings) -> {target_id: score}``."""
        ...


class RowHook(Protocol):
    """Per-request decoding-time state of one mechanism; ``apply`` edits one row of logits in place.

    A hook class may also define a static ``prepare_rows(hooks)``: work it can do for all its rows at once (ULD's
    assistant forward), run before the row loop each step. It is an optimisation only: if it fails, each row's
    ``apply`` does its own work. Likewise a static ``apply_rows(logits, [(row, hook), ...])`` applies every listed
    row's step in one go (GUARD's single ``index_put_``, ULD's one combination); it must change nothing if it raises.
    """

    def apply(self, logits_row: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class RowHooks:
    """A mechanism's decoding-time half in the logits processor (vLLM's engine process).

    ``resources(tokenizer, placement)`` builds its per-process state once (``tokenizer`` is None outside an engine;
    ``placement``, a ``guards.devices.Placement``, is the device and dtype of the logits the hooks will see: tensors
    a hook keeps belong there);
    ``validate(section)`` checks, in the front end, the request's ``extra_args["lethe"]`` for the mechanism's payloads
    (a bad one becomes a 400, never an engine crash); ``build(section, prompt_ids, output_ids, resources)`` makes one
    request's hook from its payloads (``section[name]``, one per hit target), or None if it needs none.

    Optional, for state that is slow to build (ULD's assistants): ``engine_resources(tokenizer, placement)`` builds it
    in the
    engine process instead of ``resources`` (there, a hook build must never wait on a disk load: it runs inside a
    decoding step), and ``warm(resources, request)`` loads artifacts ahead of requests in the background when the
    front end asks (``ServingContext.warm``), returning those loaded.
    """

    resources: Callable[[Any, Any], Any]
    validate: Callable[[Mapping[str, Any]], None]
    build: Callable[[Mapping[str, Any], Sequence[int] | None, list[int], Any], RowHook | None]
    engine_resources: Callable[[Any, Any], Any] | None = None
    warm: Callable[[Any, Mapping[str, Any]], list[str]] | None = None


# ---- interim protection ------------------------------------------------------------------------------------------


class InterimGuard(Protocol):
    """What protects a hit target none of whose gated mechanisms is ready yet (just registered, still training, or
    its classifier could not be fitted), instead of refusing the request: a refusal would tell the client the target
    is registered. ``prepare`` runs when the snapshot loads, from the target's record alone (no job), and may store
    what the engine must read in ``artifacts`` (the target's own interim folder: forget text never travels in
    ``extra_args``); ``plan`` is its contribution to one request, whose processor args travel to the row hook of
    mechanism ``row_hook_key``."""

    name: str  # what the audit record and the metrics call it
    row_hook_key: str

    def prepare(self, target: JobTarget, artifacts: ArtifactSink) -> Any: ...

    def plan(self, prepared: Any, prompt: PromptView) -> MechanismPlan: ...


# ---- the mechanism -------------------------------------------------------------------------------------------------


class Options(BaseModel):
    """Base of every mechanism's options model: unknown options are refused (422), so a typo never silently falls
    back to a default; so are ``NaN`` and ``Infinity`` in any number (an infinite sigma or penalty would be stored,
    then fail every request that hits the target and every listing that serialises it)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SeededOptions(Options):
    """Options of a mechanism whose preparation draws at random (calibration questions, invented stand-ins, initial
    weights): one ``seed`` fixes every draw, so a registration repeated with the same seed makes the same draws and an
    evaluation can vary them on purpose (``lethe eval tofu --seeds``, issue 16's median over registration seeds)."""

    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds every random draw of the mechanism's preparation.")


class Mechanism(Protocol):
    """One unlearning mechanism. ``name`` is its key in a target's ``mechanisms`` and in ``extra_args["lethe"]``."""

    name: str
    options: type[Options]
    jobs: tuple[JobSpec, ...]
    gate_detector: GateDetector | None
    row_hooks: RowHooks | None
    lora_modules: tuple[str, ...]  # the modules its adapters adapt: the engine wraps exactly these with LoRA layers
    # Folders of ``ServingContext.artifacts_root`` where its serving half writes derived artifacts (O3's stacks): the
    # erasure pass collects there those built from a purged artifact (``DERIVED_MEMBERS``).
    derived_artifacts: tuple[str, ...]
    # How it serves a target, for a calibration stacked on top of it (``guards.stacking.BeneathHooks``), or None
    beneath_hooks: Any

    def prepare(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The job kinds that must succeed before this mechanism can serve a target registered with ``options``."""
        ...

    def ready(self, options: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
        """Whether the published state is enough to serve (e.g. σ known)."""
        ...

    def calibrated_on(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The other mechanisms its preparation measures on top of where a target has them (``guards.stacking``):
        adding, removing or re-optioning one of them re-runs this mechanism's jobs."""
        ...

    def gate(self, options: Mapping[str, Any]) -> str:
        """Which detector's hit makes this mechanism apply (``classifiers.types.*_GATE``)."""
        ...

    def admit(self, mine: Mapping[str, Any], others: Sequence[Mapping[str, Any]], settings: Any) -> str | None:
        """Why the registry cannot take a target enabling this mechanism with ``mine`` options, given every other
        target's ``mechanisms`` (None: it can)."""
        ...

    def serving(self, context: ServingContext) -> MechanismServing:
        """The mechanism's half in a serving replica."""
        ...


class MechanismBase:
    """The common case: gated by the prompt classifier, admitted always, no detector or row hook of its own."""

    gate_detector: GateDetector | None = None
    row_hooks: RowHooks | None = None
    lora_modules: tuple[str, ...] = ()
    derived_artifacts: tuple[str, ...] = ()
    beneath_hooks: Any = None

    def gate(self, options: Mapping[str, Any]) -> str:
        return CLASSIFIER_GATE

    def calibrated_on(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        return ()

    def admit(self, mine: Mapping[str, Any], others: Sequence[Mapping[str, Any]], settings: Any) -> str | None:
        return None


class NothingShared:
    """A serving half that needs nothing across targets."""

    def share(self, entries: Sequence[TargetEntry]) -> Any:
        return None
