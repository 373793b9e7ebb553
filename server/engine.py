"""The one wrapper around vLLM's in-process ``AsyncLLM``.

Everything Lethe asks of vLLM goes through ``Engine``: startup with the options unlearning needs (prompt embeddings for
ECO, LoRA for O3, the Lethe logits processor for GUARD/ULD, *processed* logprobs so that returned probabilities are the
guarded ones) and the operator's own (``engine_args``), vLLM's Prometheus metrics, generation, abort, and liveness.
vLLM's EngineCore runs in child processes; if it dies the engine can never recover, so ``Engine`` reports it and the
server exits non-zero for the orchestrator to restart it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from guards.mechanisms import MECHANISMS
from server.config import ENGINE_SETTINGS, Settings
from server.errors import EngineUnavailable, InvalidRequest

logger = logging.getLogger(__name__)

LOGITS_PROCESSOR = "guards.processor:LetheLogitsProcessor"
WORKER_EXTENSION = "guards.engine_extension.LetheWorkerExtension"  # what `warm` calls in the engine process
WARM_TIMEOUT_S = 30.0  # a warm call returns at once (loading runs in the background there); past this, it failed
LIVENESS_POLL_S = 1.0
V2_MODEL_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


@dataclass(frozen=True)
class EngineInfo:
    model_path: str
    served_model_name: str
    max_model_len: int
    vocab_size: int
    device: str
    hidden_size: int
    dtype: Any  # torch.dtype the model runs in: what ECO's prompt_embeds must be


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# vLLM engine arguments Lethe sets itself, refused among the operator's (`lethe serve -- ...`, LETHE_ENGINE_ARGS).
LETHE_ENGINE_ARGS = {
    "model": "give the model as `lethe serve MODEL` (or --model, LETHE_MODEL)",
    "tokenizer": "Lethe uses the model directory's own tokenizer (its gate and ECO's embeddings read it)",
    "enable_prompt_embeds": "Lethe turns it on (ECO sends prompt embeddings)",
    "enable_lora": "Lethe turns it on (O3 serves LoRA adapters)",
    "lora_target_modules": "Lethe sets them from the mechanisms' adapters",
    "max_lora_rank": "set LETHE_MAX_LORA_RANK (O3 sizes its adapter stacks by it)",
    "logits_processors": "Lethe sets its own (GUARD and ULD run in it)",
    "worker_extension_cls": "Lethe sets its own (it loads the mechanisms' artifacts)",
    "logprobs_mode": "Lethe returns processed logprobs: the guarded ones",
    "max_logprobs": "Lethe's API bounds logprobs itself",
    "disable_log_stats": "Lethe exports vLLM's metrics on /metrics and logs no stats",
}


class EngineArgsRefused(ValueError):
    """An engine argument Lethe cannot pass through to vLLM."""


@lru_cache(maxsize=1)
def _vllm_parser() -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="lethe serve", description="vLLM engine arguments, given after `--`.",
                                    usage="lethe serve [MODEL] [options] -- [vLLM engine arguments]")
    return AsyncEngineArgs.add_cli_args(parser)


def parse_engine_args(words: Sequence[str]) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` fields that ``words`` set, read by vLLM's own parser as ``vllm serve`` reads them: its
    names, types, errors (an argparse exit) and ``--help``. Only the arguments given; those Lethe sets itself raise
    ``EngineArgsRefused``."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    if not words:
        return {}
    parser = _vllm_parser()
    unset = object()  # a namespace that already has every name keeps argparse's defaults out of it
    parsed = parser.parse_args(list(words), argparse.Namespace(**{action.dest: unset for action in parser._actions}))
    given = {name: value for name, value in vars(parsed).items() if value is not unset}
    options = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    fields = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    for name in given:
        option = options.get(name, name)
        if name in LETHE_ENGINE_ARGS:
            raise EngineArgsRefused(f"{option} is not accepted among vLLM's engine arguments: "
                                    f"{LETHE_ENGINE_ARGS[name]}")
        if name in ENGINE_SETTINGS:
            raise EngineArgsRefused(f"{option} is a `lethe serve` option (LETHE_{name.upper()}): give it before `--`")
        if name not in fields:
            raise EngineArgsRefused(f"{option} is not an argument of vLLM's AsyncEngineArgs")
    return given


def force_v1_model_runner() -> None:
    """Run vLLM's V1 model runner: Lethe's processor implements the V1 logits-processor interface, and vLLM 0.33's
    Model Runner V2, the CUDA default, refuses such processors at startup (VLLM_NOTES §1; docs/mechanisms.md, "On a
    GPU"). Set in this process before the engine is built: vLLM reads it when it builds its config here, and the
    EngineCore and worker processes inherit it. An operator's ``VLLM_USE_V2_MODEL_RUNNER=1`` is overridden (logged),
    since the engine could not start with it."""
    if os.environ.get(V2_MODEL_RUNNER_ENV, "0") != "0":
        logger.warning("engine.v2_model_runner_overridden", extra={"was": os.environ[V2_MODEL_RUNNER_ENV]})
    os.environ[V2_MODEL_RUNNER_ENV] = "0"


def engine_args(settings: Settings, model_path: Path, served_model_name: str) -> Any:
    """vLLM's ``AsyncEngineArgs``, from one place: what unlearning needs, the engine settings (which `lethe serve`'s
    flags override) and the other engine arguments (``LETHE_ENGINE_ARGS``, then the words after `lethe serve --`)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    dtype = settings.dtype
    if dtype == "auto" and _is_cpu_platform():
        dtype = "float32"  # bf16 kernels died with SIGILL on this CPU class (VLLM_NOTES §5)
    chosen: dict[str, Any] = {
        "served_model_name": served_model_name,  # the `model_name` label of vLLM's metrics: never the path on disk
        "dtype": dtype,
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        "enforce_eager": settings.enforce_eager,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "seed": 0,
    }
    if settings.gpu_memory_utilization is not None:
        chosen["gpu_memory_utilization"] = settings.gpu_memory_utilization
    chosen.update(parse_engine_args(settings.engine_args))
    return AsyncEngineArgs(
        model=str(model_path),
        tokenizer=str(model_path),
        enable_prompt_embeds=True,
        enable_lora=True,
        max_lora_rank=settings.max_lora_rank,
        # Only the modules the mechanisms' adapters adapt (O3's projections). Left unset, vLLM also wraps
        # embed_tokens, and its CPU LoRA embedding op then crashes the EngineCore on any batch that mixes prompt_embeds
        # (ECO) with a LoRA request (O3): "einsum(): subscript b has size 35 ... previously seen size 7".
        lora_target_modules=sorted({module for mechanism in MECHANISMS for module in mechanism.lora_modules}),
        max_logprobs=20,
        # Registered here, never through a `vllm.logits_processors` entry point: with async scheduling (GPU) vLLM fills
        # the rows' output-token lists (placeholders -1) only for explicitly registered processors (VLLM_NOTES §1).
        logits_processors=[LOGITS_PROCESSOR],
        worker_extension_cls=WORKER_EXTENSION,
        logprobs_mode="processed_logprobs",
        # Off: vLLM's default stat loggers (its periodic stats line). `Engine.start` hands the AsyncLLM its Prometheus
        # logger alone, which turns the engine's stats back on; /metrics exports what it records.
        disable_log_stats=True,
        **chosen,
    )


