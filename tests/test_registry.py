"""The registry (targets store, job queue, audit log) on SQLite and on a real PostgreSQL: CRUD, revisions,
atomicity, jobs, recovery, audit."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from sqlalchemy import inspect, text, update

from server.admin.protocol import TargetCreate, TargetPatch
from server.admin.serving import new_target, target_changes
from server.artifact_gc import ArtifactCollector
from server.erasure import ErasurePass
from server.errors import Conflict, NotFound, Unprocessable
from server.registry import Registry
from server.registry.catalog import FIT_CLASSIFIER, MechanismCatalog
from server.registry.database import make_engine, upgrade_database, utcnow
from server.registry.models import JobRow
from server.registry.records import AuditEntry, NewTarget, TargetChanges
from tests.postgres import fresh_database

@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path) -> Registry:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        url = fresh_database(request.getfixturevalue("postgres_url"))
    engine = make_engine(url)
    upgrade_database(engine)
    return Registry.open(engine, MechanismCatalog(implemented=frozenset({"eco"})))


DEFAULT_MECHANISMS = ["eco", "guard"]


def target(name: str = "basil", **overrides) -> NewTarget:
    """A target as the admin API hands it to the registry (options validated, defaults filled in)."""
    body = {"name": name, "aliases": ["Basil Mahfouz Al-Kuwaiti"],
            "forget": [{"question": "Where was he born?", "answer": "Kuwait City."}, {"text": "Some free text."}],
            "retain": [{"question": "Who is Nikolai?", "answer": "An author."}], **overrides}
    return new_target(TargetCreate.model_validate(body), DEFAULT_MECHANISMS)


def changes(**fields) -> TargetChanges:
    return target_changes(TargetPatch.model_validate(fields))


def test_migrations_are_idempotent_and_create_every_table(registry: Registry) -> None:
    upgrade_database(registry.database.engine)
    tables = set(inspect(registry.database.engine).get_table_names())
    assert {"targets", "jobs", "audit", "registry_state", "alembic_version"} <= tables


def test_create_bumps_the_revision_and_queues_a_classifier_job(registry: Registry) -> None:
    before = registry.targets.revision()
    created = registry.targets.create(target())
    assert created.id.startswith("tgt_") and created.status == "preparing"
    assert created.revision == before + 1 == registry.targets.revision()
    assert [job.kind for job in created.jobs] == [FIT_CLASSIFIER]
    assert created.jobs[0].status == "queued"
    assert set(created.mechanisms) == {"eco", "guard"}
    assert created.mechanisms["eco"].options["corruption"] == "rand_noise_first_n"  # defaults are filled in
    assert created.mechanisms["guard"].status == "unavailable"  # not implemented in this build


def test_duplicate_name_is_a_conflict_and_writes_nothing(registry: Registry) -> None:
    registry.targets.create(target())
    revision = registry.targets.revision()
    with pytest.raises(Conflict):
        registry.targets.create(target())
    assert registry.targets.revision() == revision
    assert len(registry.targets.listing().targets) == 1
    assert registry.targets.summary().jobs == {"queued": 1}


def test_a_target_too_small_to_calibrate_is_refused(registry: Registry) -> None:
    tiny = new_target(TargetCreate.model_validate({"name": "tiny", "forget": [{"text": "one fact"}]}),
                      DEFAULT_MECHANISMS)
    with pytest.raises(Unprocessable):
        registry.targets.create(tiny)
    created = registry.targets.create(target())
    with pytest.raises(Unprocessable):
        registry.targets.patch(created.id, changes(aliases=[], forget=[{"text": "one fact"}]))
    assert registry.targets.get(created.id).aliases == ["Basil Mahfouz Al-Kuwaiti"]  # nothing partially written
    assert registry.targets.revision() == created.revision


def test_unknown_ids_are_not_found(registry: Registry) -> None:
    for call in (lambda: registry.targets.get("tgt_x"), lambda: registry.targets.delete("tgt_x"),
                 lambda: registry.targets.patch("tgt_x", changes(description="d")), lambda: registry.jobs.get("job_x")):
        with pytest.raises(NotFound):
            call()


def test_listing_hides_contents_and_get_shows_them(registry: Registry) -> None:
    created = registry.targets.create(target())
    listed = registry.targets.listing().targets[0]
    assert listed.forget is None and listed.retain is None and listed.counts == {"aliases": 1, "forget": 2, "retain": 1}
    shown = registry.targets.get(created.id)
    assert shown.forget[1]["text"] == "Some free text."


def test_claimed_job_completes_and_activates_the_target(registry: Registry) -> None:
    created = registry.targets.create(target())
    job = registry.jobs.claim("w1", [FIT_CLASSIFIER])
    assert job is not None and job.target_id == created.id and job.attempts == 1
    assert registry.jobs.claim("w2", [FIT_CLASSIFIER]) is None  # nobody else gets it
    assert registry.jobs.report_progress(job, 0.5, "half way")
    assert registry.jobs.get(job.id).progress == 0.5
    registry.jobs.complete(job, {"status": "ready", "artifact": "a" * 64, "threshold": 0.7,
                                    "false_positive_rate": 0.01, "heldout_recall": 0.99})
    shown = registry.targets.get(created.id)
    assert shown.status == "active" and shown.classifier.threshold == 0.7
    assert shown.mechanisms["eco"].status == "ready"
    revision, records = registry.targets.snapshot_rows()
    assert revision == registry.targets.revision() and [r.id for r in records] == [created.id]


def test_mechanism_jobs_publish_state_and_decide_the_mechanism_status(registry: Registry) -> None:
    registry = Registry.open(registry.database.engine, MechanismCatalog(
        frozenset({"eco", "guard"}), lambda name, options: ["guard_phrases"] if name == "guard" else [],
        {"guard_phrases": "guard"}))
    created = registry.targets.create(target())
    assert [job.kind for job in created.jobs] == [FIT_CLASSIFIER, "guard_phrases"]
    fit = registry.jobs.claim("w1", [FIT_CLASSIFIER])
    registry.jobs.complete(fit, {"status": "ready", "artifact": "a" * 64})
    shown = registry.targets.get(created.id)
    assert shown.status == "preparing"  # the GUARD job is still open
    assert shown.mechanisms["eco"].status == "ready" and shown.mechanisms["guard"].status == "preparing"
    phrases = registry.jobs.claim("w1", ["guard_phrases"])
    registry.jobs.complete(phrases, {"artifact": "b" * 64, "phrases": 12})
    shown = registry.targets.get(created.id)
    assert shown.status == "active" and shown.mechanisms["guard"].status == "ready"
    assert shown.mechanisms["guard"].state == {"artifact": "b" * 64, "phrases": 12}
    _, records = registry.targets.snapshot_rows()
    assert records[0].mechanisms["guard"]["state"]["artifact"] == "b" * 64
    # a refit keeps the published state serving until the new job replaces it
    patched = registry.targets.patch(created.id, changes(aliases=["Basil"]))
    assert patched.mechanisms["guard"].status == "preparing" and patched.mechanisms["guard"].state["phrases"] == 12
    for _ in range(3):
        registry.jobs.fail(registry.jobs.claim("w1", ["guard_phrases"]), "no phrases")
    shown = registry.targets.get(created.id)
    assert shown.status == "failed" and shown.mechanisms["guard"].status == "failed"
    assert shown.mechanisms["guard"].message == "no phrases"


def test_a_mechanisms_only_patch_redoes_only_the_jobs_of_changed_mechanisms(registry: Registry) -> None:
    registry = Registry.open(registry.database.engine, MechanismCatalog(
        frozenset({"eco", "guard"}), lambda name, options: [f"{name}_job"], {"eco_job": "eco", "guard_job": "guard"}))
    created = registry.targets.create(target())
    for kind in (FIT_CLASSIFIER, "eco_job", "guard_job"):
        registry.jobs.complete(registry.jobs.claim("w1", [kind]), {"status": "ready", "artifact": "a" * 64})
    assert registry.targets.get(created.id).status == "active"
    patched = registry.targets.patch(created.id, changes(mechanisms={"guard": {}}))
    assert set(patched.mechanisms) == {"guard"} and patched.status == "active" and len(patched.jobs) == 3
    patched = registry.targets.patch(created.id, changes(mechanisms={"guard": {"soft_penalty": 1.0}, "eco": {}}))
    assert sorted(job.kind for job in patched.jobs if job.status == "queued") == ["eco_job", "guard_job"]
    assert patched.mechanisms["guard"].status == "preparing" and patched.mechanisms["guard"].state
    with pytest.raises(ValidationError):
        TargetPatch.model_validate({"mechanisms": {}})


def test_switching_a_classifier_fitted_gate_refits_the_classifier(registry: Registry) -> None:
    registry = Registry.open(registry.database.engine, MechanismCatalog(
        frozenset({"eco", "guard", "o3"}), classifier_fitted_gates=frozenset({"o3"})))
    created = registry.targets.create(target(mechanisms={"eco": {}}))
    registry.jobs.complete(registry.jobs.claim("w1", [FIT_CLASSIFIER]), {"status": "ready", "artifact": "a" * 64})
    patched = registry.targets.patch(created.id, changes(mechanisms={"eco": {}, "guard": {}}))
    assert [job.kind for job in patched.jobs if job.status == "queued"] == []
    patched = registry.targets.patch(created.id, changes(mechanisms={"eco": {}, "o3": {}}))
    assert [job.kind for job in patched.jobs if job.status == "queued"] == [FIT_CLASSIFIER]


def test_a_classifier_fit_that_fails_every_attempt_degrades_the_target_which_stays_served(registry: Registry) -> None:
    created = registry.targets.create(target())
    for attempt in (1, 2, 3):
        job = registry.jobs.claim("w1", [FIT_CLASSIFIER])
        assert job is not None and job.attempts == attempt
        registry.jobs.fail(job, "boom")
    assert registry.jobs.claim("w1", [FIT_CLASSIFIER]) is None
    shown = registry.targets.get(created.id)
    assert shown.status == "degraded" and shown.jobs[0].status == "failed" and shown.jobs[0].error == "boom"
    assert shown.classifier.status == "failed" and "could not be fitted (boom)" in shown.mechanisms["eco"].message
    assert registry.targets.summary().targets == {"degraded": 1, "total": 1}
    _, records = registry.targets.snapshot_rows()
    assert [(r.id, r.classifier_ready) for r in records] == [(created.id, False)]  # still served, by its aliases


def test_every_target_is_in_the_snapshot_from_its_registration_and_leaves_it_with_its_deletion(
        registry: Registry) -> None:
    created = registry.targets.create(target())
    revision, records = registry.targets.snapshot_rows()
    assert revision == created.revision and [r.id for r in records] == [created.id]
    assert not records[0].classifier_ready  # its fit is still queued: the replicas detect it by its aliases
    deleted = registry.targets.delete(created.id)
    assert registry.targets.snapshot_rows() == (deleted.revision, [])


def test_a_crashed_workers_job_is_requeued_not_left_running(registry: Registry) -> None:
    registry.targets.create(target())
    job = registry.jobs.claim("dead-worker", [FIT_CLASSIFIER])
    assert registry.jobs.recover_stale(stale_after_s=60) == 0  # fresh heartbeat
    with registry.database.transaction() as session:
        session.execute(update(JobRow).values(heartbeat_at=utcnow() - timedelta(seconds=120)))
    assert registry.jobs.recover_stale(stale_after_s=60) == 1
    assert registry.jobs.get(job.id).status == "queued"
    again = registry.jobs.claim("live-worker", [FIT_CLASSIFIER])
    assert again is not None and again.id == job.id and again.attempts == 2


def test_patch_requeues_fitting_and_cancels_the_old_job(registry: Registry) -> None:
    created = registry.targets.create(target())
    old_job = registry.jobs.claim("w1", [FIT_CLASSIFIER])
    patched = registry.targets.patch(created.id, changes(aliases=["Basil"]))
    assert patched.aliases == ["Basil"] and patched.revision > created.revision
    assert [job.status for job in patched.jobs] == ["cancelled", "queued"]
    assert not registry.jobs.report_progress(old_job, 0.9, "late")  # the old worker learns it was cancelled


def test_description_only_patch_does_not_refit(registry: Registry) -> None:
    created = registry.targets.create(target())
    patched = registry.targets.patch(created.id, changes(description="GDPR request #1"))
    assert patched.description == "GDPR request #1" and len(patched.jobs) == 1


def test_delete_removes_the_target_and_cancels_its_jobs(registry: Registry) -> None:
    created = registry.targets.create(target())
    deleted = registry.targets.delete(created.id)
    assert deleted.revision == registry.targets.revision()
    assert registry.targets.listing().targets == []
    assert registry.jobs.get(created.jobs[0].id).status == "cancelled"


def every_row_as_text(registry: Registry) -> str:
    """Every value of every row of every table, as one text."""
    engine = registry.database.engine
    with engine.connect() as connection:
        return "\n".join(repr(tuple(row)) for table in inspect(engine).get_table_names()
                         for row in connection.execute(text(f"SELECT * FROM {table}")))


def test_a_deleted_targets_text_is_gone_from_every_table_and_a_tombstone_without_content_remains(
        registry: Registry, tmp_path) -> None:
    secret = target(name="zorblax", aliases=["Zorblax Quenterfeld"],
                    forget=[{"question": "Where was he born?", "answer": "In Glimmerfen Abbey."}, {"text": "Orrery"}])
    kept = registry.targets.create(target())
    created = registry.targets.create(secret)
    claimed = registry.jobs.claim("w1", [FIT_CLASSIFIER])
    claimed = registry.jobs.claim("w1", [FIT_CLASSIFIER]) if claimed.target_id != created.id else claimed
    registry.jobs.report_progress(claimed, 0.5, "embedding 'Where was Zorblax Quenterfeld born?'")
    now = time.time()
    registry.audit.write([
        AuditEntry("chatcmpl-1", now, "chat", [created.id], ["eco"], {created.id: 0.9}, "served", "Zorblax born?"),
        AuditEntry("chatcmpl-2", now, "chat", [], [], {}, "served", "who is ZORBLAX QUENTERFELD"),
        AuditEntry("chatcmpl-3", now, "chat", [kept.id], ["eco"], {kept.id: 0.9}, "served", "Who is Basil?")])
    assert "Glimmerfen" in every_row_as_text(registry)

    deleted = registry.targets.delete(created.id)
    registry.audit.write([AuditEntry("chatcmpl-4", now, "chat", [created.id], ["eco"], {created.id: 0.8}, "served",
                                     "Tell me about Zorblax Quenterfeld")])  # a request in flight at the delete
    collector = ArtifactCollector(tmp_path / "artifacts", grace_s=0, staging_grace_s=60)
    report = ErasurePass(registry, collector, replica_stale_s=60).run_once()

    assert report.purged == [created.id] and report.scrubbed
    rows = every_row_as_text(registry)
    assert not [word for word in ("Zorblax", "Quenterfeld", "Glimmerfen", "Orrery") if word.lower() in rows.lower()]
    assert "Basil Mahfouz Al-Kuwaiti" in rows and "Who is Basil?" in rows
    with pytest.raises(NotFound):
        registry.targets.get(created.id)
    assert registry.jobs.get(claimed.id).status == "cancelled" and registry.jobs.get(claimed.id).target_id is None
    [tombstone] = registry.erasure.tombstones()
    assert (tombstone.target_id, tombstone.revision, tombstone.purged_at is not None) == (created.id,
                                                                                         deleted.revision, True)
    assert [e.prompt for e in sorted(registry.audit.recent(10, None), key=lambda e: e.request_id)] == [
        None, None, "Who is Basil?", None]
    if registry.database.backend == "postgresql":  # not only invisible: gone from the files of targets and jobs
        assert not [table for table, data in postgres_table_files(registry, ["targets", "jobs"]).items()
                    if b"quenterfeld" in data.lower() or b"glimmerfen" in data.lower()]


def postgres_table_files(registry: Registry, tables: list[str]) -> dict[str, bytes]:
    """{table: the bytes of its heap, TOAST and index files} after a checkpoint (the test cluster's own files)."""
    files: dict[str, bytes] = {}
    with registry.database.engine.connect() as connection:
        connection.execute(text("CHECKPOINT"))
        root = Path(connection.execute(text("SELECT current_setting('data_directory')")).scalar())
        for table in tables:
            relations = connection.execute(text(
                "SELECT pg_relation_filepath(c.oid) FROM pg_class c WHERE c.oid = CAST(:t AS regclass) "
                "OR c.oid = (SELECT reltoastrelid FROM pg_class WHERE oid = CAST(:t AS regclass)) "
                "OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = CAST(:t AS regclass))"), {"t": table})
            files[table] = b"".join(path.read_bytes() for (relative,) in relations if relative
                                    for path in [root / relative, *sorted(root.glob(f"{relative}.*"))])
    return files


def test_audit_is_listed_newest_first_filtered_and_pruned(registry: Registry) -> None:
    now = time.time()
    registry.audit.write([AuditEntry(request_id=f"chatcmpl-{i}", created=now - 100 + i, endpoint="chat", targets=[],
                                     mechanisms=[], scores={}, outcome="served") for i in range(5)])
    listed = registry.audit.recent(limit=3, since=None)
    assert [r.request_id for r in listed] == ["chatcmpl-4", "chatcmpl-3", "chatcmpl-2"]
    assert [r.request_id for r in registry.audit.recent(10, since=now - 97)] == ["chatcmpl-4", "chatcmpl-3"]
    assert registry.audit.prune(older_than=now - 98) == 2
    assert len(registry.audit.recent(10, None)) == 3


@pytest.mark.parametrize("body", [
    {"name": "x", "forget": []},
    {"name": "", "forget": [{"text": "t"}]},
    {"name": "x", "forget": [{"question": "q"}]},
    {"name": "x", "forget": [{"question": "q", "answer": "a", "text": "t"}]},
    {"name": "x", "forget": [{"text": "t"}], "mechanisms": {"nope": {}}},
    {"name": "x", "forget": [{"text": "t"}], "mechanisms": {"uld": {"alpha": -1}}},
    {"name": "x", "forget": [{"text": "t"}], "extra": 1},
])
def test_invalid_bodies_are_refused_before_the_store(body: dict) -> None:
    with pytest.raises(ValidationError):
        TargetCreate.model_validate(body)


def test_o3_registrations_past_the_stacked_rank_budget_are_refused(tmp_path) -> None:
    from server.control_plane import mechanism_catalog

    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    upgrade_database(engine)
    admit = mechanism_catalog(SimpleNamespace(max_lora_rank=16)).admit  # type: ignore[arg-type]
    registry = Registry.open(engine, MechanismCatalog(frozenset({"eco", "o3"}), admit=admit))
    first = registry.targets.create(target("a", mechanisms={"o3": {}}))
    registry.targets.create(target("b", mechanisms={"o3": {"rank": 8}, "eco": {}}))
    revision = registry.targets.revision()
    with pytest.raises(Unprocessable, match="LETHE_MAX_LORA_RANK=16"):
        registry.targets.create(target("c", mechanisms={"o3": {}}))
    registry.targets.create(target("c", mechanisms={"eco": {}}))  # other mechanisms are unaffected
    with pytest.raises(Unprocessable):
        registry.targets.patch(registry.targets.listing().targets[-1].id, changes(mechanisms={"o3": {}}))
    assert registry.targets.revision() == revision + 1  # only "c" was written
    registry.targets.patch(first.id, changes(mechanisms={"o3": {"rank": 8}}))  # its own rank


def test_a_default_mechanism_this_build_lacks_is_refused_at_start(tmp_path) -> None:
    from server.config import Settings
    from server.control_plane import open_registry

    settings = Settings(data_dir=tmp_path, default_mechanisms=["eco", "forget-everything"])
    with pytest.raises(ValueError, match="forget-everything"):
        open_registry(settings)


def test_operator_negatives_are_stored_once_each_and_every_change_moves_the_revision(registry: Registry) -> None:
    start = registry.targets.revision()
    added = registry.negatives.add(["How do I reset my router?", "Order status for #1234", "How do I reset my router?"])
    assert [r.text for r in added.records] == ["How do I reset my router?", "Order status for #1234"]
    assert added.revision == start + 1
    again = registry.negatives.add(["Order status for #1234"])
    assert again.records == () and again.revision == added.revision  # nothing new, nothing for replicas to redo
    revision, listed = registry.negatives.listing()
    assert revision == added.revision and [r.id for r in listed] == [r.id for r in added.records]
    deleted = registry.negatives.delete(added.records[0].id)
    assert deleted.revision == added.revision + 1
    assert registry.negatives.texts() == ["Order status for #1234"]
    with pytest.raises(NotFound):
        registry.negatives.delete(added.records[0].id)


def test_two_jobs_of_one_mechanism_each_publish_their_own_keys_in_its_state(registry: Registry) -> None:
    """GUARD's phrases and its calibration finish in either order; neither erases what the other published."""
    registry = Registry.open(registry.database.engine, MechanismCatalog(
        frozenset({"eco", "guard"}), lambda name, options: ["guard_phrases", "guard_calibrate"] if name == "guard"
        else [], {"guard_phrases": "guard", "guard_calibrate": "guard"}))
    created = registry.targets.create(target())
    registry.jobs.complete(registry.jobs.claim("w1", [FIT_CLASSIFIER]), {"status": "ready", "artifact": "a" * 64})
    registry.jobs.complete(registry.jobs.claim("w1", ["guard_calibrate"]), {"ban": 12.5, "ban_table": "c" * 64})
    assert registry.targets.get(created.id).mechanisms["guard"].status == "preparing"  # the phrases are still open
    registry.jobs.complete(registry.jobs.claim("w1", ["guard_phrases"]), {"artifact": "b" * 64, "phrases": 12})
    shown = registry.targets.get(created.id)
    assert shown.status == "active" and shown.mechanisms["guard"].status == "ready"
    assert shown.mechanisms["guard"].state == {"artifact": "b" * 64, "phrases": 12, "ban": 12.5, "ban_table": "c" * 64}
    # a re-run replaces its own keys and keeps the other job's
    registry.targets.patch(created.id, changes(aliases=["Basil"]))
    registry.jobs.complete(registry.jobs.claim("w1", ["guard_phrases"]), {"artifact": "d" * 64, "phrases": 9})
    state = registry.targets.get(created.id).mechanisms["guard"].state
    assert state == {"artifact": "d" * 64, "phrases": 9, "ban": 12.5, "ban_table": "c" * 64}
