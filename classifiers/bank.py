"""Scoring one request against every active target at once: the classifier's share of each request's latency.

All heads are stacked into W (T, d), b (T,) and thresholds (T,), and all aliases into one `AliasIndex`, so a request
costs one embedding call for its few texts, one (n, d) x (d, T) product, a vectorised max and threshold, and alias
lookups whose cost depends on the prompt's length, not on T. A bank is immutable: the registry builds a new one per
revision and swaps it in, so in-flight requests keep the one they started with.

Precision as targets accumulate. An alias mention is a hit. A head alone is weighed by the entity evidence of the text
it fired on (``entities.py``): its margin over the target's threshold must reach ``offsets.clean`` where the text names
something of the target's data and no name foreign to every target; ``offsets.stranger`` where it names someone or
something no target knows, or gives a year the target's data lack; where it names nothing at all, a head never fires
alone (topic similarity is no evidence: calibrated like the others it let 5 % of held-out general questions through).
The offsets are calibrated for the whole registry at once (``calibrated``): on negatives no head was fitted on (the
pool's calibration share plus the operators' own samples), the union over all targets of head-only hits stays within a
budget. A per-target threshold alone lets false positives add up with the number of targets (``docs/gate.md``: 87 %
of questions about unregistered TOFU authors flagged at 100 targets).

A target whose classifier is not fitted yet (just registered, or its fit failed) has no head: it is *alias-only*, hit
by a mention of one of its aliases alone, at the alias score. A bank of alias-only targets makes no embedding call.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from classifiers.aliases import AliasIndex
from classifiers.calibration import threshold_for_false_positive_rate
from classifiers.chunking import word_windows
from classifiers.conversation import DEFAULT_MAX_TEXTS, WINDOW_STRIDE, WINDOW_WORDS, texts_to_embed
from classifiers.embedding import Embedder
from classifiers.entities import EntityIndex, vocabulary
from classifiers.matmul import rows_dot
from classifiers.prompt_classifier import PromptClassifierArtifact, mentioned_score
from classifiers.types import AliasSpan, BankResult, Conversation, Hit

logger = logging.getLogger(__name__)


DEFAULT_MAX_UNION_FALSE_POSITIVE_RATE = 0.005


CLEAN, TOPIC, STRANGER, STRONG = 0, 1, 2, 3  # evidence classes of a (text, target) pair, in GateOffsets.by_class order
# Two distinct facts of a target's data (a place and a year) are evidence enough to let its head fire somewhat below its
# own threshold, at most this many logits: the threshold was set for recall on prompts that mostly name the target.
STRONG_FLOOR = -2.0


@dataclass(frozen=True)
class GateOffsets:
    """How far over its own threshold a head must score, in logits, to be a hit without an alias mention, by the
    evidence of the text it fired on (TOPIC: never). Uncalibrated, only clean evidence lets a head fire alone."""

    clean: float = 0.0
    stranger: float = math.inf
    strong: float = 0.0

    def by_class(self) -> np.ndarray:
        return np.array([self.clean, math.inf, self.stranger, self.strong])


@dataclass(frozen=True)
class Calibration:
    """The registry-wide calibration's outcome, for logs and metrics."""

    offsets: GateOffsets
    negatives: int  # calibration negatives scored (those mentioning a registered alias are left out)
    union_false_positive_rate: float  # of head-only hits on them, at ``offsets``
    seconds: float


def calibration_windows(negatives: Sequence[str]) -> list[list[str]]:
    """Each calibration negative as the windows ``ClassifierBank.calibrated`` embeds (a request's window size)."""
    return [word_windows(text, WINDOW_WORDS, WINDOW_STRIDE) for text in negatives]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


