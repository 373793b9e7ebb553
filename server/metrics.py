"""Prometheus metrics: Lethe's, all prefixed ``lethe_``, in a registry of their own (so tests can build several apps),
and vLLM's own ``vllm:*`` series beside them.

``/metrics`` is unauthenticated, so no label names a target (which targets exist, and which a prompt hit, would tell
anyone who filed an erasure request) and every label takes a bounded set of values (an unbounded one, such as a raw
request path, would let any client add time series without end). vLLM's labels are the served model name, the engine
index and bounded reasons; its one series that names LoRA adapters is left out (``VllmMetrics``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


VLLM_PREFIX = "vllm:"
# Its labels list the LoRA adapters running and waiting: O3's stacks, one new series for each change of the registry.
VLLM_LEFT_OUT = frozenset({"vllm:lora_requests_info"})


class VllmMetrics(Collector):
    """vLLM's metrics as they are at each scrape. vLLM's ``PrometheusStatLogger``, which ``Engine`` hands the AsyncLLM,
    registers them in prometheus_client's global registry in this (the front-end) process and updates them from the
    engine's stats; a new engine replaces them there."""

    def __init__(self, source: CollectorRegistry = REGISTRY) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            if family.name.startswith(VLLM_PREFIX) and family.name not in VLLM_LEFT_OUT:
                yield family


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        r.register(VllmMetrics())
        self.requests = Counter(
            "lethe_requests", "Requests under /v1 by endpoint (route template, or `other`) and HTTP status.",
            ["endpoint", "status"], registry=r,
        )
        self.in_flight = Gauge("lethe_requests_in_flight", "Inference requests being served.", registry=r)
        self.latency = Histogram(
            "lethe_request_latency_seconds", "End-to-end request latency.", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lethe_time_to_first_token_seconds", "Time to first generated token.", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("lethe_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("lethe_completion_tokens", "Completion tokens generated.", registry=r)
        self.engine_up = Gauge("lethe_engine_up", "1 while the vLLM engine is alive, else 0.", registry=r)
        self.target_hits = Counter("lethe_target_hits", "Requests that hit a forget target (any).", registry=r)
        self.guard_applied = Counter(
            "lethe_guard_applied", "Prompts a mechanism was applied to.", ["mechanism"], registry=r
        )
        self.speculative_prefills = Counter(
            "lethe_speculative_prefills", "Plain engine requests started while their prompt was classified: kept "
            "(the prompt was clean) or discarded (aborted unread).", ["outcome"], registry=r,
        )
        self.guard_failures = Counter(
            "lethe_guard_failures", "Flagged prompts refused because a mechanism failed (fail closed).", ["mechanism"],
            registry=r,
        )
        self.classifier_latency = Histogram(
            "lethe_classifier_latency_seconds", "Prompt classification time per prompt.", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.classifier_batch_size = Histogram(
            "lethe_classifier_batch_size", "Prompts classified together in one embedding call.",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        self.registry_revision = Gauge("lethe_registry_revision", "Registry revision this replica serves.", registry=r)
        self.registry_staleness = Gauge(
            "lethe_registry_staleness_seconds", "Seconds since this replica last confirmed its registry snapshot "
            "current (a poll that found the revision unchanged, or a swap), at scrape time.", registry=r,
        )
        self.registry_reachable = Gauge(
            "lethe_registry_reachable", "0 while this replica's snapshot reloads fail because the registry database "
            "is unreachable, else 1.", registry=r,
        )
        self.registry_load_failing = Gauge(
            "lethe_registry_load_failing", "1 while the registry answers but this replica fails to build or load "
            "its snapshot, else 0.", registry=r,
        )
        self.jobs = Gauge("lethe_jobs", "Jobs in the registry by status.", ["status"], registry=r)
        self.targets_degraded = Gauge(
            "lethe_targets_degraded", "Targets whose classifier (or its refit) could not be fitted: detected by their "
            "aliases (and any older classifier).", registry=r,
        )
        self.background_failures = Counter(
            "lethe_background_failures", "Failed runs of a background task (each logged and retried): audit_write, "
            "audit_prune, registry_reload, job_counts.", ["task"], registry=r,
        )
        self.audit_dropped = Counter(
            "lethe_audit_dropped", "Audit records lost: `buffer_full` (the oldest, while the database was "
            "unreachable), `rejected` (a record the database refused on its own).", ["reason"], registry=r,
        )
        self.audit_pending = Gauge(
            "lethe_audit_pending_records", "Audit records waiting to be written.", registry=r,
        )
        self.targets_unreadable = Gauge(
            "lethe_targets_unreadable", "Targets served degraded because an artifact of theirs cannot be read by this "
            "replica (`GET /admin/v1/targets` says which and why).", registry=r,
        )
        self.engine_unfinished = Gauge(
            "lethe_engine_unfinished_requests", "Requests the engine is still working on.", registry=r
        )
        self.gate_offset = Gauge(
            "lethe_gate_offset", "Logits over its own threshold a head needs without an alias mention, by the entity "
            "evidence of the text (registry-wide calibration).", ["evidence"], registry=r,
        )
        self.gate_calibration_fpr = Gauge(
            "lethe_gate_calibration_false_positive_rate",
            "Union rate of head-only hits on the calibration negatives at the calibrated offsets.", registry=r,
        )

    def gate_calibrated(self, calibration: Any) -> None:
        """Publish a registry-wide calibration (``classifiers.bank.Calibration``)."""
        for evidence, offset in asdict(calibration.offsets).items():
            self.gate_offset.labels(evidence).set(offset)
        self.gate_calibration_fpr.set(calibration.union_false_positive_rate)

    def watch_registry(self, health: Callable[[], Any]) -> None:
        """Read the registry gauges from ``health`` (``SnapshotHolder.health``) at each scrape."""
        self.registry_staleness.set_function(lambda: health().staleness_s)
        self.registry_reachable.set_function(lambda: float(health().reachable))
        self.registry_load_failing.set_function(lambda: float(health().load_failing))

    def render(self) -> bytes:
        return generate_latest(self.registry)
