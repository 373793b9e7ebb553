"""`lethe eval tofu`: TOFU through a running Lethe, for each mechanism set, next to the unprotected and retain-only models.

For each configuration the split's authors are registered as forget targets with that mechanism set (nothing is
registered for the unprotected run), their jobs are awaited, and then everything is measured through the server:

- greedy replies over ``/v1/chat/completions`` → ROUGE-L recall on the forget questions, their paraphrases, the retain
  authors' questions, real authors and world facts, and the forget replies' real-word share (fluency);
- the audit trail, keyed by response id → detection rate on forget questions and paraphrases, false-positive rate on
  everything else;
- ``/admin/v1/score`` (the guards applied: vLLM's own prompt logprobs would score the unprotected model) → per-answer
  losses of the gold, paraphrased and perturbed answers → TOFU's truth ratio, Probability, multiple-choice accuracy,
  **Forget Quality** (KS test against the retain-only model's truth ratios) and **Model Utility** (``tofu_metrics``).

The retain-only model (the demo model built without the split's authors) is scored in-process with the same scorer
class the server uses, with no guard in its plan. On the demo model, "retain" means the demo authors outside the split
(TOFU's own retain rows are authors the demo model never learned), so ``forget10`` leaves none and is refused.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from demo.tofu_data import AUTHORS_IN_SPLIT, N_DEMO_AUTHORS, ROWS_PER_AUTHOR, Author, authors_of, demo_authors
from evals.fluency import median_known_word_share
from guards.text_metrics import rouge_l_recall
from evals.tofu_metrics import (QuestionLosses, TruthRatioItem, forget_quality, model_utility, set_figures,
                                 truth_ratio_items)
from server.admin_client import AdminClient
from server.config import DEFAULT_MECHANISMS

MECHANISMS = ("eco", "guard", "uld", "o3")
# Retain authors whose items are registered with each target (classifier negatives, ULD's retain loss): the same
# three as the tests and benchmarks, so preparation stays minutes, not tens of minutes, on 2 cores.
REGISTERED_RETAIN_AUTHORS = 3
CONCURRENCY = 8
CALIBRATED_STRENGTHS = ("sigma", "ban", "alpha")  # ECO's noise, GUARD's ban, ULD's weight, as each state publishes it
CALIBRATION_FIGURES = ("limited_by", "gap", "reference_gap", "fluency")  # what bound the search, and where it landed


@dataclass(frozen=True)
class EvalSets:
    """The questions of one evaluation, each with the answers its losses are taken on."""

    split: str
    forget_authors: tuple[Author, ...]
    retain_authors: tuple[Author, ...]
    forget: list[TruthRatioItem]
    paraphrased_questions: list[str]  # of the forget rows, same order
    retain: list[TruthRatioItem]
    real_authors: list[TruthRatioItem]
    world_facts: list[TruthRatioItem]


def eval_sets(split: str, limit: int | None = None, known_authors: Sequence[str] | None = None) -> EvalSets:
    """The split's forget rows, the other demo authors as retain, TOFU's real authors and world facts.

    ``known_authors``: the authors the models were trained on (a demo model's ``lethe_demo.json``; the tiny variant
    knows five), so that "retain" holds only authors there is something to retain of. ``limit`` keeps the first rows
    of each set (a quick look; the figures are then not comparable with published ones).
    """
    if split not in ("forget01", "forget05"):
        raise ValueError(f"split {split!r}: use forget01 or forget05 (forget10 leaves the demo model no retain author)")
    forget_authors = authors_of(split)  # type: ignore[arg-type]
    outside = demo_authors()[: N_DEMO_AUTHORS - AUTHORS_IN_SPLIT[split]]
    retain_authors = tuple(a for a in outside if known_authors is None or a.name in known_authors)
    if not retain_authors:
        raise ValueError(f"the model knows no demo author outside {split} to measure retention on")
    cap = slice(None, limit)
    forget = truth_ratio_items(f"{split}_perturbed")  # type: ignore[arg-type]
    paraphrased = [item.paraphrased_question or item.question for a in forget_authors for item in a.items]
    demo_rows = truth_ratio_items("forget10_perturbed")  # the 20 demo authors' rows, in author order
    retain = [row for a in retain_authors for row in demo_rows[a.index * ROWS_PER_AUTHOR:(a.index + 1) * ROWS_PER_AUTHOR]]
    return EvalSets(
        split=split, forget_authors=forget_authors, retain_authors=retain_authors,
        forget=forget[cap], paraphrased_questions=paraphrased[cap], retain=retain[cap],
        real_authors=truth_ratio_items("real_authors_perturbed")[cap],
        world_facts=truth_ratio_items("world_facts_perturbed")[cap],
    )


def target_body(author: Author, retain_authors: Sequence[Author], mechanisms: Sequence[str],
                seed: int = 0) -> dict[str, Any]:
    """The registration of ``author``; ``seed``: every mechanism's preparation seed (``guards.base.SeededOptions``) and
    ECO's ``noise_key`` (else the random target id): runs of one seed draw the same noise, several seeds sample it."""
    return {
        "name": f"tofu-eval-{author.name.lower().replace(' ', '-')}",
        "aliases": [author.name],
        "forget": [{"question": item.question, "answer": item.answer} for item in author.items],
        "retain": [{"question": item.question, "answer": item.answer}
                   for other in retain_authors[:REGISTERED_RETAIN_AUTHORS] for item in other.items],
        "mechanisms": {name: {"seed": seed, **({"noise_key": f"tofu-eval-seed-{seed}"} if name == "eco" else {})}
                       for name in mechanisms},
    }