class ClassifierBank:
    """The prompt classifiers of every active target, scored together."""

    def __init__(
        self,
        target_ids: list[str],
        weights: np.ndarray,  # (T, d)
        biases: np.ndarray,  # (T,)
        thresholds: np.ndarray,  # (T,)
        aliases: Mapping[str, Sequence[str]],  # of every target, alias-only ones included
        embedder: Embedder,
        max_texts: int = DEFAULT_MAX_TEXTS,
        *,
        alias_only: Sequence[str] = (),  # targets without a head: detected by their aliases alone
        entities: Mapping[str, Iterable[str]] | None = None,
        offsets: GateOffsets = GateOffsets(),
    ):
        if weights.shape != (len(target_ids), embedder.dim):
            raise ValueError(f"weights shape {weights.shape} != ({len(target_ids)}, {embedder.dim})")
        self.target_ids = list(target_ids)
        self._w = np.ascontiguousarray(weights, dtype=np.float32)  # (T, d)
        self._b = biases.astype(np.float32)
        self._thr = thresholds.astype(np.float64)
        self._thr_logit = _logit(self._thr)  # (T,) a head's margin is its logit minus this
        self._column = {tid: i for i, tid in enumerate(self.target_ids)}
        self.alias_only_ids = [tid for tid in alias_only if tid not in self._column]
        self._aliases = AliasIndex(aliases)
        self._entities = EntityIndex(entities or {})
        self.offsets = offsets
        self._embedder = embedder
        self.max_texts = max_texts  # most texts embedded per conversation (`texts_to_embed`); more are refused

    @classmethod
    def from_artifacts(cls, artifacts: Mapping[str, PromptClassifierArtifact], embedder: Embedder,
                       max_texts: int = DEFAULT_MAX_TEXTS,
                       aliases: Mapping[str, Sequence[str]] | None = None) -> ClassifierBank:
        """Stack fitted artifacts ({target_id: artifact}); all must come from `embedder`'s model. ``aliases``: the
        registry's current {target_id: aliases}: a target without an artifact is alias-only, and a fitted target's
        aliases changed since its fit are matched at once (without them, those it was fitted with)."""
        for tid, artifact in artifacts.items():
            if artifact.embedder_id != embedder.model_id:
                raise ValueError(f"target {tid}: fitted with {artifact.embedder_id}, embedder is {embedder.model_id}")
        ids = list(artifacts)
        current = {tid: list(names) for tid, names in (aliases or {}).items()}
        alias_only = {tid: names for tid, names in current.items() if tid not in artifacts}
        fitted_aliases = {t: current.get(t, artifacts[t].aliases) for t in ids}
        weights = np.stack([artifacts[t].weights for t in ids]) if ids else np.zeros((0, embedder.dim), np.float32)
        return cls(
            ids,
            weights,
            np.array([artifacts[t].bias for t in ids], dtype=np.float32),
            np.array([artifacts[t].threshold for t in ids], dtype=np.float64),
            {**fitted_aliases, **alias_only},
            embedder,
            max_texts,
            alias_only=list(alias_only),
            # A head-less target's names are registered all the same: they are nobody's stranger.
            entities={**{t: vocabulary(a) for t, a in alias_only.items()},
                      **{t: {*artifacts[t].entities, *vocabulary(fitted_aliases[t])} for t in ids}},
        )

    def with_offsets(self, offsets: GateOffsets) -> ClassifierBank:
        """The same heads with other offsets (banks are immutable; the snapshot swaps in the calibrated one)."""
        bank = object.__new__(ClassifierBank)
        bank.__dict__.update(self.__dict__)
        bank.offsets = offsets
        return bank

    def calibrated(self, negatives: Sequence[str],
                   max_union_false_positive_rate: float = DEFAULT_MAX_UNION_FALSE_POSITIVE_RATE,
                   encode: Callable[[Sequence[str]], np.ndarray] | None = None,
                   ) -> tuple[ClassifierBank, Calibration]:
        """This bank with offsets for which at most ``max_union_false_positive_rate`` of ``negatives`` (texts no head
        was fitted on) are head-only hits of any target; a third of the budget to each evidence class that can fire.

        An offset never goes below 0 (a target's own threshold, set for its recall, is the floor), but for strong
        evidence, which may go down to ``STRONG_FLOOR``. Negatives that mention a
        registered alias are left out (they would be mislabelled positives). ``encode`` embeds their windows
        (``calibration_windows``; default: the bank's embedder): a replica keeps them embedded across rebuilds.
        """
        started = time.perf_counter()
        texts = [windows for text, windows in zip(negatives, calibration_windows(negatives), strict=True)
                 if windows and not self._aliases.find(text)]
        if not texts or not self.target_ids:
            calibration = Calibration(GateOffsets(), len(texts), 0.0, time.perf_counter() - started)
            return self.with_offsets(calibration.offsets), calibration
        flat = [window for windows in texts for window in windows]
        embedded = (encode or self._embedder.encode)(flat)
        margins = rows_dot(self._w, embedded) + self._b - self._thr_logit  # (n_windows, T)
        best = np.full((len(texts), 4), -math.inf)  # per negative, its best margin in each evidence class
        row = 0
        for index, windows in enumerate(texts):
            for window in windows:
                classes = self._evidence_classes(window)
                for evidence_class in (CLEAN, STRANGER, STRONG):
                    columns = classes == evidence_class
                    if columns.any():
                        best[index, evidence_class] = max(best[index, evidence_class], margins[row, columns].max())
                row += 1
        share = max_union_false_positive_rate / 3
        clean, stranger, strong = (threshold_for_false_positive_rate(best[:, evidence_class], share)
                                   for evidence_class in (CLEAN, STRANGER, STRONG))
        offsets = GateOffsets(max(0.0, clean), max(0.0, stranger), max(STRONG_FLOOR, strong))
        rate = float(np.mean((best >= offsets.by_class()).any(axis=1)))
        calibration = Calibration(offsets, len(texts), rate, time.perf_counter() - started)
        return self.with_offsets(offsets), calibration

    def _evidence_classes(self, text: str) -> np.ndarray:
        """(T,) each target's evidence class for this text: STRANGER wherever it names something no target knows or
        gives a year the target's data lack, else STRONG where it names two things of the target's, CLEAN one, TOPIC
        none."""
        evidence = self._entities.evidence(text)
        if evidence.unlinked_name:
            return np.full(len(self.target_ids), STRANGER)
        classes = np.full(len(self.target_ids), TOPIC)
        classes[[self._column[t] for t in evidence.linked if t in self._column]] = CLEAN
        classes[[self._column[t] for t in evidence.strongly_linked if t in self._column]] = STRONG
        if evidence.dated is not None:
            consistent = np.zeros(len(self.target_ids), dtype=bool)
            consistent[[self._column[t] for t in evidence.dated if t in self._column]] = True
            classes[~consistent] = STRANGER
        return classes

    def __len__(self) -> int:
        return len(self.target_ids) + len(self.alias_only_ids)

    def score(self, conversation: Conversation) -> BankResult:
        """Every target's score for this conversation, and the hits (score >= threshold or alias mention)."""
        return self.score_many([conversation])[0]

    def score_many(self, conversations: Sequence[Conversation]) -> list[BankResult]:
        """`score` for several conversations with one embedding call for all their texts.

        The embedding model is the classifier's whole cost, and on CPU one batch of 32 short texts costs about a
        quarter of 32 single calls; concurrent requests are coalesced into one call here (``ClassificationBatcher``).
        Each result's timings are the batch's.
        """
        started = time.perf_counter()
        if not len(self):
            nothing = np.zeros((0, self._embedder.dim), np.float32)
            return [BankResult([], {}, 0.0, time.perf_counter() - started, nothing) for _ in conversations]
        # Without heads there is nothing to embed for: alias-only targets are found in the text itself.
        texts = [texts_to_embed(conversation, self.max_texts) if self.target_ids else []
                 for conversation in conversations]
        flat = [text for request_texts in texts for text in request_texts]
        embedded = self._embedder.encode(flat) if flat else np.zeros((0, self._embedder.dim), np.float32)
        embed_seconds = time.perf_counter() - started
        logits = rows_dot(self._w, embedded) + self._b  # (N, T) over every text of every conversation
        scored = []
        offset = 0
        for conversation, request_texts in zip(conversations, texts, strict=True):
            rows = slice(offset, offset + len(request_texts))
            offset += len(request_texts)
            if request_texts:
                head = 1.0 / (1.0 + np.exp(-logits[rows].max(axis=0).astype(np.float64)))  # max over its texts
                head_hit = self._head_hits(request_texts, logits[rows])
            else:
                head = np.zeros(len(self.target_ids))
                head_hit = np.zeros(len(self.target_ids), dtype=bool)
            hits, scores = self._verdicts(conversation, head, head_hit)
            scored.append((hits, scores, embedded[rows]))
        total_seconds = time.perf_counter() - started
        return [BankResult(hits, scores, embed_seconds, total_seconds, embeddings)
                for hits, scores, embeddings in scored]

    def _head_hits(self, texts: list[str], logits: np.ndarray) -> np.ndarray:
        """(T,) whether some text's head margin reaches the offset its evidence for that target calls for."""
        margins = logits.astype(np.float64) - self._thr_logit  # (n, T)
        offsets = self.offsets.by_class()
        lowest = offsets.min()
        hit = np.zeros(len(self.target_ids), dtype=bool)
        for row, text in enumerate(texts):
            if (margins[row] >= lowest).any():  # else no evidence can make any head fire: skip the text's regexes
                hit |= margins[row] >= offsets[self._evidence_classes(text)]
        return hit

    def _verdicts(self, conversation: Conversation, head: np.ndarray,
                  head_hit: np.ndarray) -> tuple[list[Hit], dict[str, float]]:
        """Hits (best first) and every target's score from the heads' verdicts and the alias mentions."""
        spans = self._alias_spans(conversation)
        combined = head.copy()
        hit = head_hit.copy()
        alias_scores = dict.fromkeys(self.alias_only_ids, 0.0)
        for tid, target_spans in spans.items():  # only the (few) targets whose aliases were mentioned
            best_mention = max(s.score for s in target_spans)
            col = self._column.get(tid)
            if col is None:  # no head yet: the mention alone is the verdict
                alias_scores[tid] = best_mention
                continue
            combined[col], hit[col] = mentioned_score(head[col], best_mention, self._thr[col]), True

        hits = []
        for col in np.flatnonzero(hit):
            tid = self.target_ids[col]
            hits.append(Hit(tid, float(combined[col]), tuple(spans.get(tid, ()))))
        hits.extend(Hit(tid, score, tuple(spans[tid])) for tid, score in alias_scores.items() if score > 0)
        hits.sort(key=lambda h: -h.score)
        return hits, {**dict(zip(self.target_ids, combined.tolist())), **alias_scores}

    def _alias_spans(self, conversation: Conversation) -> dict[str, list[AliasSpan]]:
        """Alias mentions in every turn, tagged with the turn index: {target_id: spans, in conversation order}."""
        found: dict[str, list[AliasSpan]] = {}
        for turn, (_, content) in enumerate(conversation):
            for tid, spans in self._aliases.find(content).items():
                found.setdefault(tid, []).extend(AliasSpan(s.start, s.end, s.alias, s.score, turn) for s in spans)
        return found
