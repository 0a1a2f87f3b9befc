"""Scorers against tiny random-weight models: family choice, raw scores vs. a direct forward, limits."""

from __future__ import annotations

import itertools
import json
import random

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BlipForImageTextRetrieval,
)

from serve_app.scoring.batching import length_groups
from serve_app.scoring.family import LoadOptions
from serve_app.scoring.loading import load_scorer
from serve_app.scoring.types import Content, ModelLoadError, Pair, PairTooLong, UnsupportedPair
from tests.tiny_models import build_blip, build_clip, build_cross_encoder, build_embedding, build_siglip

TOL = 1e-4
TINY_MAX_LENGTH = 64
QUERY = "what is the capital of france"
# Mixed lengths (one over the tiny models' 64 tokens), so scorers sort, regroup and truncate.
DOCUMENTS = [
    "paris is the capital and largest city of france",
    "cat",
    "the weather today is rain and sun " * 6,
    "berlin is the capital of germany",
    "a red car",
    "python is a fast language for machine learning and code search",
    "dog",
    "the largest river in the country",
]
LONG_DOCUMENT = "paris is the capital and largest city of france " * 10  # ~100 tokens


def text_pairs(query: str = QUERY, documents: list[str] = DOCUMENTS) -> list[Pair]:
    return [Pair(query=Content(text=query), document=Content(text=d)) for d in documents]


