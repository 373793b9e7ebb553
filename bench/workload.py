"""The one fixed workload every cost ratio in ``bench/`` is measured with (issue 19), and the bench model it runs on.

Every request is a TOFU question, unique within a run (a question seen before in the run carries a reference
number, so no prompt is ever sent twice and neither vLLM's prefix cache nor the gate's embedding cache helps more
than it would on real traffic); every reply is 64 greedy tokens with ``ignore_eos``, so every path produces the same
number of tokens. Each path runs at concurrency 1, 8 and 32 (8 requests one after another at 1, two full waves at 8
and 32), in rounds whose order rotates so that host noise hits every path alike; a figure is the median over rounds
(three unless told otherwise).

The model is the ``bench`` demo variant (``demo/builder.py``): the demo model's Llama family and tokenizer, ~88 M
parameters of seeded random weights, so that one decoding step is real work (``bench/step_time.py``) and Python per
step does not dominate the ratios as it does next to the 0.9 M-parameter tiny model.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

MAX_TOKENS = 64
CONCURRENCIES = (1, 8, 32)
ROUNDS = 3
BENCH_VARIANT = "bench"

Name = TypeVar("Name")


def requests_at(concurrency: int) -> int:
    """Requests in one timed run: 8 in a row at concurrency 1, two full waves above."""
    return max(8, 2 * concurrency)


def rotated(names: Sequence[Name], round_index: int) -> list[Name]:
    """The paths in the order of one round: each round starts one later, so no path always runs first."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def sampling_params() -> Any:
    """64 greedy tokens, whatever the model would rather say: the same work on every path."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA)


class UniqueQuestions:
    """Hands out the questions in turn; a question's second and later uses carry `` (ref N)``, N unique in the run."""

    def __init__(self, questions: Sequence[str]) -> None:
        if not questions:
            raise ValueError("the workload needs at least one question")
        self._questions = itertools.cycle(dict.fromkeys(questions))
        self._distinct = len(dict.fromkeys(questions))
        self._served = itertools.count()

    def take(self, n: int) -> list[str]:
        taken = []
        for _ in range(n):
            serial, text = next(self._served), next(self._questions)
            taken.append(text if serial < self._distinct else f"{text} (ref {serial})")
        return taken

    def __iter__(self) -> Iterator[str]:
        while True:
            yield from self.take(1)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
