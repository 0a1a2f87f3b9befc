"""Overload is explicit: full queues answer 503 with Retry-After at once, a passed deadline 504."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

LONG = " ".join(["the capital city of france is paris"] * 50)  # ~350 tokens: slow on the slow model


def overload_specs(model_dirs) -> dict[str, dict]:
    """The module's applications besides tight and admitting (conftest's module_specs)."""
    from tests.conftest import MINILM_FORWARD_COST_TOKENS

    return {
        # One replica, calls of 8 pairs: test_a_large_request_keeps_at_most_two_calls_per_replica_in_flight reads it
        # first; test_a_new_config_deployed_under_load_completes_every_request then replaces this config.
        "rolling": {
            "text": {"model": str(model_dirs["cross_encoder"]), "max_batch_size": 8, "num_cpus": 0.5},
            "image_text": {"enabled": False},
            "max_pairs_per_call": 8,
        },
        # The slow model, every call queued, a long deadline: test_fifty_clients_that_give_up_while_queued_...
        "cancelled": {
            "text": {
                "model": str(model_dirs["slow"]),
                "max_batch_size": 4,
                "forward_cost_tokens": MINILM_FORWARD_COST_TOKENS,
            },
            "image_text": {"enabled": False},
            "request_timeout_s": 120,
            "admission_wait_fraction": None,  # every call queues
        },
    }


@pytest.fixture(scope="module")
def overload_apps(serve_url, model_dirs) -> Iterator[dict[str, str]]:
    """The module's applications, deployed at once."""
    from tests.conftest import module_apps, module_specs

    specs = {name: module_specs(model_dirs)[name] for name in ("tight", "admitting")}
    with module_apps(specs | overload_specs(model_dirs), serve_url) as urls:
        yield urls


@pytest.fixture(scope="module")
def tight(overload_apps) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=overload_apps["tight"], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def admitting(overload_apps) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=overload_apps["admitting"], timeout=60) as client:
        yield client


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
        assert seconds < 3  # refused at once, not after waiting in a queue for the 6 s deadline
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
    # One pool call of 100 pairs: ~12 s of the slow model's work (~8 pairs/s here), past the 6 s deadline.
    status, _, seconds = timed_post(tight, {"query": "capital of france", "documents": [LONG] * 100})
    assert status == 504
    assert seconds < 6 + 3  # request_timeout_s is 6
    deadline = time.monotonic() + 60
    while True:  # the cancelled pairs leave the replica's queue; small requests are served again
        response = tight.post("/v2/rerank", json={"query": "q", "documents": ["a"]})
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert response.status_code == 200
    stats = wait_until_idle(tight)
    assert stats["pending_pairs"] == 0
    assert stats["pairs"] - before < 75  # the pairs left at the deadline (about half) were cancelled, never scored


def test_a_client_that_disconnects_cancels_its_pairs(tight):
    before = wait_until_idle(tight)["pairs"]
    with pytest.raises(httpx.ReadTimeout):
        tight.post("/v2/rerank", json={"query": "capital of france", "documents": [LONG] * 100}, timeout=1.0)
    assert wait_until_idle(tight)["pairs"] - before < 50  # the rest left the batcher unscored


def test_a_large_request_keeps_at_most_two_calls_per_replica_in_flight(overload_apps):
    """256 documents in calls of 8 (32 calls) to one replica: at most calls_in_flight_per_replica (2) of them are
    in the pool at once; the rest wait in the ingress, not in the router's queue in front of other requests."""
    url = overload_apps["rolling"]  # before its new config
    documents = [f"document {i} about the capital of france" for i in range(256)]
    response = httpx.post(f"{url}/v2/rerank", json={"query": "capital", "documents": documents}, timeout=60)
    assert response.status_code == 200 and len(response.json()["results"]) == 256
    (replica,) = httpx.get(f"{url}/v1/stats", timeout=30).json()["pools"]["text"]
    print(f"\n32 calls of one request: at most {replica['most_calls_at_once']} at once in the replica")
    assert 1 <= replica["most_calls_at_once"] <= 2 and replica["calls_now"] == 0


def test_a_new_config_deployed_under_load_completes_every_request(overload_apps, serve_url, model_dirs):
    """The "rolling" application (overload_specs) gets a new config while a steady load runs."""
    from tests.conftest import deploy, undeploy

    model = str(model_dirs["cross_encoder"])
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
                stop.wait(0.05)  # a steady stream, not a flood: the new replicas' start-up needs the same 2 cores

    threads = [threading.Thread(target=client) for _ in range(2)]
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
        undeploy("rolling")


