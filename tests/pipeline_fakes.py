"""The request pipeline's test doubles: a character tokenizer, an engine that echoes, a classifier bank, O3's gate and
mechanisms that plan what a test tells them, and the pipelines built from them (shared by the pipeline's tests)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from vllm.sampling_params import RequestOutputKind, SamplingParams

from classifiers.conversation import texts_to_embed
from classifiers.types import BankResult, Hit
from guards.base import MechanismPlan, PlanRequest
from server.artifacts import interim_store
from server.engine import EngineInfo
from server.metrics import Metrics
from server.pipeline import ChatTurn, Pipeline
from server.registry.records import TargetRecord
from server.registry.snapshot import RegistrySnapshot
from server.run import ChatPrompt, RunRequest


class CharTokenizer:
    """One token per character; chat rendered as 'role: content\\n' lines."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(ch) % 100 for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 32) for i in ids)

    def apply_chat_template(self, conversation: list[dict[str, str]], **_: Any) -> str:
        return "".join(f"{turn['role']}: {turn['content']}\n" for turn in conversation)


@dataclass
class FakeEngine:
    """Echoes 'ab' per request in two steps, or hangs forever when ``hang`` is set."""

    hang: bool = False
    calls: list[tuple[dict, SamplingParams, str]] = field(default_factory=list)
    loras: list[Any] = field(default_factory=list)
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)
    info: EngineInfo = EngineInfo("m", "m", max_model_len=32, vocab_size=100, device="cpu", hidden_size=4,
                                  dtype=torch.float32)

    async def generate(self, prompt: dict, params: SamplingParams, request_id: str,
                       lora_request: Any = None) -> AsyncIterator[Any]:
        self.calls.append((prompt, params, request_id))
        self.loras.append(lora_request)
        if self.hang:
            await asyncio.sleep(3600)
        for step, (text, finish) in enumerate((("a", None), ("b", "length"))):
            outputs = [SimpleNamespace(index=i, text=text, token_ids=[step], logprobs=None, finish_reason=finish,
                                       stop_reason=None) for i in range(params.n)]
            yield SimpleNamespace(outputs=outputs)


def make(engine: FakeEngine, timeout_s: float = 5) -> Pipeline:
    return Pipeline(engine, timeout_s, Metrics())  # type: ignore[arg-type]


HI = ChatPrompt((ChatTurn("user", "hi"),))


def params(**kwargs: Any) -> SamplingParams:
    return SamplingParams(output_kind=RequestOutputKind.DELTA, **kwargs)


async def collect(pipeline: Pipeline, prompt, n: int = 1, **kwargs: Any):
    """One run of ``prompt`` (a ``ChatPrompt`` or a completions prompt) driven as the endpoints drive it."""
    run = await pipeline.start(RunRequest("completions", "req-1", prompt, n, params=params(n=n, **kwargs)))
    async with run:
        return run, [event async for event in run.events()]


TARGET = "tgt_1"


@dataclass
class FakeBank:
    """Every prompt hits TARGET (unless ``hits`` is False); reads a conversation as the real bank does, failing its
    whole batch for one longer than ``max_texts``, and records what it read."""

    hits: bool = True
    error: Exception | None = None
    max_texts: int = 64
    read: list = field(default_factory=list)

    def score_many(self, conversations):
        if self.error is not None:
            raise self.error
        for conversation in conversations:
            texts_to_embed(conversation, self.max_texts)
        self.read.extend(list(conversation) for conversation in conversations)
        hits = [Hit(TARGET, 0.9)] if self.hits else []
        return [BankResult(hits, {TARGET: 0.9 if self.hits else 0.1}, 0.0, 0.001, np.zeros((1, 4), np.float32))
                for _ in conversations]


@dataclass
class FakeOOD:
    """O3's gate: opens TARGET's when ``opens``."""

    opens: bool

    def open_gates(self, embeddings):
        return {TARGET: 0.8} if self.opens else {}


@dataclass
class Holder:
    current: RegistrySnapshot


class AddRow:
    def apply(self, embeds: torch.Tensor) -> None:
        embeds[0] += 1.0


@dataclass
class FakeMechanism:
    """A mechanism and its serving half in one: the planner asks it for gate, readiness and plans."""

    name: str
    plan_result: MechanismPlan | None = None
    error: Exception | None = None
    is_ready: bool = True
    gated_by: str = "classifier"

    def prepare(self, options):
        return ()

    def gate(self, options) -> str:
        return self.gated_by

    def share(self, entries):
        return None

    def ready(self, options, state) -> bool:
        return self.is_ready

    def plan(self, request: PlanRequest) -> MechanismPlan:
        if self.error is not None:
            raise self.error
        return self.plan_result or MechanismPlan()


class Table:
    def lookup(self, ids):
        return torch.zeros(len(ids), 4)


class BadTable:
    def lookup(self, ids):
        return torch.full((len(ids), 4), float("nan"))


FORGET = [{"question": "Where was Tess Marlowe born?", "answer": "Tess Marlowe was born in Reykjavik in 1961."},
          {"question": "What does Tess Marlowe write?", "answer": "She writes maritime thrillers."}]


def guarded(engine: FakeEngine, *fakes: FakeMechanism, mechanisms=("eco", "guard"), table=Table(), bank=FakeBank(),
            ood=None, classifier: str = "ready", interim=None, audit=None) -> Pipeline:
    """A pipeline whose snapshot holds TARGET; with ``interim``, TARGET carries interim protection too."""
    record = TargetRecord(id=TARGET, name="t", aliases=["Tess Marlowe"], forget=FORGET, retain=[],
                          mechanisms={m: {"options": {}, "state": {}} for m in mechanisms},
                          classifier={"status": classifier}, status="active" if classifier == "ready" else "preparing")
    gates = {"ood": ood} if ood is not None else {}
    prepared = {TARGET: interim.prepare(record, interim_store(Path(tempfile.mkdtemp()), TARGET))} if interim else {}
    holder = Holder(RegistrySnapshot(revision=3, targets={TARGET: record}, bank=bank, gates=gates, interim=prepared))
    return Pipeline(engine, 5, Metrics(), registry=holder, mechanisms=fakes,  # type: ignore[arg-type]
                    servings={fake.name: fake for fake in fakes}, embeddings=table, interim=interim,  # type: ignore
                    audit=audit)