def make_image(color: tuple[int, int, int], size: tuple[int, int], seed: int) -> Image.Image:
    """A coloured image with some noise, so that images differ in more than their mean."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, color)
    for _ in range(size[0] * size[1] // 4):
        image.putpixel(
            (rng.randrange(size[0]), rng.randrange(size[1])),
            (rng.randrange(256), rng.randrange(256), rng.randrange(256)),
        )
    return image


IMAGES = [
    make_image((200, 30, 30), (40, 30), 1),
    make_image((20, 200, 40), (32, 64), 2),
    make_image((10, 20, 220), (70, 70), 3),
]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "cross_encoder_1": str(build_cross_encoder(root / "cross_encoder_1", num_labels=1)),
        "cross_encoder_2": str(build_cross_encoder(root / "cross_encoder_2", num_labels=2, seed=1)),
        "embedding": str(build_embedding(root / "embedding")),
        "clip": str(build_clip(root / "clip")),
        "siglip": str(build_siglip(root / "siglip")),
        "blip": str(build_blip(root / "blip")),
    }


@pytest.fixture(scope="module")
def scorers(tiny_dirs) -> dict:
    options = LoadOptions(max_tokens_per_forward=64)
    return {name: load_scorer(path, options) for name, path in tiny_dirs.items()}


def assert_close(actual: list[float], expected: list[float], tol: float = TOL) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert abs(a - e) <= tol, f"pair {i}: {a} != {e}"


def features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# --- family choice -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "family", "cls"),
    [
        ("cross_encoder_1", "cross_encoder", "CrossEncoderScorer"),
        ("cross_encoder_2", "cross_encoder", "CrossEncoderScorer"),
        ("embedding", "embedding", "EmbeddingScorer"),
        ("clip", "dual_encoder", "DualEncoderScorer"),
        ("siglip", "dual_encoder", "DualEncoderScorer"),
        ("blip", "blip_itm", "BlipItmScorer"),
    ],
)
def test_load_scorer_picks_family_from_config(scorers, tiny_dirs, name, family, cls):
    scorer = scorers[name]
    assert scorer.info.family == family
    assert type(scorer).__name__ == cls
    assert scorer.info.model == tiny_dirs[name]


# --- raw scores equal a direct transformers forward ----------------------------------------


def cross_encoder_logits(model_dir: str, pairs: list[Pair]) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = []
    with torch.no_grad():
        for pair in pairs:
            enc = tokenizer(
                pair.query_text(),
                pair.document.text,
                truncation=True,
                max_length=TINY_MAX_LENGTH,
                return_tensors="pt",
            )
            rows.append(model(**enc).logits[0])
    return torch.stack(rows)


def test_cross_encoder_one_label_raw_score_is_the_logit(scorers, tiny_dirs):
    pairs = text_pairs()
    expected = cross_encoder_logits(tiny_dirs["cross_encoder_1"], pairs)[:, 0].tolist()
    assert_close(scorers["cross_encoder_1"].score(pairs), expected)


def test_cross_encoder_two_label_raw_score_is_logit_difference(scorers, tiny_dirs):
    pairs = text_pairs()
    logits = cross_encoder_logits(tiny_dirs["cross_encoder_2"], pairs)
    assert_close(scorers["cross_encoder_2"].score(pairs), (logits[:, 1] - logits[:, 0]).tolist())


def test_cross_encoder_two_label_calibrated_is_softmax_positive_class(scorers, tiny_dirs):
    pairs = text_pairs()
    logits = cross_encoder_logits(tiny_dirs["cross_encoder_2"], pairs)
    scorer = scorers["cross_encoder_2"]
    relevance = [score.relevance for score in scorer.calibrate(scorer.score(pairs))]
    assert_close(relevance, torch.softmax(logits, dim=-1)[:, 1].tolist())


def test_embedding_raw_score_is_cosine_of_mean_pooled_embeddings(scorers, tiny_dirs):
    scorer = scorers["embedding"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["embedding"])
    model = AutoModel.from_pretrained(tiny_dirs["embedding"]).eval()

    def embed(text: str) -> torch.Tensor:
        enc = tokenizer(text, truncation=True, max_length=scorer.info.max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        mask = enc["attention_mask"][0].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(0) / mask.sum(), dim=-1)

    documents = DOCUMENTS + [LONG_DOCUMENT]
    pairs = text_pairs(documents=documents)
    query = embed(QUERY)
    expected = [float(query @ embed(d)) for d in documents]
    assert scorer.info.max_length == TINY_MAX_LENGTH
    assert_close(scorer.score(pairs), expected)


def dual_encoder_reference(model_dir: str, pad_to_max_length: bool):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    def embed_text(text: str) -> torch.Tensor:
        padding = "max_length" if pad_to_max_length else False
        enc = tokenizer(text, truncation=True, max_length=max_length, padding=padding, return_tensors="pt")
        with torch.no_grad():
            out = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return F.normalize(features(out)[0], dim=-1)

    def embed_image(image: Image.Image) -> torch.Tensor:
        pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixel_values)
        return F.normalize(features(out)[0], dim=-1)

    def embed(side: Content) -> torch.Tensor:
        parts = []
        if side.text is not None:
            parts.append(embed_text(side.text))
        if side.image is not None:
            parts.append(embed_image(side.image))
        return F.normalize(torch.stack(parts).mean(0), dim=-1)

    def cosine(pair: Pair) -> float:
        return float(embed(pair.query) @ embed(pair.document))

    return model, cosine


def image_text_pairs() -> list[Pair]:
    return [
        Pair(query=Content(text=QUERY), document=Content(image=IMAGES[0])),
        Pair(query=Content(text="a red car"), document=Content(image=IMAGES[1])),
        Pair(query=Content(text=QUERY), document=Content(text=DOCUMENTS[2])),
        Pair(query=Content(image=IMAGES[2]), document=Content(text="a blue house")),
        Pair(query=Content(text=QUERY), document=Content(text="paris")),
        Pair(query=Content(image=IMAGES[0]), document=Content(image=IMAGES[1])),
        Pair(query=Content(text="photo of a dog"), document=Content(text="a dog", image=IMAGES[2])),
        Pair(query=Content(text=QUERY), document=Content(text=LONG_DOCUMENT)),
    ]


def test_clip_raw_score_is_cosine_of_normalized_features(scorers, tiny_dirs):
    _, cosine = dual_encoder_reference(tiny_dirs["clip"], pad_to_max_length=False)
    pairs = image_text_pairs()
    assert_close(scorers["clip"].score(pairs), [cosine(p) for p in pairs])


def test_siglip_calibrated_is_sigmoid_of_scaled_cosine_plus_bias(scorers, tiny_dirs):
    model, cosine = dual_encoder_reference(tiny_dirs["siglip"], pad_to_max_length=True)
    pairs = image_text_pairs()
    cosines = torch.tensor([cosine(p) for p in pairs])
    scale, bias = model.logit_scale.detach().exp(), model.logit_bias.detach()
    expected = torch.sigmoid(scale * cosines + bias).flatten().tolist()
    scorer = scorers["siglip"]
    raw = scorer.score(pairs)
    assert_close(raw, cosines.tolist())
    assert_close([score.relevance for score in scorer.calibrate(raw)], expected)


def test_blip_raw_score_is_itm_match_probability(scorers, tiny_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["blip"])
    processor = AutoImageProcessor.from_pretrained(tiny_dirs["blip"])
    model = BlipForImageTextRetrieval.from_pretrained(tiny_dirs["blip"]).eval()
    pairs = [
        Pair(query=Content(text=QUERY), document=Content(image=IMAGES[0])),
        Pair(query=Content(image=IMAGES[1]), document=Content(text=DOCUMENTS[0])),
        Pair(query=Content(text="a red car"), document=Content(image=IMAGES[2])),
        Pair(query=Content(image=IMAGES[2]), document=Content(text="dog")),
        Pair(query=Content(text=DOCUMENTS[2]), document=Content(image=IMAGES[1])),
    ]
    expected = []
    for pair in pairs:
        image, text = (
            (pair.document.image, pair.query.text) if pair.document.image else (pair.query.image, pair.document.text)
        )
        enc = tokenizer(text, truncation=True, max_length=TINY_MAX_LENGTH, return_tensors="pt")
        pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            itm = model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                pixel_values=pixel_values,
                use_itm_head=True,
            ).itm_score
        expected.append(float(torch.softmax(itm, dim=-1)[0, 1]))
    assert_close(scorers["blip"].score(pairs), expected)


# --- what the caller asks of a pair --------------------------------------------------------


@pytest.mark.parametrize("name", ["cross_encoder_1", "embedding", "clip"])
def test_instruction_leads_the_query_text_and_changes_the_score(scorers, name):
    scorer = scorers[name]
    instruction = "judge whether the document is relevant"
    document = Content(text=DOCUMENTS[0])
    with_instruction = Pair(query=Content(text=QUERY), document=document, instruction=instruction)
    assert with_instruction.query_text() == f"{instruction} {QUERY}"
    spelled_out = Pair(query=Content(text=f"{instruction} {QUERY}"), document=document)
    plain = Pair(query=Content(text=QUERY), document=document)
    scores = scorer.score([with_instruction, spelled_out, plain])
    assert abs(scores[0] - scores[1]) <= TOL
    assert abs(scores[0] - scores[2]) > TOL


@pytest.mark.parametrize("name", ["cross_encoder_1", "embedding", "clip"])
def test_max_tokens_per_doc_cuts_the_document(scorers, name):
    scorer = scorers[name]
    # Each of these words is one token of the tiny vocabulary.
    document = "paris is the capital city of france"
    cut = Pair(query=Content(text=QUERY), document=Content(text=document), max_tokens_per_doc=3)
    manual = Pair(query=Content(text=QUERY), document=Content(text="paris is the"))
    full = Pair(query=Content(text=QUERY), document=Content(text=document))
    scores = scorer.score([cut, manual, full])
    assert abs(scores[0] - scores[1]) <= TOL
    assert abs(scores[0] - scores[2]) > TOL


def test_blip_max_tokens_per_doc_cuts_the_text_document(scorers):
    scorer = scorers["blip"]
    image = Content(image=IMAGES[0])
    cut = Pair(query=image, document=Content(text="paris is the capital city of france"), max_tokens_per_doc=3)
    manual = Pair(query=image, document=Content(text="paris is the"))
    scores = scorer.score([cut, manual])
    assert abs(scores[0] - scores[1]) <= TOL


@pytest.mark.parametrize("name", ["cross_encoder_1", "cross_encoder_2", "embedding", "clip", "blip"])
def test_check_refuses_too_long_pair_unless_truncating(scorers, name):
    scorer = scorers[name]
    assert scorer.info.max_length == TINY_MAX_LENGTH
    if name == "blip":
        pairs = [
            Pair(query=Content(image=IMAGES[0]), document=Content(text="paris")),
            Pair(query=Content(image=IMAGES[0]), document=Content(text=LONG_DOCUMENT)),
        ]
    else:
        pairs = text_pairs(documents=["paris", LONG_DOCUMENT])
    with pytest.raises(PairTooLong, match="64"):
        scorer.check(pairs, truncate=False)
    scorer.check(pairs, truncate=True)
    scorer.check(pairs[:1], truncate=False)
    assert len(scorer.score(pairs)) == 2


def test_check_refuses_text_over_siglip_limit_unless_truncating(scorers):
    scorer = scorers["siglip"]
    pairs = [Pair(query=Content(text=QUERY), document=Content(text=DOCUMENTS[0] * 3))]
    with pytest.raises(PairTooLong):
        scorer.check(pairs, truncate=False)
    scorer.check(pairs, truncate=True)


@pytest.mark.parametrize("name", ["cross_encoder_1", "cross_encoder_2", "embedding"])
def test_text_scorer_refuses_image_pair(scorers, name):
    scorer = scorers[name]
    pairs = [Pair(query=Content(text=QUERY), document=Content(image=IMAGES[0]))]
    with pytest.raises(UnsupportedPair):
        scorer.check(pairs, truncate=True)
    with pytest.raises(UnsupportedPair):
        scorer.score(pairs)


def test_blip_refuses_image_against_image(scorers):
    scorer = scorers["blip"]
    pairs = [Pair(query=Content(image=IMAGES[0]), document=Content(image=IMAGES[1]))]
    with pytest.raises(UnsupportedPair):
        scorer.check(pairs, truncate=True)
    with pytest.raises(UnsupportedPair):
        scorer.score(pairs)


# --- calibration ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cross_encoder_1", "cross_encoder_2", "embedding", "clip", "siglip", "blip"])
def test_calibrated_scores_are_in_unit_interval_and_monotone(scorers, name):
    scorer = scorers[name]
    pairs = image_text_pairs()[:2] if name == "blip" else text_pairs()
    raw = sorted(scorer.score(pairs)) + [-1e6, -50.0, -1.0, 0.0, 0.25, 0.5, 1.0, 50.0, 1e6]
    raw.sort()
    scored = scorer.calibrate(raw)
    assert [score.raw for score in scored] == raw
    calibrated = [score.relevance for score in scored]
    assert all(0.0 <= c <= 1.0 for c in calibrated)
    assert all(a <= b for a, b in zip(calibrated, calibrated[1:]))


# --- batching ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [1, 16, 64, 100, 10_000])
def test_length_groups_keeps_every_index_once_within_budget(max_tokens):
    rng = random.Random(max_tokens)
    lengths = [rng.randint(1, 80) for _ in range(200)]
    groups = length_groups(lengths, max_tokens)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert group
        # One over-long text still makes a group of its own.
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= max_tokens


def test_length_groups_of_nothing_is_empty():
    assert length_groups([], 64) == []


def padded_cost(groups: list[list[int]], lengths: list[int], forward_cost: int) -> int:
    return sum(forward_cost + len(g) * max(lengths[i] for i in g) for g in groups)


def test_free_forwards_mean_no_padding():
    lengths = [12, 40, 12, 7, 40, 40, 33, 7]
    groups = length_groups(lengths, 10_000, forward_cost_tokens=0)
    assert padded_cost(groups, lengths, 0) == sum(lengths)


def test_costly_forwards_make_one_group_within_budget():
    lengths = [12, 40, 12, 7, 40, 40, 33, 7]
    assert length_groups(lengths, 10_000, forward_cost_tokens=100_000) == [sorted(range(8), key=lengths.__getitem__)]
    # The budget still cuts: at most 2 pairs of width 40 per forward.
    assert all(len(g) * max(lengths[i] for i in g) <= 80 for g in length_groups(lengths, 80, 100_000))


@pytest.mark.parametrize("seed", range(5))
def test_length_groups_find_the_cheapest_cut(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(5, 400) for _ in range(9)]
    forward_cost = rng.choice([0, 50, 500, 5000])
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    # Brute force over every way to cut the sorted order into contiguous groups.
    cheapest = min(
        padded_cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, forward_cost)
        for k in range(len(order))
        for cuts in itertools.combinations(range(1, len(order)), k)
    )
    assert padded_cost(length_groups(lengths, 10**9, forward_cost), lengths, forward_cost) == cheapest


def test_scores_come_back_in_input_order(scorers):
    scorer = scorers["cross_encoder_1"]
    pairs = text_pairs()
    forward = scorer.score(pairs)
    backward = scorer.score(pairs[::-1])
    assert_close(backward[::-1], forward)
    one_by_one = [scorer.score([p])[0] for p in pairs]
    assert_close(forward, one_by_one)


# --- the packaged default model and load failures ------------------------------------------


def test_packaged_default_model_loads_real_weights_and_ranks(tmp_path):
    scorer = load_scorer("sentence-transformers/all-MiniLM-L6-v2", LoadOptions(cache_dir=tmp_path))
    assert scorer.info.family == "embedding"
    assert (tmp_path / "sentence-transformers--all-MiniLM-L6-v2" / "config.json").exists()
    relevant, unrelated = scorer.score(
        text_pairs(
            "What is the capital of France?",
            ["Paris is the capital and largest city of France.", "The cat sat on the mat."],
        )
    )
    assert relevant > unrelated
    assert relevant > 0.5


@pytest.fixture
def offline(monkeypatch):
    """No hub here: make transformers fail at once instead of retrying the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    ("model", "message"),
    [("/nonexistent/model/dir", "no such model directory"), ("no-such-org/no-such-model", "cannot load")],
)
def test_missing_model_gives_model_load_error(offline, model, message):
    with pytest.raises(ModelLoadError, match=message) as info:
        load_scorer(model, LoadOptions())
    assert model in str(info.value)


