"""A/B tests on a slice of traffic (setting `experiment`): a request's variant from a hash of a caller-chosen key (the
same key, the same variant, on every ingress replica and after restarts), the variant's model and thresholds applied to
its job, the variant named in the answer and counted per variant for Prometheus.

The key is read from the request's header by the API's gate (serve_app/api.py) into `KEY`, a context variable
that the route's task inherits; the ingress reads it when it ranks."""

from __future__ import annotations

import contextvars
import hashlib
import random
from dataclasses import dataclass, replace

from serve_app.catalog import Catalog
from serve_app.ranking import STRATEGIES
from serve_app.schemas import RerankJob
from serve_app.settings import Experiment, Variant

CONTROL = "control"
# The request's key (the experiment's key_header), set per request by the API's gate; None without one.
KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("experiment_key", default=None)


@dataclass(frozen=True)
class ChosenVariant:
    """The variant a request was assigned: its name, its model for requests that name none, and each strategy's
    threshold for every model ({model: {strategy: entry}}, as ranking.model_strategies gives them)."""

    name: str
    model: str | None = None
    strategies: dict[str, dict[str, dict]] | None = None


def position(key: str, salt: str) -> float:
    """Where a key falls in [0, 1): the same key always falls in the same place."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Experiments:
    """The variants of the settings' experiment (none: every request is control, and answers say nothing)."""

    def __init__(self, experiment: Experiment | None, catalog: Catalog) -> None:
        self.experiment = experiment
        self.chosen = [self._chosen(v, catalog) for v in experiment.variants] if experiment else []
        self.shares = [v.share for v in experiment.variants] if experiment else []
        self.counts: dict[str, int] = {}
        self.metric = None
        if experiment is not None:
            from ray.util import metrics

            self.metric = metrics.Counter(
                "rerank_variant_requests", "Requests ranked per variant of the A/B test.", tag_keys=("variant",)
            )

    @staticmethod
    def _chosen(variant: Variant, catalog: Catalog) -> ChosenVariant:
        if variant.model is not None:
            catalog.find(variant.model)  # a name nobody serves fails the deploy, not a request
        if variant.thresholds is None:
            return ChosenVariant(variant.name, variant.model)
        table = {
            strategy: {"threshold": variant.thresholds.get(strategy, fixed.value), "inclusive": fixed.inclusive,
                       "source": f"variant {variant.name}"}
            for strategy, fixed in STRATEGIES.items()
        }  # fmt: skip
        return ChosenVariant(variant.name, variant.model, {served.name: table for served in catalog.models})

    def assign(self, key: str | None) -> ChosenVariant | None:
        """The request's variant (None without an experiment): by its key's place, or at random without a key."""
        if self.experiment is None:
            return None
        place = position(key, self.experiment.salt) if key is not None else random.random()
        variant, edge = ChosenVariant(CONTROL), 0.0
        for candidate, share in zip(self.chosen, self.shares):
            edge += share
            if place < edge:
                variant = candidate
                break
        self.counts[variant.name] = self.counts.get(variant.name, 0) + 1
        if self.metric is not None:
            self.metric.inc(tags={"variant": variant.name})
        return variant

    @staticmethod
    def applied(job: RerankJob, variant: ChosenVariant | None) -> RerankJob:
        """The job as the variant ranks it: its model where the request names none."""
        if variant is None or variant.model is None or job.model is not None:
            return job
        return replace(job, model=variant.model)
