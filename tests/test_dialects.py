"""Every client's dialect: long documents as windows, every image form, vLLM's /score, the answers' token counts
and timing headers, wide requests, and score parity with sentence-transformers."""

from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path

import httpx
import pytest

from serve_app.scoring.call import window_rule
from serve_app.scoring.loading import load_scorer, resolve_model_dir
from serve_app.scoring.types import Content, Logistic, Pair
from serve_app.settings import DEFAULT_TEXT_MODEL, Settings
from tests import direct
from tests.conftest import deploy, noise_image, undeploy

RULE = window_rule(Settings())
QUERY = "what is the capital of france"
FILLER = (
    "The old mill by the river ground wheat for the village bakers every autumn. Gardeners plant tulip bulbs "
    "before the first frost and mulch them with straw. A cyclist oils the chain and checks the brakes before a "
    "long ride. Violin strings are tuned in fifths and the bow is rosined before practice. "
)
RELEVANT = "Paris is the capital and the largest city of France, on the river Seine. "


def long_document(words: int) -> str:
    """About `words` words of filler with the one relevant sentence near the end."""
    filler = FILLER.split()
    body = " ".join(filler[i % len(filler)] for i in range(words - 30))
    return body + " " + RELEVANT + " ".join(filler[:25])


def rerank(client: httpx.Client, body: dict, path: str = "/v2/rerank") -> httpx.Response:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response


def raw_by_index(answer: dict) -> dict[int, float]:
    return {r["index"]: r["raw_score"] for r in answer["results"]}


def test_a_long_document_scores_as_its_best_window_and_outranks_a_short_irrelevant_one(beta):
    """The real default text model: a 5,000-word document whose answer sits near its end."""
    document = long_document(5000)
    assert len(document.split()) >= 5000
    documents = [document, "Bananas are rich in potassium and easy to peel."]
    answer = rerank(beta, {"query": QUERY, "documents": documents, "raw_scores": True}).json()
    assert [r["index"] for r in answer["results"]] == [0, 1]
    assert answer["meta"]["split_documents"] == 1

    # The windows the service scored, from the same code, each through a plain transformers forward.
    scorer = load_scorer(DEFAULT_TEXT_MODEL, _options())
    windows = scorer.windows(Pair(Content(text=QUERY), Content(text=document)), RULE)
    assert len(windows) > 10 and RELEVANT.split(",")[0] in windows[-1]
    model_dir = resolve_model_dir(DEFAULT_TEXT_MODEL, _options().cache_dir)
    expected = direct.embedding(model_dir, QUERY, windows, max_length=scorer.max_length)
    assert raw_by_index(answer)[0] == pytest.approx(max(expected), abs=1e-4)


def _options():
    from serve_app.scoring.family import LoadOptions

    return LoadOptions(cache_dir=Path(tempfile.gettempdir()) / "serve_app-test-models")


def test_windows_of_a_cross_encoder_match_direct_forwards_of_the_same_windows(alpha, model_dirs):
    document = long_document(300)  # the tiny model's window is 64 tokens
    answer = rerank(alpha, {"query": QUERY, "documents": [document, "the dog"], "raw_scores": True}).json()
    scorer = load_scorer(str(model_dirs["cross_encoder"]))
    windows = scorer.windows(Pair(Content(text=QUERY), Content(text=document)), RULE)
    assert len(windows) > 5
    expected = direct.cross_encoder(model_dirs["cross_encoder"], QUERY, windows)
    assert raw_by_index(answer)[0] == pytest.approx(max(expected), abs=1e-4)
    assert answer["meta"]["split_documents"] == 1
    # Windows overlap by the stride: each starts inside the one before.
    assert all(window.split()[0] in before for before, window in zip(windows, windows[1:]))


