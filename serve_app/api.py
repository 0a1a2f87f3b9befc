"""The HTTP routes of the ingress: dialect models in, answers out; errors mapped to statuses in one place."""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Protocol

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute

from serve_app import embeddings, experiment
from serve_app.errors import ModelNotFound, Overloaded, RerankError, Unauthorized
from serve_app.schemas import (
    ErrorResponse,
    HealthResponse,
    MixedbreadRerankRequest,
    MixedbreadRerankResponse,
    NimRankingRequest,
    NimRankingResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    TeiRank,
    TeiRerankRequest,
    describe_errors,
)
from serve_app.settings import Settings

DESCRIPTION = (
    "Scores (query, document) pairs with text and image-text models and returns a ranking. "
    "Dialects: Cohere v2 (`/v2/rerank`), Jina (`/v1/rerank`), text-embeddings-inference (`/rerank`), vLLM "
    "(`/score`, `/v1/score`), NVIDIA NIM (`/v1/ranking`), mixedbread (`/v1/reranking`); embeddings in OpenAI's "
    "(`/v1/embeddings`) and Cohere's (`/v2/embed`) shapes. "
    "Every rerank answer carries TEI's timing headers (x-total-time, x-queue-time, "
    "x-tokenization-time, x-inference-time in ms; x-compute-tokens, x-compute-pairs). "
    "Documents may be strings or objects with `text` and/or `image` (base64, data URI, or an "
    "allow-listed URL). Thresholds: `strategy` strict (precision >= 0.95), balanced (best F1), explore (recall "
    ">= 0.95), each model's own threshold from its fitted score map (GET /v1/models; without one: > 0.75, >= 0.55, "
    "> 0.4), or an explicit `threshold`."
)


# Every error answer has one shape; the schema says so, and which statuses a route gives.
ERRORS: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        401: "API key missing or wrong (when `api_key` is set)",
        404: "`model` names no served model; the error lists the served names",
        413: "over a limit: body, documents, text, image bytes or pixels, or a pair too long with truncate=false",
        422: "invalid input: the message names the field and what to send instead",
        429: "refused for load, with overload_status 429: retry after `Retry-After` seconds",
        503: "a pool is unavailable or its queue is full; retry after `Retry-After` seconds",
        504: "the request took longer than `request_timeout_s`",
    }.items()
}


# The limits a request is held to, by their settings' names: the schema's `info.x-limits` states each value, also
# those no field's bounds can say (windows, pixels, time).
LIMITS = (
    "max_request_bytes",
    "request_read_timeout_s",
    "request_timeout_s",
    "max_documents_per_request",
    "max_text_chars",
    "max_image_bytes",
    "max_image_pixels",
    "max_request_pixels",
    "max_windows_per_document",
    "max_windows_per_request",
    "calls_in_flight_per_replica",
    "admission_wait_fraction",
    "deadly_input_deaths",
    "deadly_input_ttl_s",
    "shared_pool.keep_resident_s",
    "shared_pool.load_backoff_s",
)


