"""Strategies are promises kept per model: each model's thresholds come from its fitted score map (strict precision
>= 0.95, explore recall >= 0.95, balanced the best F1, on the held-out split), the fixed ones are only a fallback;
a request's strategy applies to each document its own model's threshold; /v1/models shows them."""

from __future__ import annotations

import json

import httpx
import numpy as np

from serve_app import score_fit
from serve_app.ranking import STRATEGIES, Threshold, model_strategies, per_document
from serve_app.schemas import ContentSpec, RerankJob
from serve_app.settings import PoolSettings


def labelled(seed: int = 3, n: int = 600) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Raw scores of a model whose relevant pairs spread widely: one fixed explore threshold misses many."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    raw = np.where(labels, rng.normal(1.0, 1.2, n), rng.normal(-1.5, 0.8, n))
    return raw, labels.astype(int), list(range(n))


def test_fitted_thresholds_keep_the_promises_a_fixed_threshold_breaks_on_the_held_out_split():
    raw, labels, groups = labelled()
    result = score_fit.fit(raw, labels, groups, seed=0)
    held = result.held_idx
    report = score_fit.report(raw[held], labels[held], result.score_map)
    fixed, fitted = report["strategies"], report["fitted_thresholds"]
    assert fixed["explore"]["after"]["recall"] < 0.95  # the fixed 0.4 breaks explore's promise here
    assert fitted["explore"]["recall"] >= 0.95 and fitted["strict"]["precision"] >= 0.95
    assert fitted["balanced"]["f1"] >= max(fixed[name]["after"]["f1"] for name in fixed) - 1e-9
    # The figures are those of the held-out pairs at that threshold, counted directly.
    probs = result.score_map.apply(raw[held])
    explore = fitted["explore"]
    kept = probs >= explore["threshold"] if explore["inclusive"] else probs > explore["threshold"]
    assert explore["recall"] == (kept & (labels[held] == 1)).sum() / (labels[held] == 1).sum()


def test_a_model_without_fitted_thresholds_falls_back_to_the_fixed_ones(tmp_path):
    path = tmp_path / "map.json"
    thresholds = {"strict": {"threshold": 0.9, "inclusive": False, "precision": 0.96, "recall": 0.4}, "explore": None}
    score_map = {"kind": "platt", "scale": 1, "shift": 0}
    path.write_text(json.dumps({"model": "m", "map": score_map, "thresholds": thresholds}))
    mine = model_strategies(PoolSettings(model="m", score_map=str(path)), "m")
    assert mine["strict"] == {**thresholds["strict"], "source": "fitted"}
    assert mine["explore"] == {"threshold": 0.4, "inclusive": False, "source": "fallback"}  # its promise not kept
    other = model_strategies(PoolSettings(model="another", score_map=str(path)), "another")
    assert {entry["source"] for entry in other.values()} == {"fallback"}  # a map fitted for another model
    overridden = model_strategies(PoolSettings(model="m", score_map=str(path), calibration={"scale": 2.0}), "m")
    assert overridden["strict"]["source"] == "fallback"  # the calibration setting replaces the map
    # One request, two models: each document gets its own model's threshold for the strategy.
    job = RerankJob(ContentSpec(text="q"), [ContentSpec(text=str(i)) for i in range(3)], threshold=STRATEGIES["strict"])
    models = {"m": mine, "another": other}
    assert per_document(job, {"m": [0, 2], "another": [1]}, models) == [
        Threshold(0.9, False, "strict"),
        Threshold(0.75, False, "strict"),
        Threshold(0.9, False, "strict"),
    ]
    explicit = RerankJob(ContentSpec(text="q"), [ContentSpec(text="d")], threshold=Threshold(0.3, True))
    assert per_document(explicit, {"m": [0]}, models) == [Threshold(0.3, True)]  # an explicit threshold stays


