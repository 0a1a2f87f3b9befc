"""Tokenizing in the ingress: token ids from scoring/text.py equal the families' own, and so do the scores.

The pool replica then receives EncodedPairs (asserted on its counters), tokenizes nothing, and answers what it
answered when it tokenized the text itself (tokenize_in=pool).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from serve_app.scoring.call import call_windows, score_call, window_rule
from serve_app.scoring.family import LoadOptions
from serve_app.scoring.loading import load_scorer
from serve_app.scoring.text import ENCODE_CHUNK, TextEncoder, pack, unpack
from serve_app.scoring.types import Content, EncodedPair, Pair, PairTooLong, WindowRule
from serve_app.settings import Settings

LONG = " ".join(f"word{i} the capital city of france is paris" for i in range(40))
# Odd text a hostile or careless client sends: combining marks, zero-width, RTL, CJK, emoji, controls.
DOCUMENTS = [
    "paris is the capital of france",
    "e\u0301te\u0301 a\u0300 paris",
    "zero\u200bwidth\u200djoin\ufeffbom",
    "\u202eright to left\u202c and back",
    "東京は日本の首都です",
    "snakes 🐍🐍 and code 💻 fast",
    "tabs\tand\nnewlines\r\nand \x00 nul",
    "   ",
    LONG,
    LONG + " " + LONG,
]


def pairs(documents=DOCUMENTS, query="capital of france?", **extra) -> list[Pair]:
    return [Pair(Content(text=query), Content(text=d), **extra) for d in documents]


@pytest.fixture(scope="module")
def scorers(model_dirs, tmp_path_factory):
    cache = tmp_path_factory.mktemp("tokenize-cache")
    return {
        "cross_encoder": load_scorer(str(model_dirs["cross_encoder"])),
        "cross_encoder_2": load_scorer(str(model_dirs["cross_encoder_2"])),
        "embedding": load_scorer(str(model_dirs["embedding"])),
        "minilm": load_scorer("sentence-transformers/all-MiniLM-L6-v2", LoadOptions(cache_dir=cache)),
    }


NAMES = ["cross_encoder", "cross_encoder_2", "embedding", "minilm"]


@pytest.fixture(scope="module")
def tokenize_apps(serve_url, model_dirs, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The module's application: "swap" serves a copy of the tiny cross-encoder that
    test_the_ingress_fetches_a_changed_tokenizer_... changes in place (the session's `spread` tokenizes in its
    pool)."""
    import shutil

    from tests.conftest import module_apps

    served = tmp_path_factory.mktemp("swap") / "model"
    shutil.copytree(model_dirs["cross_encoder"], served)
    specs = {
        # Health-checked every second: its killed replica is noticed (and replaced) within ~1 s, not Serve's 10 s.
        "swap": {"text": {"model": str(served), "health_check_period_s": 1}, "image_text": {"enabled": False}},
    }
    with module_apps(specs, serve_url) as urls:
        yield {**urls, "swap_model": str(served)}


def encoder_of(scorer) -> TextEncoder:
    spec = scorer.tokenizer_spec()
    assert spec is not None and spec.family == scorer.family
    return TextEncoder(spec)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("extra", [{}, {"instruction": "Given a question, find passages"}, {"max_tokens_per_doc": 7}])
def test_token_ids_equal_the_families_own(scorers, name, extra):
    scorer = scorers[name]
    given = pairs(**extra)
    windows, encoded = encoder_of(scorer).prepare(given, truncate=True, rule=None)
    assert windows.split == 0 and len(encoded) == len(given)
    assert all(isinstance(e, EncodedPair) for e in encoded)
    queries, documents = scorer.text_pairs(given)
    if scorer.family == "cross_encoder":
        expected = scorer.tokenizer(queries, documents, truncation=True, max_length=scorer.max_length)
        assert [unpack(e.ids).tolist() for e in encoded] == expected["input_ids"]
        assert [unpack(e.type_ids).tolist() for e in encoded] == expected["token_type_ids"]
    else:
        expected = scorer.tokenizer(queries + documents, truncation=True, max_length=scorer.max_length)["input_ids"]
        assert [unpack(e.ids).tolist() for e in encoded] == expected[: len(given)]
        assert [unpack(e.second).tolist() for e in encoded] == expected[len(given) :]


