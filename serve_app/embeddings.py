"""Embeddings from the pools that already hold the models: OpenAI's `POST /v1/embeddings` and Cohere's
`POST /v2/embed`. Inputs are embedded by the model a request names, else by the default text model (text only) or
the default image-text model (any input with an image, so that every vector of one answer is in one space); as pool
calls through the replica's own admission and batcher, beside reranking calls (`ScoringReplica.embed`). A model
whose family scores pairs together (cross-encoder, BLIP ITM, yes/no) answers 422 naming the models that embed."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import DeadlineExceeded, InputTooLarge, InvalidInput
from serve_app.media import RequestImages, load_image
from serve_app.pool_call import CallResult
from serve_app.pool_queues import admission
from serve_app.schemas import ContentPart, ContentSpec, Text
from serve_app.scoring.types import Content

if TYPE_CHECKING:
    from serve_app.ingress import Ingress

# Families whose models embed one input on its own (the scorers' `embeds`).
EMBEDDING_FAMILIES = ("embedding", "dual_encoder")


@dataclass(frozen=True)
class EmbedJob:
    """The internal embedding request both dialects become: inputs in order, the model (None: a default),
    whether a text longer than the model's window is cut (else 413)."""

    inputs: list[ContentSpec]
    model: str | None = None
    truncate: bool = True
    field: str = "input"


@dataclass
class Embedded:
    vectors: list[list[float]]
    model: str
    tokens: int


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI `POST /v1/embeddings`: `input` a string or a list of strings."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"input": ["paris is the capital of france"]}]})

    model: Text | None = None
    input: Text | list[Text] = Field(description="A text or a list of texts (token-id lists are not taken).")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: each vector's little-endian float32 bytes (what OpenAI's SDK asks for)."
    )
    dimensions: int | None = Field(
        default=None, ge=1, description="Only the model's own dimension: no model served here is trained to be cut."
    )
    user: str | None = None

    def to_job(self) -> EmbedJob:
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not texts:
            raise InvalidInput("input: give at least one text", "input")
        return EmbedJob([ContentSpec(text=text) for text in texts], self.model, True, "input")


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: dict[str, int]


class CohereEmbedInput(BaseModel):
    content: list[ContentPart] = Field(min_length=1)


EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereEmbedRequest(BaseModel):
    """Cohere `POST /v2/embed`: `texts`, `images` (data URIs) or `inputs` (content parts, text and image_url)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"texts": ["paris"], "input_type": "search_document"}]})

    model: Text | None = None
    texts: list[Text] | None = None
    images: list[Text] | None = None
    inputs: list[CohereEmbedInput] | None = None
    input_type: Literal["search_document", "search_query", "classification", "clustering", "image"] | None = None
    embedding_types: list[EmbeddingType] = Field(default=["float"], min_length=1)
    truncate: Literal["NONE", "START", "END"] = Field(
        default="END", description="END cuts a text at the model's window; NONE refuses it (413); START is not offered."
    )
    output_dimension: int | None = Field(default=None, ge=1, description="Only the model's own dimension.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Not offered (422): texts are cut at the model's window."
    )
    priority: int | None = None

    def to_job(self) -> EmbedJob:
        given = [name for name in ("texts", "images", "inputs") if getattr(self, name) is not None]
        if len(given) != 1:
            raise InvalidInput(f"give exactly one of texts, images or inputs (given: {given or 'none'})", "texts")
        if self.truncate == "START":
            raise InvalidInput(
                "truncate START is not offered: send END (cut at the model's window) or NONE", "truncate"
            )
        if self.max_tokens is not None:
            raise InvalidInput("max_tokens is not offered: texts are cut at the model's own window", "max_tokens")
        if self.texts is not None:
            inputs = [ContentSpec(text=text) for text in self.texts]
        elif self.images is not None:
            inputs = [ContentSpec(image=image) for image in self.images]
        else:
            inputs = [content_spec(item.content, i) for i, item in enumerate(self.inputs or [])]
        if not inputs:
            raise InvalidInput(f"{given[0]}: give at least one", given[0])
        return EmbedJob(inputs, self.model, self.truncate == "END", given[0])


def content_spec(parts: list[ContentPart], index: int) -> ContentSpec:
    """One Cohere input's content parts: text parts joined by newlines, at most one image."""
    images = [part.image_url.url for part in parts if part.image_url is not None]
    if len(images) > 1:
        raise InvalidInput(f"inputs[{index}]: at most one image part per input", f"inputs[{index}]")
    text = "\n".join(part.text for part in parts if part.text is not None) or None
    return ContentSpec(text=text, image=images[0] if images else None)


class CohereEmbedResponse(BaseModel):
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
    id: str
    embeddings: dict[str, list[list[float]] | list[list[int]] | list[str]]
    texts: list[str] | None = None
    meta: dict


