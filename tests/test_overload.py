"""Overload is explicit: full queues answer 503 with Retry-After at once, a passed deadline 504."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

LONG = " ".join(["the capital city of france is paris"] * 50)  # ~350 tokens: slow on the slow model


def timed_post(client, body: dict) -> tuple[int, dict, float]:
    start = time.perf_counter()
    response = client.post("/v2/rerank", json=body)
    return response.status_code, dict(response.headers), time.perf_counter() - start


def test_full_queues_answer_503_with_retry_after_at_once(tight):
    body = {"query": "capital of france", "documents": [LONG] * 4}
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: timed_post(tight, body), range(12)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503, 504}, statuses
    refused = [(headers, seconds) for status, headers, seconds in answers if status == 503]
    assert refused, statuses
    for headers, seconds in refused:
        assert headers.get("retry-after") == "2"
        assert seconds < 2.5  # refused at once, not after waiting in a queue
    assert 200 in statuses
    assert tight.post("/v2/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200


def pool_stats(tight) -> dict:
    """The text replica's /v1/stats, once the (small) queues let the question through."""
    deadline = time.monotonic() + 60
    while True:
        response = tight.get("/v1/stats")
        if response.status_code == 200 or time.monotonic() > deadline:
            return response.json()["pools"]["text"][0]
        assert response.status_code == 503 and response.headers["retry-after"]
        time.sleep(0.5)


def wait_until_idle(tight) -> dict:
    deadline = time.monotonic() + 60
    while (stats := pool_stats(tight))["pending_pairs"] and time.monotonic() < deadline:
        time.sleep(0.5)
    return stats


def test_a_request_past_its_deadline_gets_504_and_the_service_recovers(tight):
    before = wait_until_idle(tight)["pairs"]
    status, _, seconds = timed_post(tight, {"query": "capital of france", "documents": [LONG] * 100})  # one pool call
    assert status == 504
    assert seconds < 3 + 2  # request_timeout_s is 3
    deadline = time.monotonic() + 60
    while True:  # the cancelled pairs leave the replica's queue; small requests are served again
        response = tight.post("/v2/rerank", json={"query": "q", "documents": ["a"]})
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert response.status_code == 200
    stats = wait_until_idle(tight)
    assert stats["pending_pairs"] == 0
    assert stats["pairs"] - before < 50  # most of the 100 pairs were cancelled, never scored


def test_a_client_that_disconnects_cancels_its_pairs(tight):
    before = wait_until_idle(tight)["pairs"]
    with pytest.raises(httpx.ReadTimeout):
        tight.post("/v2/rerank", json={"query": "capital of france", "documents": [LONG] * 100}, timeout=1.0)
    assert wait_until_idle(tight)["pairs"] - before < 50  # the rest left the batcher unscored


def test_a_new_config_deployed_under_load_completes_every_request(serve_url, model_dirs):
    from ray import serve

    from tests.conftest import deploy

    model = str(model_dirs["cross_encoder"])
    deploy("rolling", {"text": {"model": model, "max_batch_size": 8}, "image_text": {"enabled": False}})
    stop, statuses = threading.Event(), []

    def client() -> None:
        with httpx.Client(base_url=f"{serve_url}/rolling", timeout=60) as http:
            while not stop.is_set():
                try:
                    statuses.append(
                        http.post("/v2/rerank", json={"query": "q", "documents": ["a", "b", "c"]}).status_code
                    )
                except httpx.HTTPError as exc:
                    statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        # New init args (a rolling restart), another batch cap and one more replica, while the load runs.
        deploy(
            "rolling",
            {"text": {"model": model, "max_batch_size": 4, "num_replicas": 2}, "image_text": {"enabled": False}},
        )
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    try:
        assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        text = httpx.get(f"{serve_url}/rolling/v1/models", timeout=30).json()["pools"]["text"]
        assert text["replica_count"] == 2
        assert {r["max_batch_size"] for r in text["replicas"]} == {4}
    finally:
        serve.delete("rolling")