def test_nim_ranking_answers_every_passage_with_its_raw_logit_best_first(alpha, model_dirs):
    passages = ["paris is the capital of france", "a red car", long_document(300)]
    body = {"query": {"text": QUERY}, "passages": [{"text": p} for p in passages]}
    rankings = rerank(alpha, body, "/v1/ranking").json()["rankings"]
    assert sorted(r["index"] for r in rankings) == [0, 1, 2]
    assert [r["logit"] for r in rankings] == sorted((r["logit"] for r in rankings), reverse=True)
    expected = direct.cross_encoder(model_dirs["cross_encoder"], QUERY, passages)  # raw, the long one truncated
    assert {r["index"]: r["logit"] for r in rankings} == {i: pytest.approx(e, abs=1e-4) for i, e in enumerate(expected)}
    refused = alpha.post("/v1/ranking", json={**body, "truncate": "NONE"})  # NIM: NONE refuses what END cuts
    assert refused.status_code == 413, refused.text
    unknown = alpha.post("/v1/ranking", json={**body, "model": "nvidia/nv-rerankqa-mistral-4b-v3"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "model_not_found"


def test_records_are_scored_by_their_rank_fields_and_come_back_as_sent(alpha):
    """Documents as database rows: ids and metadata travel with them, the named fields are scored as `name: value`
    lines, and the answer echoes each record as it was sent."""
    records = [
        {"id": "a1", "title": "Paris", "body": "paris is the capital of france", "meta": {"year": 2024, "tags": None}},
        {"id": 7, "title": "Cars", "body": "a red car", "meta": {"year": 1999}},
    ]
    body = {"query": QUERY, "documents": records, "rank_fields": ["title", "body"], "raw_scores": True}
    answer = rerank(alpha, {**body, "return_documents": True}).json()
    echoed = {r["index"]: r["document"] for r in answer["results"]}
    assert echoed == {0: records[0], 1: records[1]}  # ids, metadata and nulls as sent
    rendered = [f"title: {r['title']}\nbody: {r['body']}" for r in records]
    plain = rerank(alpha, {"query": QUERY, "documents": rendered, "raw_scores": True}).json()
    assert raw_by_index(answer) == pytest.approx(raw_by_index(plain), abs=1e-6)
    # Without rank_fields: a record's `text`, or its only string field; more than one is a 422 naming rank_fields.
    only = rerank(alpha, {"query": QUERY, "documents": [{"id": 1, "body": "paris"}], "raw_scores": True}).json()
    alone = rerank(alpha, {"query": QUERY, "documents": ["paris"], "raw_scores": True}).json()
    assert raw_by_index(only) == pytest.approx(raw_by_index(alone), abs=1e-6)
    refused = alpha.post("/v2/rerank", json={"query": QUERY, "documents": records})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "rank_fields", refused.text
    # Limits count the rendered text.
    long = [{"id": i, "body": "x" * 60_000, "title": "y" * 60_000} for i in range(2)]
    too_long = alpha.post("/v2/rerank", json={"query": QUERY, "documents": long, "rank_fields": ["body", "title"]})
    assert too_long.status_code == 413 and "max_text_chars" in too_long.json()["message"], too_long.text


def test_tei_truncates_instead(alpha, model_dirs):
    document = long_document(300)
    ranks = rerank(alpha, {"query": QUERY, "texts": [document], "raw_scores": True}, "/rerank").json()
    (expected,) = direct.cross_encoder(model_dirs["cross_encoder"], QUERY, [document])  # truncated to the window
    assert ranks[0]["score"] == pytest.approx(expected, abs=1e-4)


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise_image((40, 30), seed).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_image_form_reaches_the_image_pool_with_the_same_score(alpha):
    data = base64.b64encode(png_bytes(7)).decode()
    uri = f"data:image/png;base64,{data}"
    documents = [
        {"image": data},  # Jina: base64
        {"image": uri},  # a data URI
        {"content": [{"type": "image_url", "image_url": {"url": uri}}]},  # vLLM's content parts
        {"content": [{"type": "image_url", "image_url": {"url": data}}]},
    ]
    answer = rerank(alpha, {"query": "a noisy picture", "documents": documents, "raw_scores": True}).json()
    assert answer["meta"]["pairs"] == {"image_text": 4}
    scores = list(raw_by_index(answer).values())
    assert max(scores) - min(scores) < 1e-6
    # The query as content parts: text parts joined, an image part as the query's image.
    query = {"content": [{"type": "text", "text": "a noisy"}, {"type": "text", "text": "picture"}]}
    same = rerank(alpha, {"query": query, "documents": documents[:1], "raw_scores": True}).json()
    plain = rerank(alpha, {"query": "a noisy\npicture", "documents": documents[:1], "raw_scores": True}).json()
    assert same["results"][0]["raw_score"] == pytest.approx(plain["results"][0]["raw_score"], abs=1e-6)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"content": [{"type": "image_url", "image_url": {"url": "x"}}] * 2}, "at most one image_url part"),
        ({"content": [{"type": "text"}]}, '"text" part takes `text`'),
        ({"content": [{"type": "text", "text": "a"}], "text": "b"}, "not both"),
        ({"content": []}, "at least 1"),
    ],
)
def test_malformed_content_parts_are_a_422_naming_the_fix(alpha, document, message):
    response = alpha.post("/v2/rerank", json={"query": "q", "documents": [document]})
    assert response.status_code == 422 and message in response.json()["message"]


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_vllm_score_answers_in_its_shape_and_order(alpha, path):
    documents = ["paris is the capital of france", "a red car", "the dog"]
    answer = rerank(alpha, {"model": None, "text_1": QUERY, "text_2": documents}, path).json()
    assert answer["object"] == "list" and answer["id"].startswith("score-") and isinstance(answer["created"], int)
    assert [d["index"] for d in answer["data"]] == [0, 1, 2] and {d["object"] for d in answer["data"]} == {"score"}
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 0
    cohere = rerank(alpha, {"query": QUERY, "documents": documents}).json()["results"]
    by_index = {r["index"]: r["relevance_score"] for r in cohere}
    # Batched with other pairs or alone: the same up to float32 padding noise.
    assert [d["score"] for d in answer["data"]] == pytest.approx([by_index[i] for i in range(3)], abs=1e-6)

    # Pairwise lists: each text_1 with its text_2; a vLLM client's extra fields are ignored.
    pairwise = {"text_1": [QUERY, "a red car"], "text_2": documents[:2], "user": "u-1", "encoding_format": "float"}
    scores = [d["score"] for d in rerank(alpha, pairwise, path).json()["data"]]
    one = rerank(alpha, {"text_1": "a red car", "text_2": "a red car"}, path).json()["data"][0]["score"]
    assert scores[0] == pytest.approx(by_index[0], abs=1e-6) and scores[1] == pytest.approx(one, abs=1e-6)

    mismatch = alpha.post(path, json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert mismatch.status_code == 422 and "give one text_1, or as many as text_2" in mismatch.json()["message"]


def test_answers_carry_real_tokens_and_timing_headers_that_add_up(alpha):
    body = {"query": QUERY, "documents": ["paris is the capital of france", "a red car", long_document(300)]}
    for path, request in [
        ("/v2/rerank", body),
        ("/v1/rerank", body),
        ("/rerank", {"query": QUERY, "texts": body["documents"]}),
        ("/score", {"text_1": QUERY, "text_2": body["documents"]}),
    ]:
        response = rerank(alpha, request, path)
        h = response.headers
        times = {name: int(h[f"x-{name}-time"]) for name in ("total", "queue", "tokenization", "inference")}
        assert all(value >= 0 for value in times.values()) and times["total"] > 0, path
        assert times["queue"] + times["inference"] <= times["total"], (path, times)
        assert times["queue"] + times["tokenization"] + times["inference"] <= times["total"], (path, times)
        pairs = int(h["x-compute-pairs"])
        assert pairs > 3 if path != "/rerank" else pairs == 3, (path, pairs)  # the long one is windowed, not on TEI
        assert int(h["x-compute-tokens"]) > pairs, path
    cohere = rerank(alpha, body).json()
    assert cohere["meta"]["tokens"]["input_tokens"] > 0 and cohere["meta"]["billed_units"] == {"search_units": 1}
    jina = rerank(alpha, body, "/v1/rerank").json()
    assert jina["usage"]["total_tokens"] == jina["meta"]["tokens"]["input_tokens"] > 0


def test_a_3000_document_request_is_answered_whole(serve_url, model_dirs):
    deploy(
        "wide",
        {
            "text": {"model": str(model_dirs["cross_encoder"]), "num_cpus": 0.5},
            "image_text": {"enabled": False},
            "max_documents_per_request": 3000,
            "request_timeout_s": 120,
        },
    )
    try:
        documents = [f"document {i} about {['rivers', 'capitals', 'cars', 'dogs'][i % 4]}" for i in range(3000)]
        with httpx.Client(base_url=f"{serve_url}/wide", timeout=180) as client:
            answer = rerank(client, {"query": QUERY, "documents": documents}).json()
        assert sorted(r["index"] for r in answer["results"]) == list(range(3000))
        assert answer["meta"]["pairs"] == {"text": 3000}
    finally:
        undeploy("wide")


def test_cross_encoder_scores_equal_sentence_transformers(alpha, model_dirs):
    from sentence_transformers import CrossEncoder

    pairs = [(QUERY, "paris is the capital of france"), (QUERY, "a red car in the rain"), ("dog", "the dog barks")]
    # One label: CrossEncoder.predict's default activation is the sigmoid, our calibrated score for the family.
    expected = CrossEncoder(str(model_dirs["cross_encoder"])).predict(pairs)
    for (query, document), want in zip(pairs, expected):
        answer = rerank(alpha, {"query": query, "documents": [document]}).json()
        assert answer["results"][0]["relevance_score"] == pytest.approx(float(want), abs=1e-5)
    # Two labels: predict gives logits (identity); our 0..1 score is their softmax's positive class, and our raw
    # score the logit difference.
    two = CrossEncoder(str(model_dirs["cross_encoder_2"])).predict(pairs)
    scorer = load_scorer(str(model_dirs["cross_encoder_2"]))
    ours = scorer.calibrate(scorer.score([Pair(Content(text=q), Content(text=d)) for q, d in pairs]))
    for logits, score in zip(two, ours):
        assert score.raw == pytest.approx(float(logits[1] - logits[0]), abs=1e-5)
        assert score.relevance == pytest.approx(Logistic()(float(logits[1] - logits[0])), abs=1e-5)


def test_embedding_scores_equal_sentence_transformers_cosine(model_dirs):
    from sentence_transformers import SentenceTransformer

    texts = ["paris is the capital of france", "a red car in the rain", "the dog barks"]
    model = SentenceTransformer(str(model_dirs["embedding"]))
    embeddings = model.encode([QUERY, *texts], normalize_embeddings=True, convert_to_tensor=True)
    cosines = (embeddings[1:] @ embeddings[0]).tolist()
    scorer = load_scorer(str(model_dirs["embedding"]))
    ours = scorer.calibrate(scorer.score([Pair(Content(text=QUERY), Content(text=t)) for t in texts]))
    for score, cosine in zip(ours, cosines):
        assert score.raw == pytest.approx(cosine, abs=1e-5)
        assert score.relevance == pytest.approx(Logistic(10.0, 0.5)(cosine), abs=1e-5)  # the family's documented map


def test_the_openapi_schema_shows_every_dialect_with_an_example(alpha):
    schema = alpha.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/v2/rerank", "/v1/rerank", "/rerank", "/score", "/v1/score"} <= set(paths)
    components = schema["components"]["schemas"]
    for name in ("RerankRequest", "TeiRerankRequest", "ScoreRequest", "ContentIn"):
        assert components[name].get("examples"), name
    assert "404" in paths["/v2/rerank"]["post"]["responses"] and "404" in paths["/score"]["post"]["responses"]


def windows_scored(client: httpx.Client) -> int:
    """The windows (and whole pairs) the text pool has scored from token ids the ingress sent."""
    return client.get("/v1/stats").json()["pools"]["text"][0]["encoded_pairs"]


def test_a_document_is_scored_over_at_most_max_windows_per_document(alpha):
    document = long_document(3000)  # ~100 windows of the tiny model's 64 tokens
    before = windows_scored(alpha)
    answer = rerank(alpha, {"query": QUERY, "documents": [document]}).json()
    assert answer["meta"]["split_documents"] == 1
    assert windows_scored(alpha) - before == Settings().max_windows_per_document == 32


def test_a_query_leaving_under_a_quarter_of_the_window_truncates_instead_of_windowing(alpha, model_dirs):
    """A ~55-token query against the tiny 64-token cross-encoder leaves its document a few tokens: windows of
    those would be hundreds per document (999 windows of one 2,000-character document, seen); truncated."""
    query = " ".join(["capital"] * 52)
    document = long_document(300)
    before = windows_scored(alpha)
    answer = rerank(alpha, {"query": query, "documents": [document], "raw_scores": True}).json()
    assert answer["meta"]["split_documents"] == 0 and windows_scored(alpha) - before == 1
    (expected,) = direct.cross_encoder(model_dirs["cross_encoder"], query, [document])  # truncated to the window
    assert raw_by_index(answer)[0] == pytest.approx(expected, abs=1e-4)
    # truncate=false: refused, as any pair over the window is.
    refused = alpha.post("/rerank", json={"query": query, "texts": [document], "truncate": False})
    assert refused.status_code == 413


def test_the_largest_windowed_request_is_refused_within_seconds_before_any_window_is_tokenized(alpha):
    """1,000 documents of ~20 windows each: over max_windows_per_request (4,096), refused with 413 naming it,
    from the windows counted on the tokenizer's offsets, not after encoding 20,000 windows."""
    import time

    documents = [long_document(600) + f" {i}" for i in range(1000)]
    start = time.monotonic()
    answer = alpha.post("/v2/rerank", json={"query": QUERY, "documents": documents})
    took = time.monotonic() - start
    print(f"refused in {took:.2f} s")
    assert answer.status_code == 413, answer.text
    assert "max_windows_per_request" in answer.json()["message"]
    assert took < 20  # generous for a loaded 2-core machine; the encoding it spares took ~20 s on its own


def test_the_largest_windowed_request_the_limits_let_through_is_answered_while_the_ingress_stays_live(alpha):
    """1,000 documents of 4 windows each: 4,000 windows, within max_windows_per_request (4,096), tokenized on the
    ingress' threads (not its event loop) and scored; /health/live answers throughout."""
    import threading
    import time

    import httpx

    documents = [long_document(30) + f" {i}" for i in range(1000)]
    done, slowest = threading.Event(), []

    def probe() -> None:
        with httpx.Client(base_url=str(alpha.base_url), timeout=30) as client:
            while not done.is_set():
                start = time.monotonic()
                assert client.get("/health/live").status_code == 200
                slowest.append(time.monotonic() - start)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        start = time.monotonic()
        answer = alpha.post("/v2/rerank", json={"query": QUERY, "documents": documents})
        took = time.monotonic() - start
    finally:
        done.set()
        prober.join()
    print(
        f"4,000 windows answered in {took:.2f} s; /health/live at most {max(slowest):.2f} s over {len(slowest)} probes"
    )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["results"]) == 1000 and answer.json()["meta"]["split_documents"] == 1000
    assert max(slowest) < 5  # a second when quiet (the figure above); room for a loaded 2-core machine


