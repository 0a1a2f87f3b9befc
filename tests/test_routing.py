"""The calls of one request land on different replicas (pool_router: spread).

Serve's default router routes calls sent at the same moment concurrently: each probe sees both queues empty,
and both calls often go to one replica (measured: 8 of 20 two-call requests on a 2-replica pool, where a coin
gives half). Six requests in a row all spread by chance with probability 1/64. Checked by hand beyond this test:
60 requests in a row, also with Serve's queue-length cache off (RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S=0, every
call probed), where the router that offered two replicas to the probe failed within 3 requests. The router's
own choices are also checked outside Serve (fake replicas), where a race seen once in CI is set up on purpose.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest

DOCUMENTS = [f"document {i} about paris, the capital of france" for i in range(16)]


def pairs_by_replica(client: httpx.Client) -> dict[str, int]:
    return {r["replica"]: r["pairs"] for r in client.get("/v1/stats").json()["pools"]["text"]}


def test_one_requests_calls_go_to_different_replicas(spread):
    for _ in range(3):  # every replica running and warm (the ingress counts running replicas to cut calls)
        assert spread.post("/v2/rerank", json={"query": "capital?", "documents": DOCUMENTS}).status_code == 200
    for attempt in range(6):
        before = pairs_by_replica(spread)
        response = spread.post("/v2/rerank", json={"query": f"capital {attempt}?", "documents": DOCUMENTS})
        assert response.status_code == 200, response.text
        after = pairs_by_replica(spread)
        # 16 pairs over 2 running replicas: two calls of 8, one on each replica.
        assert sorted(after[r] - before.get(r, 0) for r in after) == [8, 8], (attempt, before, after)


def fake_router(count: int):
    """A SpreadRouter over `count` fake running replicas, outside Serve (no cluster): only its own choices."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    from serve_app.routing import SpreadRouter

    async def idle(deadline_s: float) -> int:  # the queue-length probe Serve sends a new replica
        return 0

    deployment = DeploymentID(name="text_pool", app_name="fake")
    router = SpreadRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN)
    replicas = [
        SimpleNamespace(
            replica_id=ReplicaID(f"r{i}", deployment),
            node_id="node",
            availability_zone=None,
            multiplexed_model_ids=set(),
            max_ongoing_requests=8,
            get_queue_len=idle,
        )
        for i in range(count)
    ]
    router.update_replicas(replicas)
    return router, [r.replica_id for r in replicas]


def pending(request: str):
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id=request, internal_request_id=request))


def test_a_finished_call_the_router_has_not_yet_heard_of_does_not_put_a_requests_calls_on_one_replica():
    """Serve reports a finished call to the router from another thread: the next request's calls can be routed
    while an earlier call still counts on r1. The request's two calls must still go to r0 and r1, one each (before,
    the second went to r0: r0 held the first call's choice, r1 the unreported call, and the tie went to the shorter
    queue Serve last saw, r0's). A call chosen again (its probe missed the deadline) keeps its replica: it is not
    its own sibling."""

    async def run() -> None:
        for _ in range(20):  # ties go to chance: every run must spread
            router, (r0, r1) = fake_router(2)
            router.on_send_request(r1)  # a call of an earlier request, finished but not yet reported
            first, second = pending("request-a"), pending("request-a")
            chosen = [(await router.choose_replicas([], first))[0][0].replica_id]
            assert chosen == [r0]
            assert (await router.choose_replicas([], first))[0][0].replica_id == r0  # chosen again: same replica
            chosen.append((await router.choose_replicas([], second))[0][0].replica_id)
            assert chosen == [r0, r1]
            # Another request's call is no sibling: r0 (one chosen call) and r1 (one choice + the unreported call)
            # rank by load alone.
            assert (await router.choose_replicas([], pending("request-b")))[0][0].replica_id == r0

    asyncio.run(run())


def test_a_requests_placements_are_forgotten_after_placed_s():
    from serve_app.routing import PLACED_S

    async def run() -> None:
        router, _ = fake_router(2)
        chosen = (await router.choose_replicas([], pending("request-a")))[0][0].replica_id
        now = next(iter(router.placed.values()))[0]
        assert router.siblings(pending("request-a"), now + PLACED_S / 2) == {chosen: 1}
        assert router.siblings(pending("request-a"), now + PLACED_S + 1) == {}
        assert not router.placed  # the memory goes with them

    asyncio.run(run())


def test_the_default_router_can_be_chosen_back():
    from ray.serve.config import RequestRouterConfig

    from serve_app.app import router_options
    from serve_app.routing import SpreadRouter
    from serve_app.settings import Settings

    assert router_options(Settings(pool_router="power_of_two")) == {}
    config = router_options(Settings())["request_router_config"]
    assert isinstance(config, RequestRouterConfig)
    assert config.request_router_class == f"{SpreadRouter.__module__}.{SpreadRouter.__name__}"


def test_an_empty_or_unknown_router_is_refused_at_start(monkeypatch):
    from pydantic import ValidationError

    from serve_app.settings import Settings

    for value in ("", "round_robin"):
        with pytest.raises(ValidationError, match="pool_router"):
            Settings(pool_router=value)
    monkeypatch.setenv("RERANK_POOL_ROUTER", "")
    with pytest.raises(ValidationError, match="pool_router"):
        Settings()