def quantized(vectors: np.ndarray, kind: str) -> list:
    """The vectors in Cohere's types. int8/uint8 map each component of the unit-length vector from [-1, 1] by a
    fixed scale (127, and +1 then 127.5), so a text's codes do not depend on what else was in the request;
    binary/ubinary pack the signs, 8 to a byte (binary as int8: the byte minus 128); base64: float32 bytes."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if kind == "float":
        return vectors.tolist()
    if kind == "int8":
        return np.clip(np.rint(unit * 127), -128, 127).astype(np.int64).tolist()
    if kind == "uint8":
        return np.clip(np.rint((unit + 1) * 127.5), 0, 255).astype(np.int64).tolist()
    packed = np.packbits(vectors > 0, axis=-1).astype(np.int64)
    if kind == "ubinary":
        return packed.tolist()
    if kind == "binary":
        return (packed - 128).tolist()
    return [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in vectors]


def check_dimensions(dimensions: int | None, vectors: list[list[float]], field: str, model: str) -> None:
    if dimensions is not None and vectors and dimensions != len(vectors[0]):
        raise InvalidInput(
            f"{field}: model {model!r} gives {len(vectors[0])} dimensions and is not trained to give fewer: send "
            f"{len(vectors[0])} or leave it out",
            field,
        )


async def embed_openai(ingress: Ingress, request: OpenAIEmbeddingRequest) -> OpenAIEmbeddingResponse:
    done = await embed(ingress, request.to_job())
    check_dimensions(request.dimensions, done.vectors, "dimensions", done.model)
    if request.encoding_format == "base64":
        encoded = quantized(np.asarray(done.vectors, dtype=np.float32), "base64")
    else:
        encoded = done.vectors
    return OpenAIEmbeddingResponse(
        data=[OpenAIEmbedding(index=i, embedding=vector) for i, vector in enumerate(encoded)],
        model=request.model or done.model,
        usage={"prompt_tokens": done.tokens, "total_tokens": done.tokens},
    )


async def embed_cohere(ingress: Ingress, request: CohereEmbedRequest) -> CohereEmbedResponse:
    job = request.to_job()
    done = await embed(ingress, job)
    check_dimensions(request.output_dimension, done.vectors, "output_dimension", done.model)
    vectors = np.asarray(done.vectors, dtype=np.float32)
    images = sum(spec.image is not None for spec in job.inputs)
    return CohereEmbedResponse(
        id=str(uuid.uuid4()),
        embeddings={kind: quantized(vectors, kind) for kind in dict.fromkeys(request.embedding_types)},
        texts=request.texts,
        meta={
            "api_version": {"version": "2"},
            "billed_units": {"input_tokens": done.tokens, "images": images},
        },
    )


async def embed(ingress: Ingress, job: EmbedJob) -> Embedded:
    """The job's vectors, in order, within the request's deadline."""
    settings = ingress.settings
    try:
        return await asyncio.wait_for(embed_inputs(ingress, job), settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise DeadlineExceeded(
            f"the request took longer than {settings.request_timeout_s} s (setting request_timeout_s); send fewer "
            "inputs per request or retry when the service is less busy"
        ) from None


def check_embed_limits(job: EmbedJob, settings) -> None:
    """The limits of a rerank request, on inputs: their count (max_documents_per_request) and text length."""
    if len(job.inputs) > settings.max_documents_per_request:
        raise InputTooLarge(
            f"{job.field}: {len(job.inputs)} inputs; the limit is {settings.max_documents_per_request} per request "
            "(setting max_documents_per_request): split them over several requests",
            job.field,
        )
    for i, spec in enumerate(job.inputs):
        if spec.text is not None and len(spec.text) > settings.max_text_chars:
            raise InputTooLarge(
                f"{job.field}[{i}]: text has {len(spec.text)} characters; the limit is {settings.max_text_chars} "
                "(setting max_text_chars)",
                f"{job.field}[{i}]",
            )
        if not (spec.text or "").strip() and spec.image is None:
            raise InvalidInput(f"{job.field}[{i}] is empty: give it text or an image", f"{job.field}[{i}]")


async def embed_inputs(ingress: Ingress, job: EmbedJob) -> Embedded:
    """Limits; the model (before any image is fetched); the images, within one budget for the request; the inputs
    as pool calls of at most max_pairs_per_call, at most calls_in_flight_per_replica per running replica at once."""
    settings = ingress.settings
    check_embed_limits(job, settings)
    images = sum(spec.image is not None for spec in job.inputs)
    served = ingress.catalog.route(job.model, {"image_text": images} if images else {"text": len(job.inputs)})
    served = next(iter(served.values()))
    budget = RequestImages(settings)

    async def content(i: int, spec: ContentSpec) -> Content:
        if spec.image is None:
            return Content(text=spec.text)
        field = f"{job.field}[{i}]"
        return Content(
            text=spec.text, image=await load_image(spec.image, settings, field, ingress.http, budget, ingress.threads)
        )

    contents = list(await asyncio.gather(*(content(i, spec) for i, spec in enumerate(job.inputs))))
    handle = ingress._handle(served, settings.default_priority)
    running = await ingress.replicas.running(handle.deployment_name) or 1
    gate = asyncio.Semaphore(settings.calls_in_flight_per_replica * running)
    admit = admission(settings, time.time() + settings.request_timeout_s)
    step = settings.max_pairs_per_call

    async def call(piece: list[Content]) -> CallResult:
        async with gate:
            return await ingress._score_call(served, handle, piece, job.truncate, None, admit, method="embed")

    calls = [asyncio.ensure_future(call(contents[i : i + step])) for i in range(0, len(contents), step)]
    try:
        results = await asyncio.gather(*calls)
    except InvalidInput as exc:
        for pending in calls:
            pending.cancel()
        raise await cannot_embed(ingress, exc) from None
    except BaseException:
        for pending in calls:
            pending.cancel()
        raise
    vectors = [vector for result in results for vector in result.embeddings or []]
    return Embedded(vectors, served.name, sum(result.tokens for result in results))


async def cannot_embed(ingress: Ingress, exc: InvalidInput) -> InvalidInput:
    """A model that does not embed: the same 422, naming the served models that do."""
    if "has no embedding" not in exc.message:
        return exc
    listed = await ingress.status.models()
    names = [m["id"] for m in listed["data"] if m.get("family") in EMBEDDING_FAMILIES]
    return InvalidInput(f"{exc.message}; models here that embed: {names or 'none'} (send one as `model`)", "model")


__all__ = [
    "CohereEmbedRequest",
    "CohereEmbedResponse",
    "OpenAIEmbeddingRequest",
    "OpenAIEmbeddingResponse",
    "embed_cohere",
    "embed_openai",
]
