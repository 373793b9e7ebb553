"""The classifier tests' shared set-up, fitted once for the package: the forget01 authors as targets.

Set-up mirrors a real registration: each target gives its name as alias, its 20 TOFU question/answer pairs as forget
items (never the paraphrased questions, which are the held-out positives here) and nine other demo authors as retain
items. False positives are measured on prompts the heads never saw: nine further demo authors, and the held-out 30 %
of the built-in negative pool (world facts, real authors, generic chat, other TOFU authors).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from classifiers import (
    ClassifierBank,
    Embedder,
    ForgetItem,
    PromptClassifierArtifact,
    TargetSpec,
    fit_prompt_classifier,
)
from classifiers.negatives import builtin_negative_pool, split_by_hash
from demo.tofu_data import authors_of, demo_authors
from guards.o3.ood import OODArtifact, fit_ood_detector
from tests.classifiers.samples import RETAIN_AUTHORS


@pytest.fixture(scope="package")
def embedder() -> Iterator[Embedder]:
    # One torch thread: the embeddings are tiny, and on a shared 2-core host OpenMP threads spin against each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Embedder()
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def pools():
    """(fit, held-out) split of the built-in negative pool."""
    return split_by_hash(builtin_negative_pool(), heldout_fraction=0.3)


@pytest.fixture(scope="package")
def specs() -> dict[str, TargetSpec]:
    retain = [ForgetItem(i.question, i.answer) for a in demo_authors()[RETAIN_AUTHORS] for i in a.items]
    return {
        f"tofu-{a.index}": TargetSpec(
            id=f"tofu-{a.index}",
            name=a.name.lower().replace(" ", "-"),
            aliases=[a.name],
            forget=[ForgetItem(question=i.question, answer=i.answer) for i in a.items],
            retain=retain,
        )
        for a in authors_of("forget01")
    }


@pytest.fixture(scope="package")
def artifacts(specs, embedder, pools) -> dict[str, PromptClassifierArtifact]:
    return {tid: fit_prompt_classifier(spec, embedder, negative_pool=pools[0]) for tid, spec in specs.items()}


@pytest.fixture(scope="package")
def bank(artifacts, embedder) -> ClassifierBank:
    return ClassifierBank.from_artifacts(artifacts, embedder)


@pytest.fixture(scope="package")
def ood_artifacts(specs, embedder, pools) -> dict[str, OODArtifact]:
    return {tid: fit_ood_detector(spec, embedder, negative_pool=pools[0]) for tid, spec in specs.items()}
