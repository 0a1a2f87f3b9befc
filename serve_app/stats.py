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
    """Pairs per second of a replica while it is busy, from its latest batches: those that make `span_s` of busy
    time (at least `min_batches`), so the rate follows a machine that slows down within seconds.

    A batch's service time is the wall time it added to the busy period: from the later of its own start and
    the previous batch's end, to its end. Two batches in flight (one preparing while the other runs) are not
    counted twice, and idle time between batches is not counted at all, so the rate is what the replica does
    under load: the rate at which a queue in front of it drains."""

    def __init__(self, window: int = 32, min_batches: int = 3, span_s: float = 10.0) -> None:
        self.batches: deque[tuple[int, float]] = deque(maxlen=window)
        self.min_batches = min_batches
        self.span_s = span_s  # the rate is taken over the latest batches that make this much busy time
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
        pairs = service = 0.0
        for count, (batch_pairs, batch_service) in enumerate(reversed(self.batches)):
            if count >= self.min_batches and service >= self.span_s:
                break
            pairs, service = pairs + batch_pairs, service + batch_service
        return pairs / service

    def window(self) -> list[tuple[int, float]]:
        """The measured batches, oldest first: (pairs, service ms)."""
        return [(pairs, round(service * 1000, 1)) for pairs, service in self.batches]

    def wait_s(self, pairs: int) -> float | None:
        """Seconds until `pairs` more pairs are scored at the measured rate; None without a measurement."""
        rate = self.pairs_per_s()
        return None if rate is None else pairs / rate


class Drain(Throughput):
    """The rate at which a replica drains its queue of one model's calls, in work per second of busy time: a
    batch's work is its estimated tokens (scoring.call.estimated_tokens, the unit admission estimates calls in)
    plus a fixed cost per forward (the model's forward_cost_tokens, measured by the replica at start and again
    when idle), so a lone small batch implies the same rate as a full one and the rate measured at light load
    does not understate what the replica drains when its queue is long. `best`: the highest rate its window has
    shown (what a call may hope for on an idle replica)."""

    def __init__(self, window: int = 32, min_batches: int = 3, span_s: float = 10.0) -> None:
        super().__init__(window, min_batches, span_s)
        self.best: float | None = None

    @staticmethod
    def work(tokens: int, pairs: int, cap: int, forward_tokens: int) -> int:
        """A call's (or a batch's) work: its tokens plus a forward's fixed cost for each `cap` pairs."""
        return tokens + -(-pairs // max(1, cap)) * forward_tokens

    def record(self, work: int, started: float, done: float) -> None:
        super().record(work, started, done)
        rate = self.pairs_per_s()
        if rate is not None:
            self.best = max(self.best or 0.0, rate)
