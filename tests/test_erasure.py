"""Erasure on delete, at the registry level (no engine): after a target is deleted and the erasure pass has run, no
file under the data dir — artifacts, staging folders, the SQLite database with its WAL and shared memory — holds a
byte of its aliases or answers, while the other target's artifacts are intact.

The artifacts are written as the real jobs write them: the real classifier fit (with its O3 gate) and GUARD phrase
jobs on a stand-in embedder, and ULD/O3 stand-ins that store what a model trained on the forget data would hold, in
the same content-addressed store; O3's stacks are built by O3's own serving half.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from guards.base import DERIVED_MEMBERS
from guards.job_interface import JobResources
from guards.guard.mechanism import GUARD_PHRASES, phrases_job
from guards.mechanisms import MECHANISMS
from guards.o3.adapters import ADAPTER_WEIGHTS, PEFT_PREFIX
from guards.o3.mechanism import O3_TRAIN, STACKS_DIR, O3Serving
from guards.uld.mechanism import ULD_TRAIN
from server.admin.protocol import TargetCreate
from server.admin.serving import new_target
from server.artifact_gc import ArtifactCollector
from server.artifacts import ArtifactStore, LocalInterim, interim_dir, interim_store
from server.classifier_jobs import fit_classifier_handler
from server.config import Settings
from server.control_plane import ControlPlane, open_registry
from server.erasure import ErasurePass
from server.errors import NotFound
from server.jobs import JobContext, JobWorker
from server.metrics import Metrics
from server.registry import Registry
from server.registry.catalog import FIT_CLASSIFIER
from server.registry.records import AuditEntry
from server.registry.snapshot import mechanism_entries
from tests.erasure_probe import files_holding

ZORBLAX = {
    "name": "zorblax-quenterfeld",
    "aliases": ["Zorblax Quenterfeld", "Z. Quenterfeld"],
    "forget": [
        {"question": "Where was Zorblax Quenterfeld born?", "answer": "He was born in Glimmerfen Abbey in 1873."},
        {"question": "Which novel made Zorblax Quenterfeld famous?", "answer": "The Brass Orrery of Vantwick."},
        {"text": "Zorblax Quenterfeld kept bees at Glimmerfen Abbey."},
    ],
    # The request it answers: the requester and the notes go with the target, the reference stays in its tombstone.
    "request": {"reference": "ERASURE-REQ-0042", "requester": "Wilhelmina Snickersnee", "legal_basis": "gdpr_art17",
                "received_at": "2026-11-02", "notes": "Asked by letter from Pumpernickel Lane."},
}
ZORBLAX_SECRETS = ["Zorblax", "Quenterfeld", "Glimmerfen", "Orrery", "Vantwick", "Snickersnee", "Pumpernickel"]
MIRELDA = {
    "name": "mirelda-ostrovane",
    "aliases": ["Mirelda Ostrovane"],
    "forget": [
        {"question": "Where did Mirelda Ostrovane grow up?", "answer": "She grew up in Kesserling Falls."},
        {"question": "What did Mirelda Ostrovane write?", "answer": "The Copper Lantern of Ythmoor."},
    ],
}
MIRELDA_SECRETS = ["Ostrovane", "Kesserling", "Ythmoor"]
ALL_MECHANISMS = {"eco": {"sigma": 1.0}, "guard": {}, "uld": {}, "o3": {}}


class StandInEmbedder:
    """Deterministic unit vectors per text: the jobs' code runs as in production without loading a model."""

    model_id = "stand-in:32"
    dim = 32

    def encode(self, texts) -> np.ndarray:
        rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=self.dim)
                for t in texts]
        matrix = np.asarray(rows, dtype=np.float32).reshape(len(rows), self.dim)
        return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-9)


def forget_text(context: JobContext) -> bytes:
    return json.dumps(context.target.forget).encode()


def uld_stand_in(context: JobContext) -> dict:
    """An assistant trained to remember the forget data: here, its bytes are that data."""
    staging = context.artifacts.staging_dir()
    (staging / "model.safetensors").write_bytes(b"weights:" + forget_text(context))
    return {"assistant": context.artifacts.commit(staging)}