def test_a_strategy_applies_each_models_own_fitted_threshold_and_v1_models_shows_it(serve_url, model_dirs, tmp_path):
    from tests.conftest import deploy, undeploy

    model = str(model_dirs["cross_encoder"])
    fitted = {
        "strict": {"threshold": 0.02, "inclusive": False, "precision": 0.97, "recall": 0.5},
        "balanced": {"threshold": 0.01, "inclusive": True, "precision": 0.9, "recall": 0.8},
        "explore": None,  # not reachable on its labels: the fixed threshold
    }
    path = tmp_path / "fitted.json"
    # A Platt map centred far above the tiny model's raw scores: every relevance is small but above 0.02.
    score_map = {"kind": "platt", "scale": 1.0, "shift": 3.0}
    path.write_text(json.dumps({"model": model, "map": score_map, "labels": 100, "thresholds": fitted}))
    deploy(
        "strategies",
        {
            "text": {"model": model, "name": "fitted", "score_map": str(path)},
            "image_text": {"enabled": False},
            "models": [{"name": "unfitted", "model": model}],
        },
    )
    url = f"{serve_url}/strategies"
    documents = ["paris is the capital of france", "a red car", "berlin", "the sea"]

    def kept(model_name: str, strategy: str | None) -> dict[int, float]:
        body = {"model": model_name, "query": "capital of france", "documents": documents, "strategy": strategy}
        answer = httpx.post(f"{url}/v2/rerank", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        return {r["index"]: r["relevance_score"] for r in answer.json()["results"]}

    try:
        listed = {m["id"]: m["strategies"] for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]}
        assert listed["fitted"]["strict"] == {**fitted["strict"], "source": "fitted"}
        assert listed["fitted"]["explore"]["source"] == "fallback" and listed["fitted"]["explore"]["threshold"] == 0.4
        assert {entry["source"] for entry in listed["unfitted"].values()} == {"fallback"}
        everything = kept("fitted", None)
        assert all(0.02 < score < 0.4 for score in everything.values())  # the map puts them all in that band
        assert kept("fitted", "strict") == everything  # its own strict threshold (0.02) keeps them all ...
        assert kept("fitted", "explore") == {}  # ... the fixed explore one (> 0.4) none
        unfitted = kept("unfitted", None)
        assert kept("unfitted", "strict") == {i: s for i, s in unfitted.items() if s > 0.75}  # the fallback
    finally:
        undeploy("strategies")


def test_the_bulk_job_applies_each_models_own_threshold_as_the_service_does(tmp_path, monkeypatch):
    """A row of text and image documents with a strategy: each document's threshold is its model's (fitted for the
    text model, the fallback for the image model), and the shard's ranking keeps by them."""
    import base64
    import io

    import pyarrow as pa
    from PIL import Image

    from serve_app.bulk import Options as BulkOptions
    from serve_app.bulk import ShardResult, commit_shard, expand_shards, input_files, plan_shards
    from serve_app.scoring.types import Score
    from serve_app.settings import Settings

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "text.json"
    fitted = {"strict": {"threshold": 0.1, "inclusive": True, "precision": 0.95, "recall": 0.7}}
    score_map = {"kind": "platt", "scale": 1, "shift": 0}
    path.write_text(json.dumps({"model": "text-model", "map": score_map, "thresholds": fitted}))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    row = {"id": "r", "query": "q", "documents": ["a", {"image": image}, "b"], "strategy": "strict"}
    (tmp_path / "in.jsonl").write_text(json.dumps(row) + "\n")
    shards = pa.Table.from_pylist([vars(s) for s in plan_shards(input_files(tmp_path / "in.jsonl"), 256)])
    settings = Settings(text={"model": "text-model", "score_map": str(path)}, image_text={"model": "image-model"})
    kwargs = {"options": BulkOptions(input="in", output="out"), "settings": settings, "templates": {}}
    (header,) = expand_shards(shards, "rows", **kwargs).to_pylist()
    assert header["thresholds"] == [0.1, 0.75, 0.1] and header["thresholds_inclusive"] == [True, False, True]

    class Kept:
        rows: list = []

        def commit(self, shard, rows, errors):
            self.rows = rows

    result = ShardResult(rows=1, headers={0: header}, pairs={(0, 0): Score(0.0, 0.1), (0, 1): Score(0.0, 0.5),
                                                     (0, 2): Score(0.0, 0.05)})  # fmt: skip
    out = Kept()
    commit_shard(out, 0, result, set())
    assert [r["index"] for r in out.rows[0]["results"]] == [0]  # 0.1 >= 0.1 kept; 0.5 <= 0.75 and 0.05 < 0.1 not
