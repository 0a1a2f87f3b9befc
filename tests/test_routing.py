"""The calls of one request land on different replicas (pool_router: spread).

Serve's default router routes calls sent at the same moment concurrently: each probe sees both queues empty,
and both calls often go to one replica (measured: 8 of 20 two-call requests on a 2-replica pool, where a coin
gives half). Six requests in a row all spread by chance with probability 1/64. Checked by hand beyond this test:
60 requests in a row, also with Serve's queue-length cache off (RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S=0, every
call probed), where the router that offered two replicas to the probe failed within 3 requests.
"""

from __future__ import annotations

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
