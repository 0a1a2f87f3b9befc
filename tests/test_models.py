"""Many models in one application, chosen per request: named defaults with aliases, a model in a pool of its
own, and a shared multiplexed pool that loads models on first use and evicts the least recently used."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from serve_app.bulk import Options, parse_row, run
from serve_app.catalog import Catalog
from serve_app.errors import InvalidInput, ModelNotFound, PoolUnavailable
from serve_app.settings import Settings
from tests import direct
from tests.conftest import b64, module_apps, node_with, noise_image

QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "a red car in the rain", "the dog", "berlin is in germany"]
IMAGES = [noise_image((40, 30), seed) for seed in range(2)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"models": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]}, "the name 'a' is taken"),
        ({"text": {"aliases": ["b"]}, "models": [{"name": "b", "model": "x"}]}, "the name 'b' is taken by text"),
        ({"models": [{"name": "m", "model": "x"}, {"name": "n", "model": "y", "aliases": ["m"]}]}, "'m' is taken"),
        ({"models": [{"name": "a.b", "model": "x"}, {"name": "a_b", "model": "y"}]}, "share the deployment"),
        ({"models": [{"name": "a b", "model": "x"}]}, "should match pattern"),
        ({"models": [{"name": "", "model": "x"}]}, "should match pattern"),
        ({"models": [{"model": "x"}]}, "name"),
        ({"shared_pool": {"max_models_per_replica": 0}}, "greater than or equal to 1"),
    ],
)
def test_names_that_would_pick_two_models_are_refused_at_start(args, message):
    with pytest.raises(ValueError, match=message):
        Settings(**args)


def test_models_and_aliases_come_from_the_environment_too(monkeypatch):
    monkeypatch.setenv("RERANK_MODELS", '[{"name": "m", "model": "/models/m", "placement": "shared"}]')
    monkeypatch.setenv("RERANK_TEXT__ALIASES", '["rerank-v3.5"]')
    monkeypatch.setenv("RERANK_SHARED_POOL__MAX_MODELS_PER_REPLICA", "3")
    catalog = Catalog(Settings())
    assert catalog.find("m").placement == "shared" and catalog.find("rerank-v3.5").default
    assert Settings().shared_pool.max_models_per_replica == 3


def test_two_models_may_share_a_name_only_when_one_is_disabled():
    settings = Settings(text={"enabled": False, "name": "a"}, models=[{"name": "a", "model": "x"}])
    assert Catalog(settings).find("a").key == "model_a"


def test_without_a_default_for_a_kind_of_pair_the_refusal_names_the_models_that_take_it():
    catalog = Catalog(
        Settings(image_text={"enabled": False}, models=[{"name": "v", "model": "x", "modality": "image_text"}])
    )
    with pytest.raises(PoolUnavailable, match=r"image_text pool is disabled.*name a model .*'v'"):
        catalog.route(None, {"text": 1, "image_text": 1})
    assert {kind: m.name for kind, m in catalog.route("v", {"text": 1, "image_text": 1}).items()} == {
        "text": "v",
        "image_text": "v",
    }


def many_spec(model_dirs) -> dict:
    return {
        "text": {"model": str(model_dirs["cross_encoder"]), "name": "small", "aliases": ["rerank-v3.5"]},
        "image_text": {"model": str(model_dirs["clip"]), "name": "clip", "aliases": ["jina-reranker-m0"]},
        "models": [
            # Its own pool, pinned to a GPU kind (declared by a test node; the model runs on its CPU). No CPU
            # asked for here or for the shared pool: the declared-GPU nodes' CPUs go to every other test's
            # actors too, and a replica asking for one could wait for it forever.
            {
                "name": "large",
                "model": str(model_dirs["cross_encoder_2"]),
                "num_cpus": 0,
                "num_gpus": 0.5,
                "accelerator_type": "B200",
            },
            {"name": "tail-a", "model": str(model_dirs["cross_encoder"]), "placement": "shared"},
            {"name": "tail-b", "model": str(model_dirs["embedding"]), "placement": "shared"},
            # MiniLM-sized: its load (and the forward cost measured with it) takes seconds.
            {"name": "tail-slow", "model": str(model_dirs["slow"]), "placement": "shared"},
        ],
        # A call that loads a model on first use waits for the load: on a loaded 2-core machine, the MiniLM-
        # sized load beside a stream of calls for another model took more than the default 30 s (one CI run).
        "request_timeout_s": 120,
        "shared_pool": {
            "max_models_per_replica": 2,
            "keep_resident_s": None,  # eviction as it happens: the thrash protections have their own test
            "num_cpus": 0,
            "num_gpus": 0.5,
            "accelerator_type": "RTX3060",
        },
    }


def thrash_spec(model_dirs, broken: Path) -> dict:
    shared = {"placement": "shared"}
    return {
        # Named models in the shared pool alone: no default text pool (its replica would only idle).
        "text": {"enabled": False},
        "image_text": {"enabled": False},
        "models": [
            {"name": "t-a", "model": str(model_dirs["cross_encoder"]), **shared},
            {"name": "t-b", "model": str(model_dirs["embedding"]), **shared},
            {"name": "t-c", "model": str(model_dirs["cross_encoder_2"]), **shared},
            {"name": "t-broken", "model": str(broken), **shared},
            {"name": "t-hub", "model": "some-org/a-model-this-node-never-fetched", **shared},
        ],
        "shared_pool": {"max_models_per_replica": 2, "keep_resident_s": 600, "load_backoff_s": 600},
    }


@pytest.fixture(scope="module")
def model_apps(serve_url, model_dirs, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The module's two applications, deployed at once."""
    broken = tmp_path_factory.mktemp("broken")
    (broken / "config.json").write_text("{}")  # no architectures: the load fails
    with module_apps({"many": many_spec(model_dirs), "thrash": thrash_spec(model_dirs, broken)}, serve_url) as urls:
        yield urls


