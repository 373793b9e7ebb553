"""The control plane of one replica: registry, artifacts, live snapshot, embedded job workers, audit writer, and the
erasure of deleted targets (its serving-revision reports and erasure passes, ``server/erasure.py``).

``lethe serve`` owns one; ``lethe worker`` builds only the parts a worker needs (registry, artifacts, workers). Jobs
run in lanes (``guards.base.LANES``), one worker thread per lane: a new target's classifier fit and GUARD phrases
(the ``gate`` lane, seconds) never wait behind ULD/O3 training or ECO calibration (the ``training`` lane, minutes).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from classifiers.embedding import Embedder
from guards.base import Mechanism
from guards.job_interface import (ANY_WORKER, GATE_LANE, LANES, MODEL_FILES, SERVED_MODEL, TRAINING_LANE, JobHandler,
                                  JobResources, ServedModel)
from guards.mechanisms import INTERIM, MECHANISMS
from guards.stacking import beneath_of
from server.artifact_gc import ArtifactCollector
from server.artifacts import ArtifactStore, LocalInterim
from server.audit import AuditWriter
from server.backoff import Backoff
from server.classifier_jobs import (CalibrationVectors, bank_factory, check_classifier_artifact, fit_classifier_handler,
                                   gate_bank_factory)
from server.config import Settings
from server.erasure import ErasurePass, ReplicaReporter
from server.jobs import JobWorker, default_worker_id
from server.metrics import Metrics
from server.registry import Registry
from server.registry.catalog import FIT_CLASSIFIER, VERIFY_ERASURE, MechanismCatalog
from server.registry.database import make_engine, upgrade_database
from server.registry.snapshot import RegistrySnapshot, SnapshotHolder, interim_factory, mechanism_entries
from server.verification.job import ProbedModel, VerificationSettings, verification_handler

logger = logging.getLogger(__name__)

JOB_COUNTS_INTERVAL_S = 5.0  # how often `lethe_jobs` is refreshed from the database (a scrape never queries it)
MAX_BACKOFF_S = 30.0
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def mechanism_catalog(settings: Settings, mechanisms: Sequence[Mechanism] = MECHANISMS) -> MechanismCatalog:
    """What the registry must know of the mechanisms: names, jobs per registration, admission checks, which
    mechanisms bring a gate of their own that the classifier job fits (enabling one refits the classifier), and
    which are calibrated on top of others (a change beneath re-runs their jobs)."""
    by_name = {mechanism.name: mechanism for mechanism in mechanisms}

    def jobs_for(name: str, options: Mapping[str, Any]) -> list[str]:
        return list(by_name[name].prepare(options)) if name in by_name else []

    def admit(enabled: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> str | None:
        for name, options in enabled.items():
            if name in by_name and (reason := by_name[name].admit(options, others, settings)) is not None:
                return reason
        return None

    def calibrated_on(name: str, options: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(by_name[name].calibrated_on(options)) if name in by_name else ()

    return MechanismCatalog(frozenset(by_name), jobs_for,
                            {spec.kind: mechanism.name for mechanism in mechanisms for spec in mechanism.jobs}, admit,
                            classifier_fitted_gates=frozenset(mechanism.name for mechanism in mechanisms
                                                              if mechanism.gate_detector is not None),
                            calibrated_on=calibrated_on)


class LazyEmbedder:
    """Loads the sentence-transformers model on first use (once, thread-safe), or ahead of it with
    ``load_in_background``."""

    def __init__(self, model_path: str | None) -> None:
        self._model_path = model_path
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = Embedder(self._model_path)
            return self._embedder

    def load_in_background(self, then: Callable[[], None] = lambda: None) -> threading.Thread:
        """Start loading now, off the caller's thread; join the returned thread to wait for it. A serving replica
        loads once its engine is up and is ready only when this is done too: loading (model, ONNX export) took 5 s on a
        busy 2-core host, and a replica that loaded on its first target served that registration past the 2 s
        propagation budget. ``then`` runs next, on that thread (the gate's calibration negatives are embedded there). A
        failure is logged; the next use retries."""

        def load() -> None:
            try:
                self()
                then()
            except Exception:
                logger.exception("embedder.preload_failed")

        thread = threading.Thread(target=load, name="embedder-preload", daemon=True)
        thread.start()
        return thread


def open_registry(settings: Settings) -> Registry:
    """The registry database, migrated; refuses to start when ``LETHE_DEFAULT_MECHANISMS`` names a mechanism this
    build lacks (else every registration that omits ``mechanisms`` would fail)."""
    unknown = sorted(set(settings.default_mechanisms) - {mechanism.name for mechanism in MECHANISMS})
    if unknown:
        raise ValueError(f"LETHE_DEFAULT_MECHANISMS names unknown mechanisms {unknown}; this build has "
                         f"{[mechanism.name for mechanism in MECHANISMS]}")
    engine = make_engine(settings.resolved_database_url)
    upgrade_database(engine)
    catalog = replace(mechanism_catalog(settings), verify_after_changes=settings.verify_after_changes)
    return Registry.open(engine, catalog)


def mechanism_handlers(resources: JobResources, needs: set[str],
                       mechanisms: Sequence[Mechanism] = MECHANISMS) -> dict[str, JobHandler]:
    """The mechanisms' jobs a worker with these resources can run (``needs``: what it has, ``guards.base.*``)."""
    return {spec.kind: spec.handler(resources) for mechanism in mechanisms for spec in mechanism.jobs
            if spec.needs in needs}


def job_resources(settings: Settings, embedder: Callable[[], Embedder], registry: Registry,
                  model_path: Path | None, served: ServedModel | None = None) -> JobResources:
    def registrations(name: str) -> list:
        return mechanism_entries(registry.targets.snapshot_rows()[1], name)

    return JobResources(settings=settings, embedder=embedder, model_path=model_path, served=served,
                        registrations=registrations, beneath=beneath_of(MECHANISMS))


def offline_handlers(settings: Settings, embedder: Callable[[], Embedder], registry: Registry,
                     model_path: Path | None, served: ServedModel | None = None) -> dict[str, JobHandler]:
    """The jobs a worker can run without the engine: the embedder's, and training if it has the model's files. In a
    serving replica they get its ``served`` model too (O3's training asks it for its generic replies)."""
    handlers = {FIT_CLASSIFIER: fit_classifier_handler(embedder, settings.classifier_recall, MECHANISMS,
                                                       settings.classifier_max_fpr)}
    needs = {ANY_WORKER} | ({MODEL_FILES} if model_path is not None else set())
    handlers.update(mechanism_handlers(job_resources(settings, embedder, registry, model_path, served), needs))
    return handlers


def job_lanes(mechanisms: Sequence[Mechanism] = MECHANISMS) -> dict[str, str]:
    """The lane of every job kind: the classifier fit and the mechanisms' gate-lane jobs in ``gate``, the rest in
    ``training`` (the erasure report's verification too: it measures the served model)."""
    return {FIT_CLASSIFIER: GATE_LANE, VERIFY_ERASURE: TRAINING_LANE,
            **{spec.kind: spec.lane for mechanism in mechanisms for spec in mechanism.jobs}}


def verification_settings(settings: Settings) -> VerificationSettings:
    return VerificationSettings(max_probes=settings.verify_max_probes, max_tokens=settings.verify_max_tokens,
                                negatives=settings.verify_negatives, wait_s=settings.verify_wait_s)


# Every name the jobs take from transformers, and the model classes they load (the demo models are Llama, the gate's
# embedder BERT): each resolves a lazily imported module.
LAZY_TRANSFORMERS_NAMES = ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "PreTrainedTokenizerFast",
                           "PreTrainedTokenizerBase", "LlamaForCausalLM", "BertModel",
                           "get_linear_schedule_with_warmup")


