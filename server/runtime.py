"""Everything a serving replica runs, wired in one place: control plane, engine, mechanisms, pipeline, job worker.

``lethe serve`` (through the FastAPI lifespan) and the in-process benchmarks start the same ``Runtime``, so what is
measured is what is served.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from guards.base import MechanismServing, ServingContext
from guards.devices import compute_placement
from guards.mechanisms import INTERIM, MECHANISMS
from server.config import Settings
from server.control_plane import ControlPlane
from server.engine import Engine
from server.metrics import Metrics
from server.pipeline import Pipeline
from server.prompt_embeds import EmbeddingTable
from server.guarded_scorer import GuardedScorer
from server.scoring import ScoringService
from server.served_model import PipelineServedModel


@dataclass
class Runtime:
    control: ControlPlane
    engine: Engine
    servings: dict[str, MechanismServing]
    pipeline: Pipeline
    scoring: ScoringService

    @classmethod
    async def start(cls, settings: Settings, model_path: Path, served_model_name: str, metrics: Metrics) -> Runtime:
        """Open the registry, start the engine (blocks ~30 s on CPU), build the mechanisms' serving halves and start the
        job worker; ready once the classifiers' embedding model has loaded too."""
        control = ControlPlane.open(settings, metrics)
        await control.start()
        engine = Engine(settings, model_path, served_model_name)
        # The embedder loads on a thread of its own. Where vLLM may fork its processes, only once they exist (no fork
        # while a thread holds torch's locks); where it spawns them (always on the CPU), while they start: its load
        # and the gate's calibration (5-8 s on 2 cores) then hide in the engine's 40 s of imports.
        if engine.spawns_its_processes():
            embedder_loaded = control.embedder.load_in_background(then=control.calibration.warm)
            engine.start()
        else:
            engine.start()
            embedder_loaded = control.embedder.load_in_background(then=control.calibration.warm)
        context = ServingContext(engine.tokenizer, control.artifacts.path, control.artifacts.root, settings,
                                 warm=engine.warm_from_thread(asyncio.get_running_loop()))
        servings = {mechanism.name: mechanism.serving(context) for mechanism in MECHANISMS}
        control.snapshots.serve_with(servings)
        await control.snapshots.reload(force=True)  # a failure leaves the rebuild to the watch; never a crash
        embeddings = await asyncio.to_thread(EmbeddingTable, model_path, engine.info.dtype)
        pipeline = Pipeline(engine, settings.request_timeout_s, metrics, registry=control.snapshots,
                            audit=control.audit, audit_prompts=settings.audit_prompts, mechanisms=MECHANISMS,
                            servings=servings, embeddings=embeddings, interim=INTERIM,
                            speculate=settings.speculative_prefill)
        served = PipelineServedModel(pipeline, asyncio.get_running_loop(), engine.tokenizer)
        control.start_worker(served, model_path, probed=served)
        scoring = ScoringService(pipeline, GuardedScorer(model_path, engine.tokenizer,
                                                      compute_placement(settings.compute_device)), engine.tokenizer)
        await asyncio.to_thread(embedder_loaded.join)
        return cls(control, engine, servings, pipeline, scoring)

    async def stop(self) -> None:
        await self.control.stop()
        self.pipeline.close()
        self.engine.shutdown()