@pytest.fixture(scope="module")
def many(model_apps) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=model_apps["many"], timeout=180) as client:
        yield client


def rerank(client: httpx.Client, body: dict) -> dict:
    response = client.post("/v2/rerank", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def raw_scores(client: httpx.Client, model: str | None, documents: list = DOCUMENTS, query=QUERY) -> list[float]:
    body = {"query": query, "documents": documents, "raw_scores": True}
    if model is not None:
        body["model"] = model
    by_index = {r["index"]: r["raw_score"] for r in rerank(client, body)["results"]}
    return [by_index[i] for i in range(len(documents))]


def served(client: httpx.Client) -> dict[str, dict]:
    return {m["id"]: m for m in client.get("/v1/models").json()["data"]}


def test_each_name_gives_its_own_models_scores(many, model_dirs):
    small = raw_scores(many, "small")
    large = raw_scores(many, "large")
    assert small == pytest.approx(direct.cross_encoder(model_dirs["cross_encoder"], QUERY, DOCUMENTS), abs=1e-4)
    assert large == pytest.approx(direct.cross_encoder(model_dirs["cross_encoder_2"], QUERY, DOCUMENTS), abs=1e-4)
    assert small != pytest.approx(large, abs=1e-3)
    # No name: the default text model, which is "small".
    assert raw_scores(many, None) == pytest.approx(small, abs=1e-6)


def test_an_alias_picks_the_model_it_maps_to(many):
    answer = rerank(many, {"model": "rerank-v3.5", "query": QUERY, "documents": DOCUMENTS, "raw_scores": True})
    assert answer["model"] == "rerank-v3.5"  # echoed as sent
    assert answer["meta"]["models"] == {"small": len(DOCUMENTS)}
    assert sorted(r["raw_score"] for r in answer["results"]) == pytest.approx(sorted(raw_scores(many, "small")))


def test_an_unknown_name_is_a_404_listing_the_served_names(many):
    response = many.post("/v2/rerank", json={"model": "rerank-english-v2.0", "query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 404
    body = response.json()
    assert body["error"]["type"] == "model_not_found" and body["error"]["field"] == "model"
    assert body["error"]["models"] == ["small", "clip", "large", "tail-a", "tail-b", "tail-slow"]
    assert "rerank-english-v2.0" in body["message"] and "tail-slow" in body["message"]  # Cohere reads `message`


def test_a_text_model_with_an_image_pair_is_a_422_naming_the_models_that_take_images(many):
    documents = ["a red car", {"image": b64(IMAGES[0])}]
    response = many.post("/v2/rerank", json={"model": "large", "query": "red", "documents": documents})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "'large' scores text pairs only" in message and "['clip']" in message


@torch.inference_mode()
def clip_text_text(model_dir, query: str, documents: list[str]) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    features = model.get_text_features(**tokenizer([query, *documents], padding=True, return_tensors="pt"))
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    features = torch.nn.functional.normalize(features, dim=-1)
    return (features[1:] @ features[0]).tolist()


def test_a_multimodal_name_scores_text_and_image_pairs_of_one_request(many, model_dirs):
    documents = ["a red photo of noise", {"image": b64(IMAGES[0])}, "the dog", {"image": b64(IMAGES[1])}]
    answer = rerank(
        many, {"model": "jina-reranker-m0", "query": "a red photo", "documents": documents, "raw_scores": True}
    )
    assert answer["meta"]["models"] == {"clip": 4}
    assert answer["meta"]["pairs"] == {"text": 2, "image_text": 2}
    got = {r["index"]: r["raw_score"] for r in answer["results"]}
    images = direct.clip_text_image(model_dirs["clip"], "a red photo", IMAGES)
    texts = clip_text_text(model_dirs["clip"], "a red photo", ["a red photo of noise", "the dog"])
    assert [got[1], got[3]] == pytest.approx(images, abs=1e-4)
    assert [got[0], got[2]] == pytest.approx(texts, abs=1e-4)


def test_models_lists_every_served_model(many):
    models = served(many)
    assert list(models) == ["small", "clip", "large", "tail-a", "tail-b", "tail-slow"]
    small, clip, large = models["small"], models["clip"], models["large"]
    assert small["aliases"] == ["rerank-v3.5"] and small["default_for"] == "text" and small["placement"] == "own"
    assert clip["modality"] == "image_text" and clip["family"] == "dual_encoder" and clip["default_for"] == "image_text"
    assert large["family"] == "cross_encoder" and large["pool"] == "model_large" and large["replicas"] == 1
    assert large["max_batch_size"] >= 1 and large["max_batch_size_source"]
    for name in ("tail-a", "tail-b", "tail-slow"):
        assert models[name]["placement"] == "shared" and models[name]["max_models_per_replica"] == 2
    pools = many.get("/v1/models").json()["pools"]
    assert set(pools) == {"text", "image_text", "model_large", "shared"}


def test_an_own_pool_and_the_shared_pool_are_pinned_and_sized_for_their_gpu_kind(many):
    raw_scores(many, "tail-a")
    pools = many.get("/v1/models").json()["pools"]
    (large,) = pools["model_large"]["replicas"]
    assert large["node_id"] == node_with("B200") and large["gpu_kind"] == "B200"
    (shared,) = pools["shared"]["replicas"]
    assert shared["node_id"] == node_with("RTX3060") and shared["gpu_kind"] == "RTX3060"
    (tail_a,) = [m for m in shared["loaded"] if m["name"] == "tail-a"]
    assert tail_a["max_batch_size_source"].startswith("table: RTX3060/text")
    assert served(many)["tail-a"]["max_batch_size"] == tail_a["max_batch_size"] == 8


def test_the_shared_pool_loads_on_first_use_evicts_the_least_recently_used_and_answers_meanwhile(many, model_dirs):
    tail_a = direct.cross_encoder(model_dirs["cross_encoder"], QUERY, DOCUMENTS)
    assert raw_scores(many, "tail-a") == pytest.approx(tail_a, abs=1e-4)
    got_b = raw_scores(many, "tail-b")
    (replica,) = many.get("/v1/models").json()["pools"]["shared"]["replicas"]
    (info,) = [m for m in replica["loaded"] if m["name"] == "tail-b"]
    tail_b = direct.embedding(model_dirs["embedding"], QUERY, DOCUMENTS, max_length=info["max_length"])
    assert got_b == pytest.approx(tail_b, abs=1e-4)
    raw_scores(many, "tail-a")  # tail-a is now the most recently used; tail-b the least
    models = served(many)
    assert models["tail-a"]["loaded_on"] and models["tail-b"]["loaded_on"] and not models["tail-slow"]["loaded_on"]

    # The third model loads on first use (seconds) while calls for tail-a keep being answered.
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(lambda: (raw_scores(many, "tail-slow"), time.monotonic()))
        answered = []
        while not slow.done():
            assert raw_scores(many, "tail-a") == pytest.approx(tail_a, abs=1e-4)
            answered.append(time.monotonic())
        slow_scores, slow_done = slow.result()
    assert len(slow_scores) == len(DOCUMENTS)
    assert sum(at < slow_done for at in answered) >= 3, "tail-a was not answered while tail-slow loaded"

    models = served(many)
    assert not models["tail-b"]["loaded_on"], "past the limit, the least recently used model goes"
    assert models["tail-a"]["loaded_on"] and models["tail-slow"]["loaded_on"]
    assert models["tail-slow"]["family"] == "cross_encoder" and models["tail-slow"]["max_batch_size"] >= 1
    raw_scores(many, "tail-slow")
    (replica,) = many.get("/v1/models").json()["pools"]["shared"]["replicas"]
    assert replica["loads"] == 3 and replica["evictions"] == 1
    assert [m["name"] for m in replica["loaded"]] == ["tail-a", "tail-slow"]  # least recently used first

    # An evicted model loads again when asked for, with the same scores.
    assert raw_scores(many, "tail-b") == pytest.approx(tail_b, abs=1e-4)
    assert not served(many)["tail-a"]["loaded_on"]


def test_a_batch_never_mixes_models(many):
    """Concurrent calls for two shared models: each gets its own model's scores, never the other's."""
    expected = {name: raw_scores(many, name) for name in ("tail-a", "tail-slow")}
    with ThreadPoolExecutor(8) as pool:
        jobs = [(name, pool.submit(raw_scores, many, name)) for name in ["tail-a", "tail-slow"] * 8]
        for name, job in jobs:
            assert job.result() == pytest.approx(expected[name], abs=1e-4)


def many_settings(model_dirs) -> Settings:
    return Settings(
        text={"model": str(model_dirs["cross_encoder"]), "name": "small", "aliases": ["rerank-v3.5"]},
        image_text={"model": str(model_dirs["clip"]), "name": "clip"},
        models=[{"name": "large", "model": str(model_dirs["cross_encoder_2"])}],
    )


def test_a_bulk_row_is_routed_as_a_request_is(model_dirs):
    settings = many_settings(model_dirs)

    def parse(row: dict, **options):
        job = Options(input="in", output="out", **options)
        return parse_row(row, job, settings, settings.instruction_templates(), check_images=True)

    image = {"image": b64(IMAGES[0])}
    assert parse({"id": 1, "query": "q", "documents": ["x", image]}).models == ["small", "clip"]
    assert parse({"id": 1, "query": "q", "documents": ["x"]}, model="large").models == ["large"]
    assert parse({"id": 1, "query": "q", "documents": ["x"], "model": "rerank-v3.5"}, model="large").models == ["small"]
    assert parse({"id": 1, "query": "q", "documents": ["x", image], "model": "clip"}).models == ["clip", "clip"]
    with pytest.raises(ModelNotFound, match="'nope' not found.*'small', 'clip', 'large'"):
        parse({"id": 1, "query": "q", "documents": ["x"], "model": "nope"})
    with pytest.raises(InvalidInput, match="scores text pairs only"):
        parse({"id": 1, "query": "q", "documents": [image], "model": "large"})


def test_the_bulk_job_scores_each_row_with_its_model(model_dirs, tmp_path, cluster):
    # One job, run with --model large: a row that names no model takes it, a row's own name (or alias) wins.
    # (Without --model, a row goes to its modality's default: test_a_bulk_row_is_routed_as_a_request_is.)
    rows = [
        {"id": "default", "query": QUERY, "documents": DOCUMENTS},
        {"id": "small", "query": QUERY, "documents": DOCUMENTS, "model": "small"},
        {"id": "alias", "query": QUERY, "documents": DOCUMENTS, "model": "rerank-v3.5"},
        {"id": "unknown", "query": QUERY, "documents": DOCUMENTS, "model": "rerank-english-v2.0"},
    ]
    with open(tmp_path / "in.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    settings = many_settings(model_dirs)
    expected = {
        "small": direct.cross_encoder(model_dirs["cross_encoder"], QUERY, DOCUMENTS),
        "large": direct.cross_encoder(model_dirs["cross_encoder_2"], QUERY, DOCUMENTS),
    }
    with pytest.raises(SystemExit, match="--model: model 'nope' not found"):
        run(Options(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out3"), model="nope"), settings)

    run(Options(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), model="large"), settings)
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    scores = {r["id"]: [s for _, s in sorted((x["index"], x["raw_score"]) for x in r["results"])] for r in table}
    assert scores["default"] == pytest.approx(expected["large"], abs=1e-4)
    assert scores["small"] == pytest.approx(expected["small"], abs=1e-4)
    assert scores["alias"] == pytest.approx(expected["small"], abs=1e-4)
    (error,) = [
        json.loads(line) for line in (tmp_path / "out" / "errors" / "part-00000.jsonl").read_text().splitlines()
    ]
    assert error["id"] == "unknown" and "not found" in error["error"] and "large" in error["error"]


def test_the_shared_pool_cannot_be_made_to_thrash_nor_to_pull_from_a_hub(model_apps):
    """A model that served recently is not evicted (503 + Retry-After instead), a failed load is not tried again
    on every call (backoff), and a model that is not on the node is refused before anything is evicted."""
    with httpx.Client(base_url=model_apps["thrash"], timeout=120) as client:

        def post(model: str) -> httpx.Response:
            return client.post("/v2/rerank", json={"model": model, "query": QUERY, "documents": DOCUMENTS})

        def replica() -> dict:
            (info,) = client.get("/v1/models").json()["pools"]["shared"]["replicas"]
            return info

        failed = post("t-broken")
        assert failed.status_code == 503 and failed.json()["error"]["type"] == "pool_unavailable", failed.text
        assert replica()["failed_loads"] == 1
        again = post("t-broken")  # not loaded again on every call: refused until load_backoff_s has passed
        assert again.status_code == 503 and 0 < int(again.headers["retry-after"]) <= 600, again.text
        assert "load_backoff_s" in again.json()["message"] and replica()["failed_loads"] == 1

        hub = post("t-hub")  # never fetched at request time
        assert hub.status_code == 503 and "not on this node" in hub.json()["message"], hub.text
        assert replica()["failed_loads"] == 2 and replica()["loads"] == 0

        assert post("t-a").status_code == 200 and post("t-b").status_code == 200
        refused = post("t-c")  # would evict t-a, which served a moment ago
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "model_unavailable", refused.text
        assert 0 < int(refused.headers["retry-after"]) <= 600 and "keep_resident_s" in refused.json()["message"]
        info = replica()
        assert [m["name"] for m in info["loaded"]] == ["t-a", "t-b"] and info["evictions"] == 0
        assert post("t-a").status_code == 200  # and the resident models still serve