# ---- admission by estimated wait ---------------------------------------------------------------------------


def test_throughput_counts_busy_time_once_and_not_idle_time():
    from serve_app.stats import Throughput

    rate = Throughput(min_batches=2)
    rate.record(10, started=0.0, done=1.0)
    assert rate.pairs_per_s() is None  # one batch: no estimate yet
    rate.record(10, started=0.5, done=2.0)  # overlapped the first: adds 1 s of busy time, not 1.5
    assert rate.pairs_per_s() == pytest.approx(10.0)
    rate.record(20, started=10.0, done=11.0)  # after 8 s idle: the idle time is not service time
    assert rate.pairs_per_s() == pytest.approx(40 / 3)
    assert rate.wait_s(80) == pytest.approx(6.0)
    for second in range(20, 30):  # the machine slows down: 10 s of batches at 5 pairs/s
        rate.record(5, started=second, done=second + 1)
    assert rate.pairs_per_s() == pytest.approx(5.0)  # the latest 10 s of busy time, not the whole window


def admitting_stats(admitting) -> dict:
    return admitting.get("/v1/stats").json()["pools"]["text"][0]


def warm_rate(admitting) -> float:
    """A few sequential requests, so the replica has measured its rate; that rate in pairs/s."""
    for _ in range(4):
        response = admitting.post("/v2/rerank", json={"query": "capital of france", "documents": [LONG] * 4})
        assert response.status_code == 200
    rate = admitting_stats(admitting)["pairs_per_s_under_load"]
    assert rate and rate > 0
    return rate


# The admitting application's share of a fresh request's deadline for scoring: request_timeout_s (4) x
# admission_wait_fraction (0.5).
ADMISSION_S = 4 * 0.5


def test_a_request_no_deadline_could_hold_gets_413_at_once_not_a_503_no_retry_could_meet(admitting):
    warm_rate(admitting)
    before = admitting_stats(admitting)
    # The 413 takes the best rate the replica has shown: in pairs/s, its best work/s over the work per pair of
    # the batches measured (the same batches, the same service time).
    (name,) = before["tokens_per_s_best"]
    work_per_pair = before["tokens_per_s_under_load"][name] / before["pairs_per_s_under_load"]
    rate = before["tokens_per_s_best"][name] / work_per_pair
    documents = int(rate * ADMISSION_S * 1.5) + 8  # one and a half times what a whole fresh deadline holds
    assert documents <= 1000, f"the slow model scores {rate} pairs/s here: too fast for this test's deadline"
    started = time.monotonic()
    response = admitting.post("/v2/rerank", json={"query": "capital of france", "documents": [LONG] * documents})
    assert response.status_code == 413, response.text
    assert time.monotonic() - started < 2  # at once: not after the 4 s deadline
    assert "request_timeout_s x admission_wait_fraction" in response.json()["message"]
    after = admitting_stats(admitting)
    assert after["pairs"] == before["pairs"]  # nothing of it was scored
    assert after["pending_pairs"] == 0 and after["estimated_wait_s"] == 0


def test_a_request_behind_a_queue_gets_503_at_once_saying_why_and_what_to_change(admitting):
    rate = warm_rate(admitting)
    documents = max(4, int(rate * ADMISSION_S * 0.7))  # fits a fresh deadline alone, not behind another one
    body = {"query": "capital of france", "documents": [LONG] * documents}
    before = admitting_stats(admitting)
    refused_here = admitting.get("/v1/stats").json()["ingress_refused"]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(timed_post, admitting, body)
        deadline = time.monotonic() + 30
        while not admitting_stats(admitting)["pending_pairs"] and not first.done() and time.monotonic() < deadline:
            pass  # polled: /v1/stats answers in tens of milliseconds
        started = time.monotonic()
        response = admitting.post("/v2/rerank", json=body)
        seconds = time.monotonic() - started
        assert first.result()[0] == 200
    assert response.status_code == 503, response.text
    assert seconds < 2 and int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "overloaded"
    assert "admission_wait_fraction" in error["message"] and "tokens/s" in error["message"]
    # Refused by the ingress before tokenizing (its own request in flight leaves no time), not by the replica.
    stats = admitting.get("/v1/stats").json()
    assert stats["ingress_refused"] == refused_here + 1
    assert stats["pools"]["text"][0]["refused_calls"] == before["refused_calls"]