def preload_job_libraries() -> None:
    """Resolve transformers' lazily imported names, and import the libraries the jobs import inside their handlers
    (peft, sentence-transformers), once, on one thread, before the lanes start. Two lanes resolving them at once (the
    embedder's first load in the gate lane, a ULD training in the training lane) saw a half-imported module:
    ``ImportError: cannot import name 'AutoConfig'``, and the training failed."""
    import peft  # noqa: F401
    import sentence_transformers  # noqa: F401
    import transformers

    for name in LAZY_TRANSFORMERS_NAMES:
        getattr(transformers, name)


def make_workers(settings: Settings, registry: Registry, handlers: dict[str, JobHandler],
                 lanes: Sequence[str] = LANES, mechanisms: Sequence[Mechanism] = MECHANISMS) -> list[JobWorker]:
    """One worker per lane in ``lanes`` that has a handler here, each claiming only its lane's job kinds."""
    preload_job_libraries()
    artifacts = ArtifactStore(settings.resolved_artifacts_dir)
    lane_of = job_lanes(mechanisms)
    workers = []
    for lane in lanes:
        mine = {kind: handler for kind, handler in handlers.items() if lane_of.get(kind, TRAINING_LANE) == lane}
        if mine:
            workers.append(JobWorker(registry, artifacts, mine, worker_id=f"{default_worker_id()}:{lane}", lane=lane,
                                     stale_after_s=settings.job_stale_after_s))
    return workers


def report_ended(task: asyncio.Task) -> None:
    """A background loop runs until the replica stops and handles its own failures; one that ends otherwise is a bug
    that must not go unnoticed (its work, e.g. registry reloads, has stopped): logged as an error."""
    if task.cancelled():
        return
    error = task.exception()
    logger.error("background.task_ended", extra={"task": task.get_name(),
                                                 "error": type(error).__name__ if error else None},
                 exc_info=error)


