"""Tokenizing text pairs without torch: what the ingress runs so that a pool replica receives token ids.

A text family's tokenizing (cross-encoder: query and document as one truncated pair; embedding: each text
alone) is written here once against the Rust tokenizer (`tokenizers`, no torch, no transformers). A pool
replica hands the ingress a `TokenizerSpec` (its own tokenizer, serialised, and its window), the ingress
builds a `TextEncoder` from it and sends `EncodedPair`s; the replica only pads, buckets and runs forwards.
The window and max_tokens_per_doc cuts are the same functions the families use, so the scores are too
(tests/test_tokenize.py holds both paths to 1e-6).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from serve_app.scoring.types import (
    Content,
    EncodedPair,
    Pair,
    PairTooLong,
    TooManyWindows,
    UnsupportedPair,
    WindowRule,
    Windows,
)


class Stopped(Exception):
    """Tokenizing was told to stop (the request's deadline passed, or its client went away)."""


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


# Pairs between two looks at the stop flag while documents are cut into windows (each takes its offsets).
STOP_CHECK_PAIRS = 32


def stop_if_asked(stop: StopFlag | None) -> None:
    if stop is not None and stop.is_set():
        raise Stopped("tokenizing stopped: the request ended")


# Families whose tokenizing this module reproduces exactly.
ENCODED_FAMILIES = ("cross_encoder", "embedding")
# Pairs per call into the Rust tokenizer: its Encodings (ids, offsets, masks) of a whole request's windows at
# once would take hundreds of MB for a maximal request; in chunks, only the packed ids stay.
ENCODE_CHUNK = 256
TOKEN = np.dtype("<i4")


def pack(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype=TOKEN).tobytes()


def unpack(packed: bytes) -> np.ndarray:
    return np.frombuffer(packed, dtype=TOKEN)


@dataclass(frozen=True)
class TokenizerSpec:
    """What tokenizing a text family's pairs needs, as plain data: the replica's own fast tokenizer
    (serialised JSON), the model's window and the side truncation cuts."""

    family: str  # one of ENCODED_FAMILIES
    tokenizer_json: str
    max_length: int
    truncation_side: str = "right"
    type_ids: bool = True  # whether the model takes token_type_ids (BERT does, RoBERTa does not)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Names this tokenizing exactly (its JSON, window, truncation and family): every encoded pair carries
        it, and a pool whose own differs (the model behind a name changed) refuses the pair's ids."""
        # The serialised tokenizer also holds the truncation and padding its last call set (warm-up, checks):
        # state, not what the tokenizer is (TextEncoder sets its own), so it is left out.
        tokenizer = {k: v for k, v in json.loads(self.tokenizer_json).items() if k not in ("truncation", "padding")}
        digest = hashlib.sha256(json.dumps(tokenizer, sort_keys=True).encode())
        digest.update(f"|{self.family}|{self.max_length}|{self.truncation_side}|{self.type_ids}".encode())
        return digest.hexdigest()[:16]


def check_ids(pairs: Sequence[EncodedPair], vocabulary: int, max_length: int) -> None:
    """Token ids a pool can read: whole int32s, each below the vocabulary, at most the window per sequence.
    UnsupportedPair otherwise (ids beyond the vocabulary raise in the embedding, or assert on a GPU)."""
    for i, pair in enumerate(pairs):
        for packed in (pair.ids, pair.type_ids, pair.second):
            if packed is None:
                continue
            if len(packed) % TOKEN.itemsize:
                raise UnsupportedPair(f"pair {i}: token ids are not whole int32s")
            ids = unpack(packed)
            if len(ids) > max_length or (len(ids) and (ids.min() < 0 or ids.max() >= vocabulary)):
                raise UnsupportedPair(
                    f"pair {i}: token ids outside this model's vocabulary ({vocabulary}) or window ({max_length})"
                )


def prefix_of(text: str, offsets: Sequence[tuple[int, int]], max_tokens: int) -> str:
    """The longest prefix of `text` holding at most `max_tokens` of its tokens (`offsets`: each token's span)."""
    if len(offsets) <= max_tokens:
        return text
    return text[: offsets[max_tokens - 1][1]]


# A query that leaves its document less than this share of the model's window (e.g. 4 of 512 tokens) would
# turn a short document into hundreds of windows: such a pair is truncated instead (or refused, truncate=false).
MIN_WINDOW_SHARE = 4


def worth_windows(budget: int, max_length: int) -> bool:
    """Whether a document with `budget` tokens beside its query may be cut into windows (else truncation)."""
    return budget >= max(2, max_length // MIN_WINDOW_SHARE)


def cut_windows(text: str, offsets: Sequence[tuple[int, int]], budget: int, rule: WindowRule) -> list[str] | None:
    """`text` as overlapping windows of `budget` tokens, consecutive windows sharing `rule.stride` tokens (at
    most half a window), at most `rule.per_document` of them (its first); None when it fits whole."""
    if len(offsets) <= budget:
        return None
    stride = min(rule.stride, budget // 2)  # a small window (CLIP's 77 tokens) still moves on by half of itself
    windows, start = [], 0
    while len(windows) < rule.per_document:
        end = min(start + budget, len(offsets))
        windows.append(text[offsets[start][0] : offsets[end - 1][1]])
        if end == len(offsets):
            break
        start += budget - stride
    return windows


def check_window_count(windows: Windows, rule: WindowRule) -> Windows:
    """The call's windows, or TooManyWindows when they are more than `rule.per_call` (before any is tokenized)."""
    if rule.per_call is not None and len(windows.pairs) > rule.per_call:
        raise TooManyWindows(
            f"the documents make {len(windows.pairs)} windows (long documents are scored as windows of the "
            f"model's length), more than the {rule.per_call} this request may score (setting "
            "max_windows_per_request); send fewer or shorter documents, or truncate=true with long_documents="
            "truncate"
        )
    return windows


def raise_if_too_long(lengths: Sequence[int], max_length: int, what: str) -> None:
    """PairTooLong naming how many `what`s (pairs, texts) exceed the model's window, and the first."""
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if not too_long:
        return
    first = too_long[0]
    raise PairTooLong(
        f"{len(too_long)} {what}(s) exceed the model's {max_length} tokens (first: {what} {first}, "
        f"{lengths[first]} tokens); shorten them or send truncate=true"
    )


def may_need_windows(text: str, budget: int) -> bool:
    """False when `text` surely fits `budget` tokens without counting: fewer tokens than UTF-8 bytes."""
    return budget >= 2 and 4 * len(text) > budget


class TextEncoder:
    """A text family's tokenizing, from a TokenizerSpec: checks, windows, token ids. Thread-safe: the two
    Rust tokenizers it holds are configured once (truncating and plain) and never changed per call."""

    def __init__(self, spec: TokenizerSpec) -> None:
        from tokenizers import Tokenizer

        if spec.family not in ENCODED_FAMILIES:
            raise ValueError(f"no ingress tokenizing for the {spec.family} family")
        self.spec = spec
        self.family = spec.family
        self.max_length = spec.max_length
        self.pair_input = spec.family == "cross_encoder"
        self.truncating = Tokenizer.from_str(spec.tokenizer_json)
        self.truncating.no_padding()
        self.truncating.enable_truncation(
            spec.max_length, stride=0, strategy="longest_first", direction=spec.truncation_side
        )
        self.plain = Tokenizer.from_str(spec.tokenizer_json)
        self.plain.no_padding()
        self.plain.no_truncation()
        for tokenizer in (self.truncating, self.plain):
            tokenizer.encode_special_tokens = True  # a "[SEP]" a client types is text, as in the family (family.py)

    # ---- the family's text rules (those of FamilyScorer, over the Rust tokenizer) ----

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return self.plain.encode(text, add_special_tokens=False).offsets

    def document_text(self, pair: Pair) -> str:
        text = pair.document.text
        if text is None or pair.needs_image_model:
            raise UnsupportedPair(f"a text {self.family} model scores text queries against text documents only")
        if pair.max_tokens_per_doc:
            text = prefix_of(text, self.offsets(text), pair.max_tokens_per_doc)
        return text

    def document_budget(self, pair: Pair) -> int:
        specials = self.plain.num_special_tokens_to_add(self.pair_input)
        if not self.pair_input:
            return self.max_length - specials
        return self.max_length - specials - len(self.plain.encode(pair.query_text(), add_special_tokens=False).ids)

    def windows(self, pairs: Sequence[Pair], rule: WindowRule | None, stop: StopFlag | None = None) -> Windows:
        """Each pair, its document cut to max_tokens_per_doc; with a `rule`, a long document as windows. Stops
        (Stopped) when `stop` is set."""
        expanded, owner, split = [], [], 0
        for i, pair in enumerate(pairs):
            if i % STOP_CHECK_PAIRS == 0:
                stop_if_asked(stop)
            text = self.document_text(pair)
            cut = None
            if rule is not None:
                budget = self.document_budget(pair)
                if worth_windows(budget, self.max_length) and may_need_windows(text, budget):
                    cut = cut_windows(text, self.offsets(text), budget, rule)
            if cut is None:
                expanded.append(replace(pair, document=Content(text=text), max_tokens_per_doc=None))
                owner.append(i)
                continue
            split += 1
            for window in cut:
                expanded.append(replace(pair, document=Content(text=window), max_tokens_per_doc=None))
                owner.append(i)
        windows = Windows(expanded, owner, split, len(pairs))
        return windows if rule is None else check_window_count(windows, rule)

    def check(self, pairs: Sequence[Pair]) -> None:
        """PairTooLong when a pair (truncate=false) exceeds the model's window, as the family's check says it."""
        queries = [pair.query_text() for pair in pairs]
        documents = [pair.document.text or "" for pair in pairs]
        if self.pair_input:
            lengths = [len(e.ids) for e in self.plain.encode_batch(list(zip(queries, documents)))]
        else:
            encoded = self.plain.encode_batch(queries + documents)
            lengths = [max(len(q.ids), len(d.ids)) for q, d in zip(encoded[: len(pairs)], encoded[len(pairs) :])]
        raise_if_too_long(lengths, self.max_length, "pair")

    def encode(self, pairs: Sequence[Pair], stop: StopFlag | None = None) -> list[EncodedPair]:
        """Token ids of pairs whose documents are already cut (see `windows`): one truncated sequence per pair
        (cross-encoder), or the query's and the document's ids (embedding); in chunks, each after a look at
        `stop`."""
        queries = [pair.query_text() for pair in pairs]
        documents = [pair.document.text or "" for pair in pairs]
        stamp = self.spec.fingerprint
        if self.pair_input:
            out = []
            for start in range(0, len(pairs), ENCODE_CHUNK):
                stop_if_asked(stop)
                chunk = list(zip(queries[start : start + ENCODE_CHUNK], documents[start : start + ENCODE_CHUNK]))
                out += [
                    EncodedPair(pack(e.ids), pack(e.type_ids) if self.spec.type_ids else None, tokenizer=stamp)
                    for e in self.truncating.encode_batch(chunk)
                ]
            return out
        distinct = list(dict.fromkeys(queries + documents))
        ids: dict[str, bytes] = {}
        for start in range(0, len(distinct), ENCODE_CHUNK):
            stop_if_asked(stop)
            chunk = distinct[start : start + ENCODE_CHUNK]
            ids.update((text, pack(e.ids)) for text, e in zip(chunk, self.truncating.encode_batch(chunk)))
        return [EncodedPair(ids[q], None, ids[d], stamp) for q, d in zip(queries, documents)]

    def prepare(
        self, pairs: Sequence[Pair], truncate: bool, rule: WindowRule | None, stop: StopFlag | None = None
    ) -> tuple[Windows, list[EncodedPair]]:
        """A call's pairs as the pool will score them: windows (or cut documents), checked, as token ids. Work
        goes in pieces, each after a look at `stop` (Stopped once it is set)."""
        windows = self.windows(pairs, rule, stop)
        if not truncate:
            stop_if_asked(stop)
            self.check(windows.pairs)
        return windows, self.encode(windows.pairs, stop)
