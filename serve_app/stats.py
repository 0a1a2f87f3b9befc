"""Summary statistics of measured samples (batch latencies, request latencies, lengths): percentiles."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1: the value at rank ceil(q n)) of values in any order; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Throughput:
    """Pairs per second of a replica while it is busy, from its recent batches.

    A batch's service time is the wall time it added to the busy period: from the later of its own start and
    the previous batch's end, to its end. Two batches in flight (one preparing while the other runs) are not
    counted twice, and idle time between batches is not counted at all, so the rate is what the replica does
    under load: the rate at which a queue in front of it drains."""

    def __init__(self, window: int = 32, min_batches: int = 3) -> None:
        self.batches: deque[tuple[int, float]] = deque(maxlen=window)
        self.min_batches = min_batches
        self.last_done = 0.0

    def record(self, pairs: int, started: float, done: float) -> None:
        service = done - max(started, self.last_done)
        self.last_done = max(self.last_done, done)
        if service > 0 and pairs > 0:
            self.batches.append((pairs, service))

    def pairs_per_s(self) -> float | None:
        """None until `min_batches` batches were measured: no estimate is better than a guess."""
        if len(self.batches) < self.min_batches:
            return None
        return sum(p for p, _ in self.batches) / sum(s for _, s in self.batches)

    def window(self) -> list[tuple[int, float]]:
        """The measured batches, oldest first: (pairs, service ms)."""
        return [(pairs, round(service * 1000, 1)) for pairs, service in self.batches]

    def wait_s(self, pairs: int) -> float | None:
        """Seconds until `pairs` more pairs are scored at the measured rate; None without a measurement."""
        rate = self.pairs_per_s()
        return None if rate is None else pairs / rate