def test_a_pool_that_cuts_windows_keeps_its_share_of_the_request(model_dirs):
    """Where the pool cuts the windows (a family the ingress does not tokenize for), the call's rule bounds them
    the same way: at most per_document per document, and TooManyWindows past the call's share."""
    from serve_app.errors import InputTooLarge, as_request_errors
    from serve_app.scoring.call import call_windows
    from serve_app.scoring.types import WindowRule

    scorer = load_scorer(str(model_dirs["cross_encoder"]))
    pairs = [Pair(Content(text=QUERY), Content(text=long_document(3000))) for _ in range(3)]
    windows = call_windows(scorer, pairs, WindowRule(64, per_document=5, per_call=15), truncate=True)
    assert len(windows.pairs) == 15 and windows.owner == [0] * 5 + [1] * 5 + [2] * 5
    with pytest.raises(InputTooLarge, match="max_windows_per_request"), as_request_errors():
        call_windows(scorer, pairs, WindowRule(64, per_document=5, per_call=14), truncate=True)


def test_a_pairwise_score_as_large_as_the_limits_allow_is_one_request_and_answers(alpha, model_dirs):
    """1,000 pairs of 1,000 distinct queries: one job (one image budget, one admission, each model's pairs sent
    together), not 1,000 one-pair jobs each with its own budget, which an idle service refused with 503."""
    queries = [f"{word} {i}" for i, word in enumerate(["paris", "car", "dog", "river"] * 250)]
    documents = [f"the {word} document" for word in ["capital", "red", "animal", "water"] * 250]
    before = pool_calls(alpha)
    answer = rerank(alpha, {"text_1": queries, "text_2": documents}, "/score").json()
    assert [d["index"] for d in answer["data"]] == list(range(1000))
    assert pool_calls(alpha) - before <= 1000 // Settings().min_pairs_per_call  # calls of many pairs, not one each
    # Each pair is scored against its own query.
    raw = direct.cross_encoder(model_dirs["cross_encoder"], queries[7], [documents[7]])
    alone = rerank(alpha, {"query": queries[7], "documents": [documents[7]], "raw_scores": True}).json()
    assert alone["results"][0]["raw_score"] == pytest.approx(raw[0], abs=1e-4)
    assert answer["data"][7]["score"] == pytest.approx(alone["results"][0]["relevance_score"], abs=1e-5)


