"""Each dialect through the client library its users call, pointed at the running service by its base URL: the
Cohere SDK (v2 rerank), LangChain's NVIDIARerank (NIM /v1/ranking), the mixedbread SDK (/v1/reranking) and
Haystack's text-embeddings-inference ranker (/rerank). Each answer must equal the same request sent as plain
HTTP: the client parsed what the service said, in the order it said it."""

from __future__ import annotations

import httpx
import pytest

QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "a red car", "berlin is the capital of germany"]


@pytest.fixture(scope="module")
def root(apps) -> str:
    """The service at the root path, as `make run` serves it (the session's alpha application, whose text model
    answers to "ranker" too): Haystack's ranker joins "/rerank" to its URL as an absolute path, so it reaches no
    service under a prefix."""
    return apps["alpha"]


def plain(url: str, path: str, body: dict) -> dict | list:
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_cohere_sdk_reranks(root):
    import cohere

    client = cohere.ClientV2(api_key="unused-here", base_url=root)
    answer = client.rerank(model="ranker", query=QUERY, documents=DOCUMENTS, top_n=2)
    expected = plain(root, "/v2/rerank", {"model": "ranker", "query": QUERY, "documents": DOCUMENTS, "top_n": 2})
    assert [(r.index, r.relevance_score) for r in answer.results] == [
        (r["index"], pytest.approx(r["relevance_score"], abs=1e-9)) for r in expected["results"]
    ]


def test_langchain_nvidia_rerank_reads_nim_rankings(root):
    from langchain_core.documents import Document
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    ranker = NVIDIARerank(base_url=f"{root}/v1", model="ranker", top_n=3)
    ranked = ranker.compress_documents(documents=[Document(page_content=d) for d in DOCUMENTS], query=QUERY)
    body = {"model": "ranker", "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCUMENTS]}
    expected = plain(root, "/v1/ranking", body)["rankings"]
    assert [(d.page_content, d.metadata["relevance_score"]) for d in ranked] == [
        (DOCUMENTS[r["index"]], pytest.approx(r["logit"], abs=1e-9)) for r in expected
    ]


def test_the_mixedbread_sdk_reranks_records_and_gets_them_back(root):
    from mixedbread import Mixedbread

    records = [{"id": f"row-{i}", "body": d, "meta": {"n": i}} for i, d in enumerate(DOCUMENTS)]
    client = Mixedbread(api_key="unused-here", base_url=root)
    answer = client.rerank(model="ranker", query=QUERY, input=records, rank_fields=["body"], top_k=2, return_input=True)
    body = {"model": "ranker", "query": QUERY, "input": records, "rank_fields": ["body"], "top_k": 2}
    expected = plain(root, "/v1/reranking", body)["data"]
    assert [(d.index, d.score) for d in answer.data] == [
        (r["index"], pytest.approx(r["score"], abs=1e-9)) for r in expected
    ]
    assert [d.input for d in answer.data] == [records[r["index"]] for r in expected]  # ids and metadata back


def test_haystacks_tei_ranker_reranks(root, monkeypatch):
    monkeypatch.setenv("HAYSTACK_TELEMETRY_ENABLED", "False")
    from haystack import Document
    from haystack.components.rankers import HuggingFaceTEIRanker

    ranker = HuggingFaceTEIRanker(url=root, top_k=2)
    ranked = ranker.run(query=QUERY, documents=[Document(content=d) for d in DOCUMENTS])["documents"]
    expected = plain(root, "/rerank", {"query": QUERY, "texts": DOCUMENTS})
    assert [(d.content, d.score) for d in ranked] == [
        (DOCUMENTS[r["index"]], pytest.approx(r["score"], abs=1e-9)) for r in expected[:2]
    ]
