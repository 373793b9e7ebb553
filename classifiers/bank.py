"""Scoring one request against every active target at once: the classifier's share of each request's latency.

All heads are stacked into W (T, d), b (T,) and thresholds (T,), and all aliases into one `AliasIndex`, so a request
costs one embedding call for its few texts, one (n, d) x (d, T) product, a vectorised max and threshold, and alias
lookups whose cost depends on the prompt's length, not on T. A bank is immutable: the registry builds a new one per
revision and swaps it in, so in-flight requests keep the one they started with.

A target whose classifier is not fitted yet (just registered, or its fit failed) has no head: it is *alias-only*, hit
by a mention of one of its aliases alone, at the alias score. A bank of alias-only targets makes no embedding call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from classifiers.aliases import AliasIndex
from classifiers.conversation import texts_to_embed
from classifiers.embedding import Embedder
from classifiers.matmul import rows_dot
from classifiers.prompt_classifier import PromptClassifierArtifact, combine
from classifiers.types import AliasSpan, BankResult, Conversation, Hit

logger = logging.getLogger(__name__)


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
        alias_only: Sequence[str] = (),  # targets without a head: detected by their aliases alone
    ):
        if weights.shape != (len(target_ids), embedder.dim):
            raise ValueError(f"weights shape {weights.shape} != ({len(target_ids)}, {embedder.dim})")
        self.target_ids = list(target_ids)
        self._w = np.ascontiguousarray(weights, dtype=np.float32)  # (T, d)
        self._b = biases.astype(np.float32)
        self._thr = thresholds.astype(np.float64)
        self._column = {tid: i for i, tid in enumerate(self.target_ids)}
        self.alias_only_ids = [tid for tid in alias_only if tid not in self._column]
        self._aliases = AliasIndex(aliases)
        self._embedder = embedder

    @classmethod
    def from_artifacts(cls, artifacts: Mapping[str, PromptClassifierArtifact], embedder: Embedder,
                       alias_only: Mapping[str, Sequence[str]] | None = None) -> ClassifierBank:
        """Stack fitted artifacts ({target_id: artifact}); all must come from `embedder`'s model. ``alias_only``:
        {target_id: aliases} of targets with no fitted artifact yet."""
        for tid, artifact in artifacts.items():
            if artifact.embedder_id != embedder.model_id:
                raise ValueError(f"target {tid}: fitted with {artifact.embedder_id}, embedder is {embedder.model_id}")
        ids = list(artifacts)
        alias_only = {tid: list(aliases) for tid, aliases in (alias_only or {}).items() if tid not in artifacts}
        weights = np.stack([artifacts[t].weights for t in ids]) if ids else np.zeros((0, embedder.dim), np.float32)
        return cls(
            ids,
            weights,
            np.array([artifacts[t].bias for t in ids], dtype=np.float32),
            np.array([artifacts[t].threshold for t in ids], dtype=np.float64),
            {**{t: artifacts[t].aliases for t in ids}, **alias_only},
            embedder,
            list(alias_only),
        )

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
        texts = [texts_to_embed(conversation) if self.target_ids else [] for conversation in conversations]
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
            else:
                head = np.zeros(len(self.target_ids))
            hits, scores = self._verdicts(conversation, head)
            scored.append((hits, scores, embedded[rows]))
        total_seconds = time.perf_counter() - started
        return [BankResult(hits, scores, embed_seconds, total_seconds, embeddings)
                for hits, scores, embeddings in scored]

    def _verdicts(self, conversation: Conversation, head: np.ndarray) -> tuple[list[Hit], dict[str, float]]:
        """Hits (best first) and every target's score from the heads' probabilities and the alias mentions."""
        spans = self._alias_spans(conversation)
        combined = head.copy()
        hit = head >= self._thr
        alias_scores = dict.fromkeys(self.alias_only_ids, 0.0)
        for tid, target_spans in spans.items():  # only the (few) targets whose aliases were mentioned
            alias_score = max(s.score for s in target_spans)
            col = self._column.get(tid)
            if col is None:  # no head yet: the mention alone is the verdict
                alias_scores[tid] = alias_score
                continue
            combined[col], hit[col] = combine(head[col], alias_score, self._thr[col])

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