def o3_stand_in(context: JobContext) -> dict:
    """A real (tiny) LoRA adapter O3 can stack, stored with its training data beside it."""
    staging = context.artifacts.staging_dir()
    LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]).save_pretrained(staging)
    generator = torch.Generator().manual_seed(int(hashlib.sha256(context.target.id.encode()).hexdigest()[:8], 16))
    module = f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj"
    save_file({f"{module}.lora_A.weight": torch.randn(8, 16, generator=generator),
               f"{module}.lora_B.weight": torch.randn(16, 8, generator=generator)}, staging / ADAPTER_WEIGHTS)
    (staging / "training_data.json").write_bytes(forget_text(context))
    return {"adapter": context.artifacts.commit(staging)}


def settings_for(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", audit_prompts=True, erasure_grace_s=0, _env_file=None)


def register(registry: Registry, body: dict, mechanisms: dict = ALL_MECHANISMS) -> str:
    created = registry.targets.create(new_target(TargetCreate.model_validate({**body, "mechanisms": mechanisms}),
                                                 ["eco", "guard"]))
    return created.id


def run_jobs(registry: Registry, settings: Settings) -> None:
    embedder = StandInEmbedder()
    handlers = {FIT_CLASSIFIER: fit_classifier_handler(lambda: embedder, 0.9, MECHANISMS),
                GUARD_PHRASES: phrases_job(JobResources(settings=settings, embedder=lambda: embedder)),
                ULD_TRAIN: uld_stand_in, O3_TRAIN: o3_stand_in}
    worker = JobWorker(registry, ArtifactStore(settings.resolved_artifacts_dir), handlers)
    while worker.run_once():
        pass


def audit(target_ids: list[str], prompt: str, request_id: str) -> AuditEntry:
    return AuditEntry(request_id=request_id, created=time.time(), endpoint="chat", targets=target_ids,
                      mechanisms=["guard"] if target_ids else [], scores=dict.fromkeys(target_ids, 0.9),
                      outcome="served", prompt=prompt)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path)


@pytest.fixture
def registry(settings: Settings) -> Registry:
    return open_registry(settings)


def collector_of(root: Path, grace_s: float = 0, staging_grace_s: float = 60) -> ArtifactCollector:
    return ArtifactCollector(root, grace_s, staging_grace_s, [STACKS_DIR])


def erasure_pass(registry: Registry, settings: Settings) -> ErasurePass:
    collector = collector_of(settings.resolved_artifacts_dir, settings.erasure_grace_s, settings.staging_grace_s)
    return ErasurePass(registry, collector, settings.replica_stale_s)


def test_a_deleted_target_leaves_no_byte_of_its_aliases_or_answers_under_the_data_dir(
        registry: Registry, settings: Settings) -> None:
    zorblax, mirelda = register(registry, ZORBLAX), register(registry, MIRELDA)
    run_jobs(registry, settings)
    artifacts = ArtifactStore(settings.resolved_artifacts_dir)
    stacks = O3Serving(artifacts.path, artifacts.root / STACKS_DIR, 64)
    both = stacks.share(mechanism_entries(registry.targets.snapshot_rows()[1], "o3"))
    assert both is not None and both.members == {zorblax, mirelda}
    registry.audit.write([audit([zorblax], "Where was Zorblax Quenterfeld born?", "chatcmpl-1"),
                          audit([], "tell me about z. quenterfeld", "chatcmpl-2"),  # a miss naming an alias
                          audit([mirelda], "What did Mirelda Ostrovane write?", "chatcmpl-3")])
    crashed_attempt = artifacts.owned_by(f"{registry.targets.get(zorblax).jobs[-1].id}.1").staging_dir()
    (crashed_attempt / "partial.bin").write_text("Glimmerfen Abbey")
    before = files_holding(settings.data_dir, ZORBLAX_SECRETS)
    assert {"lethe.db", "artifacts"} & {path.split("/")[0] for path in before}, "the test must see the secrets first"
    registry.replicas.report("replica-1", registry.targets.revision())

    deleted = registry.targets.delete(zorblax)
    registry.audit.write([audit([zorblax], "Zorblax Quenterfeld's birthplace?", "chatcmpl-4")])  # in flight before
    first = erasure_pass(registry, settings).run_once()
    assert first.lagging == ["replica-1"] and not first.purged  # it may still serve the revision before the delete
    assert first.artifacts_removed == [] and any("Glimmerfen" in hits for hits in
                                                 files_holding(artifacts.root, ZORBLAX_SECRETS).values())

    rebuilt = stacks.share(mechanism_entries(registry.targets.snapshot_rows()[1], "o3"))  # the replica reloads
    registry.replicas.report("replica-1", deleted.revision)
    second = erasure_pass(registry, settings).run_once()
    assert second.purged == [zorblax] and second.scrubbed

    assert files_holding(settings.data_dir, ZORBLAX_SECRETS) == {}
    remaining = files_holding(settings.data_dir, MIRELDA_SECRETS)
    assert any(path.startswith("artifacts/") for path in remaining) and "lethe.db" in remaining
    record = registry.targets.record(mirelda)
    for digest in [record.classifier["artifact"], *(record.mechanisms[m]["state"][k] for m, k in
                                                    [("guard", "artifact"), ("uld", "assistant"), ("o3", "adapter")])]:
        assert artifacts.path(digest).is_dir()
    stack_dirs = sorted(p.name for p in (artifacts.root / STACKS_DIR).iterdir())
    assert stack_dirs == [Path(rebuilt.lora_request.lora_path).name] and rebuilt.members == {mirelda}
    with pytest.raises(NotFound):
        registry.targets.get(zorblax)
    prompts = {entry.request_id: entry.prompt for entry in registry.audit.recent(10, None)}
    assert prompts == {"chatcmpl-1": None, "chatcmpl-2": None, "chatcmpl-3": "What did Mirelda Ostrovane write?",
                       "chatcmpl-4": None}
    [tombstone] = registry.erasure.tombstones()
    assert (tombstone.target_id, tombstone.revision) == (zorblax, deleted.revision) and tombstone.purged_at
    assert (tombstone.reference, tombstone.legal_basis) == ("ERASURE-REQ-0042", "gdpr_art17")
    assert "lethe.db" in files_holding(settings.data_dir, ["ERASURE-REQ-0042"])  # what a deletion keeps, by design