@pytest.mark.parametrize("name", ["cross_encoder", "embedding"])
def test_a_call_larger_than_a_tokenizer_chunk_keeps_its_order_at_four_bytes_a_token(scorers, name):
    scorer = scorers[name]
    given = pairs([f"{d} {i}" for i, d in enumerate(DOCUMENTS * 70)])
    assert len(given) > 2 * ENCODE_CHUNK
    _, encoded = encoder_of(scorer).prepare(given, truncate=True, rule=None)
    queries, documents = scorer.text_pairs(given)
    if scorer.family == "cross_encoder":
        expected = scorer.tokenizer(queries, documents, truncation=True, max_length=scorer.max_length)["input_ids"]
        packed = [e.ids for e in encoded]
    else:
        expected = scorer.tokenizer(documents, truncation=True, max_length=scorer.max_length)["input_ids"]
        packed = [e.second for e in encoded]
    assert [unpack(p).tolist() for p in packed] == expected
    assert [len(p) for p in packed] == [4 * len(ids) for ids in expected]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stride", [None, 0, 8])
def test_scores_are_identical_with_tokenizing_in_the_ingress_and_in_the_replica(scorers, name, stride):
    scorer = scorers[name]
    given = pairs(max_tokens_per_doc=None)
    # The replica's own path (scoring.call): its windows (when asked), its tokenizing, its forward; the best
    # window's score.
    rule = None if stride is None else WindowRule(stride)
    replica_windows = call_windows(scorer, given, rule, truncate=True)
    in_replica = [s.raw for s in score_call(scorer, given, len(replica_windows.pairs), rule)]
    windows, encoded = encoder_of(scorer).prepare(given, truncate=True, rule=rule)
    assert windows.owner == replica_windows.owner and windows.split == replica_windows.split
    if stride is not None:
        assert windows.split > 0 or scorer.max_length >= 256  # the tiny models' 64 tokens cut LONG
    in_ingress = [s.raw for s in windows.merge(scorer.calibrate(scorer.score(encoded)))]
    assert in_ingress == pytest.approx(in_replica, abs=1e-6)
    # A batch mixing both (another caller's text beside token ids) scores each the same.
    mixed = [e if i % 2 else p for i, (e, p) in enumerate(zip(encoded, windows.pairs))]
    assert scorer.score(mixed) == pytest.approx(scorer.score(windows.pairs), abs=1e-6)


@pytest.mark.parametrize("name", ["cross_encoder", "embedding"])
def test_too_long_without_truncation_is_refused_with_the_families_message(scorers, name):
    scorer = scorers[name]
    given = pairs(["short", LONG, "short too", LONG])
    with pytest.raises(PairTooLong) as in_replica:
        scorer.check(given, truncate=False)
    with pytest.raises(PairTooLong) as in_ingress:
        encoder_of(scorer).prepare(given, truncate=False, rule=None)
    assert str(in_ingress.value) == str(in_replica.value)
    assert "2 pair(s)" in str(in_ingress.value) and "pair 1" in str(in_ingress.value)


def test_image_families_keep_tokenizing_in_the_pool(model_dirs):
    assert load_scorer(str(model_dirs["clip"])).tokenizer_spec() is None


# ---- through the service ----------------------------------------------------------------------------------


def text_pool(client: httpx.Client) -> dict:
    return client.get("/v1/stats").json()["pools"]["text"][0]


def replicas(client: httpx.Client) -> dict[str, dict]:
    return {r["replica"]: r for r in client.get("/v1/stats").json()["pools"]["text"]}


def calls(client: httpx.Client) -> int:
    return sum(r["counters"]["calls"] for r in client.get("/v1/models").json()["pools"]["text"]["replicas"])


