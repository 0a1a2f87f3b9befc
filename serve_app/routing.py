"""How a caller's pool calls pick a replica: one request's calls on different replicas, then the fewest calls
outstanding from this caller.

Serve's default router (power of two choices) probes two random replicas for their queue lengths and takes the
shorter queue. Calls sent at the same moment (one request's pairs, cut into a call per replica) are routed
concurrently: each probe sees every queue empty, so both calls often land on one replica, which then scores
twice the pairs while the other idles (measured: 8 of 20 two-call requests on a 2-replica pool). This router
ranks a request's calls first by how many of that request's calls each replica already has (the calls of one
ingress request share Serve's internal request id, which the proxy makes and a client cannot set), then by the
calls this caller (each ingress replica has its own) has sent and not yet seen finish, plus the choices it has
made and not yet sent; ties go to the shorter queue as Serve last saw it (every caller's load), then to chance.
The request comes first because the finished-call count lags: Serve reports a finished call to the router from
another thread, so a request sent right after another one's calls can see a replica still busy with a call that
has already finished (seen once in CI, on a busy machine: both calls of a request went to the replica that the
/v1/stats calls just before it had left looking idle). A request's placements are kept for PLACED_S.

The choice is offered alone: offered both, Serve's probe picks the shorter real queue, and two calls routed at
once both see empty queues. Its queue-length probe may miss its deadline on a loaded machine: offering the
runner-up then put both calls on the replica whose queue length was cached, so the choice is offered alone for
ALONE_TRIES tries (Serve doubles the deadline each time), the runner-up only after them or when the choice is
known full. A choice counts until its call is sent, and where Serve gave the call another task's replica, it
counts there (seen: with `RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S=0` and a busy machine, choices left behind by
such calls piled up and sent a request's two calls to one replica). With several ingress replicas each spreads
its own calls, so their sum stays spread.

A multiplexed call (the shared pool) is offered the replicas Serve's multiplex routing picks (those holding
the model, else the fewest models), then ranked the same way. No torch here: the ingress imports this.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from dataclasses import dataclass

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
# Tries a call's choice gets alone before the runner-up is offered too. A try fails when the replica's queue-length
# probe misses its deadline (0.1 s, doubled at each try): on a loaded machine the first often does, and offering the
# runner-up at once then sent both calls of a request to the one replica whose queue length was cached.
ALONE_TRIES = 4
# How long a request's call placements are remembered after its last choice or send (a request's calls are routed
# within moments of each other; later ones wait for earlier ones to finish). Bounds the memory to the requests of
# the last PLACED_S seconds.
PLACED_S = 10.0


@dataclass
class Reservation:
    """A call this caller has routed and not yet seen sent: the replica chosen for it, when, and how many times it
    was chosen (a try fails when its replica's queue-length probe misses the deadline, or the replica is full)."""

    request: PendingRequest
    chosen: ReplicaID
    at: float
    tries: int = 0

    def replica(self) -> ReplicaID:
        """Where the call is going: the replica Serve gave it, once it has one (Serve may fulfil a request with
        another routing task's replica), else the one chosen for it."""
        future = self.request.future
        if future.done() and not future.cancelled() and future.exception() is None:
            return future.result().replica_id
        return self.chosen


class SpreadRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Fewest calls of the same request first, then the fewest outstanding (this caller's), then the shorter known
    queue, then chance."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.outstanding: dict[ReplicaID, int] = {}
        # id(pending request) -> its reservation, until its call is sent. A request chosen again replaces its own.
        self.reserved: dict[int, Reservation] = {}
        # Serve's internal request id -> (last update, id(pending request) -> its replica), oldest update first.
        self.placed: OrderedDict[str, tuple[float, dict[int, ReplicaID]]] = OrderedDict()

    def load(self, replica_id: ReplicaID) -> int:
        held = sum(1 for reservation in self.reserved.values() if reservation.replica() == replica_id)
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
        # A reservation whose call was cancelled, or never sent in RESERVED_S, no longer counts.
        self.reserved = {
            key: held
            for key, held in self.reserved.items()
            if now - held.at < RESERVED_S and not held.request.future.cancelled()
        }
        earlier = self.reserved.pop(id(pending_request), None) if pending_request is not None else None
        queued = self.replica_queue_len_cache  # every caller's load, as the last probe or send saw it

        def known_full(rid: ReplicaID) -> bool:
            return (queued.get(rid) or 0) >= self.curr_replicas[rid].max_ongoing_requests

        siblings = self.siblings(pending_request, now)  # this request's other calls, by replica

        def rank(rid: ReplicaID) -> tuple:
            return (known_full(rid), siblings.get(rid, 0), self.load(rid), queued.get(rid) or 0, random.random())

        ranked = sorted(ids, key=rank)[:2]
        tries = earlier.tries + 1 if earlier else 0
        if pending_request is not None:
            # Held from now, before the probe's await: a call routed meanwhile sees this replica as busier.
            self.reserved[id(pending_request)] = Reservation(pending_request, ranked[0], now, tries)
            self.place(pending_request, ranked[0], now)
        # The choice is offered alone: offered both, Serve's probe would pick the shorter real queue, and two calls
        # routed at once see two empty queues. Its probe may miss the deadline on a loaded machine: Serve then asks
        # again, with a longer deadline, and gets the same choice. The runner-up is offered too only after
        # ALONE_TRIES tries, or when the choice is known to be full.
        if tries < ALONE_TRIES and not known_full(ranked[0]):
            ranked = ranked[:1]
        return [[self.curr_replicas[rid]] for rid in ranked]

    def siblings(self, pending_request: PendingRequest | None, now: float) -> dict[ReplicaID, int]:
        """The replicas of the other calls of this call's request (Serve's internal request id), with how many
        each has; placements not updated for PLACED_S are forgotten first."""
        while self.placed and now - next(iter(self.placed.values()))[0] > PLACED_S:
            self.placed.popitem(last=False)
        if pending_request is None or pending_request.metadata.internal_request_id not in self.placed:
            return {}
        counts: dict[ReplicaID, int] = {}
        for key, rid in self.placed[pending_request.metadata.internal_request_id][1].items():
            if key != id(pending_request):
                counts[rid] = counts.get(rid, 0) + 1
        return counts

    def place(self, request: PendingRequest, replica_id: ReplicaID, now: float) -> None:
        """Where this call is going (chosen, then sent), under its request's id, as its request's latest update."""
        group = request.metadata.internal_request_id
        calls = self.placed.pop(group, (now, {}))[1]
        calls[id(request)] = replica_id
        self.placed[group] = (now, calls)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self.outstanding[replica_id] = self.outstanding.get(replica_id, 0) + 1
        # The reservation this send fulfils: a request Serve gave this replica (its future holds it).
        for key, reservation in self.reserved.items():
            if reservation.request.future.done() and reservation.replica() == replica_id:
                del self.reserved[key]
                self.place(reservation.request, replica_id, time.monotonic())
                break

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
