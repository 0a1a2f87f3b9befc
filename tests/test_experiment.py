"""A/B tests on a slice of traffic (setting experiment): each key keeps its variant, the variants hold their shares,
and each answer names its variant (header x-variant, meta.variant), ranked by its model and thresholds."""

from __future__ import annotations

import random

import httpx
import pytest

from serve_app.catalog import Catalog
from serve_app.experiment import CONTROL, Experiments, position
from serve_app.settings import Experiment, Settings


def experiments(**variant) -> Experiments:
    return Experiments(Experiment(variants=[{"name": "b", **variant}]), Catalog(Settings()))


def test_each_key_keeps_its_arm_and_the_arms_hold_their_shares():
    ab = experiments(share=0.2)
    keys = [f"user-{i}" for i in range(1000)]
    first = [ab.assign(key).name for key in keys]
    assert [ab.assign(key).name for key in keys] == first  # sticky: never moved between variants
    assert abs(first.count("b") / len(keys) - 0.2) < 0.03
    assert set(first) == {"b", CONTROL}
    salted = Experiments(Experiment(salt="round-2", variants=[{"name": "b", "share": 0.2}]), Catalog(Settings()))
    assert [salted.assign(key).name for key in keys] != first  # a new salt, a new draw
    random.seed(0)  # keyless requests are drawn at random with the same shares (seeded here)
    drawn = [ab.assign(None).name for _ in range(1000)]
    assert abs(drawn.count("b") / 1000 - 0.2) < 0.05
    assert ab.counts == {
        "b": first.count("b") * 2 + drawn.count("b"),
        CONTROL: 3000 - first.count("b") * 2 - drawn.count("b"),
    }


def test_an_experiment_that_cannot_be_served_is_refused_when_it_is_set():
    with pytest.raises(ValueError, match="sum to more than 1"):
        Experiment(variants=[{"name": "b", "share": 0.6}, {"name": "c", "share": 0.6}])
    with pytest.raises(ValueError, match="not `control`"):
        Experiment(variants=[{"name": "control", "share": 0.1}])
    with pytest.raises(ValueError, match="0..1"):
        Experiment(variants=[{"name": "b", "share": 0.1, "thresholds": {"strict": 2}}])
    from serve_app.errors import ModelNotFound

    with pytest.raises(ModelNotFound):
        experiments(share=0.1, model="nobody-serves-this")


def test_each_answer_names_its_arm_ranked_by_the_arms_model_and_thresholds(serve_url, model_dirs):
    from tests.conftest import deploy, undeploy

    model = str(model_dirs["cross_encoder"])
    deploy(
        "experiment",
        {
            "text": {"model": model, "name": "ranker"},
            "image_text": {"enabled": False},
            "models": [{"name": "challenger", "model": str(model_dirs["cross_encoder_2"])}],
            "experiment": {
                "key_header": "x-user-id",
                "variants": [{"name": "b", "share": 0.5, "model": "challenger", "thresholds": {"strict": 0.0}}],
            },
        },
    )
    url = f"{serve_url}/experiment"
    body = {"query": "capital of france", "documents": ["paris", "a red car", "berlin"], "strategy": "strict"}
    try:
        variants = {}
        for i in range(16):
            key = f"user-{i}"
            answer = httpx.post(f"{url}/v2/rerank", json=body, headers={"x-user-id": key}, timeout=60)
            assert answer.status_code == 200, answer.text
            variant = answer.headers["x-variant"]
            assert answer.json()["meta"]["variant"] == variant
            assert variant == ("b" if position(key, "") < 0.5 else CONTROL)  # the same place on every replica
            if variant == "b":  # the challenger ranks, and its strict threshold (0.0) keeps every document
                assert answer.json()["meta"]["models"] == {"challenger": 3} and len(answer.json()["results"]) == 3
            else:
                assert answer.json()["meta"]["models"] == {"ranker": 3}
                assert all(r["relevance_score"] > 0.75 for r in answer.json()["results"])
            again = httpx.post(f"{url}/v1/rerank", json=body, headers={"x-user-id": key}, timeout=60)
            assert again.headers["x-variant"] == variant  # sticky, on every dialect
            variants[key] = variant
        assert set(variants.values()) == {"b", CONTROL}
        named = {**body, "model": "ranker"}  # a request naming its model keeps it, in either variant
        for key in variants:
            answer = httpx.post(f"{url}/v2/rerank", json=named, headers={"x-user-id": key}, timeout=60).json()
            assert answer["meta"]["models"] == {"ranker": 3}
        counts = httpx.get(f"{url}/v1/stats", timeout=60).json()["variants"]
        assert sum(counts.values()) == 16 * 3 and counts.get("b", 0) == 3 * list(variants.values()).count("b")
    finally:
        undeploy("experiment")
