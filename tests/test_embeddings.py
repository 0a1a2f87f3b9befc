"""Embeddings from the pools that hold the models (`/v1/embeddings`, `/v2/embed`), through the client libraries
their users call: the `openai` SDK and the `cohere` SDK. The default text model's vectors equal
sentence-transformers' `encode`; an image embeds through the image-text pool, in the space its scores use; a model
that scores pairs together answers 422 naming the models that embed."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.test_dialects import png_bytes

TEXTS = ["paris is the capital of france", "a red car", "the capital of france is paris", "a red car"]


def default_text_model(client: httpx.Client) -> tuple[str, Path]:
    """The served name of the app's default text model and a local copy of its weights."""
    from serve_app.scoring.loading import resolve_model_dir

    listed = client.get("/v1/models").json()
    name = next(m["id"] for m in listed["data"] if m["default_for"] == "text")
    return name, resolve_model_dir(listed["pools"]["text"]["model"], Path(tempfile.mkdtemp()))


def model_named(client: httpx.Client, modality: str) -> str:
    return next(m["id"] for m in client.get("/v1/models").json()["data"] if m["default_for"] == modality)


def test_the_openai_sdk_gets_the_default_models_sentence_transformers_embeddings(apps, beta):
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    name, local = default_text_model(beta)
    client = OpenAI(api_key="unused-here", base_url=f"{apps['beta']}/v1")
    answer = client.embeddings.create(model=name, input=TEXTS)  # the SDK asks for base64 and decodes it
    got = np.array([d.embedding for d in sorted(answer.data, key=lambda d: d.index)])
    expected = SentenceTransformer(str(local), device="cpu").encode(TEXTS)
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the model card's Normalize module
    assert answer.usage.prompt_tokens > len(TEXTS)
    floats = beta.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "float"}).json()
    assert np.abs(np.array(floats["data"][0]["embedding"]) - expected[0]).max() < 1e-5  # a string, the default


def test_the_cohere_sdk_embeds_in_each_type(apps, beta):
    import cohere

    name, _ = default_text_model(beta)
    client = cohere.ClientV2(api_key="unused-here", base_url=apps["beta"])
    answer = client.embed(
        model=name,
        texts=TEXTS,
        input_type="search_document",
        embedding_types=["float", "int8", "uint8", "binary", "ubinary"],
    )
    floats = np.array(answer.embeddings.float_)
    plain = beta.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "float"}).json()["data"]
    assert np.abs(floats - np.array([d["embedding"] for d in plain])).max() < 1e-6
    # Fixed scales (a text's codes do not depend on its neighbours); off by one only where float32 rounding meets .5.
    for codes, expected in ((answer.embeddings.int8, floats * 127), (answer.embeddings.uint8, (floats + 1) * 127.5)):
        assert np.abs(np.array(codes) - expected).max() <= 0.5 + 1e-3
    signs = np.packbits(floats > 0, axis=-1).astype(int)
    assert np.array_equal(np.array(answer.embeddings.ubinary), signs)
    assert np.array_equal(np.array(answer.embeddings.binary), signs - 128)
    assert answer.texts == TEXTS and floats[1].tolist() == floats[3].tolist()  # a repeated text, the same vector


def test_an_image_embeds_through_the_image_text_pool_in_the_space_its_scores_use(alpha):
    """On the dual encoder, the rerank raw score of a text query against an image is the dot of their embeddings."""
    clip = model_named(alpha, "image_text")
    image = "data:image/png;base64," + base64.b64encode(png_bytes(3)).decode()
    embedded = alpha.post("/v2/embed", json={"model": clip, "images": [image], "embedding_types": ["float"]})
    assert embedded.status_code == 200, embedded.text
    text = alpha.post("/v2/embed", json={"model": clip, "texts": ["a noisy picture"]}).json()
    (image_vector,), (text_vector,) = embedded.json()["embeddings"]["float"], text["embeddings"]["float"]
    ranked = alpha.post(
        "/v2/rerank", json={"query": "a noisy picture", "documents": [{"image": image}], "raw_scores": True}
    ).json()
    assert ranked["results"][0]["raw_score"] == pytest.approx(float(np.dot(image_vector, text_vector)), abs=1e-4)
    parts = {"inputs": [{"content": [{"type": "image_url", "image_url": {"url": image}}]}]}  # Cohere's inputs
    no_model = alpha.post("/v2/embed", json=parts).json()  # an image: the default image-text model embeds it
    assert np.abs(np.array(no_model["embeddings"]["float"][0]) - image_vector).max() < 1e-5


def test_a_model_that_scores_pairs_together_is_a_422_naming_the_models_that_embed(alpha):
    answer = alpha.post("/v1/embeddings", json={"input": ["a"]})  # alpha's default text model: a cross-encoder
    assert answer.status_code == 422
    assert "cross_encoder" in answer.json()["message"] and model_named(alpha, "image_text") in answer.json()["message"]


def test_embedding_limits_and_refusals(beta, apps):
    from serve_app.settings import Settings

    limits = Settings()
    too_many = beta.post("/v1/embeddings", json={"input": ["a"] * (limits.max_documents_per_request + 1)})
    assert too_many.status_code == 413 and "max_documents_per_request" in too_many.json()["message"]
    assert beta.post("/v1/embeddings", json={"input": []}).status_code == 422
    assert beta.post("/v1/embeddings", json={"input": ["a", " "]}).json()["error"]["field"] == "input[1]"
    long = " ".join(["word"] * 2000)
    assert beta.post("/v2/embed", json={"texts": [long], "truncate": "NONE"}).status_code == 413
    cut = beta.post("/v2/embed", json={"texts": [long], "truncate": "END"})
    assert cut.status_code == 200
    assert beta.post("/v2/embed", json={"texts": ["a"], "truncate": "START"}).status_code == 422
    both = beta.post("/v2/embed", json={"texts": ["a"], "images": ["x"]})
    assert both.status_code == 422 and "exactly one" in both.json()["message"]
    dims = len(cut.json()["embeddings"]["float"][0])
    assert beta.post("/v1/embeddings", json={"input": "a", "dimensions": dims}).status_code == 200
    assert beta.post("/v1/embeddings", json={"input": "a", "dimensions": dims - 1}).status_code == 422
    blip = beta.post("/v2/embed", json={"images": ["data:image/png;base64," + base64.b64encode(png_bytes(1)).decode()]})
    assert blip.status_code == 422 and "blip" in blip.json()["message"]  # beta's image-text model is BLIP ITM
    schema = httpx.get(f"{apps['beta']}/openapi.json", timeout=30).json()
    texts = schema["components"]["schemas"]["CohereEmbedRequest"]["properties"]["texts"]["anyOf"][0]
    assert texts["maxItems"] == limits.max_documents_per_request
