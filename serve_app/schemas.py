"""Request and response models of each API dialect, the one internal form they all become, and the limit
checks the ingress and the bulk job share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from serve_app.errors import InputTooLarge, InvalidInput
from serve_app.ranking import STRATEGIES, Strategy, Threshold
from serve_app.settings import Settings


def valid_unicode(text: str) -> str:
    """Refuse a lone UTF-16 surrogate ("\\ud800" is valid JSON, not valid Unicode): no tokenizer or encoder
    downstream can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"holds a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X} at character {exc.start}), which is not "
            "valid Unicode; send the pair it belongs to, or drop it"
        ) from None
    return text


Text = Annotated[str, AfterValidator(valid_unicode)]
Priority = Literal["realtime", "batch"]


@dataclass(frozen=True)
class ContentSpec:
    """A query or document as sent: text and/or an image reference (base64, data URI or URL)."""

    text: str | None = None
    image: str | None = None


@dataclass(frozen=True)
class RerankJob:
    """The internal request every dialect becomes."""

    query: ContentSpec
    documents: list[ContentSpec]
    top_n: int | None = None
    threshold: Threshold | None = None
    instruction: str | None = None
    max_tokens_per_doc: int | None = None
    truncate: bool = True
    priority: Priority | None = None
    model: str | None = None  # a served name or alias; None: the defaults
    split_long_documents: bool = True  # a long document as windows (setting long_documents); False: cut (TEI)
    # A query per document (vLLM's pairwise /score): one job, one budget, for the whole request. None: `query`.
    queries: list[ContentSpec] | None = None

    def query_fields(self) -> list[tuple[str, ContentSpec]]:
        """Each distinct query with the field it came from, in order."""
        if self.queries is None:
            return [("query", self.query)]
        first: dict[ContentSpec, int] = {}
        for i, query in enumerate(self.queries):
            first.setdefault(query, i)
        return [(f"text_1[{i}]", query) for query, i in first.items()]

    def query_of(self, document: int) -> ContentSpec:
        return self.query if self.queries is None else self.queries[document]


def check_limits(job: RerankJob, settings: Settings) -> None:
    """The limits every request and every bulk row must keep: InputTooLarge or InvalidInput naming the field."""
    limit = settings.max_documents_per_request
    if len(job.documents) > limit:
        raise InputTooLarge(
            f"documents: {len(job.documents)} documents; the limit is {limit} per request "
            "(setting max_documents_per_request): split them over several requests",
            "documents",
        )
    for field, query in job.query_fields():
        if not (query.text or "").strip() and query.image is None:
            raise InvalidInput(f"{field}: the query is empty; give it text or an image", field)
    texts = (
        [(field, query.text) for field, query in job.query_fields()]
        + [("instruction", job.instruction)]
        + [(f"documents[{i}]", d.text) for i, d in enumerate(job.documents)]
    )
    for field, text in texts:
        if text is not None and len(text) > settings.max_text_chars:
            raise InputTooLarge(
                f"{field}: text has {len(text)} characters; the limit is {settings.max_text_chars} "
                "(setting max_text_chars)",
                field,
            )


def describe_errors(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's validation errors as one message ("field: what is wrong; ...") and the first field."""
    fields = [".".join(str(part) for part in e["loc"] if part != "body") or "body" for e in errors]
    message = "; ".join(f"{field}: {e['msg']}" for field, e in zip(fields, errors))
    return message, fields[0] if fields else None


class ImageUrl(BaseModel):
    url: Text = Field(description="A data:image/...;base64, URI, base64, or an allow-listed http(s) URL.")


class ContentPart(BaseModel):
    """vLLM's (OpenAI's) content part: {"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url"}}."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image_url"]
    text: Text | None = None
    image_url: ImageUrl | None = None

    @model_validator(mode="after")
    def _matches_type(self) -> ContentPart:
        if self.type == "text" and (self.text is None or self.image_url is not None):
            raise ValueError('a "text" part takes `text` only')
        if self.type == "image_url" and (self.image_url is None or self.text is not None):
            raise ValueError('an "image_url" part takes `image_url: {"url": ...}` only')
        return self


class ContentIn(BaseModel):
    """A document or query object: text, an image (base64, data URI or allow-listed URL), or both; or vLLM's
    `content` parts (text parts joined by newlines, at most one image part)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "a red bicycle", "image": "data:image/png;base64,iVBORw0KGgo..."},
                {
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://..."}},
                        {"type": "text", "text": "x"},
                    ]
                },
            ]
        },
    )

    text: Text | None = None
    image: Text | None = Field(
        default=None,
        description="Base64 image, a data:image/...;base64, URI, or an allow-listed http(s) URL.",
    )
    content: list[ContentPart] | None = Field(default=None, min_length=1, max_length=16)

    @model_validator(mode="after")
    def _not_empty(self) -> ContentIn:
        if self.content is not None:
            if self.text is not None or self.image is not None:
                raise ValueError("give `content` parts, or `text`/`image`, not both")
            if sum(part.type == "image_url" for part in self.content) > 1:
                raise ValueError("give at most one image_url part per query or document")
            return self
        if self.text is None and self.image is None:
            raise ValueError("give `text`, `image` or both")
        return self

    def spec(self) -> ContentSpec:
        if self.content is None:
            return ContentSpec(text=self.text, image=self.image)
        texts = [part.text for part in self.content if part.text is not None]
        images = [part.image_url.url for part in self.content if part.image_url is not None]
        return ContentSpec(text="\n".join(texts) if texts else None, image=images[0] if images else None)