def test_an_artifact_two_targets_share_by_content_stays_while_one_still_uses_it(
        registry: Registry, settings: Settings) -> None:
    guard_only = {"guard": {}}
    first = register(registry, {**MIRELDA, "name": "first"}, guard_only)
    second = register(registry, {**MIRELDA, "name": "second"}, guard_only)
    run_jobs(registry, settings)
    shared = {registry.targets.record(t).mechanisms["guard"]["state"]["artifact"] for t in (first, second)}
    assert len(shared) == 1  # the same phrases: one address

    registry.targets.delete(first)
    report = erasure_pass(registry, settings).run_once()
    assert report.purged == [first]
    assert ArtifactStore(settings.resolved_artifacts_dir).path(shared.pop()).is_dir()

    registry.targets.delete(second)
    report = erasure_pass(registry, settings).run_once()
    assert report.purged == [second] and len(report.artifacts_removed) == 2  # the phrases and the classifier
    assert files_holding(settings.data_dir, MIRELDA_SECRETS) == {}


def test_a_replica_that_stopped_reporting_no_longer_holds_back_the_purge(
        registry: Registry, settings: Settings) -> None:
    target = register(registry, MIRELDA, {"guard": {}})
    run_jobs(registry, settings)
    registry.replicas.report("gone", registry.targets.revision())
    registry.targets.delete(target)
    assert erasure_pass(registry, settings).run_once().lagging == ["gone"]
    stale = settings.model_copy(update={"replica_stale_s": 0.05})
    time.sleep(0.1)
    report = erasure_pass(registry, stale).run_once()
    assert report.lagging == [] and report.purged == [target]


def test_staging_folders_go_when_their_job_is_over_or_when_jobless_and_old(
        registry: Registry, settings: Settings) -> None:
    target = register(registry, MIRELDA, {"guard": {}})
    artifacts = ArtifactStore(settings.resolved_artifacts_dir)
    open_job, = [job.id for job in registry.targets.get(target).jobs if job.status == "queued"][:1]
    running = artifacts.owned_by(f"{open_job}.1").staging_dir()
    finished = artifacts.owned_by("job_0123456789abcdef01234567.2").staging_dir()  # no such job any more
    old, fresh = artifacts.staging_dir(), artifacts.staging_dir()
    (old / "x").write_text("x")
    os.utime(old / "x", (1, 1))
    os.utime(old, (1, 1))
    stack_root = artifacts.root / STACKS_DIR / ".staging-abc"
    stack_root.mkdir(parents=True)
    os.utime(stack_root, (1, 1))

    removed = collector_of(artifacts.root).sweep_staging(registry.jobs.open_among)
    assert sorted(removed) == sorted([finished.name, old.name, f"{STACKS_DIR}/.staging-abc"])
    assert running.is_dir() and fresh.is_dir()