@dataclass
class RunResult:
    """One configuration's figures, in SPEC §10's JSON shape (plus the detail the table and plot use)."""

    name: str
    mechanisms: list[str]
    forget_quality: float
    model_utility: float
    forget_rouge: float
    paraphrase_rouge: float
    retain_rouge: float
    real_authors_rouge: float
    world_facts_rouge: float
    real_authors_acc: float
    world_facts_acc: float
    forget_truth_ratio: float
    forget_probability: float
    detection_rate: float | None
    false_positive_rate: float | None
    fluency: float
    preparation_seconds: float = 0.0
    seed: int | None = None  # the registration's preparation seed; None for a run nothing was registered for
    membership_auc: float | None = None  # `evals.membership`'s distinguisher on this run, when asked for
    utility_sets: dict[str, dict[str, float]] = field(default_factory=dict)  # Model Utility's 9 figures, by set
    forget_truth_ratios: list[float] = field(default_factory=list, repr=False)
    calibrated: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # `Preparation.calibrated`


@dataclass(frozen=True)
class Preparation:
    """What registering a configuration's targets took, and what their calibrations decided: kept with the figures
    they produced, so that a report says which strengths it measured (``calibrated_values``)."""

    seconds: float
    calibrated: dict[str, dict[str, dict[str, Any]]]  # target name -> mechanism -> strength and calibration figures