def test_directory_without_config_gives_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_scorer(str(tmp_path))


def test_unknown_architecture_gives_model_load_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="no scorer family"):
        load_scorer(str(tmp_path))


def test_broken_weights_give_model_load_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="as embedding"):
        load_scorer(str(tmp_path))


def test_scores_that_are_not_numbers_are_an_error_never_a_ranking(model_dirs, tmp_path):
    """A model whose output overflows (or whose weights are broken) gives NaN: it went out as `null` in a 200
    and ranked as if it meant something. Scoring a call refuses it, naming the model and the likely cause; the
    replica answers 500 model_fault for that call alone, and a bulk row fails with the reason."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from serve_app.errors import ModelFault
    from serve_app.scoring.call import finite, score_call
    from serve_app.scoring.types import NotFiniteScores, Score

    model = AutoModelForSequenceClassification.from_pretrained(model_dirs["cross_encoder"])
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model_dirs["cross_encoder"]).save_pretrained(tmp_path)
    scorer = load_scorer(str(tmp_path))
    pairs = [Pair(Content(text="q"), Content(text=d)) for d in ("paris", "the dog")]
    with pytest.raises(NotFiniteScores, match="dtype float32"):
        score_call(scorer, pairs, cap=8, rule=None)
    healthy = load_scorer(str(model_dirs["cross_encoder"]))
    assert len(score_call(healthy, pairs, cap=8, rule=None)) == 2
    with pytest.raises(NotFiniteScores):
        finite([Score(1.0, 0.7), Score(float("inf"), 1.0)], "m")
    assert ModelFault("x").status == 500