def test_a_spike_gets_200s_and_fast_503s_never_504(admitting):
    rate = warm_rate(admitting)
    # Ten clients at once, each asking for ~20% of the deadline's work: the first two fit in the admission's 50%
    # of it (the app's admission_wait_fraction), the rest cannot. Admitted work stays at about 40% of the deadline,
    # so a 504 means the estimate was off by 2.5x. After the burst, a lone request on the drained queue is
    # admitted whatever rate the burst made the replica measure.
    documents = max(4, min(100, int(rate * 4 * 0.2)))
    body = {"query": "capital of france", "documents": [LONG] * documents}
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: timed_post(admitting, body), range(10)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses
    for status, headers, seconds in answers:
        if status == 503:
            assert seconds < 2, seconds
            assert int(headers["retry-after"]) >= 1
    response = admitting.post("/v2/rerank", json=body)
    assert response.status_code in (200, 503)
    # Once the queue drained, a request of the same size is admitted again. Polled, not a sleep of Retry-After:
    # on a loaded machine the admitted requests can outlast it, and the next one then misses its deadline (504).
    deadline = time.monotonic() + 60
    while admitting_stats(admitting)["pending_pairs"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert admitting.post("/v2/rerank", json=body).status_code == 200


def test_admission_counts_tokens_per_model_checks_the_queue_before_a_load_and_refuses_what_no_deadline_holds():
    from types import SimpleNamespace

    from serve_app.errors import InputTooLarge, Overloaded
    from serve_app.pool_call import Admit
    from serve_app.scoring_replica import ScoringReplica
    from serve_app.stats import Drain

    replica = object.__new__(ScoringReplica)  # its admission alone: no model, no Serve
    replica.realtime, replica.refused = False, 0
    replica.metrics = SimpleNamespace(refused=SimpleNamespace(inc=lambda: None))
    replica.drains = {"fast": Drain(), "slow": Drain()}
    for start in range(3):
        replica.drains["fast"].record(1000, start, start + 1)  # 1,000 tokens/s
        replica.drains["slow"].record(100, start, start + 1)  # 100 tokens/s
    replica.pending_tokens = {"fast": 2000, "slow": 300}  # 2 s + 3 s queued
    now = time.time()
    assert replica._queued_s() == pytest.approx(5.0)
    replica._admit(Admit(now + 6, 9), "fast", 500)  # 5 s + 0.5 s: admitted
    with pytest.raises(Overloaded) as queued:
        replica._admit(Admit(now + 6, 9), "slow", 500)  # 5 s + 5 s of its own, the slow model's rate
    assert 4 <= queued.value.retry_after_s <= 5 and "tokens/s" in queued.value.message  # 10 s of work, 6 s left
    with pytest.raises(Overloaded):
        replica._admit(Admit(now + 4, 9))  # no model yet (before a shared pool loads one): the queue alone
    with pytest.raises(InputTooLarge) as alone:
        replica._admit(Admit(now + 60, 9), "slow", 1000)  # 10 s alone: more than a whole fresh request has
    assert "admission_wait_fraction" in alone.value.message
    replica._admit(Admit(now + 60, 9), "unmeasured", 10**6)  # no measurement: admitted
    replica._admit(None, "slow", 10**6)  # admission off
    assert replica.refused == 2

    # A burst's load made the slow model's rate drop to 40 tokens/s; its best stays 100 tokens/s.
    for start in range(3, 35):
        replica.drains["slow"].record(40, start, start + 1)
    assert replica.drains["slow"].pairs_per_s() == pytest.approx(40) and replica.drains["slow"].best == 100
    replica._admit(Admit(now + 60, 9), "slow", 800)  # 8 s at its best: not too large, though 20 s at 40/s
    with pytest.raises(Overloaded):  # behind a queue, the rate measured under load counts: 5 s + 5 s > 6 s
        replica._admit(Admit(now + 6, 9), "slow", 200)
    # Once the queue drained, a call is admitted even if it would not fit at the rate measured under load (a
    # retry could never meet such a refusal, and the replica would never measure its rate again).
    replica.pending_tokens = {"fast": 0, "slow": 0}
    replica._admit(Admit(now + 6, 9), "slow", 400)  # 10 s at 40/s, 4 s at its best: admitted
    replica._admit(Admit(now + 6, 9))  # the queue alone, empty
    assert replica.refused == 3


def test_a_drain_counts_each_forwards_fixed_cost_so_a_lone_batch_implies_the_rate_of_a_full_one():
    from serve_app.stats import Drain

    # A forward costs 100 tokens' time plus 1 ms a token (1,000 tokens/s of work); cap 32 pairs.
    lone, full = Drain(min_batches=1), Drain(min_batches=1)
    lone.record(Drain.work(50, 1, 32, 100), 0.0, 0.150)  # one pair of 50 tokens: 150 ms
    full.record(Drain.work(1600, 32, 32, 100), 0.0, 1.700)  # 32 pairs of 50 tokens: 1.7 s
    assert lone.pairs_per_s() == pytest.approx(1000) and full.pairs_per_s() == pytest.approx(1000)
    assert Drain.work(1600, 33, 32, 100) == 1800  # 33 pairs: two forwards
    tokens_only = Drain(min_batches=1)  # without the fixed cost, the lone batch says 333 tokens/s: 3x too slow
    tokens_only.record(50, 0.0, 0.150)
    assert tokens_only.pairs_per_s() == pytest.approx(333.3, rel=1e-3)


@pytest.mark.parametrize("overload_status", [503, 429])
def test_load_shedding_answers_the_chosen_status_with_its_retry_after_and_other_503s_stay(overload_status):
    from fastapi.testclient import TestClient

    from serve_app.api import build_api
    from serve_app.errors import Overloaded, PoolUnavailable, ReplicaLost
    from serve_app.settings import Settings

    class Service:
        settings = Settings(overload_status=overload_status)
        refusal: Exception

        async def rerank(self, request, return_documents, api_version):
            raise self.refusal

    service = Service()
    with TestClient(build_api(service)) as client:

        def refused(error: Exception):
            service.refusal = error
            return client.post("/v2/rerank", json={"query": "q", "documents": ["a"]})

        shed = refused(Overloaded("queue full", 7))
        assert shed.status_code == overload_status and shed.headers["retry-after"] == "7"
        assert shed.json()["error"]["type"] == "overloaded"
        lost = refused(ReplicaLost("a replica died", 20))  # the pool's state, not load: 503 either way
        assert lost.status_code == 503 and lost.headers["retry-after"] == "20"
        assert refused(PoolUnavailable("no model")).status_code == 503


def test_fifty_clients_that_give_up_while_queued_leave_no_work_behind_and_wedge_no_batch(overload_apps):
    """A slow request holds the replica; 50 more queue behind it, and once all 50 are in the replica their clients
    give up (each closes its connection). Their pairs leave the batcher unscored (the replica's pairs counter), no
    batch is left waiting for them (Ray#50046), and the next request is answered.

    The clients close their sockets themselves when the replica holds every call, not after a fixed time: on a
    loaded machine a timed give-up may come before a call reaches the replica, or after the slow request ends."""
    import json
    import socket
    from urllib.parse import urlsplit

    url = overload_apps["cancelled"]
    where = urlsplit(url)
    body = json.dumps({"query": "capital of france", "documents": [LONG] * 4}).encode()
    request = (
        f"POST {where.path}/v2/rerank HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    def replica() -> dict:
        return httpx.get(f"{url}/v1/stats", timeout=60).json()["pools"]["text"][0]

    def poll(until, what: str, seconds: float = 120) -> dict:
        deadline = time.monotonic() + seconds
        while not until(now := replica()):
            calls, pending = now["calls_now"], now["pending_pairs"]
            assert time.monotonic() < deadline, f"{what}: not within {seconds} s ({calls} calls, {pending} pairs)"
        return now

    assert httpx.post(f"{url}/v2/rerank", json={"query": "q", "documents": ["a"]}, timeout=60).status_code == 200
    before = replica()["pairs"]
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(
            httpx.post, f"{url}/v2/rerank", json={"query": "capital", "documents": [LONG] * 32}, timeout=120
        )
        poll(lambda r: r["pending_pairs"], "the slow request in the replica")
        clients = [socket.create_connection((where.hostname, where.port), timeout=60) for _ in range(50)]
        for client in clients:
            client.sendall(request)
        poll(lambda r: r["calls_now"] == 51, "the 50 calls queued in the replica")
        for client in clients:  # the clients give up
            client.close()
        given_up = poll(lambda r: r["calls_now"] <= 1, "the 50 cancellations in the replica")
        assert not slow.done(), "the slow request ended before the cancellations arrived: make it longer"
        assert slow.result().status_code == 200
    now = poll(lambda r: not r["pending_pairs"], "an empty queue")
    computed = now["pairs"] - before - 32
    done = given_up["pairs"] - before
    print(f"\n50 clients gave up while queued: {computed} of their 200 pairs computed; {done} of 32 slow done")
    # At most the batch that may start preparing beside the slow request's last (two batches in flight).
    assert 0 <= computed <= 4
    after = httpx.post(f"{url}/v2/rerank", json={"query": "q", "documents": ["a", "b"]}, timeout=60)
    assert after.status_code == 200  # no batch left waiting for the cancelled callers


def test_the_ingress_refuses_before_tokenizing_what_its_own_requests_in_flight_leave_no_time_for(monkeypatch):
    from types import SimpleNamespace

    from serve_app.errors import Overloaded
    from serve_app.pool_call import Admit, PoolRate
    from serve_app.pool_queues import PoolQueues
    from serve_app.scoring.types import Content, Pair
    from serve_app.settings import Settings

    queues = PoolQueues(Settings())
    served = SimpleNamespace(key="text", placement="own")
    pairs = [Pair(Content(text="q" * 34), Content(text="d" * 360)) for _ in range(10)]  # 100 tokens each
    now = time.time()
    held: list = []
    queues.admit(served, pairs, None, Admit(now + 1, 27), 1, held)  # no rate answered yet: left to the replicas
    assert held == [] and queues.in_flight == {}
    queues.seen("text", PoolRate(None, 512, 32, 0))  # not measured yet: ignored
    queues.seen("text", PoolRate(500.0, 512, 32, 24))  # 500 tokens/s; a forward costs 24 tokens' time
    first, second, third = [], [], []
    queues.admit(served, pairs, None, Admit(now + 1, 27), 1, first)  # an empty queue: admitted, 2.05 s alone
    assert first == [("text", 1024)]
    queues.admit(served, pairs, None, Admit(now + 10, 27), 1, second)  # 2 s queued + 2 s: within 10 s
    with pytest.raises(Overloaded) as refused:
        queues.admit(served, pairs, None, Admit(now + 5, 27), 1, third)  # 4.1 s queued + 2 s > 5 s
    assert third == [] and refused.value.retry_after_s >= 1 and "Retry-After" in refused.value.message
    queues.admit(served, pairs, None, Admit(now + 5, 27), 2, third)  # two replicas drain it twice as fast
    assert queues.stats()["ingress_refused"] == 1 and queues.in_flight["text"] == 3 * 1024
    # Refused requests are told to come back one after the other: each behind those refused before it.
    with pytest.raises(Overloaded) as later:
        queues.admit(served, pairs, None, Admit(now + 5, 5), 1, [])
    with pytest.raises(Overloaded) as latest:
        queues.admit(served, pairs, None, Admit(now + 5, 5), 1, [])
    assert latest.value.retry_after_s >= later.value.retry_after_s + 2  # its 2 s of work promised to `later`
    for held in (first, second, third):
        queues.release(held)
    assert queues.in_flight["text"] == 0 and first == []
    # A request of 8 calls of 128 pairs, 2 in flight at once: a quarter of its work is ahead of later requests.
    big: list = []
    queues.admit(served, pairs * 100, None, Admit(now + 60, 27), 1, big)
    assert big == [("text", round((100_000 + 32 * 24) / 4))]
    queues.admit(served, pairs, None, None, 1, [])  # admission off: held, never refused
    realtime: list = []
    queues.admit(served, pairs * 100, None, Admit(now + 1, 1), 1, realtime, realtime=True)  # never refused here
    assert realtime == []

    # A flood of refusals: the promises kept stay bounded, and go once due.
    from serve_app import pool_queues

    monkeypatch.setattr(pool_queues, "MAX_PROMISES", 100)
    for _ in range(1000):
        with pytest.raises(Overloaded):
            queues.admit(served, pairs, None, Admit(now + 1, 1), 1, [])
    assert len(queues.promised["text"]) <= 100 and queues.promised_work["text"] <= 100 * 1024
    monkeypatch.setattr(pool_queues, "time", SimpleNamespace(time=lambda: now + 10**6))  # all of them due
    with pytest.raises(Overloaded):
        queues.admit(served, pairs, None, Admit(now + 10**6 + 1, 1), 1, [])
    assert len(queues.promised["text"]) == 1 and queues.promised_work["text"] == 1024