class RecordIn(BaseModel):
    """A document as a record: any fields (an id, a title, a body, metadata) beside an optional `text` and `image`.
    The request's `rank_fields` names the fields that are scored; without it, `text`, or the record's only string
    field. `return_documents` echoes the record as sent."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [{"id": "a1", "title": "Paris", "body": "The capital of France.", "year": 2024}]
        },
    )

    text: Text | None = None
    image: Text | None = Field(default=None, description="An image scored with the record's text, as in ContentIn.")

    @model_validator(mode="after")
    def _is_record(self) -> RecordIn:
        if not self.model_extra:
            raise ValueError("a record has fields besides `text` and `image` (else send it as {text, image})")
        return self

    def spec(self, rank_fields: list[str] | None, index: int) -> ContentSpec:
        """The record's scored text: `name: value` lines of `rank_fields` in their order (Cohere's advice for
        structured data; a field the record lacks is left out), else `text`, else its only string field."""
        fields = {name: value for name, value in self.model_dump(exclude_unset=True).items() if name != "image"}
        if rank_fields:
            lines = [f"{name}: {_field_text(fields[name])}" for name in rank_fields if fields.get(name) is not None]
            if not lines and self.image is None:
                raise InvalidInput(
                    f"documents[{index}]: the record has none of rank_fields {rank_fields}", "rank_fields"
                )
            return ContentSpec(text="\n".join(lines) or None, image=self.image)
        if self.text is not None:
            return ContentSpec(text=self.text, image=self.image)
        strings = [value for value in fields.values() if isinstance(value, str)]
        if not strings and self.image is not None:
            return ContentSpec(image=self.image)
        if len(strings) != 1:
            raise InvalidInput(
                f"documents[{index}]: a record without `text` and with {len(strings)} string fields: name the fields "
                "to score in `rank_fields`",
                "rank_fields",
            )
        return ContentSpec(text=strings[0], image=self.image)


def _field_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _spec(value: str | ContentIn | RecordIn, rank_fields: list[str] | None = None, index: int = 0) -> ContentSpec:
    if isinstance(value, str):
        return ContentSpec(text=value)
    if isinstance(value, RecordIn):
        return value.spec(rank_fields, index)
    return value.spec()


def _document_form(value: object) -> str:
    """Which form a document takes, decided by its keys so that a malformed object gets the errors of its own form:
    an object of only `text`, `image` and `content` is content (parts included), one with other fields a record."""
    if isinstance(value, dict):
        return "content" if set(value) <= set(ContentIn.model_fields) else "record"
    if isinstance(value, BaseModel):
        return "record" if isinstance(value, RecordIn) else "content"
    return "text"


# A document: its text, an object of text and/or image (or content parts), or a record of any fields.
DocumentIn = Annotated[
    Annotated[Text, Tag("text")] | Annotated[ContentIn, Tag("content")] | Annotated[RecordIn, Tag("record")],
    Discriminator(_document_form),
]


class RerankRequest(BaseModel):
    """Cohere v2 / Jina rerank request, plus this service's thresholds and instructions."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "minilm",
                    "query": "what is the capital of france",
                    "documents": ["Paris is the capital of France.", "Berlin is in Germany."],
                    "top_n": 1,
                    "strategy": "balanced",
                },
                {
                    "query": {"text": "a red bicycle"},
                    "documents": [
                        {"image": "data:image/png;base64,iVBORw0KGgo..."},
                        {"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]},
                        "a blue car",
                    ],
                },
            ]
        },
    )

    model: Text | None = Field(
        default=None,
        description="The served model (or an alias) that scores every pair; GET /v1/models lists them. Unset: "
        "the default text model for text pairs and the default image-text model for pairs with an image.",
    )
    query: Text | ContentIn
    documents: list[DocumentIn] = Field(min_length=1)
    rank_fields: list[Text] | None = Field(
        default=None,
        min_length=1,
        description="The fields of record documents that are scored, as `name: value` lines in this order. Unset: "
        "a record's `text`, or its only string field.",
    )
    top_n: int | None = Field(default=None, ge=1, description="Return at most this many results; all when unset.")
    return_documents: bool | None = Field(
        default=None, description="Echo each document in its result (default: false on /v2, true on /v1)."
    )
    max_tokens_per_doc: int | None = Field(default=None, ge=1, description="Cut each document to this many tokens.")
    strategy: Strategy | None = Field(
        default=None,
        description="Keep results by a promise, each model's own threshold (GET /v1/models, `strategies`): strict "
        "precision >= 0.95, explore recall >= 0.95, balanced the best F1, on the labels its score map was fitted "
        "on; a model without one: strict > 0.75, balanced >= 0.55, explore > 0.4.",
    )
    threshold: float | None = Field(default=None, ge=0, le=1, description="Keep results scoring >= this.")
    instruction: Text | None = Field(default=None, description="Free-text task instruction, put before the query.")
    instruction_template: Text | None = Field(
        default=None, description="Name of an instruction in deploy/instruction_templates.json."
    )
    raw_scores: bool = Field(default=False, description="Also return the model's native score as `raw_score`.")
    priority: Priority | None = Field(
        default=None,
        description="realtime: the pool's realtime variant, no waiting for other callers (where deployed); "
        "batch: batched with other callers for throughput. Unset: setting default_priority.",
    )

    @model_validator(mode="after")
    def _one_of_each(self) -> RerankRequest:
        if self.strategy is not None and self.threshold is not None:
            raise ValueError("give `strategy` or `threshold`, not both")
        if self.instruction is not None and self.instruction_template is not None:
            raise ValueError("give `instruction` or `instruction_template`, not both")
        return self

    def to_job(self, templates: dict[str, str]) -> RerankJob:
        instruction = self.instruction
        if self.instruction_template is not None:
            if self.instruction_template not in templates:
                raise InvalidInput(
                    f"instruction_template: no template named {self.instruction_template!r}; "
                    f"known: {sorted(templates)}",
                    "instruction_template",
                )
            instruction = templates[self.instruction_template]
        threshold = STRATEGIES[self.strategy] if self.strategy else None
        if self.threshold is not None:
            threshold = Threshold(self.threshold, inclusive=True)
        return RerankJob(
            query=_spec(self.query),
            documents=[_spec(d, self.rank_fields, i) for i, d in enumerate(self.documents)],
            top_n=self.top_n,
            threshold=threshold,
            instruction=instruction,
            max_tokens_per_doc=self.max_tokens_per_doc,
            priority=self.priority,
            model=self.model,
        )