@dataclass
class ControlPlane:
    settings: Settings
    metrics: Metrics
    registry: Registry
    snapshots: SnapshotHolder
    audit: AuditWriter
    artifacts: ArtifactStore
    embedder: LazyEmbedder
    calibration: CalibrationVectors
    reporter: ReplicaReporter
    erasure: ErasurePass
    interim: LocalInterim
    workers: list[JobWorker] = field(default_factory=list)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    @classmethod
    def open(cls, settings: Settings, metrics: Metrics) -> ControlPlane:
        registry = open_registry(settings)
        embedder = LazyEmbedder(settings.embedding_model)
        artifacts = ArtifactStore(settings.resolved_artifacts_dir)
        calibration = CalibrationVectors(embedder)
        interim = LocalInterim()
        snapshots = SnapshotHolder(registry.targets, artifacts.path,
                                   bank_factory(embedder, settings.gate_max_union_fpr, settings.gate_max_windows,
                                                metrics.gate_calibrated, calibration),
                                   settings.registry_poll_s, gate_bank_factory(embedder, MECHANISMS),
                                   interim_factory(INTERIM, interim.root), registry.negatives.texts,
                                   check_classifier_artifact)
        audit = AuditWriter(registry.audit, settings.audit_retention_days,
                            int(settings.audit_buffer_mib * 1024 * 1024), metrics)
        reporter = ReplicaReporter(registry, lambda: snapshots.current.revision, settings.registry_poll_s)
        collector = ArtifactCollector(artifacts.root, settings.erasure_grace_s, settings.staging_grace_s,
                                      [folder for mechanism in MECHANISMS for folder in mechanism.derived_artifacts])
        return cls(settings, metrics, registry, snapshots, audit, artifacts, embedder, calibration, reporter,
                   ErasurePass(registry, collector, settings.replica_stale_s), interim)

    async def start(self) -> None:
        await asyncio.to_thread(self.reporter.starting)
        await self.start_snapshots()
        self._tasks = [asyncio.create_task(self.snapshots.watch(), name="registry-watch"),
                       asyncio.create_task(self.audit.run(), name="audit-writer"),
                       asyncio.create_task(self.watch_job_counts(), name="job-counts"),
                       asyncio.create_task(self.reporter.run(), name="replica-reporter"),
                       asyncio.create_task(self.erasure.run(self.settings.erasure_interval_s), name="erasure")]
        for task in self._tasks:
            task.add_done_callback(report_ended)

    def start_worker(self, served: ServedModel, model_path: Path, probed: ProbedModel | None = None) -> None:
        """Run this replica's job workers, one thread per lane, once the engine is up.

        Jobs that measure the served model (ECO's calibration, the erasure report's verification with ``probed``)
        always run in a serving replica; the others run here too unless ``LETHE_EMBEDDED_WORKER=false`` hands them to
        ``lethe worker`` processes.
        """
        resources = job_resources(self.settings, self.embedder, self.registry, model_path, served)
        handlers = mechanism_handlers(resources, {SERVED_MODEL})
        if probed is not None:
            handlers[VERIFY_ERASURE] = verification_handler(probed, self.registry.targets.get,
                                                            verification_settings(self.settings))
        if self.settings.embedded_worker:
            handlers.update(offline_handlers(self.settings, self.embedder, self.registry, model_path, served))
        self.workers = make_workers(self.settings, self.registry, handlers)
        for worker in self.workers:
            worker.start()

    async def watch_job_counts(self) -> None:
        """Keep ``lethe_jobs`` current from the database, off the scrape path: ``/metrics`` only reads the last counts,
        so it answers during a database outage too (the counts then stay at their last values, and
        ``lethe_background_failures_total{task="job_counts"}`` grows)."""
        retry = Backoff(JOB_COUNTS_INTERVAL_S, MAX_BACKOFF_S)
        while True:
            try:
                summary = await asyncio.to_thread(self.registry.targets.summary)
            except Exception as exc:
                if not retry.failures:
                    logger.warning("registry.job_counts_failed", extra={"error": type(exc).__name__})
                self.metrics.background_failures.labels("job_counts").inc()
                retry.failed()
            else:
                for status in {*JOB_STATUSES, *summary.jobs}:  # a status whose jobs are all gone reads 0, not stale
                    self.metrics.jobs.labels(status).set(summary.jobs.get(status, 0))
                retry.succeeded()
            await asyncio.sleep(retry.delay)

    async def start_snapshots(self) -> None:
        """Report every snapshot swap, failed reload and the snapshot's staleness in the metrics, and load a first
        snapshot. A first load that fails does not stop the start (the watch retries it); the replica is not ready
        and serves no request until one is loaded (``/health/ready``, ``pipeline``)."""
        self.snapshots.on_swap.append(self._on_swap)
        self.metrics.watch_registry(self.snapshots.health)
        self.snapshots.on_failure.append(lambda _: self.metrics.background_failures.labels("registry_reload").inc())
        if not await self.snapshots.reload():
            logger.error("registry.initial_load_failed", extra={"retry_s": self.settings.registry_poll_s})

    def _on_swap(self, snapshot: RegistrySnapshot) -> None:
        self.interim.keep_only(set(snapshot.targets))  # a deleted target's phrases leave this replica with it
        self.metrics.registry_revision.set(snapshot.revision)
        self.metrics.targets_degraded.set(snapshot.degraded)
        self.metrics.targets_unreadable.set(len(snapshot.unreadable))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers:
            await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(self.reporter.leave)
        self.interim.close()