def pool_calls(client: httpx.Client) -> int:
    return client.get("/v1/models").json()["pools"]["text"]["counters"]["calls"]


def test_mixedbread_reranking_takes_records_strings_and_elasticsearch_images(alpha):
    records = [{"id": "a1", "title": "Paris", "body": "paris is the capital of france"}, "a red car"]
    body = {"query": QUERY, "input": records, "rank_fields": ["title", "body"], "top_k": 1, "return_input": True}
    answer = rerank(alpha, body, "/v1/reranking").json()
    assert answer["object"] == "list" and answer["top_k"] == 1 and answer["return_input"] is True
    assert answer["usage"]["total_tokens"] > 0 and answer["model"]
    (best,) = answer["data"]
    both = rerank(alpha, {**body, "top_k": 2}, "/v1/reranking").json()["data"]
    assert best == both[0] and both[0]["score"] >= both[1]["score"]
    assert {d["index"]: d["input"] for d in both} == {0: records[0], 1: records[1]}  # as sent
    image = {"type": "image", "format": "base64", "value": base64.b64encode(png_bytes(3)).decode()}
    pictured = rerank(alpha, {"query": QUERY, "input": ["paris", image]}, "/v1/reranking").json()
    assert sorted(d["index"] for d in pictured["data"]) == [0, 1]  # the image scored by the image-text pool
    assert alpha.post("/v1/reranking", json={"query": QUERY, "input": ["a"], "rewrite_query": True}).status_code == 422
