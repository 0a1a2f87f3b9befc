"""serve_app/static/playground.html in a real browser (headless Chromium through Selenium), against a stand-in API.

No Ray: a tiny FastAPI app under uvicorn, mounted under the prefix /pg (as a Serve route prefix would put it),
serves the page at /pg/playground and answers /pg/v1/models and /pg/v2/rerank, scoring each document by word
overlap with the query and requiring X-API-Key. Checked: the page calls the API relative to its own URL; without
a key the 401's `message` shows in #error and the model list keeps only "(default)"; with the key the model list
fills, the request has the shape the API takes (strategy, raw_scores, no model), and the ranking the page shows
(data-index order, data-score, 3-decimal scores) is the stand-in's, with the balanced threshold line drawn over the
bars at 0.55 and the time taken in #elapsed; the key is not stored in localStorage, cookies or the URL; an added
document row with an image goes out as {"text", "image": data URI} and comes back as a thumbnail. A screenshot of
the page ranking with the default model's real weights goes to $PLAYGROUND_SCREENSHOT.

Chromium and chromedriver must be installed (Debian: apt-get install chromium chromium-driver; `make chromium`):
a missing binary fails here rather than skipping.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from serve_app.api import page_headers
from serve_app.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "serve_app" / "static" / "playground.html"
# docs/api.md's picture: PLAYGROUND_SCREENSHOT=bench/results/playground.png renews it; by default a temporary file.
SCREENSHOT = Path(os.environ.get("PLAYGROUND_SCREENSHOT", Path(tempfile.gettempdir()) / "playground.png"))
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PREFIX = "/pg"
KEY = "playground-key-0123456789"
UNAUTHORIZED = "missing or wrong API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
THRESHOLDS = {"strict": (0.75, False), "balanced": (0.55, True), "explore": (0.4, False)}
MODELS = [
    {"id": "stand-in-text", "object": "model", "aliases": ["text"], "modality": "text", "default_for": "text"},
    {"id": "stand-in-vision", "object": "model", "aliases": [], "modality": "image-text", "default_for": None},
]

QUERY = "red apple pie recipe"
DOCUMENTS = ["apple pie", "a recipe for red apple jam", "recipe for red apple pie with cinnamon"]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def overlap(query: str, document: str) -> float:
    """The stand-in's score: the share of the query's words that the document has."""
    asked = words(query)
    return round(len(asked & words(document)) / len(asked), 4) if asked else 0.0


def text_of(content: str | dict) -> str:
    return content if isinstance(content, str) else content.get("text") or ""


def ranking(query: str | dict, documents: list, strategy: str | None) -> list[tuple[int, float]]:
    """(index, score) best first, kept by the strategy's threshold as the service keeps them."""
    scored = [(i, overlap(text_of(query), text_of(d))) for i, d in enumerate(documents)]
    if strategy:
        value, inclusive = THRESHOLDS[strategy]
        scored = [(i, s) for i, s in scored if (s >= value if inclusive else s > value)]
    return sorted(scored, key=lambda pair: (-pair[1], pair[0]))


def unauthorized() -> JSONResponse:
    body = {"message": UNAUTHORIZED, "error": {"type": "unauthorized", "message": UNAUTHORIZED, "field": None}}
    return JSONResponse(body, status_code=401)


def stand_in(received: list[dict]) -> FastAPI:
    """The API the page talks to, mounted under PREFIX; every rerank body that passes the key lands in `received`."""
    api = FastAPI()

    @api.get("/playground")
    async def playground() -> HTMLResponse:  # no key: a browser must be able to load the page
        page = PAGE.read_text(encoding="utf-8")  # under the service's own policy: the page must work within it
        return HTMLResponse(page, headers=page_headers(page))

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        if request.headers.get("x-api-key") != KEY:
            return unauthorized()
        return JSONResponse({"object": "list", "data": MODELS})

    @api.post("/v2/rerank")
    async def rerank(request: Request) -> JSONResponse:
        if request.headers.get("x-api-key") != KEY:
            return unauthorized()
        body = await request.json()
        received.append(body)
        ranked = ranking(body["query"], body["documents"], body.get("strategy"))
        results = [{"index": i, "relevance_score": s, "raw_score": round(8 * s - 4, 4)} for i, s in ranked]
        return JSONResponse({"results": results, "meta": {"model": "stand-in-text", "pairs": len(body["documents"])}})

    app = FastAPI()
    app.mount(PREFIX, api)
    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, list[dict]]]:
    received: list[dict] = []
    port = free_port()
    config = uvicorn.Config(stand_in(received), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, name="playground-stand-in", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the stand-in API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}{PREFIX}/playground", received
    uvicorn_server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not installed, so the playground page cannot be tested in a browser. "
            "`make chromium` installs them (Debian: apt-get install chromium chromium-driver).",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: webdriver.Chrome, url: str) -> WebDriverWait:
    driver.get(url)  # a fresh load: whatever the last test typed (the key included) is gone
    wait = WebDriverWait(driver, 10)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#documents .document")) == 3)
    return wait


