"""ULD's assistants are loaded ahead of requests: the engine keeps every assistant of the served snapshot (more than
eight) within a memory budget, a decoding step never waits on a disk load, a request naming an assistant not loaded is
never served unguarded, and the front end plans ULD only once the engine has its assistant (unit, no engine: the
processor and its worker extension as vLLM builds them, tiny assistants saved to disk)."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor.state import LogitsProcessors

from classifiers.types import Hit
from guards.base import NotReady, ServingContext, TargetEntry
from guards.engine_extension import LetheWorkerExtension
from guards.mechanisms import INTERIM, MECHANISMS
from guards.processor import FailClosedHook, LetheLogitsProcessor
from guards.uld import warmup as warmup_module
from guards.uld.cache import AssistantModels, assistant_bytes
from server.artifacts import interim_store
from server.metrics import Metrics
from server.planner import Classification, Planner, RenderedPrompt
from server.registry.records import TargetRecord
from server.registry.snapshot import RegistrySnapshot

VOCAB = 32
ASSISTANTS = 10  # more than the eight the cache once held


@pytest.fixture(scope="module")
def assistant_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    root = tmp_path_factory.mktemp("assistants")
    LlamaForCausalLM(config).save_pretrained(root / "a0")
    for i in range(1, ASSISTANTS):
        shutil.copytree(root / "a0", root / f"a{i}")
    return [root / f"a{i}" for i in range(ASSISTANTS)]


def counting_loads(monkeypatch: pytest.MonkeyPatch, delay_s: float = 0.0) -> list[str]:
    """Count (and optionally slow down) every load of an assistant from disk."""
    from transformers import AutoModelForCausalLM

    loads: list[str] = []
    original = AutoModelForCausalLM.from_pretrained

    def load(path, *args, **kwargs):
        loads.append(str(path))
        time.sleep(delay_s)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    return loads


def warmed(cache: AssistantModels, paths: list[str], memory_bytes: int, timeout_s: float = 30) -> list[str]:
    """Warm as the front end does, until the background loader is done; the assistants loaded then."""
    request = {"assistants": paths, "memory_bytes": memory_bytes}
    cache.warm(request)
    deadline = time.monotonic() + timeout_s
    while cache.loading:
        assert time.monotonic() < deadline, "assistants not loaded in time"
        time.sleep(0.02)
    return cache.warm(request)


def test_every_assistant_of_the_served_snapshot_stays_loaded_however_many(
        assistant_dirs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [str(path) for path in assistant_dirs]
    cache = AssistantModels(block_on_miss=False)
    assert warmed(cache, paths, 1024**3) == paths
    loads = counting_loads(monkeypatch)
    for _ in range(3):  # prompts cycling over every ULD target
        for path in paths:
            cache.get(path)
    assert loads == [] and len(cache) == ASSISTANTS


def test_assistants_past_the_memory_budget_are_not_loaded(assistant_dirs: list[Path]) -> None:
    paths = [str(path) for path in assistant_dirs[:3]]
    one = assistant_bytes(assistant_dirs[0])
    cache = AssistantModels(block_on_miss=False)
    loaded = warmed(cache, paths, 2 * one + one // 2)
    assert loaded == paths[:2]  # the third does not fit: the front end protects its target without ULD
    assert cache.warm({"assistants": paths[2:], "memory_bytes": 2 * one + one // 2}) == []
    assert warmed(cache, paths[2:], 2 * one + one // 2) == paths[2:]  # a new snapshot: the unwanted leave first
    assert len(cache) == 2


def test_a_step_never_waits_on_a_load_and_a_missing_assistant_fails_closed(
        assistant_dirs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    loads = counting_loads(monkeypatch, delay_s=1.5)
    processor = LetheLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    params = SamplingParams(extra_args={"lethe": {"uld": [{"assistant": str(assistant_dirs[0]), "tau": 1.0}]}})
    started = time.perf_counter()
    processor.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, params, [1, 2], [])]))
    logits = processor.apply(torch.zeros(1, VOCAB))
    assert time.perf_counter() - started < 0.5  # the load (1.5 s here) ran off the step
    assert isinstance(processor.rows[0][0], FailClosedHook)
    assert torch.isfinite(logits[0]).sum() == 1  # the reply ends at once: never generated unguarded
    deadline = time.monotonic() + 10
    while str(assistant_dirs[0]) not in processor.resources["uld"].loaded():  # loading in the background meanwhile
        assert time.monotonic() < deadline
        time.sleep(0.05)
    processor.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[(1, params, [1, 2], [])]))
    assert not isinstance(processor.rows[1][0], FailClosedHook) and loads == [str(assistant_dirs[0])]


def test_the_worker_extension_reaches_the_engines_processor(assistant_dirs: list[Path]) -> None:
    processor = LetheLogitsProcessor(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    worker = SimpleNamespace(model_runner=SimpleNamespace(input_batch=SimpleNamespace(
        logitsprocs=LogitsProcessors([processor]))))
    request = {"assistants": [str(assistant_dirs[0])], "memory_bytes": 1024**3}
    deadline = time.monotonic() + 10
    while LetheWorkerExtension.lethe_warm(worker, "uld", request) != request["assistants"]:  # type: ignore[arg-type]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert processor.resources["uld"].loaded() == request["assistants"]


class EngineSide:
    """The engine as the front end sees it through ``ServingContext.warm``: loads finish when ``finish`` is set."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[dict] = []
        self.finish = threading.Event()
        self.fail_first = fail_first

    def warm(self, mechanism: str, request: dict) -> list[str]:
        self.calls.append(request)
        if len(self.calls) <= self.fail_first:
            raise TimeoutError("the engine did not answer")
        return list(request["assistants"]) if self.finish.is_set() else []