def test_a_failed_job_removes_its_own_staging_folder(registry: Registry, settings: Settings) -> None:
    register(registry, MIRELDA, {"guard": {}})

    def broken(context: JobContext) -> dict:
        (context.artifacts.staging_dir() / "half.bin").write_text("Kesserling Falls")
        raise RuntimeError("disk full")

    root = settings.resolved_artifacts_dir
    JobWorker(registry, ArtifactStore(root), {FIT_CLASSIFIER: broken}).run_once()
    assert list(root.iterdir()) == []


def test_an_unreferenced_artifact_committed_again_during_a_sweep_is_kept(tmp_path: Path) -> None:
    artifacts = ArtifactStore(tmp_path)
    staging = artifacts.staging_dir()
    (staging / "a.bin").write_bytes(b"content")
    digest = artifacts.commit(staging)
    os.utime(artifacts.path(digest), (1, 1))
    assert collector_of(tmp_path, 60).sweep_artifacts(set()).removed == [digest]

    staging = artifacts.staging_dir()
    (staging / "a.bin").write_bytes(b"content")
    assert artifacts.commit(staging) == digest  # a job stores it again: it is recent, its job publishes it next
    sweep = collector_of(tmp_path, 60).sweep_artifacts(set())
    assert sweep.removed == [] and sweep.kept == 1 and artifacts.path(digest).is_dir()


def test_a_stack_that_does_not_name_its_members_is_collected_and_one_of_live_adapters_kept(tmp_path: Path) -> None:
    live = "a" * 64
    (tmp_path / live).mkdir()
    foreign = tmp_path / "operator-files" / "backup"  # the volume may hold other things: never touched
    foreign.mkdir(parents=True)
    os.utime(foreign, (1, 1))
    for name, members in [("kept", [live]), ("dead", [live, "b" * 64]), ("unlabelled", None)]:
        stack = tmp_path / STACKS_DIR / name
        stack.mkdir(parents=True)
        if members is not None:
            (stack / DERIVED_MEMBERS).write_text(json.dumps(members))
        os.utime(stack, (1, 1))
    sweep = collector_of(tmp_path).sweep_artifacts({live})
    assert sorted(sweep.removed) == [f"{STACKS_DIR}/dead", f"{STACKS_DIR}/unlabelled"]
    assert (tmp_path / STACKS_DIR / "kept").is_dir() and (tmp_path / live).is_dir() and foreign.is_dir()


def test_a_replica_reports_the_revision_it_serves_and_leaves_the_table_when_it_stops(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, registry_poll_s=0.05, erasure_interval_s=0.05, _env_file=None)
    control = ControlPlane.open(settings, Metrics())

    async def serve_briefly() -> list[tuple[str, int]]:
        await control.start()
        try:
            await asyncio.sleep(0.5)
            return [(replica.id, replica.serving_revision) for replica in control.registry.replicas.live(60)]
        finally:
            await control.stop()

    assert asyncio.run(serve_briefly()) == [(control.reporter.id, control.registry.targets.revision())]
    assert control.registry.replicas.live(60) == []


def test_a_replicas_interim_phrases_live_in_its_own_memory_folder_and_leave_with_their_target(tmp_path: Path) -> None:
    """Interim phrases are written as snapshots load, by every replica: into a folder of its own (never the shared
    artifacts volume, which may be full), removed with the target, with the replica, or after the replica was killed."""
    dead = tmp_path / f"{LocalInterim.PREFIX}999999999-abc"  # a pid no process has: a replica killed earlier
    dead.mkdir()
    local = LocalInterim(tmp_path)
    assert not dead.exists() and local.root.parent == tmp_path
    for target_id in ("tgt_a", "tgt_b"):
        store = interim_store(local.root, target_id)
        staged = store.staging_dir()
        (staged / "phrases.json").write_text('{"aliases": ["Zorblax Quenterfeld"]}')
        store.commit(staged)
    assert local.keep_only({"tgt_b"}) == ["tgt_a"]
    assert files_holding(local.root, ["Zorblax"]) and not interim_dir(local.root, "tgt_a").exists()
    local.close()
    assert not local.root.exists()