def test_token_ids_travel_to_the_pool_and_it_tokenizes_nothing(alpha, scorers):
    documents = DOCUMENTS[:8]
    before = text_pool(alpha)
    start = time.perf_counter()
    response = alpha.post(
        "/v2/rerank", json={"query": "capital of france?", "documents": documents, "raw_scores": True}
    )
    wall = time.perf_counter() - start
    assert response.status_code == 200, response.text
    after = text_pool(alpha)
    assert after["encoded_pairs"] - before["encoded_pairs"] == len(documents)
    assert after["tokenized_pairs"] == before["tokenized_pairs"]
    # The time it spent: forwards and padding, each within the request's own wall time.
    for key in ("forward_seconds", "prepare_seconds"):
        assert 0 < after[key] - before[key] < wall, key
    raw = {r["index"]: r["raw_score"] for r in response.json()["results"]}
    expected = scorers["cross_encoder"].score(pairs(documents))
    assert [raw[i] for i in range(len(documents))] == pytest.approx(expected, abs=1e-5)


def test_long_documents_cut_in_the_ingress_spread_over_calls_and_merge_to_their_best_window(alpha, scorers):
    scorer = scorers["cross_encoder"]
    body = {"query": "capital of france?", "documents": [LONG + " " + LONG, "paris"], "raw_scores": True}
    before = text_pool(alpha)
    response = alpha.post("/v2/rerank", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["meta"]["split_documents"] == 1
    windows = scorer.expand_windows(pairs(body["documents"]), window_rule(Settings()))
    assert len(windows.pairs) > 3
    assert text_pool(alpha)["encoded_pairs"] - before["encoded_pairs"] == len(windows.pairs)
    expected = [s.raw for s in windows.merge(scorer.calibrate(scorer.score(windows.pairs)))]
    raw = {r["index"]: r["raw_score"] for r in answer["results"]}
    assert [raw[0], raw[1]] == pytest.approx(expected, abs=1e-5)


def test_tokenize_in_pool_sends_text_and_scores_the_same(spread, alpha):
    textual = spread  # tokenize_in: pool
    body = {"query": "capital of france?", "documents": DOCUMENTS + [LONG + " " + LONG], "raw_scores": True}
    before, calls_before = replicas(textual), calls(textual)
    there = textual.post("/v2/rerank", json=body)
    after = replicas(textual)
    tokenized = {r: after[r]["tokenized_pairs"] - before[r]["tokenized_pairs"] for r in after}
    assert sum(tokenized.values()) == len(body["documents"])
    assert all(r["encoded_pairs"] == 0 for r in after.values())
    # 11 pairs over 2 running replicas: two calls, of 8 (min_pairs_per_call) and 3, which Serve's router
    # may give to both replicas at once.
    assert calls(textual) - calls_before == 2
    here = alpha.post("/v2/rerank", json=body)
    assert there.status_code == here.status_code == 200
    assert there.json()["meta"]["split_documents"] == here.json()["meta"]["split_documents"] == 3
    by_index = [{r["index"]: r["raw_score"] for r in a.json()["results"]} for a in (there, here)]
    # Equal up to what batching changes: the pairs may share a batch (and its padding) with other pairs
    # on one path and not on the other, and float32 sums move by ~1e-6 (1.2e-6 seen in CI). That the
    # ingress and the pool make the same token ids is exact, in the test above.
    assert [by_index[0][i] for i in range(len(body["documents"]))] == pytest.approx(
        [by_index[1][i] for i in range(len(body["documents"]))], abs=1e-5
    )


def test_a_too_long_pair_is_refused_by_the_ingress_with_413(alpha):
    response = alpha.post("/rerank", json={"query": "capital of france?", "texts": ["paris", LONG], "truncate": False})
    assert response.status_code == 413, response.text
    assert "pair 1" in response.json()["error"]["message"]


class SetAfter:
    """A stop flag that is set after `looks` looks at it (the deadline passing while tokenizing)."""

    def __init__(self, looks: int) -> None:
        self.looks, self.limit = 0, looks

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.limit


@pytest.mark.parametrize("name", ["cross_encoder", "embedding"])
@pytest.mark.parametrize("looks", [0, 2, 19, 21])  # 19 looks cut 600 documents: then it encodes
def test_tokenizing_stops_at_its_next_piece_of_work_once_told(scorers, name, looks):
    """The ingress tokenizes in a thread that the request's deadline or its client's going away cannot kill: it
    looks at a stop flag between pieces (32 documents cut into windows, 256 pairs encoded) and stops there."""
    from serve_app.scoring.text import Stopped

    encoder = encoder_of(scorers[name])
    given = pairs([LONG + f" {i}" for i in range(600)])  # windows, then ~thousands of pairs to encode
    stop = SetAfter(looks)
    with pytest.raises(Stopped):
        encoder.prepare(given, truncate=True, rule=WindowRule(8), stop=stop)
    assert stop.looks == looks + 1  # it stopped at the first look after the flag was set
    # Unset, the same work finishes.
    windows, encoded = encoder.prepare(given[:40], truncate=True, rule=WindowRule(8), stop=SetAfter(10**6))
    assert len(encoded) == len(windows.pairs) > 40


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_typed_as_text_stay_text_in_the_ingress_and_the_replica(scorers, name):
    """A document holding "[SEP]" (or "[CLS]", "</s>") would close the pair's segment if tokenized as the control
    token; it is the characters a client typed, on both paths, and the only special tokens are the tokenizer's
    own."""
    scorer = scorers[name]
    tokenizer = scorer.tokenizer
    typed = " ".join(t for t in (tokenizer.sep_token, tokenizer.cls_token, tokenizer.eos_token) if t)
    given = pairs([f"paris {typed} is the capital", "paris is the capital"])
    special = set(tokenizer.all_special_ids)
    _, encoded = encoder_of(scorer).prepare(given, truncate=True, rule=None)
    in_ingress = [unpack(e.ids).tolist() + (unpack(e.second).tolist() if e.second else []) for e in encoded]
    plain = [tokenizer(p.query_text(), p.document.text)["input_ids"] for p in given]
    if scorer.family == "embedding":
        plain = [tokenizer(p.query_text())["input_ids"] + tokenizer(p.document.text)["input_ids"] for p in given]
    assert in_ingress == plain  # the same ids on both paths
    own = sum(1 for i in plain[1] if i in special)
    assert sum(1 for i in plain[0] if i in special) == own  # the typed ones added none
    # And the typed tokens changed the text the model reads (they are not dropped either).
    assert len(plain[0]) > len(plain[1]) + 2


def test_encoded_pairs_carry_their_tokenizers_fingerprint_and_it_names_the_tokenizer(scorers):
    specs = {name: scorers[name].tokenizer_spec() for name in NAMES}
    names = ("cross_encoder", "embedding", "minilm")  # cross_encoder_2 shares cross_encoder's tokenizer files
    assert len({specs[name].fingerprint for name in names}) == 3  # another tokenizer, another fingerprint
    assert specs["cross_encoder_2"].fingerprint == specs["cross_encoder"].fingerprint
    shorter = replace(specs["cross_encoder"], max_length=specs["cross_encoder"].max_length - 1)
    assert shorter.fingerprint != specs["cross_encoder"].fingerprint  # another window: other ids
    _, encoded = encoder_of(scorers["cross_encoder"]).prepare(pairs(), truncate=True, rule=None)
    assert {e.tokenizer for e in encoded} == {specs["cross_encoder"].fingerprint}


def test_a_pool_refuses_token_ids_it_cannot_read():
    from serve_app.scoring.text import check_ids
    from serve_app.scoring.types import UnsupportedPair

    check_ids([EncodedPair(pack([1, 2, 99]), pack([0, 0, 1]))], vocabulary=100, max_length=3)
    for bad in (
        EncodedPair(pack([1, 2, 100])),  # beyond the vocabulary: an index error, or a device assert on a GPU
        EncodedPair(pack([1, -1])),
        EncodedPair(pack([1, 2, 3, 4])),  # longer than the window
        EncodedPair(pack([1, 2]) + b"\x00"),  # not whole int32s
        EncodedPair(pack([1]), None, pack([100])),  # the embedding's second text
    ):
        with pytest.raises(UnsupportedPair):
            check_ids([bad], vocabulary=100, max_length=3)


def test_a_pool_refuses_ids_from_another_tokenizer_and_ids_beyond_its_vocabulary(alpha, scorers, cluster):
    """After a redeploy changes the model behind a name, ids from the ingress' cached tokenizer would be scored as
    another model's (silently wrong) or index past its vocabulary (a 500, a device assert on a GPU). The pool
    names the stale tokenizer (503: the ingress fetches the new one and resends once) and refuses bad ids (422)."""
    from ray import serve

    from serve_app.errors import InvalidInput, StaleTokenizer

    pool = serve.get_deployment_handle("text_pool", app_name="alpha")
    encoder = encoder_of(scorers["cross_encoder"])
    _, encoded = encoder.prepare(pairs(["paris"]), truncate=True, rule=None)
    assert pool.score.remote(encoded).result(timeout_s=60).scores  # its own tokenizer: scored
    other = encoder_of(scorers["minilm"])  # its ids index a vocabulary ten times the tiny model's
    _, stale = other.prepare(pairs(["paris"]), truncate=True, rule=None)
    with pytest.raises(StaleTokenizer) as refused:
        pool.score.remote(stale).result(timeout_s=60)
    assert refused.value.status == 503 and refused.value.model
    beyond = [replace(encoded[0], ids=pack([0, len(scorers["cross_encoder"].tokenizer) + 5]))]
    with pytest.raises(InvalidInput, match="vocabulary"):
        pool.score.remote(beyond).result(timeout_s=60)


def test_the_ingress_fetches_a_changed_tokenizer_and_resends_once_after_the_model_behind_a_name_changed(
    tokenize_apps,
):
    """The model's directory changes under a running service (a volume updated in place) and its pool replica is
    replaced: the ingress still holds the old tokenizer. The pool refuses its ids (stale_tokenizer); the ingress
    fetches the pool's tokenizer again and resends within the request: the caller gets the new model's scores."""
    import json
    import os
    import signal

    from tests import direct

    url = tokenize_apps["swap"]
    served = Path(tokenize_apps["swap_model"])
    # 51 tokens with the query: one window at 64 tokens, windows at 32.
    body = {"query": "capital of france", "documents": ["paris is the capital", " ".join(["paris"] * 45)]}
    first = httpx.post(f"{url}/v2/rerank", json=body, timeout=60)  # the ingress holds the tokenizer now
    assert first.status_code == 200 and first.json()["meta"]["split_documents"] == 0
    config = served / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 32}))  # a new window
    (replica,) = httpx.get(f"{url}/v1/models", timeout=60).json()["pools"]["text"]["replicas"]
    os.kill(replica["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the replacement runs with the new tokenizer
        replicas = httpx.get(f"{url}/v1/models", timeout=60).json()["pools"]["text"]["replicas"]
        if [r["max_length"] for r in replicas if r["pid"] != replica["pid"] and r["available"]] == [32]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the replaced pool replica never ran")
    answer = httpx.post(f"{url}/v2/rerank", json={**body, "raw_scores": True}, timeout=60)
    assert answer.status_code == 200, answer.text  # not a 503 stale_tokenizer: refetched and resent
    assert answer.json()["meta"]["split_documents"] == 1  # cut by the new tokenizer's window in the ingress
    raw = {r["index"]: r["raw_score"] for r in answer.json()["results"]}
    assert raw[0] == pytest.approx(direct.cross_encoder(served, body["query"], body["documents"][:1])[0], abs=1e-4)
