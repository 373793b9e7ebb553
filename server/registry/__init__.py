"""The forget-target registry: SQLAlchemy models, the targets store, the job queue, the audit log, the operators'
negatives, the serving replicas, the erasure ledger and its tombstones, the admin trail, the named admin keys, the web
console's sessions and the live snapshot. It speaks its own dataclasses
(``records.py``), never HTTP types: the admin API converts at its edge.

``Registry`` holds the stores over one database; code that needs only one of them is handed only that one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from server.registry.admin_keys import AdminKeyStore
from server.registry.audit_log import AuditLog
from server.registry.catalog import MechanismCatalog
from server.registry.console_sessions import ConsoleSessionStore
from server.registry.database import RegistryDatabase
from server.registry.erasure import ErasureLedger
from server.registry.job_queue import JobQueue
from server.registry.negatives import NegativeStore
from server.registry.replicas import ReplicaStore
from server.registry.targets import TargetStore
from server.registry.tombstones import TombstoneStore
from server.registry.trail import AdminTrail


@dataclass(frozen=True)
class Registry:
    database: RegistryDatabase
    targets: TargetStore
    jobs: JobQueue
    audit: AuditLog
    negatives: NegativeStore
    replicas: ReplicaStore
    erasure: ErasureLedger
    tombstones: TombstoneStore
    trail: AdminTrail
    admin_keys: AdminKeyStore
    console_sessions: ConsoleSessionStore

    @classmethod
    def open(cls, engine: Engine, catalog: MechanismCatalog = MechanismCatalog()) -> Registry:
        """The stores over ``engine`` (already migrated: ``database.upgrade_database``)."""
        database = RegistryDatabase(engine)
        jobs = JobQueue(database, catalog)
        return cls(database, TargetStore(database, jobs, catalog), jobs, AuditLog(database), NegativeStore(database),
                   ReplicaStore(database), ErasureLedger(database), TombstoneStore(database), AdminTrail(database),
                   AdminKeyStore(database), ConsoleSessionStore(database))