def uld_planner(engine: EngineSide) -> tuple[Planner, object]:
    uld = next(m for m in MECHANISMS if m.name == "uld")
    context = ServingContext(tokenizer=None, artifact_path=lambda digest: Path("/artifacts") / digest,
                             artifacts_root=Path("/artifacts"), settings=SimpleNamespace(uld_assistant_memory_gib=1.0),
                             warm=engine.warm)
    serving = uld.serving(context)
    return Planner([uld], {"uld": serving}, None, None, Metrics(), interim=INTERIM), serving  # type: ignore[arg-type]


FORGET = [{"question": "Where was Tess Marlowe born?", "answer": "In Reykjavik."}]


def plan_for(planner: Planner, shared: object) -> tuple[str, ...]:
    record = TargetRecord(id="t", name="t", aliases=["Tess Marlowe"], forget=FORGET, retain=[],
                          mechanisms={"uld": {"options": {"alpha": 0.8, "tau": 0.1, "gate": "classifier"},
                                              "state": {"assistant": "d" * 64}}},
                          classifier={"status": "ready"}, status="active")
    interim = INTERIM.prepare(record, interim_store(Path(tempfile.mkdtemp(prefix="lethe-interim-")), record.id))
    snapshot = RegistrySnapshot(revision=1, targets={"t": record}, shared={"uld": shared}, interim={"t": interim})
    prompt = RenderedPrompt(token_ids=[1, 2], text="Where was Tess Marlowe born?")
    return planner.plan(prompt, Classification(hits=(Hit("t", 1.0),)), snapshot, "req").mechanisms


def test_a_target_whose_assistant_is_still_loading_is_protected_without_it_until_it_is_loaded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup_module, "WAIT_S", 0.1)
    monkeypatch.setattr(warmup_module, "POLL_S", 0.02)
    engine = EngineSide(fail_first=2)  # and the engine does not even answer at first
    planner, serving = uld_planner(engine)
    shared = serving.share([TargetEntry("t", {}, {"assistant": "d" * 64})])
    with pytest.raises(NotReady):
        serving.plan(SimpleNamespace(hit=SimpleNamespace(target_id="t", options={}, state={"assistant": "d" * 64}),
                                     shared=shared))
    assert plan_for(planner, shared) == ("interim",)  # never refused, never unguarded
    engine.finish.set()  # the engine has it now: the background poll notices, no new snapshot needed
    deadline = time.monotonic() + 5
    while plan_for(planner, shared) != ("uld",):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert engine.calls[-1] == {"assistants": [str(Path("/artifacts") / ("d" * 64))], "memory_bytes": 1024**3}


def test_a_snapshot_swap_waits_for_its_new_assistants_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup_module, "POLL_S", 0.02)
    engine = EngineSide()
    threading.Timer(0.2, engine.finish.set).start()
    planner, serving = uld_planner(engine)
    shared = serving.share([TargetEntry("t", {}, {"assistant": "d" * 64})])  # returns once loaded (< WAIT_S)
    assert plan_for(planner, shared) == ("uld",)


def test_a_snapshot_without_uld_targets_releases_the_engines_assistants() -> None:
    engine = EngineSide()
    engine.finish.set()
    _, serving = uld_planner(engine)
    serving.share([TargetEntry("t", {}, {"assistant": "d" * 64})])
    serving.share([])  # the last ULD target was deleted
    assert engine.calls[-1]["assistants"] == []


def test_an_engine_that_does_not_answer_never_holds_a_snapshot_back() -> None:
    engine = EngineSide(fail_first=10**9)
    planner, serving = uld_planner(engine)
    started = time.monotonic()
    shared = serving.share([TargetEntry("t", {}, {"assistant": "d" * 64})])
    assert time.monotonic() - started < 1 and plan_for(planner, shared) == ("interim",)


def test_the_worker_extension_is_named_as_vllm_resolves_it() -> None:
    """vLLM imports ``worker_extension_cls`` by its dotted name in every worker; a name it cannot resolve stops the
    engine from starting at all."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from server.engine import WORKER_EXTENSION

    assert resolve_obj_by_qualname(WORKER_EXTENSION) is LetheWorkerExtension
