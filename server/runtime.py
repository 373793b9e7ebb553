"""Everything a serving replica runs, wired in one place: control plane, engine, guards, pipeline, job worker.

``lethe serve`` (through the FastAPI lifespan) and the in-process benchmarks start the same ``Runtime``, so what is
measured is what is served.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from guards.base import Guard
from guards.eco import ECO_CALIBRATE, EcoGuard
from guards.embedding_table import EmbeddingTable
from guards.o3 import STACKS_DIR
from guards.registry import build_guards
from server.config import Settings
from server.control_plane import ControlPlane
from server.engine import Engine
from server.guard_jobs import EcoCalibrator
from server.metrics import Metrics
from server.pipeline import Pipeline
from server.scoring import GuardedScorer, ScoringService


@dataclass
class Runtime:
    control: ControlPlane
    engine: Engine
    guards: tuple[Guard, ...]
    pipeline: Pipeline
    scoring: ScoringService

    @classmethod
    async def start(cls, settings: Settings, model_path: Path, served_model_name: str, metrics: Metrics) -> Runtime:
        """Open the registry, start the engine (blocks ~30 s on CPU), build the guards and start the job worker; ready
        once the classifiers' embedding model has loaded too."""
        control = ControlPlane.open(settings, metrics)
        await control.start()
        engine = Engine(settings, model_path, served_model_name)
        engine.start()
        # After the engine's process exists (no fork while a thread holds torch's locks), in parallel with the rest.
        embedder_loaded = control.embedder.load_in_background()
        guards = build_guards(engine.tokenizer, control.artifacts.path, control.artifacts.root / STACKS_DIR,
                              settings.max_lora_rank)
        control.snapshots.share_with({guard.name: guard.share for guard in guards})
        await asyncio.to_thread(control.snapshots.refresh, True)
        embeddings = await asyncio.to_thread(EmbeddingTable, model_path, engine.info.dtype)
        pipeline = Pipeline(engine, settings.request_timeout_s, metrics, registry=control.snapshots,
                            audit=control.audit, audit_prompts=settings.audit_prompts, guards=guards,
                            embeddings=embeddings)
        eco = next(guard for guard in guards if isinstance(guard, EcoGuard))
        calibrator = EcoCalibrator(pipeline, eco, asyncio.get_running_loop(), settings.eco_calibration_questions,
                                   settings.eco_calibration_max_tokens)
        control.start_worker({ECO_CALIBRATE: calibrator}, model_path)
        scoring = ScoringService(pipeline, GuardedScorer(model_path, engine.tokenizer), engine.tokenizer)
        await asyncio.to_thread(embedder_loaded.join)
        return cls(control, engine, guards, pipeline, scoring)

    async def stop(self) -> None:
        await self.control.stop()
        self.engine.shutdown()
