"""The ``verify_erasure`` job: ask the served model a target's probes with and without its protection.

It runs in a serving replica (it needs the engine, like ECO's calibration), in the ``training`` lane. It is queued
behind the target's own jobs at every change that queues them (and on demand, ``POST /admin/v1/targets/{id}/verify``)
and first waits, reporting progress, until the target is no longer ``preparing`` and this replica serves the
revision that made it so: it measures the protection clients get once the change is in force. Past
``LETHE_VERIFY_WAIT_S`` it measures what is served then and says so (``status`` in its result).

Each probe (``probes.py``) is asked twice, greedily:

- **without protection**: the plain engine request, no plan (what the model itself would say);
- **with protection**: through the full request pipeline exactly as a client's chat request (classifier, planner,
  every ready mechanism), but not written to the inference audit, whose hits over time the report shows for client
  traffic.

A few unrelated questions (the target's retain questions, else other authors' from the built-in negative pool) go
through the pipeline too: the share of them flagged as about this target is a false-positive estimate beside the
classifier's own calibration figures. The result keeps figures only — rates, counts, per-probe scores — never a
probe, a reply or a forget text, so the report and the tombstone can carry it.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from classifiers.negatives import builtin_negative_pool
from guards.job_interface import JobContext, JobHandler
from server.verification.leaks import LEAK_THRESHOLD, leak_score, leaks
from server.verification.probes import FAMILIES, Probe, build_probes

logger = logging.getLogger(__name__)

RESULT_VERSION = 1
WAIT_POLL_S = 2.0
BATCH = 16  # probes sent to the engine at once between two progress reports
NEGATIVE_TOKENS = 1  # an unrelated question is asked only to see whether the gate flags it


@dataclass(frozen=True)
class GuardedReply:
    """A reply through the pipeline: its text, the targets its prompt hit, the mechanisms applied; ``refused`` when
    the pipeline refused it (503 ``guard_unavailable``: a hit it could not protect, never served unguarded)."""

    text: str
    targets: tuple[str, ...]
    mechanisms: tuple[str, ...]
    refused: bool = False


class ProbedModel(Protocol):
    """The served model as the verification asks it (``server.served_model.PipelineServedModel`` in a replica)."""

    def serving_revision(self) -> int:
        """The registry revision this replica's live snapshot serves."""
        ...

    def plain_replies(self, probes: Sequence[Probe], max_tokens: int, tag: str) -> list[str]:
        """Greedy replies without any protection (the plain engine request)."""
        ...

    def guarded_replies(self, probes: Sequence[Probe], max_tokens: int, tag: str) -> list[GuardedReply]:
        """Greedy replies through the request pipeline, exactly as client chat requests (not audited)."""
        ...


class TargetState(Protocol):
    """What the job re-reads of its target while it waits (a ``TargetView``)."""

    status: str
    revision: int


@dataclass(frozen=True)
class VerificationSettings:
    max_probes: int
    max_tokens: int
    negatives: int
    wait_s: float


def unrelated_questions(retain: Sequence[dict[str, Any]], count: int, seed: str) -> list[str]:
    """``count`` questions about someone else: the target's retain questions first (what its operator said must stay
    answered), then other authors' from the built-in negative pool, a sample fixed by ``seed``."""
    own = [str(item["question"]) for item in retain if item.get("question")][:count]
    pool = [n.text for n in builtin_negative_pool() if n.source == "tofu_other_authors" and n.text.endswith("?")
            and n.text not in own]
    rng = random.Random(seed)
    return own + [pool[i] for i in sorted(rng.sample(range(len(pool)), min(count - len(own), len(pool))))]


