"""What an ingress replica knows of the queues in front of each pool: the work of its own requests in flight there
(estimated before they are tokenized) and the rate the pool's replicas last said they drain at. Enough to refuse
a request at once, before the ingress tokenizes it and before any pool call, when it could not be scored in
time behind them: in a burst, a refusal then costs the parsing of its body, not its tokenizing beside the
replicas' forwards. The pool replicas' own admission (scoring_replica.py) stays the authority: this refuses only
what the replicas would refuse later, counting no other ingress replica's work."""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from serve_app.errors import Overloaded
from serve_app.pool_call import Admit, PoolRate, call_size
from serve_app.scoring.call import estimated_tokens
from serve_app.scoring.types import Pair, WindowRule
from serve_app.stats import Drain

if TYPE_CHECKING:
    from serve_app.catalog import Served
    from serve_app.settings import Settings

# Refused requests whose work a pool's Retry-After counts, at most (the earliest due are dropped first).
MAX_PROMISES = 4096


class PoolQueues:
    """Per pool key: the latest PoolRate any of its replicas answered with, and the work of this ingress
    replica's requests in flight to it. A request is refused here when that work, plus its own, at the pool's
    rate over its running replicas would take longer than the time its admission allows; a pool that never
    answered, or whose queue here is empty, is left to its replicas."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rates: dict[str, PoolRate] = {}
        self.in_flight: dict[str, int] = {}
        # Per pool: (when, work) of the requests refused here and told to come back then (a heap, earliest
        # first), and their work's sum.
        self.promised: dict[str, list[tuple[float, int]]] = {}
        self.promised_work: dict[str, int] = {}
        self.refused = 0

    def seen(self, key: str, rate: PoolRate | None) -> None:
        if rate is not None and rate.work_per_s:
            self.rates[key] = rate

    def admit(
        self,
        served: Served,
        items: Sequence[Pair],
        rule: WindowRule | None,
        admit: Admit | None,
        running: int,
        held: list[tuple[str, int]],
        realtime: bool = False,
    ) -> None:
        """Hold the pairs' work against their pool (in the request's `held`, until `release`), or refuse them (503).
        A request holds what stays ahead of later requests: all of its work when its calls are in flight at once,
        a share when calls_in_flight_per_replica holds some back (later requests' calls go out between them).
        A request for a pool's realtime variant is neither held nor refused: that variant admits every call."""
        key = served.key
        rate = self.rates.get(key)
        if rate is None or realtime:
            return
        tokens = estimated_tokens(items, rate.max_length, rule)
        work = Drain.work(tokens, len(items), rate.cap, rate.forward_tokens)
        calls = -(-len(items) // call_size(self.settings, served.placement, len(items), max(1, running)))
        ahead = round(work * min(1.0, self.settings.calls_in_flight_per_replica * max(1, running) / calls))
        queued_work = self.in_flight.get(key, 0)
        if admit is not None and queued_work:
            pool_rate = rate.work_per_s * max(1, running)
            queued, alone = queued_work / pool_rate, work / pool_rate
            left = admit.by - time.time()
            if queued + alone > left:
                self.refused += 1
                raise self._refusal(key, work, queued, alone, left, admit.fresh_s, pool_rate, running)
        self.in_flight[key] = queued_work + ahead
        held.append((key, ahead))

    def _refusal(
        self, key: str, work: int, queued: float, alone: float, left: float, fresh_s: float, rate: float, running: int
    ) -> Overloaded:
        """A 503 whose Retry-After a retry can meet: when the queue will have drained enough for this request
        with a fresh deadline, behind the requests refused before it and told to come back earlier (their work
        is promised until then). Refused requests of a burst come back one after the other, not all at once to
        be refused again."""
        now = time.time()
        promised = self.promised.setdefault(key, [])
        # Past promises, and beyond MAX_PROMISES the earliest (a flood of refusals costs O(log n) each): gone.
        while promised and (promised[0][0] <= now or len(promised) >= MAX_PROMISES):
            self.promised_work[key] -= heapq.heappop(promised)[1]
        ahead = self.promised_work.get(key, 0) / rate
        retry_after = max(1, math.ceil(queued + ahead + alone - fresh_s))
        heapq.heappush(promised, (now + retry_after, work))
        self.promised_work[key] = self.promised_work.get(key, 0) + work
        return Overloaded(
            f"this service's requests in flight to the {key} pool hold about {queued:.1f} s of work, and this one "
            f"~{alone:.1f} s more (~{work} tokens at the {rate:.0f} tokens/s of its {max(1, running)} running "
            f"replica(s)): more than the {max(left, 0.0):.1f} s the request has before its deadline (settings "
            "request_timeout_s, admission_wait_fraction); retry after the Retry-After seconds, or send fewer "
            "documents",
            retry_after,
        )

    def stats(self) -> dict:
        """What /v1/stats shows of it: requests refused here, the work in flight and the rate per pool."""
        return {
            "ingress_refused": self.refused,
            "ingress_in_flight_work": dict(self.in_flight),
            "ingress_pool_rates": {key: round(rate.work_per_s or 0.0, 1) for key, rate in self.rates.items()},
        }

    def release(self, held: list[tuple[str, int]]) -> None:
        """A request's work leaves its pools' queues (answered, refused, cancelled)."""
        for key, work in held:
            self.in_flight[key] -= work
        held.clear()


def admission(settings: Settings, deadline: float) -> Admit | None:
    """Admission of a request's pool calls: scores expected by the admission fraction of the time it has left,
    and within that fraction of a whole fresh deadline. None: admission by estimated wait is off."""
    fraction = settings.admission_wait_fraction
    if fraction is None:
        return None
    now = time.time()
    return Admit(now + max(0.0, deadline - now) * fraction, settings.request_timeout_s * fraction)