def fill(driver: webdriver.Chrome, query: str, documents: list[str]) -> None:
    driver.find_element(By.ID, "query").send_keys(query)
    rows = driver.find_elements(By.CSS_SELECTOR, "#documents .document")
    for row, text in zip(rows, documents, strict=True):
        row.find_element(By.CSS_SELECTOR, "textarea.document-text").send_keys(text)


def model_options(driver: webdriver.Chrome) -> list[str]:
    """The model list's values, read in one script: the page replaces the options each time a fetch of /v1/models
    answers (one per change of the key, so several may be in flight), and an option read one by one from here may
    be gone before its value is (a StaleElementReferenceException, seen in a busy CI run)."""
    return driver.execute_script("return [...document.getElementById('model').options].map((o) => o.value);")


def test_without_key_the_401_message_shows(browser, server):
    url, received = server
    before = len(received)
    wait = open_page(browser, url)
    fill(browser, QUERY, DOCUMENTS)
    browser.find_element(By.ID, "rank").click()
    error = wait.until(ec.visibility_of_element_located((By.ID, "error")))
    wait.until(lambda d: UNAUTHORIZED in error.text)
    assert "401" in error.text
    assert browser.find_elements(By.CSS_SELECTOR, "#results .result") == []
    assert model_options(browser) == [""], "without a key /v1/models answers 401: only (default) is offered"
    assert len(received) == before, "the stand-in scored a request that had no key"


def test_ranks_with_key_and_strategy(browser, server):
    url, received = server
    wait = open_page(browser, url)
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    # The model list is fetched again once the key changes (401 before it): (default), then each id.
    wait.until(lambda d: model_options(d) == ["", *(m["id"] for m in MODELS)])
    fill(browser, QUERY, DOCUMENTS)
    Select(browser.find_element(By.ID, "strategy")).select_by_value("balanced")
    browser.find_element(By.ID, "rank").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))

    sent = received[-1]
    assert sent == {
        "query": QUERY,
        "documents": DOCUMENTS,
        "return_documents": False,
        "raw_scores": True,
        "strategy": "balanced",
    }, "no model or instruction_template was chosen, so neither is sent"

    expected = ranking(QUERY, DOCUMENTS, "balanced")
    assert [i for i, _ in expected] == [2, 1], "the data should rank two documents and drop one (0.5 < 0.55)"
    items = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    shown = [(int(item.get_attribute("data-index")), float(item.get_attribute("data-score"))) for item in items]
    assert shown == expected
    for rank, (item, (index, score)) in enumerate(zip(items, expected), start=1):
        assert item.find_element(By.CSS_SELECTOR, ".rank").text == str(rank)
        assert item.find_element(By.CSS_SELECTOR, ".score").text.splitlines()[0] == f"{score:.3f}"
        assert DOCUMENTS[index] in item.find_element(By.CSS_SELECTOR, ".doc").text
        track = item.find_element(By.CSS_SELECTOR, ".bar-track").rect
        bar = item.find_element(By.CSS_SELECTOR, ".bar").rect
        assert bar["width"] == pytest.approx(score * track["width"], abs=2)

    # One line at the threshold, over the bar column of every row.
    line = browser.find_element(By.CSS_SELECTOR, ".threshold-line")
    assert line.is_displayed()
    assert float(line.get_attribute("data-threshold")) == 0.55
    line_rect = line.rect
    tracks = [item.find_element(By.CSS_SELECTOR, ".bar-track").rect for item in items]
    for track in tracks:
        assert line_rect["x"] == pytest.approx(track["x"] + 0.55 * track["width"], abs=3)
    assert line_rect["y"] <= tracks[0]["y"] and line_rect["y"] + line_rect["height"] >= tracks[-1]["y"]

    assert re.fullmatch(r"\d+ ms", browser.find_element(By.ID, "elapsed").text)
    assert not browser.find_element(By.ID, "error").is_displayed()

    stored = browser.execute_script("return JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
    assert KEY not in stored and KEY not in browser.execute_script("return document.cookie")
    assert KEY not in browser.current_url


def test_added_row_with_an_image(browser, server, tmp_path):
    url, received = server
    wait = open_page(browser, url)
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    picture = tmp_path / "red.png"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    picture.write_bytes(buffer.getvalue())

    fill(browser, QUERY, ["", "", "apple pie"])  # empty rows are not sent
    browser.find_element(By.ID, "add-document").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "#documents .document")
    assert len(rows) == 4
    rows[3].find_element(By.CSS_SELECTOR, "textarea.document-text").send_keys("red apple pie")
    rows[3].find_element(By.CSS_SELECTOR, "input.document-image").send_keys(str(picture))
    wait.until(lambda d: rows[3].find_element(By.CSS_SELECTOR, ".image-pick img").get_attribute("src"))
    browser.find_element(By.ID, "rank").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 2)

    sent = received[-1]
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert sent["documents"] == ["apple pie", {"text": "red apple pie", "image": image}]
    assert "strategy" not in sent
    items = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert [item.get_attribute("data-index") for item in items] == ["1", "0"]  # 0.75, then 0.5
    assert items[0].find_element(By.CSS_SELECTOR, ".doc img").get_attribute("src") == image
    assert browser.find_elements(By.CSS_SELECTOR, ".threshold-line") == [], "no strategy, no threshold line"