def schema_with_limits(schema: dict, settings: Settings) -> dict:
    """The limits the service enforces, written into its schema (client generators and fuzzers read them)."""
    schema.setdefault("info", {})["x-limits"] = {
        name: functools.reduce(getattr, name.split("."), settings) for name in LIMITS
    }
    components = schema.get("components", {}).get("schemas", {})
    # base64 is 4 characters per 3 bytes; a data URI adds a short header.
    image_chars = -(-settings.max_image_bytes // 3) * 4 + 256

    def bound(node: dict, max_length: int) -> None:
        if node.get("type") == "string":
            node["maxLength"] = max_length
        for branch in [*node.get("anyOf", []), *node.get("oneOf", [])]:
            bound(branch, max_length)
        if node.get("type") == "array":
            node["maxItems"] = settings.max_documents_per_request
            bound(node.get("items", {}), max_length)

    fields = {
        "RerankRequest": ("query", "documents", "instruction"),
        "TeiRerankRequest": ("query", "texts"),
        "ContentIn": ("text",),
        "ContentPart": ("text",),
        "ScoreRequest": ("text_1", "text_2"),
        "NimContent": ("text",),
        "MixedbreadRerankRequest": ("query", "input"),
        "OpenAIEmbeddingRequest": ("input",),
        "CohereEmbedRequest": ("texts",),
    }
    for model, names in fields.items():
        properties = components.get(model, {}).get("properties", {})
        for name in names:
            if name in properties:
                bound(properties[name], settings.max_text_chars)
    images = (("ContentIn", "image"), ("ImageUrl", "url"), ("NimContent", "image"), ("CohereEmbedRequest", "images"))
    for model, name in images:
        image = components.get(model, {}).get("properties", {}).get(name)
        if image is not None:
            bound(image, image_chars)
    return schema


def error_body(kind: str, message: str, field: str | None, **more) -> dict:
    """`message` at the top, as Cohere answers errors; `error` with the type and the field at fault."""
    return {"message": message, "error": {"type": kind, "message": message, "field": field, **more}}


async def rerank_error(request: Request, exc: RerankError) -> JSONResponse:
    more = {"models": exc.models} if isinstance(exc, ModelNotFound) else {}
    # Refused for load: the status the operator chose (overload_status); other 503s say a pool's state.
    status = request.app.state.overload_status if exc.kind == Overloaded.kind else exc.status
    return JSONResponse(error_body(exc.kind, exc.message, exc.field, **more), status_code=status, headers=exc.headers())


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, field = describe_errors(exc.errors())
    return JSONResponse(error_body("invalid_input", message, field), status_code=422)


# Answer without a key: health, and the playground page with its index (the page sends the key it is given
# with each API call it makes; it holds no data of its own).
OPEN_PATHS = ("/health", "/health/live", "", "/", "/playground")
PLAYGROUND = Path(__file__).resolve().parent / "static" / "playground.html"


class RequestGate:
    """What a request passes before its body is read: the API key (401, on every path but OPEN_PATHS), then
    the body's size (413, by Content-Length or while a chunked body streams in) and the time it takes to
    arrive (408 past `request_read_timeout_s`: a slow body cannot hold a connection open).

    The body is read here in full (the JSON parser needs all of it anyway) and replayed to the app.
    """

    def __init__(self, inner, settings: Settings) -> None:
        self.inner = inner
        self.limit = settings.max_request_bytes
        self.max_items = settings.max_documents_per_request
        self.read_timeout_s = settings.request_read_timeout_s
        self.keys = settings.api_keys()
        # The A/B test's key header (setting experiment.key_header): its value goes to the ingress with the request.
        self.variant_key = settings.experiment.key_header.lower().encode() if settings.experiment else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        root = scope.get("root_path", "")
        path = scope.get("path", "")
        path = path[len(root) :] if root and path.startswith(root) else path
        if self.keys and path not in OPEN_PATHS and not key_matches(headers, self.keys):
            await self._refuse(send, 401, "unauthorized", UNAUTHORIZED, None)
            return
        declared = headers.get(b"content-length")
        if (path in OPEN_PATHS or scope.get("method") in ("GET", "HEAD")) and has_body(headers):
            # No route here reads a body: an open path must not hold a connection for one (nor read it).
            message = f"{scope.get('method')} {path or '/'} takes no request body; send it without one"
            await self._refuse(send, 413, "input_too_large", message, "body")
            return
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse_size(send)
            return
        body = await self._read_body(receive, send)
        if body is None:
            return
        document = parsed(body)
        too_long = None if document is NOT_JSON else longest_list(document, self.max_items)
        if too_long is not None:
            field, items = too_long
            message = (
                f"{field}: more than {self.max_items} items ({items}); the limit is {self.max_items} per request "
                "(setting max_documents_per_request): split them over several requests"
            )
            await self._refuse(send, 413, "input_too_large", message, field)
            return
        if document is not NOT_JSON:
            scope[PARSED_BODY] = document  # the route takes it as parsed here: a 50 MB body is parsed once
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if self.variant_key is not None:  # every request sets it: a task never sees another request's key
            value = headers.get(self.variant_key)
            experiment.KEY.set(value.decode("latin-1")[:256] if value else None)
        await self.inner(scope, replay, send)

    async def _read_body(self, receive, send) -> bytes | None:
        """The whole body, or None once refused (too large, too slow) or the client went away."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                message = (
                    f"the request body did not arrive within {self.read_timeout_s} s (setting "
                    "request_read_timeout_s); send it at once"
                )
                await self._refuse(send, 408, "timeout", message, "body")
                return None
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse_size(send)
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse_size(self, send) -> None:
        message = f"request body is larger than {self.limit} bytes (setting max_request_bytes)"
        await self._refuse(send, 413, "input_too_large", message, "body")

    @staticmethod
    async def _refuse(send, status: int, kind: str, message: str, field: str | None) -> None:
        await JSONResponse(error_body(kind, message, field), status_code=status)({"type": "http"}, None, send)


def has_body(headers: dict[bytes, bytes]) -> bool:
    declared = headers.get(b"content-length", b"0")
    return headers.get(b"transfer-encoding") is not None or not declared.isdigit() or int(declared) > 0


# A list inside a document (its content parts) may hold a few items even where documents are limited to fewer.
NESTED_LIST_ITEMS = 16


# Where RequestGate leaves the JSON body it parsed, for the route to take instead of parsing it again.
PARSED_BODY = "rerank.parsed_body"
NOT_JSON = object()


def parsed(body: bytes) -> object:
    """The body as JSON, or NOT_JSON (the route's own parse then says what is wrong with it)."""
    try:
        return json.loads(body) if body else NOT_JSON
    except (ValueError, RecursionError):
        return NOT_JSON


class ParsedBodyRequest(Request):
    """A request whose JSON body RequestGate already parsed: json() takes that instead of parsing again."""

    async def json(self):
        if not hasattr(self, "_json") and PARSED_BODY in self.scope:
            self._json = self.scope.pop(PARSED_BODY)
        return await super().json()


class ParsedBodyRoute(APIRoute):
    """Every route of the app reads its JSON body through ParsedBodyRequest."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(ParsedBodyRequest(request.scope, request.receive))

        return route


def longest_list(document: object, limit: int) -> tuple[str, int] | None:
    """The first list in a parsed JSON body longer than a request may hold (`limit` at the top level, where the
    documents are, at least NESTED_LIST_ITEMS below it), as (its field, its length): checked on the parsed JSON,
    before the request model converts a single item (two million one-letter documents take the C parser 0.1 s
    and pydantic ~20 s). None for a body within the limits."""
    stack: list[tuple[str, object, int]] = [("", document, 0)]
    while stack:
        field, value, depth = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{field}.{key}" if field else str(key), item, depth + 1) for key, item in value.items())
        elif isinstance(value, list):
            if len(value) > (limit if depth <= 1 else max(limit, NESTED_LIST_ITEMS)):
                return field or "body", len(value)
            stack.extend((f"{field}[{i}]", item, depth + 1) for i, item in enumerate(value))
    return None


UNAUTHORIZED = "missing or wrong API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"


def key_matches(headers: dict[bytes, bytes], keys: list[bytes]) -> bool:
    """Whether the request carries one of the keys (Bearer or X-API-Key). Compared with every key, always: the
    time taken does not say which key came close."""
    given = headers.get(b"x-api-key", b"")
    authorization = headers.get(b"authorization", b"")
    if authorization.lower().startswith(b"bearer "):
        given = authorization[7:].strip()
    matches = [hmac.compare_digest(given, key) for key in keys]
    return any(matches)


def api_key_check(settings: Settings):
    """A dependency that checks the API key on a route, when one is set (RequestGate checked it already, before
    the body; this keeps a route safe wherever it is mounted)."""
    keys = settings.api_keys()

    def check(request: Request) -> None:
        headers = {key.lower().encode("latin-1"): value.encode("latin-1") for key, value in request.headers.items()}
        if keys and not key_matches(headers, keys):
            raise Unauthorized(UNAUTHORIZED)

    return Depends(check)


class RerankService(Protocol):
    """What the routes call: the ingress deployment, or anything that answers the same."""

    settings: Settings

    async def rerank(
        self, request: RerankRequest, return_documents: bool, api_version: str
    ) -> tuple[RerankResponse, dict[str, str]]: ...

    async def rerank_tei(self, request: TeiRerankRequest) -> tuple[list[TeiRank], dict[str, str]]: ...

    async def score_pairs(self, request: ScoreRequest) -> tuple[ScoreResponse, dict[str, str]]: ...

    async def rank_nim(self, request: NimRankingRequest) -> tuple[NimRankingResponse, dict[str, str]]: ...

    async def rerank_mixedbread(self, request: MixedbreadRerankRequest) -> tuple[MixedbreadRerankResponse, dict]: ...

    async def health(self) -> tuple[HealthResponse, int]: ...

    async def models(self) -> dict: ...

    async def stats(self) -> dict: ...


def build_api(ingress: RerankService) -> FastAPI:
    """One FastAPI app per ingress replica, built with its settings; routes delegate to the ingress.

    With an API key set, every route but /health needs it, the schema (/openapi.json) and /docs included."""
    settings = ingress.settings
    app = FastAPI(
        title="Multimodal reranker", description=DESCRIPTION, version="0.1.0", docs_url=None, redoc_url=None,
        openapi_url=None,
    )  # fmt: skip
    app.state.overload_status = settings.overload_status
    app.router.route_class = ParsedBodyRoute
    app.add_middleware(RequestGate, settings=settings)
    app.add_exception_handler(RerankError, rerank_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    authorized = [api_key_check(settings)]
    add_schema_routes(app, settings, authorized)
    add_rerank_routes(app, ingress, authorized)
    add_vendor_routes(app, ingress, authorized)
    add_embedding_routes(app, ingress, authorized)
    add_probe_routes(app, ingress)
    add_pages(app)
    add_status_routes(app, ingress, authorized)
    return app


def add_schema_routes(app: FastAPI, settings: Settings, authorized: list) -> None:
    """/openapi.json (with the limits of these settings) and /docs, behind the key."""

    @functools.cache
    def limited_schema() -> dict:  # the settings of a replica never change: built once
        return schema_with_limits(copy.deepcopy(app.openapi()), settings)

    # FastAPI's own /docs and /openapi.json take no dependencies: these two do what they do, behind the key.
    @app.get("/openapi.json", include_in_schema=False, dependencies=authorized)
    async def openapi(request: Request) -> JSONResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # Serve's route prefix, where there is one
        return JSONResponse({**limited_schema(), **({"servers": [{"url": root}]} if root else {})})

    @app.get("/docs", include_in_schema=False, dependencies=authorized)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - Swagger UI")


def add_rerank_routes(app: FastAPI, ingress: RerankService, authorized: list) -> None:
    """The dialects: Cohere v2, Jina, text-embeddings-inference and vLLM's /score."""

    @app.post(
        "/v2/rerank",
        response_model=RerankResponse,
        response_model_exclude_none=True,
        dependencies=authorized,
        responses=ERRORS,
    )
    async def rerank_v2(request: RerankRequest, response: Response) -> RerankResponse:
        """Cohere v2 shape; documents are echoed only when `return_documents` is true."""
        body, headers = await ingress.rerank(request, bool(request.return_documents), api_version="2")
        response.headers.update(headers)
        return body

    @app.post(
        "/v1/rerank",
        response_model=RerankResponse,
        response_model_exclude_none=True,
        dependencies=authorized,
        responses=ERRORS,
    )
    async def rerank_v1(request: RerankRequest, response: Response) -> RerankResponse:
        """Jina shape; documents are echoed unless `return_documents` is false."""
        body, headers = await ingress.rerank(request, request.return_documents is not False, api_version="1")
        response.headers.update(headers)
        return body

    @app.post(
        "/rerank",
        response_model=list[TeiRank],
        response_model_exclude_none=True,
        dependencies=authorized,
        responses=ERRORS,
    )
    async def rerank_tei(request: TeiRerankRequest, response: Response) -> list[TeiRank]:
        """text-embeddings-inference shape: a bare list sorted by score."""
        body, headers = await ingress.rerank_tei(request)
        response.headers.update(headers)
        return body

    async def score(request: ScoreRequest, response: Response) -> ScoreResponse:
        """vLLM `/score`: `text_1` against `text_2` (one against many, or pairwise lists); a score per pair in the
        pairs' order, `usage` with the real tokens computed."""
        body, headers = await ingress.score_pairs(request)
        response.headers.update(headers)
        return body

    for path in ("/score", "/v1/score"):
        app.post(
            path,
            response_model=ScoreResponse,
            response_model_exclude_none=True,
            dependencies=authorized,
            responses=ERRORS,
            operation_id=f"score_{path.strip('/').replace('/', '_')}",
        )(score)


def add_vendor_routes(app: FastAPI, ingress: RerankService, authorized: list) -> None:
    """The dialects of hosted rerankers' clients: mixedbread and NVIDIA NIM."""

    @app.post(
        "/v1/reranking",
        response_model=MixedbreadRerankResponse,
        response_model_exclude_none=True,
        dependencies=authorized,
        responses=ERRORS,
    )
    async def reranking_mixedbread(request: MixedbreadRerankRequest, response: Response) -> MixedbreadRerankResponse:
        """mixedbread shape: `input` documents (strings, records with `rank_fields`, Elasticsearch's image form),
        `top_k`; `data` best first, each with its `input` when `return_input`."""
        body, headers = await ingress.rerank_mixedbread(request)
        response.headers.update(headers)
        return body

    @app.post(
        "/v1/ranking",
        response_model=NimRankingResponse,
        response_model_exclude_none=True,
        dependencies=authorized,
        responses=ERRORS,
    )
    async def ranking_nim(request: NimRankingRequest, response: Response) -> NimRankingResponse:
        """NVIDIA NIM shape (LangChain's NVIDIARerank, Haystack's NvidiaRanker): every passage by index with the
        model's raw score as `logit`, best first."""
        body, headers = await ingress.rank_nim(request)
        response.headers.update(headers)
        return body


def add_embedding_routes(app: FastAPI, ingress: RerankService, authorized: list) -> None:
    """Embeddings from the same pools (serve_app/embeddings.py): OpenAI's and Cohere's shapes."""

    @app.post(
        "/v1/embeddings",
        response_model=embeddings.OpenAIEmbeddingResponse,
        dependencies=authorized,
        responses=ERRORS,
    )
    async def embeddings_openai(request: embeddings.OpenAIEmbeddingRequest) -> embeddings.OpenAIEmbeddingResponse:
        """OpenAI shape (the `openai` SDK's `embeddings.create`): `data[].embedding` in input order, floats or
        base64 float32; `usage` in tokens. 422 for a model that does not embed, naming those that do."""
        return await embeddings.embed_openai(ingress, request)

    @app.post(
        "/v2/embed",
        response_model=embeddings.CohereEmbedResponse,
        response_model_exclude_none=True,
        dependencies=authorized,
        responses=ERRORS,
    )
    async def embed_cohere(request: embeddings.CohereEmbedRequest) -> embeddings.CohereEmbedResponse:
        """Cohere shape (the `cohere` SDK's `ClientV2.embed`): `texts`, `images` or `inputs`; `embeddings` by
        each of `embedding_types` (float, int8, uint8, binary, ubinary, base64)."""
        return await embeddings.embed_cohere(ingress, request)


def add_probe_routes(app: FastAPI, ingress: RerankService) -> None:
    """Readiness and liveness: no key needed."""

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health() -> JSONResponse:
        """Readiness: scores a small real pair through each loaded pool (cached `health_cache_s` seconds).
        200 while any pool scores ("ok" or "degraded"), 503 when none does. Says why a pool is down in words;
        the details are in the logs."""
        response, status_code = await ingress.health()
        return JSONResponse(response.model_dump(exclude_none=True), status_code=status_code)

    @app.get("/health/live")
    async def live() -> dict:
        """Liveness: this process answers. Scores nothing, so a busy or broken pool never fails it: restart a
        container on this, take it out of the load balancer on /health."""
        return {"status": "alive"}


def page_headers(page: str) -> dict[str, str]:
    """What an HTML page of ours is sent with: a Content-Security-Policy that runs only its own inline script (by
    hash), talks only to this origin and may not be framed (clickjacking), and no MIME sniffing."""
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    script_src = hashes or "'none'"
    policy = (
        f"default-src 'none'; script-src {script_src}; style-src 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}


def add_pages(app: FastAPI) -> None:
    """The playground and the index page linking it: no key needed (the page asks for it where one is set)."""
    page = PLAYGROUND.read_text(encoding="utf-8")
    headers = page_headers(page)

    @app.get("/playground", include_in_schema=False)
    async def playground() -> HTMLResponse:
        """A page to try queries: text or image query and documents, model, strategy and template; the ranking
        with scores as bars, the strategy's threshold line and the time taken."""
        return HTMLResponse(page, headers=headers)

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        links = "".join(
            f'<li><a href="{root}{path}">{what}</a></li>'
            for path, what in (("/playground", "Playground: try a query"), ("/docs", "API documentation"))
        )
        body = f"<!doctype html><title>Reranker</title><h1>Multimodal reranker</h1><ul>{links}</ul>"
        return HTMLResponse(body, headers=page_headers(body))


def add_status_routes(app: FastAPI, ingress: RerankService, authorized: list) -> None:
    """/v1/models and /v1/stats, behind the key."""

    @app.get("/v1/models", dependencies=authorized, responses={401: ERRORS[401]})
    async def models() -> dict:
        """Each pool: model, family, device, dtype, max batch size, replicas and counters, or why it is down."""
        return await ingress.models()

    @app.get("/v1/stats", dependencies=authorized, responses={401: ERRORS[401]})
    async def stats() -> dict:
        """Per replica: memory (CUDA allocated/reserved/peak, or RSS), batches, mean fill, p50/p95 batch latency,
        queued pairs. The same figures go to Prometheus through Ray's metrics export."""
        return await ingress.stats()
