"""Strategies, thresholds and the ranking: a score per document -> kept, best first, cut to top_n. Below the HTTP
schemas, so that the score-fitting code (score_fit.py) and the bulk job use them without the request models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from serve_app.scoring.types import Score

Strategy = Literal["strict", "balanced", "explore"]


@dataclass(frozen=True)
class Threshold:
    """Keep a result whose calibrated score is above `value` (or equal, when inclusive)."""

    value: float
    inclusive: bool

    def keeps(self, score: float) -> bool:
        return score >= self.value if self.inclusive else score > self.value


STRATEGIES: dict[str, Threshold] = {
    "strict": Threshold(0.75, inclusive=False),
    "balanced": Threshold(0.55, inclusive=True),
    "explore": Threshold(0.4, inclusive=False),
}


@dataclass(frozen=True)
class ScoredDocument:
    index: int
    relevance_score: float
    raw_score: float


def rank(scores: Sequence[Score], threshold: Threshold | None, top_n: int | None) -> list[ScoredDocument]:
    """A score per document -> kept by the threshold, best first (ties by index), cut to top_n."""
    ranked = [ScoredDocument(i, score.relevance, score.raw) for i, score in enumerate(scores)]
    if threshold is not None:
        ranked = [s for s in ranked if threshold.keeps(s.relevance_score)]
    ranked.sort(key=lambda s: (-s.relevance_score, s.index))
    return ranked[:top_n] if top_n is not None else ranked
