"""Pool calls as the ingress sees them: the message a call answers with (a message between the ingress and a pool
replica, not a scoring type), and the calls lost with their replica."""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from serve_app.scoring.types import Score


@dataclass(frozen=True)
class CallResult:
    """One pool call's scores and what they cost: the pairs and real tokens computed (windows included),
    documents split into windows, and the times of its slowest piece (waiting for a batch, preparing,
    the forward pass), in ms."""

    scores: list[Score]
    pairs: int = 0
    tokens: int = 0
    split: int = 0
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    inference_ms: float = 0.0

    @property
    def busy_ms(self) -> float:
        return self.queue_ms + self.tokenize_ms + self.inference_ms


@dataclass
class Sent:
    """A request's pool calls in flight, each with the documents its pairs belong to, and what the ingress did
    before sending them: documents it cut into windows, seconds it spent tokenizing."""

    calls: list[tuple[list[int], asyncio.Future]] = field(default_factory=list)
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
