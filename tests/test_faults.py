"""Faults under load: a replica killed mid-request, a model that appears after start-up."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from serve_app.pool_call import LostCalls
from serve_app.scoring.types import Content, EncodedPair, Pair
from tests.conftest import MINILM_FORWARD_COST_TOKENS, deploy, module_apps, undeploy

BODY = {"query": "what is the capital of france", "documents": ["paris is the capital", "a red car", "the dog"]}
# How long Serve may take to notice a killed replica: its next health check (Serve asks every health_check_period_s,
# +-10%, so a death goes unnoticed for up to 11 s at the default 10 s: a busy CI run saw 504s from calls sent 8.1 s
# after the kill), then its control loop (1 s under quiet_ray_env). The one-replica test checks every HEALTH_S.
HEALTH_S = 2
NOTICED_S = 8
Answer = tuple[float, int, float, str | None]  # (sent at, status, seconds, Retry-After)


@pytest.fixture(scope="module")
def fault_apps(serve_url, model_dirs) -> Iterator[dict[str, str]]:
    """The applications whose replicas the tests kill, deployed at once (the late model's has its own test: its
    replica is replaced every few seconds until the model appears)."""
    cross_encoder = str(model_dirs["cross_encoder"])
    specs = {
        "faults": {
            "text": {"model": cross_encoder, "num_replicas": 2, "num_cpus": 0.5},
            "image_text": {"enabled": False},
            "request_timeout_s": 10,
        },
        "lone": {
            "text": {"model": cross_encoder, "num_cpus": 0.5, "health_check_period_s": HEALTH_S},
            "image_text": {"enabled": False},
            "request_timeout_s": 4,
        },
        "deadly": {
            "text": {
                "model": str(model_dirs["slow"]),
                "num_replicas": 2,
                "num_cpus": 0.5,
                "max_batch_size": 4,
                "forward_cost_tokens": MINILM_FORWARD_COST_TOKENS,
            },
            "image_text": {"enabled": False},
            "request_timeout_s": 60,
            "deadly_input_deaths": 1,
        },
    }
    with module_apps(specs, serve_url) as urls:
        yield urls


def load_and_kill(
    url: str, clients: int, done: Callable[[list[Answer], float], bool], limit_s: float
) -> tuple[list[Answer], float]:
    """`clients` callers in a loop; once each has been answered, the first text replica is SIGKILLed; the load
    goes on until `done(answers, killed_at)` holds (or `limit_s` after the kill); every answer, and when."""
    replicas = httpx.get(f"{url}/v1/models", timeout=60).json()["pools"]["text"]["replicas"]
    answers: list[Answer] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                sent = time.monotonic()
                response = http.post(f"{url}/v2/rerank", json=BODY)
                answers.append(
                    (sent, response.status_code, time.monotonic() - sent, response.headers.get("retry-after"))
                )

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    warm = time.monotonic() + 60
    while len(answers) < 2 * clients and time.monotonic() < warm:  # every client answered: the load is on
        time.sleep(0.1)
    killed_at = time.monotonic()
    os.kill(replicas[0]["pid"], signal.SIGKILL)
    while not done(list(answers), killed_at) and time.monotonic() < killed_at + limit_s:
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    return answers, killed_at


def served_again(answers: list[Answer], killed_at: float, in_a_row: int) -> bool:
    """`in_a_row` answers of 200, each sent after the kill, one second or more after it, and after the last
    failure: the pool serves again."""
    after = sorted(a for a in answers if a[0] >= killed_at)
    last_failure = max((a[0] for a in after if a[1] != 200), default=killed_at)
    later = [a for a in after if a[0] > max(last_failure, killed_at + 1)]
    return len(later) >= in_a_row and all(a[1] == 200 for a in later)


def test_a_killed_replica_costs_at_most_a_retry_and_no_request_waits_for_the_deadline(fault_apps):
    # Observed for NOTICED_S at least, the window in which Serve notices the death, then until the pool
    # serves again.
    answers, killed_at = load_and_kill(
        fault_apps["faults"],
        4,
        lambda seen, at: time.monotonic() - at > NOTICED_S and served_again(seen, at, 20),
        limit_s=30,
    )
    undeploy("faults")  # its replacement replica need not start beside the next test
    after = [a for a in answers if a[0] >= killed_at]
    failed = [a for a in after if a[1] != 200]
    recovered_s = max((a[0] + a[2] - killed_at for a in failed), default=0.0)
    print(
        f"\nreplica killed under 4 clients (2 replicas): {len(after)} requests after the kill, {len(failed)} failed "
        f"({sorted({a[1] for a in failed})}), all succeed again {recovered_s:.1f} s after the kill; "
        f"slowest {max(a[2] for a in after):.1f} s"
    )
    assert len(after) > 20
    assert all(status == 503 and retry for _, status, _, retry in failed), failed  # never a 500
    assert max(a[2] for a in after) < 10  # none parked until the deadline (504)
    assert recovered_s < 10


def test_with_one_replica_killed_requests_are_refused_fast_until_its_replacement_runs(fault_apps):
    answers, killed_at = load_and_kill(fault_apps["lone"], 2, lambda seen, at: served_again(seen, at, 10), limit_s=90)
    undeploy("lone")
    after = [a for a in answers if a[0] >= killed_at]
    failed = [a for a in after if a[1] != 200]
    last_failure = max((a[0] for a in failed), default=killed_at)
    back = [a[0] + a[2] - killed_at for a in after if a[1] == 200 and a[0] >= last_failure]
    print(
        f"\none replica, killed under 2 clients: {len(failed)} of {len(after)} requests refused "
        f"({sorted({a[1] for a in failed})}), serving again {min(back, default=float('nan')):.1f} s after "
        f"the kill; slowest {max(a[2] for a in after):.1f} s"
    )
    # Known gap: until Serve's status notices the death (its next health check, HEALTH_S here, and a control
    # loop; longer under load), a call can still wait in the router for the deadline (504). Past that window
    # (NOTICED_S, with room for a loaded machine) every refusal is a fast 503 + Retry-After.
    parked = [a for a in failed if a[1] == 504]
    window = max((a[0] - killed_at for a in parked), default=0.0)
    print(f"{len(parked)} request(s) sent within {window:.1f} s of the kill hit the deadline")
    assert all((status == 503 and retry) or status == 504 for _, status, _, retry in failed), failed  # never 500
    # The replica is gone: a retry is worth making once a replacement may run (replica_start_s), not in 1 s.
    assert "20" in {retry for _, status, _, retry in failed if status == 503}, failed
    assert all(sent - killed_at < NOTICED_S for sent, *_ in parked), parked
    assert all(a[2] < 4 for a in failed if a[0] - killed_at >= NOTICED_S)  # later: refused fast, nobody parked
    assert back and after[-1][1] == 200  # and the replacement serves


def test_pairs_lost_with_replicas_are_deadly_after_the_set_count_and_forgotten_after_the_ttl():
    now = [0.0]
    lost = LostCalls(ttl_s=60, deadly_after=2, most=4, clock=lambda: now[0])
    a, b = Pair(Content("q"), Content("doc a")), Pair(Content("q"), Content("doc b"))
    assert not lost.deadly("text", [a, b])
    assert lost.record("text", [a], "replica-1") == 1
    assert lost.record("text", [a], "replica-1") == 1  # another call of the same pairs, lost with the same replica
    assert not lost.deadly("text", [a, b])
    now[0] = 30
    assert lost.record("text", [a, b], "replica-2") == 2  # a's second replica, b's first
    assert lost.deadly("text", [b, a]) and lost.deadly("text", [a])
    assert not lost.deadly("text", [b]) and not lost.deadly("model_x", [a])  # per pair, per pool
    assert not lost.deadly("text", [Pair(Content("q"), Content("doc a"), instruction="other")])
    now[0] = 89
    assert lost.deadly("text", [a])
    now[0] = 91  # 61 s after the last death
    assert not lost.deadly("text", [a]) and not lost.deaths
    lost.record("text", [EncodedPair(bytes([i, 0, 0, 0])) for i in range(6)], "replica-3")
    assert len(lost.deaths) == 4  # bounded: the oldest are forgotten
    assert not LostCalls(ttl_s=None).deadly("text", [a]) and LostCalls(ttl_s=None).record("text", [a], "r") == 1


def test_a_call_on_a_replica_that_dies_is_not_sent_again_and_its_pairs_are_then_refused(fault_apps):
    url = fault_apps["deadly"]
    # 32 documents of the model's whole window: calls on both replicas, each busy for seconds.
    body = {"query": "which one", "documents": [" ".join(f"w{i}x{j}" for j in range(300)) for i in range(32)]}
    pids = {
        r["replica"]: r["pid"] for r in httpx.get(f"{url}/v1/models", timeout=60).json()["pools"]["text"]["replicas"]
    }
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(httpx.post(f"{url}/v2/rerank", json=body, timeout=90)))
    sender.start()
    deadline = time.monotonic() + 60
    busy = None
    while busy is None and sender.is_alive() and time.monotonic() < deadline:
        replicas = httpx.get(f"{url}/v1/stats", timeout=30).json()["pools"]["text"]
        busy = next((r["replica"] for r in replicas if r["pending_pairs"]), None)
    assert busy is not None, "no replica was seen scoring the request"
    os.kill(pids[busy], signal.SIGKILL)
    sender.join(timeout=90)
    first = answer[0]
    # Not resent to the other replica (it would have answered 200): the call may be what killed its replica.
    assert first.status_code == 503, first.text
    assert first.json()["error"]["type"] == "replica_lost" and first.headers["retry-after"] == "20"
    started = time.monotonic()
    again = httpx.post(f"{url}/v2/rerank", json=body, timeout=90)
    assert again.status_code == 422 and again.json()["error"]["type"] == "deadly_input", again.text
    assert "deadly_input_ttl_s" in again.json()["message"]
    print(f"\nthe same documents again: 422 in {time.monotonic() - started:.2f} s")
    other = httpx.post(f"{url}/v2/rerank", json={"query": "another", "documents": body["documents"][:2]}, timeout=90)
    assert other.status_code in (200, 503), other.text  # other pairs are not refused as deadly
    undeploy("deadly")


def test_a_model_that_appears_after_start_up_is_loaded_by_a_replacement_replica(serve_url, model_dirs, tmp_path):
    late = tmp_path / "late-model"
    # Checked every second: replaced about 3 s after load_retry_s, not 30 s (Serve replaces after 3 failed checks).
    text = {"model": str(late), "load_retry_s": 1, "health_check_period_s": 1}
    deploy("late", {"text": text, "image_text": {"enabled": False}})
    try:
        url = f"{serve_url}/late"
        assert httpx.post(f"{url}/v2/rerank", json=BODY, timeout=60).status_code == 503
        shutil.copytree(model_dirs["cross_encoder"], late)  # the volume is mounted, the download finished ...
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if httpx.post(f"{url}/v2/rerank", json=BODY, timeout=60).status_code == 200:
                break
            time.sleep(1)
        else:
            raise AssertionError("the pool never loaded the model that appeared")
    finally:
        undeploy("late")
