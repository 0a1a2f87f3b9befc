"""Strategies, thresholds and the ranking: a score per document -> kept, best first, cut to top_n. Below the HTTP
schemas, so that the score-fitting code (score_fit.py) and the bulk job use them without the request models."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from serve_app.scoring.types import Score
from serve_app.settings import PoolSettings, score_map_path

Strategy = Literal["strict", "balanced", "explore"]


@dataclass(frozen=True)
class Threshold:
    """Keep a result whose calibrated score is above `value` (or equal, when inclusive). A strategy's threshold
    names it (`strategy`): it is resolved per model, from the model's fitted thresholds (model_strategies)."""

    value: float
    inclusive: bool
    strategy: str | None = None

    def keeps(self, score: float) -> bool:
        return score >= self.value if self.inclusive else score > self.value


# The fallback of each strategy, for a model without fitted thresholds (no score map fitted on labels).
STRATEGIES: dict[str, Threshold] = {
    "strict": Threshold(0.75, inclusive=False, strategy="strict"),
    "balanced": Threshold(0.55, inclusive=True, strategy="balanced"),
    "explore": Threshold(0.4, inclusive=False, strategy="explore"),
}
# What each strategy promises, on the labelled pairs its model's score map was fitted on (the held-out split):
# strict the lowest threshold with precision >= 0.95, explore the highest with recall >= 0.95, balanced the best F1.
PROMISES = {"strict": ("precision", 0.95), "explore": ("recall", 0.95), "balanced": ("f1", None)}


def model_strategies(pool_settings: PoolSettings, name: str) -> dict[str, dict]:
    """Each strategy's threshold for one model, and where it came from: "fitted" (the thresholds calibrate_scores
    wrote into the model's score map, with their precision and recall on the held-out split) or "fallback" (the
    fixed STRATEGIES: no fitted map, a map fitted for another model, the `calibration` setting in its place, or a
    promise the labels could not keep). Read from the same file the model's pool loads its map from."""
    fitted: dict = {}
    path = Path(pool_settings.score_map) if pool_settings.score_map is not None else score_map_path(name)
    if pool_settings.calibration is None and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if isinstance(data, dict) and data.get("model") == pool_settings.model:
            fitted = data.get("thresholds") or {}
    described = {}
    for strategy, fallback in STRATEGIES.items():
        entry = fitted.get(strategy)
        if isinstance(entry, dict) and isinstance(entry.get("threshold"), (int, float)):
            described[strategy] = {**entry, "inclusive": bool(entry.get("inclusive")), "source": "fitted"}
        else:
            described[strategy] = {"threshold": fallback.value, "inclusive": fallback.inclusive, "source": "fallback"}
    return described


def resolved(threshold: Threshold | None, models: dict[str, dict[str, dict]], model: str) -> Threshold | None:
    """A request's threshold for the documents one model scored: a strategy's, that model's own."""
    if threshold is None or threshold.strategy is None or model not in models:
        return threshold
    entry = models[model][threshold.strategy]
    return Threshold(entry["threshold"], entry["inclusive"], threshold.strategy)


def per_document(job, by_model: dict[str, list[int]], models: dict[str, dict[str, dict]]) -> list[Threshold | None]:
    """The request's threshold for each of its documents (`by_model`: documents per model name; `job` a
    RerankJob): a strategy resolved for the model that scored the document."""
    thresholds: list[Threshold | None] = [job.threshold] * len(job.documents)
    for name, indices in by_model.items():
        threshold = resolved(job.threshold, models, name)
        for i in indices:
            thresholds[i] = threshold
    return thresholds


@dataclass(frozen=True)
class ScoredDocument:
    index: int
    relevance_score: float
    raw_score: float


def rank(
    scores: Sequence[Score], threshold: Threshold | Sequence[Threshold | None] | None, top_n: int | None
) -> list[ScoredDocument]:
    """A score per document -> kept by the threshold (one for all, or one per document: a strategy resolved per
    model), best first (ties by index), cut to top_n."""
    ranked = [ScoredDocument(i, score.relevance, score.raw) for i, score in enumerate(scores)]
    per_document = threshold if isinstance(threshold, Sequence) else [threshold] * len(ranked)
    ranked = [s for s in ranked if per_document[s.index] is None or per_document[s.index].keeps(s.relevance_score)]
    ranked.sort(key=lambda s: (-s.relevance_score, s.index))
    return ranked[:top_n] if top_n is not None else ranked