class Engine:
    """Owns the AsyncLLM and its tokenizer; the request pipeline is its only client."""

    def __init__(self, settings: Settings, model_path: Path, served_model_name: str) -> None:
        self._settings = settings
        self._model_path = model_path
        self._served_model_name = served_model_name
        self._llm: Any = None
        self._dead = False

    @staticmethod
    def spawns_its_processes() -> bool:
        """Whether vLLM starts the engine's processes with ``spawn``, never ``fork``: on the CPU it always does
        (``vllm/platforms/cpu.py`` sets it), elsewhere where the environment asks for it."""
        return _is_cpu_platform() or os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn"

    def start(self) -> None:
        """Build the AsyncLLM (blocks for the engine start, ~30 s on CPU)."""
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        if _is_cpu_platform():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self._settings.kv_cache_gib)
        else:
            force_v1_model_runner()
        logger.info("engine.starting", extra={"model": str(self._model_path)})
        self._llm = AsyncLLM.from_engine_args(engine_args(self._settings, self._model_path, self._served_model_name),
                                              stat_loggers=[PrometheusStatLogger])
        logger.info("engine.started", extra={"max_model_len": self.info.max_model_len})

    @property
    def info(self) -> EngineInfo:
        config = self._llm.model_config
        return EngineInfo(
            model_path=str(self._model_path),
            served_model_name=self._served_model_name,
            max_model_len=config.max_model_len,
            vocab_size=config.get_vocab_size(),
            device="cpu" if _is_cpu_platform() else "cuda",
            hidden_size=config.get_hidden_size(),
            dtype=config.dtype,
        )

    @property
    def tokenizer(self) -> Any:
        return self._llm.get_tokenizer()

    @property
    def alive(self) -> bool:
        return self._llm is not None and not self._dead and not self._llm.errored

    @property
    def unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests() if self.alive else 0

    async def generate(
        self, prompt: dict[str, Any], params: Any, request_id: str, lora_request: Any = None
    ) -> AsyncIterator[Any]:
        """Stream ``RequestOutput``s; cancelling the consumer aborts the engine request (vLLM does it on exit)."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self.alive:
            raise EngineUnavailable()
        try:
            # Closed with this stream, not when collected: closing it is what aborts the engine request.
            async with aclosing(self._llm.generate(prompt, params, request_id, lora_request=lora_request)) as outputs:
                async for output in outputs:
                    yield output
        except EngineDeadError as exc:
            self._dead = True
            raise EngineUnavailable() from exc
        except VLLMValidationError as exc:
            raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from exc
        except ValueError as exc:
            # vLLM's input processor and the logits processors' validate_params raise ValueError for bad requests.
            raise InvalidRequest(str(exc)) from exc

    async def warm(self, mechanism: str, request: Mapping[str, Any]) -> list[str]:
        """Ask the engine process to load a mechanism's artifacts ahead of its requests (``RowHooks.warm`` there, in
        the background); the artifacts loaded now."""
        if not self.alive:
            raise EngineUnavailable()
        replies = await self._llm.collective_rpc("lethe_warm", timeout=WARM_TIMEOUT_S, args=(mechanism, dict(request)))
        loaded = [set(reply) for reply in replies]  # one reply per worker: loaded only where every worker has it
        return sorted(set.intersection(*loaded)) if loaded else []

    def warm_from_thread(self, loop: asyncio.AbstractEventLoop) -> Callable[[str, Mapping[str, Any]], list[str]]:
        """``warm`` for code running in a worker thread (a snapshot load): it blocks that thread, never the loop."""

        def warm(mechanism: str, request: Mapping[str, Any]) -> list[str]:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return asyncio.run_coroutine_threadsafe(self.warm(mechanism, request), loop).result(WARM_TIMEOUT_S)
            raise RuntimeError("warm would block the event loop: call it from a worker thread")

        return warm

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def watch(self, on_death: Callable[[], Awaitable[None] | None]) -> None:
        """Poll liveness until the engine dies, then call ``on_death`` once."""
        while self._llm is not None and not self._llm.errored and not self._dead:
            await asyncio.sleep(LIVENESS_POLL_S)
        self._dead = True
        logger.error("engine.dead")
        result = on_death()
        if result is not None:
            await result

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