def calibrated_values(target: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each mechanism's calibrated strength on ``target`` (its admin-API view) and the figures of the search that set
    it, by mechanism; mechanisms whose state publishes none (O3: it learns its target) are left out."""
    values: dict[str, dict[str, Any]] = {}
    for name, mechanism in (target.get("mechanisms") or {}).items():
        state = mechanism.get("state") or {}
        calibration = state.get("calibration") or {}
        figures = {key: state[key] for key in CALIBRATED_STRENGTHS if key in state}
        figures.update({key: calibration[key] for key in CALIBRATION_FIGURES if key in calibration})
        if figures:
            values[name] = figures
    return values


class Model(Protocol):
    """What one configuration is measured on."""

    def replies(self, questions: list[str]) -> list[tuple[str, str | None]]:
        """Greedy replies and, when served, their response ids (the audit key)."""
        ...

    def losses(self, question: str, continuations: list[str]) -> list[float]:
        """Per-token losses of each continuation after the question."""
        ...

    def hits(self) -> dict[str, list[str]] | None:
        """Targets hit, by response id; None for a model no classifier sees."""
        ...


def measure(name: str, mechanisms: Sequence[str], model: Model, sets: EvalSets,
            reference_ratios: Sequence[float] | None, progress: Callable[[str], None]) -> RunResult:
    """Every figure of one configuration. ``reference_ratios``: the retain-only model's forget truth ratios (None:
    this is the retain-only model, compared with itself)."""
    progress(f"{name}: replies")
    asked = {
        "forget": [item.question for item in sets.forget], "paraphrase": sets.paraphrased_questions,
        "retain": [item.question for item in sets.retain], "real_authors": [item.question for item in sets.real_authors],
        "world_facts": [item.question for item in sets.world_facts],
    }
    gold = {"forget": sets.forget, "paraphrase": sets.forget, "retain": sets.retain,
            "real_authors": sets.real_authors, "world_facts": sets.world_facts}
    replies = {key: model.replies(questions) for key, questions in asked.items()}
    rouge = {key: [rouge_l_recall(text, item.answer) for (text, _), item in zip(replies[key], gold[key], strict=True)]
             for key in asked}

    progress(f"{name}: scores")
    losses = {key: [question_losses(model, item) for item in gold[key]]
              for key in ("forget", "retain", "real_authors", "world_facts")}
    ratios = [q.truth_ratio for q in losses["forget"]]
    utility_sets = {key: set_figures(split, losses[key], rouge[key]) for key, split in (
        ("retain", "retain_perturbed"), ("real_authors", "real_authors_perturbed"),
        ("world_facts", "world_facts_perturbed"))}
    utility = model_utility(utility_sets["retain"], utility_sets["real_authors"], utility_sets["world_facts"])
    forget_figures = set_figures("forget01_perturbed", losses["forget"], rouge["forget"])

    detection = false_positives = None
    hit = model.hits()
    if hit is not None:
        flagged = [bool(hit.get(rid or "")) for key in ("forget", "paraphrase") for _, rid in replies[key]]
        others = [bool(hit.get(rid or "")) for key in ("retain", "real_authors", "world_facts") for _, rid in replies[key]]
        detection, false_positives = statistics.fmean(flagged), statistics.fmean(others)
    return RunResult(
        name=name, mechanisms=list(mechanisms),
        forget_quality=forget_quality(ratios, ratios if reference_ratios is None else reference_ratios),
        model_utility=utility, forget_rouge=statistics.fmean(rouge["forget"]),
        paraphrase_rouge=statistics.fmean(rouge["paraphrase"]), retain_rouge=statistics.fmean(rouge["retain"]),
        real_authors_rouge=statistics.fmean(rouge["real_authors"]),
        world_facts_rouge=statistics.fmean(rouge["world_facts"]),
        real_authors_acc=multiple_choice_accuracy(losses["real_authors"]),
        world_facts_acc=multiple_choice_accuracy(losses["world_facts"]),
        forget_truth_ratio=forget_figures.truth_ratio, forget_probability=forget_figures.probability,
        detection_rate=detection, false_positive_rate=false_positives,
        fluency=median_known_word_share([text for text, _ in replies["forget"]]),
        utility_sets={key: asdict(figures) for key, figures in utility_sets.items()}, forget_truth_ratios=ratios,
    )


def question_losses(model: Model, item: TruthRatioItem) -> QuestionLosses:
    """The gold, base (paraphrased or same) and perturbed answers' losses, scored in one call."""
    continuations = [item.answer, *([] if item.base_answer == item.answer else [item.base_answer]),
                     *item.perturbed_answers]
    values = model.losses(item.question, continuations)
    base = values[0] if item.base_answer == item.answer else values[1]
    return QuestionLosses(answer=values[0], base=base, perturbed=tuple(values[-len(item.perturbed_answers):]))


def multiple_choice_accuracy(losses: Sequence[QuestionLosses]) -> float:
    """Share of questions whose true answer has a lower per-token loss than every wrong option (TOFU's MC reading)."""
    return statistics.fmean(q.answer < min(q.perturbed) for q in losses)


# ---------------------------------------------------------------- the served model, through the API


