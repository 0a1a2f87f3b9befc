"""What a pool reports: its Prometheus series (through Ray's metrics export) and the percentiles of /v1/stats."""

from __future__ import annotations

from collections.abc import Iterable

from ray.util import metrics


class PoolMetrics:
    """Prometheus series tagged by pool."""

    def __init__(self, pool: str) -> None:
        tags = {"pool": pool}
        self.pairs = metrics.Counter("rerank_pairs_scored", "Pairs scored.", tag_keys=("pool",))
        self.batch_pairs = metrics.Histogram(
            "rerank_batch_pairs", "Pairs per batch.", boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
            tag_keys=("pool",),
        )  # fmt: skip
        self.batch_ms = metrics.Histogram(
            "rerank_batch_latency_ms", "Prepare + forward time per batch.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000], tag_keys=("pool",),
        )  # fmt: skip
        self.queue = metrics.Gauge("rerank_pending_pairs", "Pairs waiting for or in a batch.", tag_keys=("pool",))
        self.memory = metrics.Gauge(
            "rerank_memory_bytes", "CUDA allocated bytes, or RSS on the CPU.", tag_keys=("pool", "kind")
        )
        for series in (self.pairs, self.batch_pairs, self.batch_ms, self.queue, self.memory):
            series.set_default_tags(tags)


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of the values in any order; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
