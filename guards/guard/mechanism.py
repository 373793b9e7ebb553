"""GUARD — generation-time unlearning by adaptive restriction (Deng et al., 2025; METHODS.md §2): the mechanism.

Registration (the ``guard_phrases`` job): every forget item's forbidden phrases (``phrases.py``) and an SBERT
embedding of the item (its question, or its text) are stored as the target's GUARD artifact.

Per request: the forget items nearest to the prompt (SBERT retrieval on the classifier's own embeddings, so no extra
encode) lend their phrases, best match first, after the aliases, up to ``max_phrases``: the ``TOP_ITEMS`` nearest
lend their key phrases and every content word, the others their key phrases. What travels to
``LetheLogitsProcessor`` in ``extra_args`` is a reference (the artifact's path, the chosen item indices, the limit:
``payload.py``), never the phrases: the engine process reads them from the artifact and matches them on the text the
tokens spell (``phrase_matcher.py``), so no tokenisation variant of a phrase slips through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pydantic import Field

from classifiers.types import TargetSpec
from guards.base import (MechanismBase, MechanismPlan, NothingShared, PlanRequest, RowHooks, SeededOptions,
                         ServingContext, TargetEntry)
from guards.job_interface import (ANY_WORKER, GATE_LANE, MODEL_FILES, JobContext, JobHandler, JobResources, JobSpec,
                                  registered_options, target_spec)
from guards.devices import compute_placement
from guards.guard.payload import (GUARD_KEY, MAX_LIMIT, ItemPhrases, PhraseTable, guard_payload, read_phrase_table,
                                  validate_guard_section, write_phrase_table)
from guards.guard.phrase_matcher import Vocabulary, guard_row_hook
from guards.guard.phrases import Background, alias_phrases, builtin_background, content_words, key_phrases

if TYPE_CHECKING:
    from classifiers.embedding import Embedder

logger = logging.getLogger(__name__)

GUARD_PHRASES = "guard_phrases"
GUARD_CALIBRATE = "guard_calibrate"
KEYS_FILE = "keys.npy"


def forget_item_phrases(spec: TargetSpec) -> list[ItemPhrases]:
    """Each forget item's forbidden phrases, rarity judged against the built-in background and the retain data."""
    retain_texts = [text for item in spec.retain for text in (item.question, item.answer, item.text) if text]
    background = builtin_background() | Background.from_texts(retain_texts)
    answers = [item.answer or item.text or "" for item in spec.forget]
    return [{"key": key_phrases(answer, background), "content": content_words(answer)} for answer in answers]


def build_phrase_artifact(spec: TargetSpec, embedder: Embedder, directory: Path) -> dict[str, Any]:
    """Extract and store a target's forbidden phrases and retrieval keys; returns figures for the target's state."""
    item_phrases = forget_item_phrases(spec)
    keys = embedder.encode([item.question or item.text or item.answer or "" for item in spec.forget])  # (n, d), unit
    write_phrase_table(directory, alias_phrases(spec.aliases), item_phrases)
    np.save(directory / KEYS_FILE, np.asarray(keys, dtype=np.float32))
    return {"phrases": sum(len(p["key"]) for p in item_phrases), "items": len(spec.forget)}