class BulkRow(RerankRequest):
    """One row of a bulk job's input: a rerank request with an `id`. An image may also be a file path
    inside the job's working directory; other fields of the row (extra Parquet columns) are ignored."""

    model_config = ConfigDict(extra="ignore")

    id: Text | int = Field(description="The row's id, written beside its results.")

    @model_validator(mode="after")
    def _has_id(self) -> BulkRow:
        if not str(self.id).strip():
            raise ValueError("give the row a non-empty `id`")
        return self


class ErrorDetail(BaseModel):
    type: str = Field(
        description="invalid_input, input_too_large, unauthorized, model_not_found, overloaded, replica_lost, "
        "pool_unavailable, deadline_exceeded"
    )
    message: str = Field(description="What was wrong and how to fix it.")
    field: str | None = Field(default=None, description="The request field at fault, where there is one.")
    models: list[str] | None = Field(default=None, description="model_not_found: the names this service serves.")


class ErrorResponse(BaseModel):
    message: str = Field(description="The error's message, where Cohere's clients read it.")
    error: ErrorDetail


class DocumentOut(BaseModel):
    """A document as it was sent (return_documents): its text and image, its content parts, or a record's fields."""

    model_config = ConfigDict(extra="allow")

    text: str | None = None
    image: str | None = None
    content: list[ContentPart] | None = None


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    raw_score: float | None = None
    document: DocumentOut | None = None


