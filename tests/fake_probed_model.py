"""A stand-in for the served model in the verification's tests: the unprotected model answers every probe with the
registered answer it is about, the protected one echoes the question; the gate flags a prompt naming an alias."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.verification.job import GuardedReply
from server.verification.probes import Probe


@dataclass
class FakeProbedModel:
    target_id: str
    forget: Sequence[Mapping[str, Any]]
    aliases: Sequence[str]
    revision: int = 10**9
    asked: list[str] = field(default_factory=list)

    def serving_revision(self) -> int:
        return self.revision

    def _knows(self, probe: Probe) -> str:
        index = probe.answers[0] if probe.answers else 0
        item = self.forget[index]
        return str(item.get("answer") or item.get("text") or "")

    def plain_replies(self, probes: Sequence[Probe], max_tokens: int, tag: str) -> list[str]:
        self.asked.extend(probe.turns[-1][1] for probe in probes)
        return [self._knows(probe) if probe.answers else "I do not know." for probe in probes]

    def guarded_replies(self, probes: Sequence[Probe], max_tokens: int, tag: str) -> list[GuardedReply]:
        replies = []
        for probe in probes:
            text = " ".join(content for _, content in probe.turns)
            hit = any(alias.lower() in text.lower() for alias in self.aliases)
            replies.append(GuardedReply(text=probe.turns[0][1] if hit else self._knows(probe) if probe.answers else "",
                                        targets=(self.target_id,) if hit else (), mechanisms=("guard",) if hit else ()))
        return replies