def test_the_page_ranks_through_the_service(browser, apps, guarded):
    """The page served by the application itself (no key needed for the page), with the API key on: the ranking it
    shows is the service's own answer to the same request."""
    from tests.conftest import GUARDED_KEYS

    query = "what is the capital of france"
    documents = ["paris is the capital of france", "a red car in the rain", "berlin is a city in germany"]
    wait = open_page(browser, f"{apps['guarded']}/playground")
    browser.find_element(By.ID, "api-key").send_keys(GUARDED_KEYS[0])
    wait.until(lambda d: len(model_options(d)) > 1)  # the key opened /v1/models: its models are offered
    fill(browser, query, documents)
    Select(browser.find_element(By.ID, "strategy")).select_by_value("explore")
    browser.find_element(By.ID, "rank").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result") or d.find_element(By.ID, "error").text)
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    items = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    shown = [(int(item.get_attribute("data-index")), float(item.get_attribute("data-score"))) for item in items]
    body = {"query": query, "documents": documents, "strategy": "explore"}
    expected = [(r["index"], r["relevance_score"]) for r in guarded.post("/v2/rerank", json=body).json()["results"]]
    assert [i for i, _ in shown] == [i for i, _ in expected]
    assert [s for _, s in shown] == pytest.approx([s for _, s in expected], abs=1e-9)
    assert re.fullmatch(r"\d+ ms", browser.find_element(By.ID, "elapsed").text)


def test_the_screenshot_shows_the_default_models_real_ranking(browser, apps, beta):
    """The picture in docs/api.md: the page on `beta`, whose text model is the default one with its real weights
    (packaged), ranking the README's request. The answer ranks first, as the service ranks it."""
    query = "What is the capital of France?"
    documents = [
        "Paris is the capital and largest city of France.",
        "The Eiffel Tower was finished in 1889.",
        "Bananas are rich in potassium.",
    ]
    wait = open_page(browser, f"{apps['beta']}/playground")
    wait.until(lambda d: len(model_options(d)) > 1)
    fill(browser, query, documents)
    browser.find_element(By.ID, "rank").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result") or d.find_element(By.ID, "error").text)
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    shown = [
        int(item.get_attribute("data-index")) for item in browser.find_elements(By.CSS_SELECTOR, "#results .result")
    ]
    body = {"query": query, "documents": documents}
    assert shown == [r["index"] for r in beta.post("/v2/rerank", json=body).json()["results"]]
    assert shown[0] == 0 and len(shown) == 3, "the real default model ranks the answer first"
    browser.execute_script("window.scrollTo(0, 0)")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))


def test_the_index_links_the_playground_and_neither_needs_the_key(apps):
    import httpx

    index = httpx.get(f"{apps['guarded']}/", timeout=30)
    assert index.status_code == 200 and 'href="/guarded/playground"' in index.text
    playground = httpx.get(f"{apps['guarded']}/playground", timeout=30)
    assert playground.status_code == 200
    assert httpx.get(f"{apps['guarded']}/v1/models", timeout=30).status_code == 401  # the API still needs it
    for page in (index, playground):  # its own script only, this origin only, never in a frame, no sniffing
        policy = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
        assert "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
        assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
