"""Pool calls as the ingress sees them: the message a call answers with (a message between the ingress and a pool
replica, not a scoring type), and the calls lost with their replica."""

from __future__ import annotations

import asyncio
import hashlib
import math
import pickle
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serve_app.scoring.types import Score

if TYPE_CHECKING:
    from serve_app.ranking import ScoredDocument
    from serve_app.settings import Settings


@dataclass(frozen=True)
class PoolRate:
    """How fast a pool replica drains one model's calls, as it said when it answered one: work per second of busy
    time (stats.Drain), and what the ingress needs to count a request's work as the replica does."""

    work_per_s: float | None  # None: not measured yet
    max_length: int
    cap: int  # pairs per forward
    forward_tokens: int  # a forward's fixed cost in tokens


@dataclass(frozen=True)
class CallResult:
    """One pool call's scores and what they cost: the pairs and real tokens computed (windows included),
    documents split into windows, and the times of its slowest piece (waiting for a batch, preparing,
    the forward pass), in ms."""

    scores: list[Score]
    embeddings: list[list[float]] | None = None  # an embedding call's vectors, one per input (scores empty)
    pairs: int = 0
    tokens: int = 0
    split: int = 0
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    inference_ms: float = 0.0
    rate: PoolRate | None = None  # the replica's rate for this call's model, as it answered

    @property
    def busy_ms(self) -> float:
        return self.queue_ms + self.tokenize_ms + self.inference_ms


@dataclass
class Ranked:
    """A request's ranking and what it took: pairs per kind and per model, and its pool calls' costs."""

    scored: list[ScoredDocument]
    per_kind: dict[str, int]
    per_model: dict[str, int]
    calls: list[CallResult]
    total_ms: float = 0.0
    split_here: int = 0  # documents the ingress cut into windows (the pools count the ones they cut)
    tokenize_ms: float = 0.0  # tokenizing in the ingress, before the pool calls
    variant: str | None = None  # the A/B test's variant that ranked it (setting experiment)

    @property
    def tokens(self) -> int:
        return sum(call.tokens for call in self.calls)

    @property
    def split(self) -> int:
        return self.split_here + sum(call.split for call in self.calls)

    def headers(self) -> dict[str, str]:
        """text-embeddings-inference's timing headers (ms). The calls run in parallel: queue, tokenization and
        inference are those of the slowest call (the request's critical path), so queue + inference <= total."""
        slowest = max(self.calls, key=lambda call: call.busy_ms, default=CallResult([]))
        # Whole ms: the parts rounded down and the total up, so the sums the headers promise survive rounding.
        return {
            "x-total-time": str(math.ceil(self.total_ms)),
            "x-queue-time": str(math.floor(slowest.queue_ms)),
            "x-tokenization-time": str(math.floor(self.tokenize_ms + slowest.tokenize_ms)),
            "x-inference-time": str(math.floor(slowest.inference_ms)),
            "x-compute-tokens": str(self.tokens),
            "x-compute-pairs": str(sum(call.pairs for call in self.calls)),
            **({"x-variant": self.variant} if self.variant else {}),
        }


@dataclass
class Sent:
    """A request's pool calls in flight, each with the documents its pairs belong to, and what the ingress did
    before sending them: documents it cut into windows, seconds it spent tokenizing."""

    calls: list[tuple[list[int], asyncio.Future]] = field(default_factory=list)
    held: list[tuple[str, int]] = field(default_factory=list)  # work held against pools (pool_queues.py)
    split_here: int = 0
    tokenize_s: float = 0.0

    @staticmethod
    async def gated(gate: asyncio.Semaphore, call: Callable[[], Awaitable[CallResult]]) -> CallResult:
        """The call, made once `gate` lets it: a request's calls beyond its bound wait for earlier ones."""
        async with gate:
            return await call()


@dataclass(frozen=True)
class Admit:
    """Admission of a pool call by estimated wait: scored by `by` (epoch seconds), or refused at once; a call
    that could not be scored within `fresh_s` (what a request's whole deadline allows) even on an empty queue
    is refused as too large."""

    by: float
    fresh_s: float


class LostCalls:
    """Calls that were on a replica when it died (killed, out of memory, a failed GPU, a crash in the model). Such
    a call is never sent again by the ingress: it may be what killed the replica (a query of death), and a resend
    would kill the next one. The caller gets 503 + Retry-After; a call whose pairs were lost with `deadly_after`
    replicas within `ttl_s` is refused at once (the ingress answers 422) until `ttl_s` has passed since the last
    death. Kept by a digest of each pair (its text or token ids, images and options); at most `most`
    pairs remembered, oldest forgotten first. ttl_s None: nothing is remembered."""

    def __init__(
        self,
        ttl_s: float | None,
        deadly_after: int = 2,
        most: int = 16_384,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.deadly_after = deadly_after
        self.most = most
        # pair digest -> (the replicas it was lost with, the last death's clock)
        self.deaths: OrderedDict[str, tuple[tuple[str, ...], float]] = OrderedDict()

    @staticmethod
    def digest(pool: str, pair: object) -> str:
        # A pair is a frozen dataclass of text, bytes and PIL images: it pickles to its content.
        return hashlib.blake2b(pickle.dumps((pool, pair), protocol=5), digest_size=16).hexdigest()

    def deadly(self, pool: str, pairs: Sequence[object]) -> bool:
        """Whether any of these pairs was lost with `deadly_after` replicas within the last ttl_s (free while
        nothing was lost: no digest is computed). Pairs, not calls: a request is cut into calls by the replicas
        running, which a death changes."""
        if self.ttl_s is None or not self.deaths:
            return False
        self._expire()
        return any(len(self.deaths.get(self.digest(pool, pair), ((), 0.0))[0]) >= self.deadly_after for pair in pairs)

    def record(self, pool: str, pairs: Sequence[object], replica: str) -> int:
        """The replica `replica` died with these pairs: the most replicas any of them was lost with within ttl_s.
        Calls of the same pairs lost with one replica (clients sending the same request) count once."""
        if self.ttl_s is None:
            return 1
        self._expire()
        now, most = self.clock(), 0
        for pair in pairs:
            key = self.digest(pool, pair)
            replicas = set(self.deaths.pop(key, ((), 0.0))[0]) | {replica}
            self.deaths[key] = (tuple(replicas), now)
            most = max(most, len(replicas))
        while len(self.deaths) > self.most:
            self.deaths.popitem(last=False)
        return most

    def _expire(self) -> None:
        now = self.clock()
        while self.deaths and now - next(iter(self.deaths.values()))[1] > self.ttl_s:
            self.deaths.popitem(last=False)


def call_size(settings: Settings, placement: str, pairs: int, running: int) -> int:
    """Pairs per pool call: spread over the pool's `running` replicas (ceil(pairs / replicas)), within
    min_pairs_per_call .. max_pairs_per_call. The shared pool's calls stay whole: a replica without the model
    would load it."""
    most = settings.max_pairs_per_call
    if placement == "shared" or pairs <= settings.min_pairs_per_call:
        return most
    return max(min(settings.min_pairs_per_call, most), min(most, -(-pairs // running)))