class PhraseArtifact:
    """A target's GUARD artifact as the front end reads it: the phrase table and each item's retrieval key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.table: PhraseTable = read_phrase_table(directory)
        self.digest = self.table.digest
        self.keys: np.ndarray = np.load(directory / KEYS_FILE)  # (n_items, d)

    def order(self, query: np.ndarray) -> list[int]:
        """The forget items, most similar to the query first (max over the query's texts)."""
        if len(query) and len(self.keys):
            similarity = (self.keys @ np.asarray(query, dtype=np.float32).T).max(axis=1)  # (n_items,)
            return [int(i) for i in np.argsort(-similarity, kind="stable")]
        return list(range(len(self.table.items)))

    def ranked_phrases(self, query: np.ndarray, limit: int) -> list[str]:
        """Aliases, then the phrases of the items most similar to the query: all of the top items' words, the key
        phrases of the rest (what the engine resolves this artifact's payload to)."""
        return self.table.ranked(self.order(query), limit)


@lru_cache(maxsize=1024)
def _load_artifact(directory: Path) -> PhraseArtifact:
    return PhraseArtifact(directory)


class GuardOptions(SeededOptions):
    soft_penalty: float = Field(5.0, ge=0, description="Logit penalty on tokens that start a forbidden phrase.")
    max_phrases: int = Field(64, ge=1, le=MAX_LIMIT)
    calibrate: bool = Field(True, description="Replace the -inf ban by a finite penalty calibrated against the served "
                                              "model on an invented stand-in (calibration.py); false: ban outright.")


def phrases_job(resources: JobResources) -> JobHandler:
    """The ``guard_phrases`` job: the target's forbidden phrases and retrieval keys as a content-addressed artifact."""

    def run(context: JobContext) -> dict[str, Any]:
        context.progress(0.1, "extracting forbidden phrases")
        staging = context.artifacts.staging_dir()
        figures = build_phrase_artifact(target_spec(context.target), resources.embedder(), staging)
        return {"artifact": context.artifacts.commit(staging), **figures}

    return run


def calibration_job(resources: JobResources) -> JobHandler:
    """The ``guard_calibrate`` job: the finite ban at which the target's answers read as never learned."""
    model_path = resources.model_files(GUARD_CALIBRATE)
    placement = compute_placement(getattr(resources.settings, "compute_device", "auto"))

    def run(context: JobContext) -> dict[str, Any]:
        from guards.guard.calibration import calibrate_ban

        options = registered_options(context.target, GUARD_KEY)
        return calibrate_ban(model_path, target_spec(context.target), int(options.get("max_phrases", 64)),
                             float(options.get("soft_penalty", 0.0)), int(options.get("seed", 0)), placement,
                             lambda message: context.progress(0.5, message), context.check_cancelled)

    return run


def served_beneath(probe: Any, spec: TargetSpec, options: Mapping[str, Any], progress: Callable[[str], None]
                   ) -> tuple[Callable[[str], Any], dict[str, Any]]:
    """GUARD as it will serve ``spec``, for a calibration stacked on top of it (``calibration.served_guard``)."""
    from guards.guard.calibration import served_guard

    return served_guard(probe, spec, options, progress)


def _vocabulary(tokenizer: Any, placement: Any) -> Vocabulary | None:
    """The served tokenizer's token texts, read once per engine process (None outside one); the bans' index tensors
    are made on each logits row's own device (``phrase_matcher``)."""
    return Vocabulary.from_tokenizer(tokenizer) if tokenizer is not None else None


class Guard(MechanismBase):
    """The GUARD mechanism: forbidden-phrase restriction in the logits processor."""

    name = GUARD_KEY
    options = GuardOptions
    jobs = (JobSpec(GUARD_PHRASES, ANY_WORKER, phrases_job, lane=GATE_LANE),  # seconds: it builds no model
            JobSpec(GUARD_CALIBRATE, MODEL_FILES, calibration_job))
    row_hooks = RowHooks(resources=_vocabulary, validate=validate_guard_section, build=guard_row_hook)
    beneath_hooks = staticmethod(served_beneath)

    def prepare(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        return (GUARD_PHRASES, GUARD_CALIBRATE) if options.get("calibrate", True) else (GUARD_PHRASES,)

    def ready(self, options: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
        return "artifact" in state

    def serving(self, context: ServingContext) -> GuardServing:
        return GuardServing(context.artifact_path)


class GuardServing(NothingShared):
    """Plans the phrases of the forget items nearest to the prompt (retrieval on the classifier's embeddings), as a
    reference to the target's artifact."""

    def __init__(self, artifact_path: Callable[[str], Path]) -> None:
        self._artifact_path = artifact_path

    def check(self, entry: TargetEntry) -> None:
        """Read the target's phrase artifact (cached for its requests); raises if this replica cannot."""
        if "artifact" in entry.state:
            _load_artifact(self._artifact_path(entry.state["artifact"]))

    def plan(self, request: PlanRequest) -> MechanismPlan:
        artifact = _load_artifact(self._artifact_path(request.hit.state["artifact"]))
        options = request.hit.options
        return MechanismPlan(processor_args=guard_payload(
            artifact.directory, artifact.table, artifact.order(request.query_embeddings),
            int(options.get("max_phrases", 64)), float(options.get("soft_penalty", 0.0)),
            calibrated_ban(options, request.hit.state, artifact.digest)))


def calibrated_ban(options: Mapping[str, Any], state: Mapping[str, Any], table_digest: str) -> float | None:
    """The finite ban calibrated for exactly this phrase table, else None (ban outright): a table whose calibration
    has not ended yet, a target registered with ``calibrate: false``, or a calibration no finite ban passed."""
    if not options.get("calibrate", True) or state.get("ban_table") != table_digest:
        return None
    ban = state.get("ban")
    return float(ban) if ban is not None else None