class RerankResponse(BaseModel):
    id: str
    model: str | None = None
    results: list[RerankResult]
    meta: dict = Field(
        description="billed_units, tokens (input_tokens: real tokens computed), pairs per kind, pairs per model, "
        "split_documents (documents scored as windows)"
    )
    usage: dict | None = Field(default=None, description="Jina (/v1/rerank): total_tokens")


class TeiRerankRequest(BaseModel):
    """text-embeddings-inference `POST /rerank`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"query": "what is deep learning", "texts": ["Deep learning is...", "cheese"], "raw_scores": False}
            ]
        }
    )

    query: Text
    texts: list[Text] = Field(min_length=1)
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = Field(
        default=None,
        description="Cut over-long pairs; when false they are refused (413). Unset: auto_truncate.",
    )
    truncation_direction: Literal["Right", "right"] = "Right"

    def to_job(self, auto_truncate: bool) -> RerankJob:
        return RerankJob(
            query=ContentSpec(text=self.query),
            documents=[ContentSpec(text=t) for t in self.texts],
            truncate=auto_truncate if self.truncate is None else self.truncate,
            split_long_documents=False,  # TEI: over-long pairs are truncated (or refused with truncate=false)
        )


ScoreInput = Annotated[Text | ContentIn, Field(union_mode="left_to_right")]


class ScoreRequest(BaseModel):
    """vLLM `POST /score` (and `/v1/score`): `text_1` against `text_2`, one against many or pairwise lists; each
    item a string or a content object (vLLM's content parts, or `text`/`image`)."""

    model_config = ConfigDict(
        extra="ignore",  # vLLM's sampling and pooling fields (user, priority, ...): nothing for a reranker to do
        json_schema_extra={
            "examples": [
                {"model": "minilm", "text_1": "what is the capital of france", "text_2": ["paris is", "a red car"]}
            ]
        },
    )

    model: Text | None = Field(default=None, description="A served model name or alias; unset: the defaults.")
    text_1: ScoreInput | list[ScoreInput] = Field(description="The query, or one query per pair.")
    text_2: ScoreInput | list[ScoreInput] = Field(description="The documents, or one document per pair.")
    truncate_prompt_tokens: int | None = Field(default=None, ge=1, description="Cut each document to this many tokens.")

    def pairs(self) -> list[tuple[ContentSpec, ContentSpec]]:
        """(query, document) per pair, in order: one text_1 against each text_2, or the two lists pairwise."""
        firsts = self.text_1 if isinstance(self.text_1, list) else [self.text_1]
        seconds = self.text_2 if isinstance(self.text_2, list) else [self.text_2]
        if not firsts or not seconds:
            raise InvalidInput("text_1 and text_2 need one item each at least", "text_2")
        if len(firsts) == 1:
            firsts = firsts * len(seconds)
        if len(firsts) != len(seconds):
            raise InvalidInput(
                f"text_1 has {len(firsts)} items and text_2 {len(seconds)}: give one text_1, or as many as text_2",
                "text_1",
            )
        return [(_spec(a), _spec(b)) for a, b in zip(firsts, seconds)]

    def to_job(self, max_pairs: int) -> RerankJob:
        """The pairs as one job (document i is text_2's i-th pair; its query, text_1's), so that the request has one
        budget (images, admission, windows) and each model's pairs go out together, however many distinct
        queries it holds. More than `max_pairs` pairs is a 413."""
        pairs = self.pairs()
        if len(pairs) > max_pairs:
            raise InputTooLarge(
                f"text_2: {len(pairs)} pairs; the limit is {max_pairs} (setting max_documents_per_request)", "text_2"
            )
        queries = [query for query, _ in pairs]
        return RerankJob(
            query=queries[0],
            queries=queries if len(set(queries)) > 1 else None,
            documents=[document for _, document in pairs],
            max_tokens_per_doc=self.truncate_prompt_tokens,
            model=self.model,
        )


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str | None = None
    data: list[ScoreData] = Field(description="One score per pair, in the order of the pairs (not sorted).")
    usage: dict = Field(description="prompt_tokens and total_tokens: the real tokens computed")


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class NimContent(BaseModel):
    """NVIDIA NIM's query or passage: text, and for a passage an image (base64 or a data URI), as LangChain's
    NVIDIARerank sends a document whose metadata holds one."""

    text: Text | None = None
    image: Text | None = Field(default=None, description="Base64 image or a data:image/...;base64, URI.")

    @model_validator(mode="after")
    def _not_empty(self) -> NimContent:
        if self.text is None and self.image is None:
            raise ValueError("give `text`, `image` or both")
        return self

    def spec(self) -> ContentSpec:
        return ContentSpec(text=self.text, image=self.image)


class NimRankingRequest(BaseModel):
    """NVIDIA NIM `POST /v1/ranking` (LangChain's NVIDIARerank, Haystack's NvidiaRanker, LiteLLM)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "rerank", "query": {"text": "which way?"}, "passages": [{"text": "north"}]}]
        }
    )

    model: str | None = None
    query: NimContent
    passages: list[NimContent] = Field(min_length=1)
    truncate: Literal["NONE", "END"] = Field(
        default="END", description="END: cut over-long pairs; NONE: refuse them (413)."
    )

    def to_job(self) -> RerankJob:
        return RerankJob(
            query=self.query.spec(),
            documents=[passage.spec() for passage in self.passages],
            truncate=self.truncate == "END",
            split_long_documents=False,  # NIM truncates (or refuses) a pair over the window
            model=self.model,
        )


class NimRanking(BaseModel):
    index: int
    logit: float


class NimRankingResponse(BaseModel):
    """Every passage by its index, with the model's raw score, best first."""

    rankings: list[NimRanking]
    usage: dict[str, int] | None = None


def elastic_image(document: str | ContentIn | RecordIn) -> ContentSpec | None:
    """Elasticsearch's image form, {"type": "image", "format": "base64" | "url", "value": ...}, as an image
    document; None for any other document."""
    if not isinstance(document, RecordIn) or document.text is not None or document.image is not None:
        return None
    fields = document.model_extra or {}
    if set(fields) != {"type", "format", "value"} or fields["type"] != "image" or not isinstance(fields["value"], str):
        return None
    if fields["format"] not in ("base64", "url"):
        raise InvalidInput('an image input\'s `format` is "base64" or "url"', "input")
    return ContentSpec(image=fields["value"])


class MixedbreadRerankRequest(BaseModel):
    """mixedbread `POST /v1/reranking`: documents as `input` (strings, records with `rank_fields`, or images in
    Elasticsearch's {"type": "image", "format", "value"} form), `top_k`, `return_input`."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"query": "capital of france", "input": ["paris", "a red car"], "top_k": 1}]}
    )

    model: Text | None = None
    query: Text
    input: list[DocumentIn] = Field(min_length=1)
    rank_fields: list[Text] | None = Field(default=None, min_length=1)
    top_k: int | None = Field(default=None, ge=1, description="Return at most this many results; all when unset.")
    return_input: bool = False
    rewrite_query: bool = Field(default=False, description="Not offered: true is refused (422).")

    def to_job(self) -> RerankJob:
        if self.rewrite_query:
            raise InvalidInput(
                "rewrite_query is not offered by this service; send false or leave it out", "rewrite_query"
            )
        documents = [elastic_image(d) or _spec(d, self.rank_fields, i) for i, d in enumerate(self.input)]
        return RerankJob(query=ContentSpec(text=self.query), documents=documents, top_n=self.top_k, model=self.model)


class MixedbreadRank(BaseModel):
    index: int
    score: float
    input: Any = None
    object: Literal["rank_result"] = "rank_result"


class MixedbreadRerankResponse(BaseModel):
    usage: dict[str, int]
    model: str
    data: list[MixedbreadRank]
    object: Literal["list"] = "list"
    top_k: int
    return_input: bool


class PoolHealth(BaseModel):
    status: Literal["ok", "unavailable", "disabled", "down"]
    latency_ms: float | None = None
    reason: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "down"]
    latency_ms: float | None
    pools: dict[str, PoolHealth]


def as_sent(document):
    return document if isinstance(document, str) else document_out(document)


def document_out(document) -> dict:
    if isinstance(document, str):
        return {"text": document}
    if isinstance(document, RecordIn):  # as sent: its id, metadata and nulls included
        return document.model_dump(exclude_unset=True)
    return document.model_dump(exclude_none=True)
