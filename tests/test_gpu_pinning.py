"""GPU pinning and per-GPU batch caps, on a cluster of declared-GPU nodes (no real GPU needed)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_app.hardware import load_profile_rows, lookup_profile
from serve_app.settings import Settings
from tests.conftest import node_with

QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "a red car in the rain", "the dog"]
ROWS = load_profile_rows(Settings().batch_profiles_path)


def table_cap(kind: str, pool: str, model: str) -> int:
    return lookup_profile(ROWS, kind, pool, model).max_batch_size


def test_each_pool_runs_on_the_node_its_config_pins(pinned):
    pools = pinned.get("/v1/models").json()["pools"]
    for name, kind in [("text", "A10G"), ("image_text", "RTX3060"), ("text_realtime", "A10G")]:
        for replica in pools[name]["replicas"]:
            assert replica["node_id"] == node_with(kind), name
            assert replica["gpu_kind"] == kind
            assert replica["device"] == "cpu"  # no CUDA here: computes on the CPU, sized for its GPU kind
            assert replica["dtype"] == "float32"


def test_batch_cap_is_the_profile_row_of_the_pinned_gpu(pinned):
    pools = pinned.get("/v1/models").json()["pools"]
    text, image_text = pools["text"]["replicas"][0], pools["image_text"]["replicas"][0]
    assert text["max_batch_size"] == table_cap("A10G", "text", text["model"]) == 32
    assert text["max_batch_size_source"] == "table: A10G/text"
    assert image_text["max_batch_size"] == table_cap("RTX3060", "image_text", image_text["model"])
    assert image_text["max_batch_size"] < table_cap("RTX3060", "text", text["model"])


def test_a_gpu_kind_without_a_row_falls_back_without_crashing(guarded):
    text = guarded.get("/v1/models").json()["pools"]["text"]["replicas"][0]
    assert text["gpu_kind"] == "B200"
    assert "no row for B200" in text["max_batch_size_source"]
    assert text["max_batch_size"] == table_cap("cpu", "text", text["model"])


def test_config_cap_overrides_the_profile(beta):
    text = beta.get("/v1/models").json()["pools"]["text"]
    assert text["max_batch_size"] == 8
    assert text["max_batch_size_source"] == "config"


def test_batches_never_exceed_the_profile_cap_across_callers(pinned):
    cap = pinned.get("/v1/models").json()["pools"]["image_text"]["max_batch_size"]
    from tests.conftest import b64, noise_image

    body = {"query": QUERY, "documents": [{"image": b64(noise_image((16, 16), seed))} for seed in range(4)]}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: pinned.post("/v2/rerank", json=body), range(24)))
    assert all(r.status_code == 200 for r in responses)
    assert pinned.get("/v1/models").json()["pools"]["image_text"]["counters"]["largest_batch"] <= cap


def test_realtime_priority_uses_the_realtime_variant_with_the_same_scores(pinned):
    def calls(variant: str) -> int:
        return pinned.get("/v1/models").json()["pools"][variant]["counters"]["calls"]

    before = calls("text_realtime")
    batch = pinned.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS, "raw_scores": True}).json()
    realtime = pinned.post(
        "/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS, "raw_scores": True, "priority": "realtime"}
    ).json()
    assert calls("text_realtime") == before + 1
    assert {r["index"]: r["raw_score"] for r in realtime["results"]} == pytest.approx(
        {r["index"]: r["raw_score"] for r in batch["results"]}, abs=1e-5
    )
    realtime_replica = pinned.get("/v1/models").json()["pools"]["text_realtime"]
    assert realtime_replica["variant"] == "realtime" and realtime_replica["batch_wait_timeout_s"] == 0.0


def test_stats_show_memory_fill_latency_and_queue_per_replica(pinned):
    pinned.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    stats = pinned.get("/v1/stats").json()["pools"]
    (text,) = stats["text"]
    assert text["memory"]["device"] == "cpu" and text["memory"]["rss_bytes"] > 0
    assert text["batches"] >= 1 and text["mean_batch_fill_pairs"] > 0
    assert 0 < text["batch_latency_ms_p50"] <= text["batch_latency_ms_p95"]
    assert text["pending_pairs"] == 0
    assert text["node_id"] == node_with("A10G")


def test_replica_figures_reach_prometheus_through_ray_metrics(pinned):
    import time

    import httpx
    import ray

    pinned.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    pinned.get("/v1/stats")  # sets the memory gauge
    (port,) = [n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node_with("A10G")]
    wanted = ("ray_rerank_pairs_scored", "ray_rerank_batch_latency_ms", "ray_rerank_memory_bytes")
    deadline = time.monotonic() + 90  # Ray exports every few seconds
    while True:
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {
            name
            for name in wanted
            for line in body.splitlines()
            if line.startswith(name) and 'pool="text"' in line and 'model="' in line
        }
        if found == set(wanted) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert found == set(wanted)
