"""Repeated pairs never scored twice (setting score_cache_entries): a hit skips the pool, x-compute-pairs counts only
what was computed, /v1/stats counts hits and misses, the cache is bounded, and a redeploy that changes the model's
score map never serves an old score."""

from __future__ import annotations

import httpx
import pytest

from serve_app.catalog import Catalog
from serve_app.score_cache import ScoreCache
from serve_app.scoring.types import Content, Pair, Score
from serve_app.settings import Settings

QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "a red car", "berlin is the capital of germany", "the sea"]


def test_keys_tell_apart_everything_that_changes_a_score_and_the_cache_is_bounded(tmp_path):
    served = Catalog(Settings()).find(Catalog(Settings()).names()[0])
    cache = ScoreCache(entries=3)
    version = cache.version(served, "tokenizer-a")
    pair = Pair(Content(text="q"), Content(text="d"))
    key = cache.key(version, pair, (True, True))
    others = [
        cache.key(ScoreCache(3).version(served, "tokenizer-b"), pair, (True, True)),  # another tokenizer
        cache.key(version, Pair(Content(text="q"), Content(text="d"), instruction="i"), (True, True)),
        cache.key(version, Pair(Content(text="q"), Content(text="d"), max_tokens_per_doc=8), (True, True)),
        cache.key(version, pair, (False, True)),  # truncate off: a long document is refused, not cut
        cache.key(version, pair, (True, False)),  # cut, not windowed
        cache.key(version, Pair(Content(text="q "), Content(text="d")), (True, True)),
    ]
    assert len({key, *others}) == 1 + len(others)
    assert cache.key(version, Pair(Content(text="q", image=object()), Content(text="d")), (True, True)) is None
    keys = [cache.key(version, Pair(Content(text="q"), Content(text=str(i))), (True, True)) for i in range(5)]
    cache.put(keys, [Score(float(i), 0.5) for i in range(5)])
    assert cache.get(keys) == [None, None, Score(2.0, 0.5), Score(3.0, 0.5), Score(4.0, 0.5)]  # the last 3 kept
    assert cache.stats() | {"hit_rate": None} == {
        "entries": 3,
        "max_entries": 3,
        "hits": 3,
        "misses": 2,
        "hit_rate": None,
    }


def test_repeated_pairs_skip_the_pool_and_a_new_score_map_is_never_served_from_the_cache(serve_url, model_dirs):
    from tests.conftest import deploy, undeploy

    def app(scale: float) -> dict:
        return {
            "text": {"model": str(model_dirs["cross_encoder"]), "calibration": {"scale": scale}},
            "image_text": {"enabled": False},
            "score_cache_entries": 1000,
        }

    url = f"{serve_url}/cached"

    def rerank(documents: list[str], **more) -> tuple[dict[str, tuple[float, float]], int]:
        body = {"query": QUERY, "documents": documents, "raw_scores": True, **more}
        answer = httpx.post(f"{url}/v2/rerank", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        scores = {documents[r["index"]]: (r["raw_score"], r["relevance_score"]) for r in answer.json()["results"]}
        return scores, int(answer.headers["x-compute-pairs"])

    def cache() -> dict:
        return httpx.get(f"{url}/v1/stats", timeout=60).json()["score_cache"]

    deploy("cached", app(1.0))
    try:
        first, computed = rerank(DOCUMENTS)
        assert computed == 4 and cache()["misses"] == 4 and cache()["hits"] == 0
        again, computed = rerank(DOCUMENTS)
        assert computed == 0 and again == first and cache()["hits"] == 4  # nothing sent to the pool
        half, computed = rerank(DOCUMENTS[:2] + ["a blue car", "rome"])
        assert computed == 2 and {d: half[d] for d in DOCUMENTS[:2]} == {d: first[d] for d in DOCUMENTS[:2]}
        _, computed = rerank(DOCUMENTS, instruction="judge relevance")  # another pair as the model reads it
        assert computed == 4
        deploy("cached", app(3.0))  # the same name, another score map
        redeployed, computed = rerank(DOCUMENTS)
        assert computed == 4 and cache()["hits"] == 0  # a fresh ingress, an empty cache
        for document in DOCUMENTS:
            # The same raw score, up to what batching changes (a fresh replica may cut the 4 pairs into other
            # forwards, and float32 sums move: 1.2e-7 seen in a CI-like run) ...
            assert redeployed[document][0] == pytest.approx(first[document][0], abs=1e-5)
            if abs(first[document][0]) > 1e-3:
                assert redeployed[document][1] != first[document][1]  # ... through the new map
    finally:
        undeploy("cached")