def _rate(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def summarise(probes: Sequence[Probe], before: Sequence[float], after: Sequence[GuardedReply],
              after_scores: Sequence[float], target_id: str, negatives: Sequence[GuardedReply]) -> dict[str, Any]:
    """The figures of one run: overall, per family, and the per-probe scores the report plots."""
    detected = [reply.refused or target_id in reply.targets for reply in after]
    families = []
    for family in FAMILIES:
        picked = [i for i, probe in enumerate(probes) if probe.family == family]
        if not picked:
            continue
        families.append({
            "family": family, "probes": len(picked),
            "leaked_before": sum(leaks(before[i]) for i in picked),
            "leaked_after": sum(leaks(after_scores[i]) for i in picked),
            "detected": sum(detected[i] for i in picked),
            "mean_score_before": _mean([before[i] for i in picked]),
            "mean_score_after": _mean([after_scores[i] for i in picked]),
        })
    flagged = sum(target_id in reply.targets for reply in negatives)
    applied: dict[str, int] = {}
    for reply in after:
        for mechanism in reply.mechanisms:
            applied[mechanism] = applied.get(mechanism, 0) + 1
    return {
        "probes": len(probes),
        "leaked_before": sum(map(leaks, before)),
        "leaked_after": sum(map(leaks, after_scores)),
        "leak_rate_before": _rate(sum(map(leaks, before)), len(probes)),
        "leak_rate_after": _rate(sum(map(leaks, after_scores)), len(probes)),
        "detection_rate": _rate(sum(detected), len(probes)),
        "refused": sum(reply.refused for reply in after),
        "negatives": len(negatives),
        "false_positive_rate": _rate(flagged, len(negatives)),
        "families": families,
        "mechanisms_applied": applied,
    }


class VerificationJob:
    """The job's handler in a serving replica; ``target_state`` re-reads the target (status, revision)."""

    def __init__(self, model: ProbedModel, target_state: Callable[[str], TargetState],
                 settings: VerificationSettings, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._model = model
        self._target_state = target_state
        self._settings = settings
        self._clock = clock
        self._sleep = sleep

    def __call__(self, context: JobContext) -> dict[str, Any]:
        record = context.target
        state = self._wait_until_in_force(context)
        probes = build_probes(record.forget, record.aliases, self._settings.max_probes)
        if not probes:
            raise ValueError("the target registers nothing a probe can ask about (no question, answer or text)")
        tag = f"verify-{context.job_id}-{uuid.uuid4().hex[:6]}"
        tokens = self._settings.max_tokens
        total = 2 * len(probes)

        plain: list[str] = []
        for start in range(0, len(probes), BATCH):
            context.progress(0.05 + 0.45 * start / total, f"without protection: probe {start + 1} of {len(probes)}")
            plain.extend(self._model.plain_replies(probes[start:start + BATCH], tokens, f"{tag}-p{start}"))
        guarded: list[GuardedReply] = []
        for start in range(0, len(probes), BATCH):
            context.progress(0.5 + 0.45 * start / total, f"with protection: probe {start + 1} of {len(probes)}")
            guarded.extend(self._model.guarded_replies(probes[start:start + BATCH], tokens, f"{tag}-g{start}"))
        context.progress(0.95, "unrelated questions through the gate")
        questions = unrelated_questions(record.retain, self._settings.negatives, record.id)
        negatives = self._model.guarded_replies(
            [Probe("negative", (("user", q),), (), q) for q in questions], NEGATIVE_TOKENS, f"{tag}-n")

        before = [leak_score(reply, probe, record.forget) for reply, probe in zip(plain, probes, strict=True)]
        after = [0.0 if reply.refused else leak_score(reply.text, probe, record.forget)
                 for reply, probe in zip(guarded, probes, strict=True)]
        figures = summarise(probes, before, guarded, after, record.id, negatives)
        finished = datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds")
        logger.info("verification.done", extra={"target_id": record.id, "probes": len(probes),
                                                "leak_rate_before": figures["leak_rate_before"],
                                                "leak_rate_after": figures["leak_rate_after"]})
        return {
            "version": RESULT_VERSION, "job_id": context.job_id, "finished_at": finished,
            "revision": state.revision, "status": state.status, "threshold": LEAK_THRESHOLD, "max_tokens": tokens,
            **{key: figures[key] for key in ("families", "mechanisms_applied")},
            "scores": {"before": [round(s, 4) for s in before], "after": [round(s, 4) for s in after],
                       "family": [probe.family for probe in probes]},
            "summary": {"verified_at": finished, "revision": state.revision,
                        **{key: figures[key] for key in ("probes", "leaked_before", "leaked_after",
                                                         "leak_rate_before", "leak_rate_after", "detection_rate",
                                                         "refused", "negatives", "false_positive_rate")},
                        "threshold": LEAK_THRESHOLD},
        }

    def _wait_until_in_force(self, context: JobContext) -> TargetState:
        """The target once its own jobs are over and this replica serves it so (or at the wait's end)."""
        deadline = self._clock() + self._settings.wait_s
        while True:
            state = self._target_state(context.target.id)
            in_force = state.status != "preparing" and self._model.serving_revision() >= state.revision
            if in_force or self._clock() >= deadline:
                return state
            context.progress(0.01, f"waiting for the target's jobs (status {state.status})")
            self._sleep(WAIT_POLL_S)


def verification_handler(model: ProbedModel, target_state: Callable[[str], TargetState],
                         settings: VerificationSettings) -> JobHandler:
    return VerificationJob(model, target_state, settings)
