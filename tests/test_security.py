"""Access control and hostile input, settings-level: keys that cannot silently turn authentication off."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from serve_app.settings import MIN_API_KEY_CHARS, Settings


@pytest.mark.parametrize("key", ["", " ", "short", "a" * (MIN_API_KEY_CHARS - 1), "k" * 20 + ","])
def test_an_empty_or_short_api_key_is_refused(key):
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(api_key=key)


def test_an_empty_api_key_variable_is_refused_not_ignored(monkeypatch):
    monkeypatch.setenv("RERANK_API_KEY", "")
    with pytest.raises(ValidationError, match="api_key"):
        Settings()


def test_several_keys_are_all_valid_for_rotation():
    old, new = "o" * MIN_API_KEY_CHARS, "n" * (MIN_API_KEY_CHARS + 4)
    assert Settings(api_key=f"{old}, {new}").api_keys() == [old.encode(), new.encode()]
    assert Settings().api_keys() == []  # unset: authentication off, by choice


class ProbedPool:
    """A pool handle whose probe answers as told: a latency, or an exception."""

    def __init__(self, outcome: float | Exception) -> None:
        self.outcome = outcome
        self.probe = self

    async def remote(self) -> float:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def health_of(text: float | Exception, image_text: float | Exception):
    from serve_app.ingress import Ingress

    pools = {"text": ProbedPool(text), "image_text": ProbedPool(image_text)}
    # The class as written, under Serve's ASGI wrapper (whose constructor is a coroutine).
    written = Ingress.func_or_class.__mro__[1]
    ingress = written.__new__(written)
    written.__init__(ingress, pools, {}, Settings(), {})
    return asyncio.run(ingress.health())


def test_a_pool_failing_its_probe_leaves_the_service_ready_and_says_why_in_words():
    leak = RuntimeError("CUDA error: device-side assert at 10.0.4.7, pid 4242, /models/internal-name")
    response, status = health_of(3.0, leak)
    assert status == 200 and response.status == "degraded"
    assert response.pools["text"].status == "ok" and response.pools["image_text"].status == "down"
    reason = response.pools["image_text"].reason
    assert reason and not any(secret in reason for secret in ("10.0.4.7", "4242", "internal-name", "CUDA"))
    response, status = health_of(leak, leak)  # no pool scores: not ready
    assert status == 503 and response.status == "down"


def test_a_device_fault_is_told_apart_from_bad_input_and_out_of_memory():
    import torch

    from serve_app.hardware import is_device_fault

    assert is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_fault(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))
    assert not is_device_fault(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_device_fault(ValueError("CUDA error in the text of a document"))
    assert not is_device_fault(RuntimeError("shape mismatch"))


def test_a_replica_asks_to_be_replaced_after_a_device_fault_or_a_failed_load():
    import time

    from serve_app.scoring_replica import unhealthy_because
    from serve_app.settings import TextPoolSettings

    pool = TextPoolSettings(load_retry_s=60)
    now = time.monotonic()
    assert unhealthy_because(None, True, now - 3600, pool) is None  # loaded and fine
    assert "device failed" in unhealthy_because("RuntimeError: CUDA error", True, now, pool)
    assert unhealthy_because(None, False, now - 10, pool) is None  # not loaded, retried later
    assert "load it again" in unhealthy_because(None, False, now - 61, pool)
    assert unhealthy_because(None, False, now - 3600, TextPoolSettings(load_retry_s=None)) is None


def test_concurrent_calls_share_one_read_of_the_running_replicas(monkeypatch):
    import time

    from serve_app import status

    reads = []

    def slow_status() -> dict[str, int]:
        reads.append(1)
        time.sleep(0.2)
        return {"text_pool": 2}

    monkeypatch.setattr(status, "running_replicas", slow_status)
    watch = status.RunningReplicas()

    async def many() -> list[int | None]:
        return await asyncio.gather(*(watch.running("text_pool") for _ in range(50)))

    assert asyncio.run(many()) == [2] * 50
    assert len(reads) == 1  # not one controller call per waiting request


def test_a_failed_read_of_the_running_replicas_keeps_the_last_counts(monkeypatch):
    from serve_app import status

    answers = iter([None, {"text_pool": 2}, None])
    monkeypatch.setattr(status, "running_replicas", lambda: next(answers))
    watch = status.RunningReplicas()

    async def three() -> list[int | None]:
        return [await watch.running("text_pool", fresh=True) for _ in range(3)]

    # Unknown until a read succeeds; then a failed read (the controller busy) does not forget the 2 replicas.
    assert asyncio.run(three()) == [None, 2, 2]


def test_pieces_are_never_cut_larger_than_the_batcher_takes_and_a_lower_cap_waits_for_the_queue():
    """The shared pool's batcher cap comes from profile rows (8 on a GPU kind without one) while a loaded model
    derives its own, larger cap: pieces cut at the model's cap were refused by the batcher (a 500). And a cap
    lowered by `reconfigure` while pieces were queued failed those pieces."""
    from serve_app.scoring_replica import ScoringReplica

    class Batcher:
        def __init__(self) -> None:
            self.caps: list[int] = []

        def set_max_batch_size(self, cap: int) -> None:
            self.caps.append(cap)

    class Profile:
        max_batch_size = 64
        batch_wait_timeout_s = 0.0

    replica = ScoringReplica.__new__(ScoringReplica)
    replica.batch_cap, replica.lower_cap, replica.pending_pairs = 32, None, 0
    replica._score_batch = Batcher()
    replica.set_batch_cap(8)  # idle: at once
    assert replica.batch_cap == 8 and replica._score_batch.caps == [8]
    pieces: list[int] = []
    replica.realtime = True

    async def run(calls):
        pieces.extend(len(call) for call in calls)
        return [None for _ in calls]

    replica._run = run
    asyncio.run(replica._in_batches(Profile(), list(range(20))))
    assert pieces == [8, 8, 4]  # the batcher's 8, not the model's 64
    replica.pending_pairs = 5  # pieces queued
    replica.set_batch_cap(4)
    assert replica.batch_cap == 8 and replica.lower_cap == 4  # waits for the queue to drain
    replica.set_batch_cap(16)  # raising is safe at once
    assert replica.batch_cap == 16 and replica.lower_cap is None


def test_a_call_that_fails_in_its_batch_answers_what_failed_never_a_bare_500():
    """Out of memory is load (503 + Retry-After), a failed GPU means this replica goes (503), an input the model
    cannot take is the caller's (413 / 422), anything else the model's (500 naming the error's type only)."""
    import torch

    from serve_app.errors import InputTooLarge, InvalidInput, ModelFault, Overloaded
    from serve_app.scoring.types import PairTooLong, UnsupportedPair
    from serve_app.scoring_replica import ScoringReplica

    replica = ScoringReplica.__new__(ScoringReplica)
    out_of_memory = replica._call_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert isinstance(out_of_memory, Overloaded) and out_of_memory.headers()["Retry-After"] == "1"
    assert isinstance(replica._call_error(RuntimeError("CUDA error: an illegal memory access")), Overloaded)
    assert isinstance(replica._call_error(PairTooLong("too long")), InputTooLarge)
    assert isinstance(replica._call_error(UnsupportedPair("no images")), InvalidInput)
    fault = replica._call_error(IndexError("index out of range in self at /home/me/model.py"))
    assert isinstance(fault, ModelFault) and fault.status == 500
    assert "IndexError" in fault.message and "/home" not in fault.message


def test_concurrent_health_checks_after_the_cache_expires_share_one_probe():
    """A load balancer's burst of /health checks once the cached answer is stale: one probe of the pools, not
    one per check (each probe calls every replica)."""
    from serve_app.status import ServiceStatus

    probes = []

    async def probe():
        probes.append(1)
        await asyncio.sleep(0.2)
        return "healthy", 200

    service = ServiceStatus.__new__(ServiceStatus)
    service.settings, service.cached_health, service.probing = Settings(health_cache_s=0.0), None, None
    service._probe_pools = probe

    async def burst() -> list:
        return await asyncio.gather(*(service.health() for _ in range(30)))

    assert asyncio.run(burst()) == [("healthy", 200)] * 30
    assert len(probes) == 1


def test_a_json_body_is_parsed_once_by_the_gate_and_handed_to_the_route(monkeypatch):
    """RequestGate parses a body to count its lists before any conversion; the route takes that parse (a 50 MB
    body was parsed twice on the event loop), and a body that is not JSON still gets the schema's 422."""
    import json

    from fastapi.testclient import TestClient

    from serve_app.api import build_api
    from serve_app.errors import InvalidInput

    seen = []

    class Service:
        settings = Settings(max_documents_per_request=5)

        async def rerank(self, request, return_documents, api_version):
            seen.append(request.documents)
            raise InvalidInput("seen", "documents")

    parses = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda *args, **kwargs: parses.append(1) or loads(*args, **kwargs))
    with TestClient(build_api(Service())) as client:
        answer = client.post("/v2/rerank", json={"query": "q", "documents": ["a", "b"]})
        assert len(parses) == 1  # the gate's (before this fix, the route parsed the body again)
        assert answer.status_code == 422 and answer.json()["message"] == "seen" and seen == [["a", "b"]]
        assert client.post("/v2/rerank", json={"query": "q", "documents": list("abcdef")}).status_code == 413
        assert len(seen) == 1  # refused before the route
        broken = client.post("/v2/rerank", content=b'{"query": ', headers={"content-type": "application/json"})
        assert broken.status_code == 422 and broken.json()["error"]["type"] == "invalid_input"