class ServedModel:
    """The model behind a running Lethe, through its API."""

    def __init__(self, client: AdminClient, model_name: str, max_tokens: int, since: float) -> None:
        self._client, self._model, self._max_tokens, self._since = client, model_name, max_tokens, since

    def replies(self, questions: list[str]) -> list[tuple[str, str | None]]:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            answers = pool.map(lambda q: self._client.reply(self._model, q, self._max_tokens), questions)
            return [(reply.text, reply.response_id) for reply in answers]

    def losses(self, question: str, continuations: list[str]) -> list[float]:
        return list(self._client.score(question, continuations).mean_losses)

    def token_logprobs(self, question: str, continuations: list[str]) -> list[list[float]]:
        return [list(values) for values in self._client.score(question, continuations).token_logprobs]

    def hits(self) -> dict[str, list[str]]:
        return self._client.audit_targets(self._since)


def run_name(mechanisms: Sequence[str]) -> str:
    return "+".join(mechanisms) or "unprotected"


@contextmanager
def registered(client: AdminClient, authors: Sequence[Author], retain_authors: Sequence[Author],
               mechanisms: Sequence[str], job_timeout_s: float, progress: Callable[[str], None],
               seed: int = 0) -> Iterator[Preparation]:
    """``authors`` registered as targets with ``mechanisms`` (none for an empty set) and preparation ``seed``, and
    active for the duration; yields how long their preparation took and what it calibrated. The targets are deleted
    on the way out, whatever happened."""
    created: list[str] = []
    try:
        started = time.monotonic()
        if mechanisms:
            progress(f"{run_name(mechanisms)}: registering {len(authors)} targets")
            created = [client.create_target(target_body(a, retain_authors, mechanisms, seed))["id"] for a in authors]
            client.wait_until_active(created, job_timeout_s)
        seconds = round(time.monotonic() - started, 1)
        yield Preparation(seconds, {target["name"]: calibrated_values(target)
                                    for target in (client.target(target_id) for target_id in created)})
    finally:
        for target_id in created:
            client.delete_target(target_id, missing_ok=True)


def run_served(client: AdminClient, sets: EvalSets, mechanisms: Sequence[str], reference_ratios: Sequence[float],
               max_tokens: int, job_timeout_s: float, progress: Callable[[str], None],
               membership: Callable[[ServedModel], float] | None = None, seed: int | None = None) -> RunResult:
    """One configuration on the server: register the split's authors with ``mechanisms`` and preparation ``seed``,
    measure, remove them. ``seed`` None: seed 0, and the run's name does not show it (one seed per configuration).
    ``membership``: also run the membership distinguisher (``evals.membership``) while they are registered."""
    name = run_name(mechanisms) + ("" if seed is None or not mechanisms else f" · seed {seed}")
    with registered(client, sets.forget_authors, sets.retain_authors, mechanisms, job_timeout_s,
                    progress, seed or 0) as preparation:
        model = ServedModel(client, client.model(), max_tokens, since=time.time() - 1.0)
        result = measure(name, mechanisms, model, sets, reference_ratios, progress)
        result.preparation_seconds, result.calibrated = preparation.seconds, preparation.calibrated
        result.seed = (seed or 0) if mechanisms else None
        if membership is not None:
            result.membership_auc = membership(model)
        return result


def configurations(mechanisms: Sequence[Sequence[str]] | None, matrix: bool) -> list[tuple[str, ...]]:
    """The runs: unprotected first, then each mechanism alone, the default set a target gets when it names none, and
    all four (matrix; issue 16's goals read all three kinds), or the sets given (the default set if none): several
    sets measure combinations side by side against one unprotected run (``--mechanisms eco,uld --mechanisms
    guard,uld``), as a diagnosis of what stacks badly needs."""
    if matrix:
        return [(), *((name,) for name in MECHANISMS), DEFAULT_MECHANISMS, MECHANISMS]
    chosen = [tuple(names) for names in mechanisms or [DEFAULT_MECHANISMS]]
    unknown = sorted({name for names in chosen for name in names if name not in MECHANISMS})
    if unknown:
        raise ValueError(f"unknown mechanisms {unknown}; choose from {list(MECHANISMS)}")
    if any(not names for names in chosen):
        raise ValueError("an empty mechanism set: the unprotected run is always measured first")
    return [(), *dict.fromkeys(chosen)]


