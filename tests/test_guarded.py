"""An application with small limits, an API key and an image-text model that cannot load."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import GUARDED_KEYS, b64, noise_image


def test_api_key_is_required_on_rerank_and_models(apps):
    with httpx.Client(base_url=apps["guarded"], timeout=30) as anonymous:
        assert anonymous.post("/v2/rerank", json={"query": "q", "documents": ["a"]}).status_code == 401
        assert anonymous.get("/v1/models").status_code == 401
        wrong = anonymous.post(
            "/v2/rerank", json={"query": "q", "documents": ["a"]}, headers={"Authorization": "Bearer no"}
        )
        assert wrong.status_code == 401
        for key in GUARDED_KEYS:  # both keys of a rotation work
            right = anonymous.post(
                "/v2/rerank", json={"query": "q", "documents": ["a"]}, headers={"Authorization": f"Bearer {key}"}
            )
            assert right.status_code == 200
        prefix = anonymous.post(
            "/v2/rerank", json={"query": "q", "documents": ["a"]}, headers={"X-API-Key": GUARDED_KEYS[0][:-1]}
        )
        assert prefix.status_code == 401


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
def test_the_schema_and_its_page_need_the_key_too(apps, guarded, path):
    assert httpx.get(f"{apps['guarded']}{path}", timeout=30).status_code == 401
    answer = guarded.get(path)
    assert answer.status_code == 200
    if path == "/openapi.json":
        # Served under Serve's route prefix: "try it out" must call the prefixed routes.
        assert answer.json()["servers"] == [{"url": "/guarded"}] and "/v2/rerank" in answer.json()["paths"]
    else:
        assert "/guarded/openapi.json" in answer.text


def test_health_needs_no_key_and_names_the_unavailable_pool(apps):
    response = httpx.get(f"{apps['guarded']}/health", timeout=30)
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "degraded"
    assert health["pools"]["text"]["status"] == "ok"
    assert health["pools"]["image_text"]["status"] == "unavailable"
    # Unauthenticated: says why in words, without the model path, addresses or ids (those are in the log).
    reason = health["pools"]["image_text"]["reason"]
    assert "did not load" in reason and "no-such-model" not in reason and "/" not in reason


def test_liveness_asks_the_process_only(apps):
    response = httpx.get(f"{apps['guarded']}/health/live", timeout=30)
    assert response.status_code == 200 and response.json() == {"status": "alive"}


def test_models_says_why_a_pool_is_unavailable(guarded):
    image_text = guarded.get("/v1/models").json()["pools"]["image_text"]
    assert image_text["available"] is False
    assert "no-such-model" in image_text["reason"]


def test_image_request_to_an_unavailable_pool_gets_503_naming_the_setting(guarded):
    response = guarded.post("/v2/rerank", json={"query": "q", "documents": [{"image": b64(noise_image((8, 8), 0))}]})
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "RERANK_IMAGE_TEXT__MODEL" in message
    assert "no-such-model" not in message and "/tmp" not in message  # local paths: in /v1/models, behind the key
    assert guarded.post("/v2/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200


@pytest.mark.parametrize(
    ("body", "field", "setting"),
    [
        ({"query": "q", "documents": ["a"] * 6}, "documents", "max_documents_per_request"),
        ({"query": "q", "documents": ["a" * 201]}, "documents[0]", "max_text_chars"),
        ({"query": "q" * 201, "documents": ["a"]}, "query", "max_text_chars"),
        (
            {"query": "q", "documents": [{"image": b64(noise_image((28, 28), 1))}]},
            "documents[0].image",
            "max_image_bytes",
        ),
    ],
)
def test_over_a_limit_gets_413_naming_field_and_setting(guarded, body, field, setting):
    response = guarded.post("/v2/rerank", json=body)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert setting in error["message"]


@pytest.mark.parametrize("chunked", [False, True])
def test_request_body_over_the_limit_gets_413(guarded, chunked):
    body = (json.dumps({"query": "q", "documents": ["a"]}) + " " * 5000).encode()
    content = iter([body[:2000], body[2000:]]) if chunked else body  # chunked: no Content-Length
    response = guarded.post("/v2/rerank", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "max_request_bytes" in response.json()["error"]["message"]
    assert guarded.post("/v2/rerank", json={"query": "q", "documents": ["a"]}).status_code == 200


def test_two_label_cross_encoder_scores_are_softmax_of_the_positive_class(guarded, model_dirs):
    from tests import direct

    documents = ["paris is the capital", "a red car"]
    answer = guarded.post("/v2/rerank", json={"query": "capital", "documents": documents, "raw_scores": True}).json()
    expected = direct.cross_encoder(model_dirs["cross_encoder_2"], "capital", documents)
    import math

    for result in answer["results"]:
        assert result["raw_score"] == pytest.approx(expected[result["index"]], abs=1e-4)
        assert result["relevance_score"] == pytest.approx(1 / (1 + math.exp(-expected[result["index"]])), abs=1e-4)


def test_the_schema_carries_the_limits_this_service_enforces(guarded):
    schemas = guarded.get("/openapi.json").json()["components"]["schemas"]
    documents = schemas["RerankRequest"]["properties"]["documents"]
    assert documents["maxItems"] == 5  # max_documents_per_request
    assert {"type": "string", "maxLength": 200} in documents["items"]["oneOf"]  # max_text_chars
    assert {"type": "string", "maxLength": 200} in schemas["ContentIn"]["properties"]["text"]["anyOf"]
    assert schemas["TeiRerankRequest"]["properties"]["texts"]["maxItems"] == 5
    # 2048 image bytes (max_image_bytes) in base64, with room for a data URI's header.
    (image,) = [b for b in schemas["ContentIn"]["properties"]["image"]["anyOf"] if b.get("type") == "string"]
    assert 2732 <= image["maxLength"] <= 2732 + 256
    # Every limit by its setting's name, those no field's bounds can say included.
    limits = guarded.get("/openapi.json").json()["info"]["x-limits"]
    assert limits["max_documents_per_request"] == 5 and limits["max_request_bytes"] == 4096
    assert limits["max_windows_per_request"] == 4096 and limits["max_windows_per_document"] == 32
    assert limits["calls_in_flight_per_replica"] == 2 and limits["shared_pool.keep_resident_s"] == 10.0
    # And what it says holds: one document over the documented count is refused.
    over = guarded.post("/v2/rerank", json={"query": "q", "documents": ["a"] * 6})
    assert over.status_code == 413 and over.json()["error"]["field"] == "documents"


def raw_request(
    base_url: str, path: str, headers: dict[str, str], body: bytes, wait_s: float, method: str = "POST"
) -> tuple[int, float]:
    """Send the headers and `body` (a part of what Content-Length promises, or all), then wait for the status
    line: (status, seconds from the last byte sent to the answer)."""
    import socket
    import time
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    lines = [f"{method} {url.path}{path} HTTP/1.1", f"Host: {url.hostname}", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection((url.hostname, url.port), timeout=wait_s) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        sent = time.monotonic()
        answer = conn.recv(4096).decode(errors="replace")
    return int(answer.split(" ", 2)[1]), time.monotonic() - sent


def test_the_key_is_checked_before_the_body_is_read(apps):
    # A 4 KiB body promised, none sent: without the key the answer comes at once, not after the body.
    status, waited = raw_request(
        apps["guarded"], "/v2/rerank", {"Content-Type": "application/json", "Content-Length": "4000"}, b"", 8
    )
    assert status == 401 and waited < 2


def test_a_body_that_never_finishes_arriving_gets_408(apps):
    headers = {"Content-Type": "application/json", "Content-Length": "1000", "X-API-Key": GUARDED_KEYS[0]}
    status, waited = raw_request(apps["guarded"], "/v2/rerank", headers, b'{"query": "q", ', 10)
    assert status == 408 and waited < 6  # request_read_timeout_s is 2 here


@pytest.mark.parametrize(("method", "path"), [("POST", "/health"), ("POST", "/health/live"), ("GET", "/playground")])
def test_an_open_path_or_a_get_refuses_a_body_before_reading_it(apps, method, path):
    """No key is asked there, so nothing may be read: a promised body that never comes would hold the
    connection until the read timeout (it did: 408 after request_read_timeout_s), a large one would be read."""
    status, waited = raw_request(apps["guarded"], path, {"Content-Length": "1000"}, b"", 10, method)
    assert status == 413 and waited < 1.5  # request_read_timeout_s is 2 here
    assert httpx.get(f"{apps['guarded']}/health/live", timeout=30).status_code == 200  # without a body: as before
