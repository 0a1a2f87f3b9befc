"""How a caller's pool calls pick a replica: the fewest calls outstanding from this caller first.

Serve's default router (power of two choices) probes two random replicas for their queue lengths and takes the
shorter queue. Calls sent at the same moment (one request's pairs, cut into a call per replica) are routed
concurrently: each probe sees every queue empty, so both calls often land on one replica, which then scores
twice the pairs while the other idles (measured: 8 of 20 two-call requests on a 2-replica pool). This router
keeps, per caller (each ingress replica has its own), the calls it has sent and not yet seen finish, plus the
choices it has made and not yet sent, and sends a call to the replica with the fewest of them; ties go to the
shorter queue as Serve last saw it (every caller's load, from its probes), then to chance. That replica is
offered alone, the runner-up only if it cannot take the call: offered both, Serve's probe picks the shorter
real queue, and two calls routed at once both see empty queues (in one CI run, one request of six put all 16
of its pairs on one replica; with probes forced, `RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S=0`, it happens within
a few requests). With several ingress replicas each spreads its own calls, so their sum stays spread.

A multiplexed call (the shared pool) is offered the replicas Serve's multiplex routing picks (those holding
the model, else the fewest models), then ranked the same way. No torch here: the ingress imports this.
"""

from __future__ import annotations

import random
import time

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

RESERVED_S = 2.0  # a choice not followed by a send (cancelled, refused) stops counting after this


class SpreadRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Least outstanding calls (this caller's) first, then the shorter known queue, then chance."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.outstanding: dict[ReplicaID, int] = {}
        # id(pending request) -> (replica, when): chosen, not yet sent. A request chosen again (its replica was
        # full) replaces its earlier choice.
        self.reserved: dict[int, tuple[ReplicaID, float]] = {}

    def load(self, replica_id: ReplicaID, now: float) -> int:
        held = sum(1 for rid, when in self.reserved.values() if rid == replica_id and now - when < RESERVED_S)
        return self.outstanding.get(replica_id, 0) + held

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            offered = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            offered = self.apply_locality_routing(pending_request)
        ids = [rid for rid in offered if rid in self.curr_replicas]
        if not ids:
            return []
        now = time.monotonic()
        self.reserved = {key: held for key, held in self.reserved.items() if now - held[1] < RESERVED_S}
        if pending_request is not None:
            self.reserved.pop(id(pending_request), None)
        queued = self.replica_queue_len_cache  # every caller's load, as the last probe or send saw it
        ranked = sorted(ids, key=lambda rid: (self.load(rid, now), queued.get(rid) or 0, random.random()))[:2]
        if pending_request is not None:
            # Held from now, before the probe's await: a call routed meanwhile sees this replica as busier.
            self.reserved[id(pending_request)] = (ranked[0], now)
        # The choice is offered alone, the runner-up only if it cannot take the call (its queue full). Offered
        # both, Serve's probe would pick the shorter real queue, and two calls routed at once see two empty
        # queues: it took either, and the reservation pointed elsewhere.
        return [[self.curr_replicas[rid]] for rid in ranked]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self.outstanding[replica_id] = self.outstanding.get(replica_id, 0) + 1
        # The choice this send fulfils: one held for this replica, else the oldest (the probe took the other one).
        held = [key for key, (rid, _) in self.reserved.items() if rid == replica_id] or list(self.reserved)
        if held:
            self.reserved.pop(held[0])

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        left = self.outstanding.get(replica_id, 0) - 1
        if left > 0:
            self.outstanding[replica_id] = left
        else:
            self.outstanding.pop(replica_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.outstanding.pop(replica_id, None)