def run_count(runs: Sequence[tuple[str, ...]], seeds: int) -> int:
    """How many results `evaluate` returns: the retain-only model, then each configuration once per seed (the
    unprotected one once: nothing is registered, so there is nothing to seed)."""
    return 1 + sum(seeds if mechanisms else 1 for mechanisms in runs)


@dataclass(frozen=True)
class SeededFigures:
    """One configuration over its registration seeds: each figure's median and range (issue 16's goals read the
    median over at least three seeds)."""

    name: str
    mechanisms: list[str]
    seeds: list[int]
    figures: dict[str, dict[str, float]]  # figure -> {"median", "min", "max"}


SEEDED_FIGURES = ("forget_quality", "model_utility", "forget_rouge", "paraphrase_rouge", "retain_rouge", "fluency",
                  "membership_auc")


def over_seeds(runs: Sequence[RunResult]) -> list[SeededFigures]:
    """The registered runs grouped by mechanism set (in the order first measured), each figure's median and range."""
    groups: dict[tuple[str, ...], list[RunResult]] = {}
    for run in runs:
        if run.seed is not None:
            groups.setdefault(tuple(run.mechanisms), []).append(run)
    summaries = []
    for mechanisms, group in groups.items():
        figures = {}
        for key in SEEDED_FIGURES:
            values = [value for value in (getattr(run, key) for run in group) if value is not None]
            if values:
                figures[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        summaries.append(SeededFigures(run_name(mechanisms), list(mechanisms), [run.seed or 0 for run in group],
                                       figures))
    return summaries


def summary(split: str, runs: Sequence[RunResult]) -> dict[str, Any]:
    """SPEC §10's JSON: ``{"split", "runs": [...]}``, plus ``over_seeds``: each registered configuration's figures
    over its seeds (``over_seeds``).

    Each run keeps its per-question forget truth ratios, so that Forget Quality can be recomputed against another
    retain-only model (``tofu_metrics.forget_quality``) without serving the run again.
    """
    return {"split": split, "runs": [asdict(run) for run in runs],
            "over_seeds": [asdict(group) for group in over_seeds(runs)]}


def require_empty_registry(client: AdminClient) -> None:
    """Targets already on the server would protect the "unprotected" run: refuse to measure."""
    names = [t["name"] for t in client.targets()]
    if names:
        raise ValueError(f"the server already has forget targets ({names}): they would protect the \"unprotected\" "
                         "run; evaluate on a replica with an empty registry (or remove them first)")


def evaluate(client: AdminClient, sets: EvalSets, runs: Sequence[tuple[str, ...]], reference: Model,
             max_tokens: int, job_timeout_s: float, progress: Callable[[str], None],
             on_run: Callable[[list[RunResult]], None] = lambda results: None,
             membership: Callable[[ServedModel], float] | None = None, seeds: int = 1) -> list[RunResult]:
    """The retain-only model first (its truth ratios are every other run's reference), then each configuration,
    registered ``seeds`` times with preparation seeds 0, 1, … (each a run of its own, named with its seed when there
    is more than one).

    ``on_run`` gets the results so far after each run, so that a failure in a later configuration (a matrix takes an
    hour on forget05) does not lose the runs already measured. ``membership``: see `run_served` (the retain-only
    model is not served, so it has no membership figure).
    """
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, not {seeds}")
    require_empty_registry(client)
    retain_only = measure("retain-only model", [], reference, sets, None, progress)
    results = [retain_only]
    on_run(results)
    for mechanisms in runs:
        for seed in range(seeds) if mechanisms and seeds > 1 else [None]:
            results.append(run_served(client, sets, mechanisms, retain_only.forget_truth_ratios, max_tokens,
                                      job_timeout_s, progress, membership, seed))
            on_run(results)
    return results
