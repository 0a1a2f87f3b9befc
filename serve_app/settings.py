"""Every limit and knob of the service as one typed settings object (env, Serve config args)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger("serve_app.settings")

ENV_PREFIX = "RERANK_"
DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"
DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_IMAGE_TEXT_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_MODEL_CACHE_DIR = Path.home() / ".cache" / "serve_app" / "models"
SCORE_MAPS_DIR = DEPLOY_DIR / "score_maps"

MIN_API_KEY_CHARS = 16

# A tuning knob: docs/settings.md lists it under "Advanced", after the settings a newcomer needs.
ADVANCED = {"advanced": True}
# A field read under an old name for one release: docs/settings.md says so instead of listing it.
OLD_NAME = {"json_schema_extra": {"old_name": True}}

# The modalities: text-only pairs, and pairs with an image on either side. Each has a default model, the Settings
# field of that name (whose pool is deployed under that name too).
MODALITIES = ("text", "image_text")


class Calibration(BaseModel):
    """calibrated = sigmoid(scale * (raw - shift)); overrides a family's default map."""

    scale: float = Field(gt=0, description="How steep the map is around `shift`.")
    shift: float = Field(default=0.0, description="The raw score that maps to 0.5.")


class Variant(BaseModel):
    """One variant of an A/B test: a share of the requests ranked by another model, or other thresholds."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$", description="What answers and metrics call it.")
    share: float = Field(gt=0, le=1, description="The share of keys (requests without a key: of requests) it gets.")
    model: str | None = Field(
        default=None,
        description="A served model that ranks this variant's requests when they name no `model` (a request naming "
        "one keeps it). Unset: the same models.",
    )
    thresholds: dict[Literal["strict", "balanced", "explore"], float] | None = Field(
        default=None,
        description="Each strategy's threshold in this variant (0..1, for every model; inclusive as the fixed one is). "
        "Unset: each model's own.",
    )

    @field_validator("thresholds")
    @classmethod
    def _in_range(cls, value: dict | None) -> dict | None:
        if value and not all(0 <= v <= 1 for v in value.values()):
            raise ValueError("a threshold is a calibrated score: give one in 0..1")
        return value


class Experiment(BaseModel):
    """An A/B test on a slice of traffic: each request is assigned a variant by a hash of a caller-chosen key (a user
    id: the same key always gets the same variant), the rest get `control`. Each answer names its variant (header
    x-variant, Cohere's `meta.variant`) so that callers can join it with their click logs."""

    key_header: str = Field(
        default="x-user-id",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="The request header whose value assigns the variant (sticky); without it a request's variant "
        "is drawn at random with the same shares.",
    )
    salt: str = Field(default="", description="Changes every key's variant (a new experiment on the same users).")
    variants: list[Variant] = Field(min_length=1, description="The variants besides control; their shares sum to <= 1.")

    @model_validator(mode="after")
    def _shares(self) -> Experiment:
        if sum(v.share for v in self.variants) > 1 + 1e-9:
            raise ValueError("the variants' shares sum to more than 1")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names) or "control" in names:
            raise ValueError("give each variant its own name, not `control` (the requests no variant gets)")
        return self


class Autoscaling(BaseModel):
    """Serve's autoscaling_config for one deployment: replicas follow ongoing requests per replica."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas; 0 lets an idle pool scale to zero.")
    max_replicas: int = Field(default=4, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Calls in flight per replica that Serve aims at: above it, more replicas."
    )
    upscale_delay_s: float = Field(default=5.0, ge=0, description="How long the need lasts before replicas are added.")
    downscale_delay_s: float = Field(
        default=60.0, ge=0, description="How long the lull lasts before replicas are dropped (a start costs a load)."
    )
    metrics_interval_s: float = Field(default=2.0, gt=0, description="How often replicas report their load.")
    look_back_period_s: float = Field(default=10.0, gt=0, description="The window the load is averaged over.")


def replica_options(num_replicas: int, autoscaling: Autoscaling | None) -> dict:
    """Serve options: a fixed replica count, or an autoscaling config (then Serve owns the count)."""
    if autoscaling is None:
        return {"num_replicas": num_replicas}
    return {"num_replicas": "auto", "autoscaling_config": autoscaling.model_dump()}


MODEL_DESCRIPTION = "Local model directory or model id, loaded with from_pretrained."
NUM_CPUS_DESCRIPTION = "CPUs Ray reserves for each replica (ray_actor_options)."

# A served model's name: what clients send as `model`. No spaces or control characters, so logs and metric tags stay
# one token; a default model named by its path or hub id (the `model` setting) fits too.
MODEL_NAME_PATTERN = r"^[^\s\x00-\x1f\x7f]{1,200}$"
ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]


class ReplicaSettings(BaseModel):
    """What every pool's deployment has: replicas (fixed or autoscaled), the resources of each, its queues and torch
    threads. A pool of its own and the shared pool both take these."""

    max_ongoing_requests: int = Field(
        default=64,
        ge=1,
        description="Calls a replica takes at once; must exceed the calls one batch gathers.",
        json_schema_extra=ADVANCED,
    )
    max_queued_requests: int = Field(
        default=256,
        ge=-1,
        description="Calls waiting for a replica; beyond it callers get 503 + Retry-After. -1: no cap.",
        json_schema_extra=ADVANCED,
    )
    autoscaling: Autoscaling | None = Field(
        default=None,
        description="Serve's autoscaling of this pool (the Autoscaling table; the shared pool's router prefers the "
        "replicas holding a call's model). Unset: num_replicas, fixed.",
    )
    num_replicas: int = Field(default=1, ge=1, description="Replicas of the pool, when it does not autoscale.")
    num_cpus: float = Field(default=1.0, ge=0, description=NUM_CPUS_DESCRIPTION)
    num_gpus: float = Field(
        default=0.0, ge=0, description="GPUs per replica; a fraction lets pools share a card (ray_actor_options)."
    )
    accelerator_type: str | None = Field(
        default=None,
        description="Pins replicas to nodes with Ray's accelerator_type:<NAME> resource, e.g. A10G or L4; the batch "
        "profile row of that card sizes the batches.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Torch CPU threads per replica. Unset: Ray's OMP_NUM_THREADS, i.e. the replica's num_cpus. "
        "A lone CPU replica on a machine gets all cores' speed with this set to the core count.",
        json_schema_extra=ADVANCED,
    )

    def deployment_options(self, name: str) -> dict:
        """Serve deployment options: replicas, queues, each replica's resources."""
        return {
            "name": name,
            **replica_options(self.num_replicas, self.autoscaling),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.ray_actor_options(),
        }

    def ray_actor_options(self) -> dict:
        options: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        return options


class PoolSettings(ReplicaSettings):
    """One pool of scoring replicas: its model, its resources and its batch cap."""

    enabled: bool = Field(default=True, description="false: the pool is not deployed; requests needing it get 503.")
    model: str = Field(description=MODEL_DESCRIPTION)
    name: ModelName | None = Field(
        default=None, description="The name a request's `model` field picks this model by. Unset: the `model` setting."
    )
    aliases: list[ModelName] = Field(
        default_factory=list,
        description="More names that pick this model, e.g. a vendor's model name a client hard-codes "
        "(rerank-v3.5, jina-reranker-m0).",
    )
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Most pairs per batch, counted across callers. Unset: the batch profile of the replica's GPU "
        "(docs/gpus.md); set: overrides it, live through Serve's user_config.",
    )
    batch_wait_timeout_s: float | None = Field(
        default=None,
        ge=0,
        description="How long a batch waits to fill. Unset: from the batch profile.",
        json_schema_extra=ADVANCED,
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto: the profile's (bf16/fp16) on a GPU, float32 on the CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa",
        description="flash_attention_2 is used where flash-attn is installed, else sdpa.",
        json_schema_extra=ADVANCED,
    )
    quantize: Literal["int8"] | None = Field(
        default=None,
        description="int8: dynamic quantisation on CPU (bitsandbytes on GPU). Faster and smaller, costs some accuracy.",
    )
    overlap_preprocessing: bool = Field(
        default=True,
        description="Tokenize the next batch while the previous one runs its forward pass.",
        json_schema_extra=ADVANCED,
    )
    realtime_replicas: int = Field(
        default=0,
        ge=0,
        description="Replicas of a realtime variant (<pool>_realtime_pool), for requests with priority realtime: "
        "each call is its own batch, no wait for other callers.",
    )
    max_tokens_per_forward: int | None = Field(
        default=None,
        ge=64,
        description="Padded tokens per forward pass; a batch sorted by length is cut to fit. Unset: 16384 on "
        "the CPU, no limit on a GPU (the batch cap was sized for the card's memory at full length).",
        json_schema_extra=ADVANCED,
    )
    forward_cost_tokens: int | None = Field(
        default=None,
        ge=0,
        description="What one more forward pass costs, in padded tokens; a sorted batch is cut where a cut saves "
        "more padding than this. Unset: measured at start-up and three times more when idle after the first "
        "call, the median kept (text pools); 0 otherwise.",
        json_schema_extra=ADVANCED,
    )
    calibration: Calibration | None = Field(
        default=None,
        description="{scale, shift}: calibrated = sigmoid(scale * (raw - shift)), overriding the family's raw -> "
        "0..1 map and any score_map.",
    )
    score_map: Path | None = Field(
        default=None,
        description="A raw -> 0..1 map fitted from labels (python -m serve_app.calibrate_scores). Unset: "
        "deploy/score_maps/<name>.json where it exists and was fitted for this model; `calibration` wins over both.",
    )
    load_retry_s: float | None = Field(
        default=300.0,
        gt=0,
        description="A replica whose model did not load reports itself unhealthy after this many seconds, so Serve "
        "replaces it and the new replica loads again (a model volume mounted late, a hub outage). Unset: never.",
        json_schema_extra=ADVANCED,
    )
    health_check_period_s: float = Field(
        default=10.0,
        gt=0,
        description="How often Serve asks each replica whether it is healthy; three failed checks in a row replace "
        "it (a failed device, a model that did not load after load_retry_s). Serve's own default, 10 s: a broken "
        "replica is replaced about 30 s after it breaks.",
        json_schema_extra=ADVANCED,
    )
    family: Literal["cross_encoder", "embedding", "dual_encoder", "blip_itm", "yes_no"] | None = Field(
        default=None,
        description="The model's scorer family. Unset: from config.json's architectures; set it for a model whose "
        "config names none we know (e.g. yes_no for another causal LM reranker).",
    )
    answer_tokens: tuple[str, str] = Field(
        default=("no", "yes"),
        description="yes/no rerankers: the (negative, positive) answer tokens, as the tokenizer spells them; "
        "the score is the softmax of the positive one over the two at the answer position.",
        json_schema_extra=ADVANCED,
    )
    cuda_graphs: bool = Field(
        default=False,
        description="Text cross-encoders and embedding models on a CUDA device: replay each padded shape's forward "
        "from a CUDA graph (captured at warm-up) instead of launching its kernels from Python; a model that cannot be "
        "captured runs eagerly (/v1/models says why). No effect on the CPU or with flash_attention_2.",
        json_schema_extra=ADVANCED,
    )
    prefix_reuse: bool = Field(
        default=True,
        description="yes/no rerankers (causal LMs): run the prompt prefix a query's documents share once per "
        "batch and score only each document's own tokens.",
        json_schema_extra=ADVANCED,
    )

    def served_name(self) -> str:
        return self.name or self.model

    def deployment_options(self, name: str) -> dict:
        """Serve deployment options for this pool."""
        return {
            **super().deployment_options(name),
            "health_check_period_s": self.health_check_period_s,
            "user_config": {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s},
        }

    def realtime_options(self, name: str) -> dict:
        options = self.deployment_options(name)
        options.pop("autoscaling_config", None)
        return {**options, "num_replicas": self.realtime_replicas}


class TextPoolSettings(PoolSettings):
    model: str = Field(default=DEFAULT_TEXT_MODEL, description=MODEL_DESCRIPTION)


class ImageTextPoolSettings(PoolSettings):
    """Half a CPU by default, so that ingress (0.5) + text (1) + image-text (0.5) fit a 2-core machine."""

    model: str = Field(default=DEFAULT_IMAGE_TEXT_MODEL, description=MODEL_DESCRIPTION)
    num_cpus: float = Field(default=0.5, ge=0, description=NUM_CPUS_DESCRIPTION)


# What a model placed in the shared pool cannot set: the shared pool's replicas serve it (shared_pool sets these).
SHARED_IGNORES = frozenset(ReplicaSettings.model_fields) | {
    "realtime_replicas",
    "health_check_period_s",
    "load_retry_s",
}


class ModelSettings(PoolSettings):
    """One more served model, picked by name: a pool of its own (its own replicas, autoscaling and GPU pinning),
    or a place in the shared pool (loaded on demand, least recently used evicted). A shared model's replica
    settings (replicas, autoscaling, CPUs, GPUs, accelerator, queues) are the shared pool's: setting them on the
    model is refused."""

    name: ModelName = Field(description="The name a request's `model` field picks this model by.")
    modality: Literal["text", "image_text"] = Field(
        default="text",
        description="text: scores text pairs only (an image pair sent to it is a 422); image_text: takes image "
        "pairs, and text pairs where its family scores them.",
    )
    placement: Literal["own", "shared"] = Field(
        default="own", description="own: a pool (deployment) of its own; shared: the multiplexed shared pool."
    )

    @model_validator(mode="after")
    def _shared_takes_no_replica_settings(self) -> ModelSettings:
        """A shared model runs on the shared pool's replicas: its own replica settings would be silently ignored."""
        ignored = sorted(SHARED_IGNORES & self.model_fields_set) if self.placement == "shared" else []
        if ignored:
            raise ValueError(
                f"models[name={self.name}] is placed in the shared pool, whose replicas serve it: {', '.join(ignored)} "
                "would be ignored; set them under shared_pool, or give the model placement: own"
            )
        return self


class SharedPoolSettings(ReplicaSettings):
    """The multiplexed pool: its replicas load the `placement: shared` models on first use, at most
    max_models_per_replica each, evicting the least recently used; a batch never mixes models."""

    max_models_per_replica: int = Field(
        default=2, ge=1, description="Models one shared replica holds loaded; past it the least recently used goes."
    )
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Most pairs one gathered batch holds, all models together (each model's own cap still cuts its "
        "forward passes). Unset: the largest of the models' caps (their max_batch_size, else their profile row).",
    )
    keep_resident_s: float | None = Field(
        default=10.0,
        gt=0,
        description="A model that served (or has calls queued) within this many seconds is not evicted to load "
        "another: the call that would evict it gets 503 model_unavailable + Retry-After, so callers naming shared "
        "models in turn cannot make a replica load and evict on every call. null: the least recently used goes "
        "at once.",
    )
    load_backoff_s: float | None = Field(
        default=30.0,
        gt=0,
        description="After a model failed to load (or is not on the node), calls for it are refused at once (503 + "
        "Retry-After) for this long, instead of a load tried (and a model evicted) on every call. null: tried on "
        "every call.",
    )


class IngressSettings(BaseModel):
    """The ingress deployment: HTTP in, pool calls out, on CPUs."""

    replicas: int = Field(default=1, ge=1, description="Ingress replicas, when it does not autoscale.")
    num_cpus: float = Field(
        default=0.5,
        ge=0,
        description="CPUs Ray reserves per ingress replica (ingress 0.5 + text 1 + image-text 0.5 fit 2 cores).",
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Serve's autoscaling of the ingress (the Autoscaling table). Unset: replicas, fixed."
    )
    max_ongoing_requests: int = Field(
        default=100, ge=1, description="HTTP requests one ingress replica takes at once.", json_schema_extra=ADVANCED
    )
    threads: int = Field(
        default=2,
        ge=1,
        description="Threads one ingress replica tokenizes text and decodes images on, each single-threaded (the "
        "Rust tokenizer's own parallelism is off there): however many requests arrive, the ingress takes no more "
        "cores than this, and its event loop keeps answering.",
        json_schema_extra=ADVANCED,
    )
    max_queued_requests: int = Field(
        default=200,
        ge=-1,
        description="HTTP requests waiting for an ingress replica; beyond it: 503 + Retry-After.",
        json_schema_extra=ADVANCED,
    )

    def deployment_options(self) -> dict:
        return {
            **replica_options(self.replicas, self.autoscaling),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus},
        }


# The ingress fields that had flat names (ingress_<name>) before the group: a field added since has none.
OLD_INGRESS_NAMES = ("replicas", "num_cpus", "autoscaling", "max_ongoing_requests", "max_queued_requests")


def score_map_path(name: str) -> Path:
    """Where calibrate_scores writes a served model's fitted map, and where its pool looks for one by default."""
    return SCORE_MAPS_DIR / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".json")


def deployment_key(name: str) -> str:
    """The key (and deployment name stem) of a named model's own pool: model_<name with [^A-Za-z0-9_-] as _>."""
    return "model_" + re.sub(r"[^A-Za-z0-9_-]", "_", name)


class Settings(BaseSettings):
    """All settings. Env: RERANK_<NAME>, nested with '__' (RERANK_TEXT__MODEL=...)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the HTTP proxy binds to.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the HTTP proxy listens on.")
    api_key: SecretStr | None = Field(
        default=None,
        description=f"When set, every route but /health and /health/live needs it (Bearer or X-API-Key). Several "
        f"keys, comma-separated, are all valid (rotation: add the new key, move clients, drop the old one). Each "
        f"key needs {MIN_API_KEY_CHARS}+ characters; set but empty refuses to start (unset: authentication off).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="ERROR for production.")

    text: TextPoolSettings = Field(
        default=TextPoolSettings(), description="The default model for text pairs (a request with no `model`)."
    )
    image_text: ImageTextPoolSettings = Field(
        default=ImageTextPoolSettings(), description="The default model for pairs with an image."
    )
    models: list[ModelSettings] = Field(
        default_factory=list,
        description="More models, each picked by its `name` (or an alias) in a request's `model` field "
        "(env: a JSON list).",
    )
    experiment: Experiment | None = Field(
        default=None,
        description="An A/B test of models or thresholds on a share of requests (see `experiment`). Unset: none.",
    )
    shared_pool: SharedPoolSettings = Field(
        default=SharedPoolSettings(), description="Replicas of the models placed `shared`; deployed only if any is."
    )
    ingress: IngressSettings = Field(
        default=IngressSettings(), description="The ingress deployment: its replicas, CPUs and queues."
    )
    # The ingress group's fields under their old flat names (ingress_replicas ...), still read for one release.
    ingress_replicas: int | None = Field(default=None, ge=1, description="Old name of ingress.replicas.", **OLD_NAME)
    ingress_num_cpus: float | None = Field(default=None, ge=0, description="Old name of ingress.num_cpus.", **OLD_NAME)
    ingress_max_ongoing_requests: int | None = Field(
        default=None, ge=1, description="Old name of ingress.max_ongoing_requests.", **OLD_NAME
    )
    ingress_max_queued_requests: int | None = Field(
        default=None, ge=-1, description="Old name of ingress.max_queued_requests.", **OLD_NAME
    )
    ingress_autoscaling: Autoscaling | None = Field(
        default=None, description="Old name of ingress.autoscaling.", **OLD_NAME
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Deadline of one request; past it the caller gets 504 and its pairs are cancelled.",
    )
    overload_status: Annotated[Literal[503, 429], BeforeValidator(int)] = Field(
        default=503,
        description="The status of a request refused for load (a pool's queue full, admission by estimated wait, a "
        "replica out of memory), with the computed Retry-After either way. 503: a load balancer retries it on "
        "another node (deploy/nginx.conf: proxy_next_upstream http_503); 429: it goes to the client, which backs "
        "off for Retry-After (nginx retries a 429 only with http_429 added). A pool that is down, a replica lost "
        "or a model not loaded stay 503; Serve's own refusal past ingress.max_queued_requests is always 503.",
    )
    retry_after_s: int = Field(
        default=1,
        ge=0,
        description="Retry-After (seconds) sent with 503 when queues are full.",
        json_schema_extra=ADVANCED,
    )
    replica_start_s: int = Field(
        default=20,
        ge=0,
        description="Retry-After (seconds) of a 503 because a pool's replica died or none is running: about what a "
        "replacement takes to start (17-23 s measured on the 2-core VM, tests/test_faults.py); a retry sooner "
        "would only be refused again.",
        json_schema_extra=ADVANCED,
    )
    deadly_input_ttl_s: float | None = Field(
        default=600.0,
        gt=0,
        description="A pool call that was on a replica when it died is never sent again (it may be what killed it: "
        "the caller gets 503 + Retry-After replica_start_s). Pairs lost with two replicas are refused at once "
        "(422 deadly_input) by the ingress that saw it, until this many seconds after the last death. null: never "
        "refused (each retry of such a request may take down one more replica).",
        json_schema_extra=ADVANCED,
    )
    deadly_input_deaths: int = Field(
        default=2,
        ge=1,
        description="Replica deaths with the same pairs after which those pairs are refused (deadly_input_ttl_s).",
        json_schema_extra=ADVANCED,
    )
    admission_wait_fraction: float | None = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Admission by estimated wait: a pool replica refuses a call at once (503, Retry-After computed "
        "from the estimate) when the work admitted before it, plus its own, at the rate the replica drains each "
        "model at (estimated tokens plus each forward's fixed cost, per second of busy time) would take longer "
        "than this fraction of the time the request has left before request_timeout_s. A call on an empty queue is "
        "admitted. A call that alone takes longer than this fraction of a whole request_timeout_s, even at the "
        "best rate the replica has shown, is a 413 (no retry could meet it). Checked before a shared pool loads a "
        "model and before documents are cut into windows. null: admit every call (it may then wait in the queue "
        "until the deadline, and get 504).",
        json_schema_extra=ADVANCED,
    )

    max_documents_per_request: int = Field(
        default=1000,
        ge=1,
        description="Documents per request; more is 413. Every list in a request body is held to it (a list inside "
        "a document, such as its content parts, to at least 16), counted on the parsed JSON before any item is "
        "converted.",
    )
    max_text_chars: int = Field(
        default=100_000,
        ge=1,
        description="Characters per query or document text (a long document is scored as windows; this bounds "
        "the work one document may ask for).",
    )
    max_request_bytes: int = Field(default=50 * 1024 * 1024, ge=1024, description="HTTP request body size.")
    request_read_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time for a request's body to arrive; past it: 408 (a slow body holds no connection open).",
    )
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1, description="Encoded bytes per image.")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Width x height per decoded image.")
    max_image_size: int = Field(
        default=384,
        ge=32,
        description="Images are resized so the long side is at most this (256 saves memory).",
    )
    max_image_aspect_ratio: float = Field(
        default=20.0,
        ge=1,
        description="Longest side over shortest side per image; a 384x1 strip would cost a short-side resizer "
        "gigabytes.",
    )
    max_request_pixels: int = Field(
        default=256_000_000,
        ge=1,
        description="Decoded pixels of all images of one request together (each counted from its header, before "
        "decoding).",
    )
    image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP"],
        description="Pillow formats images may be in (comma-separated in env); others are refused undecoded.",
    )
    image_url_concurrency: int = Field(
        default=8, ge=1, description="Allow-listed URL fetches one request runs at once."
    )
    image_url_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="URL prefixes images may be fetched from (scheme://host[:port]/path). Empty: no URLs.",
    )
    image_url_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Per image fetch, the whole download (a server trickling bytes is cut); waiting for a free "
        "connection gets half of it, then 503 (our load, not the caller's fault).",
    )
    long_documents: Literal["windows", "truncate"] = Field(
        default="windows",
        description="A document longer than the model's window (beside its query): windows scores it as "
        "overlapping token windows and keeps the best window's score; truncate cuts it to the window. TEI's "
        "/rerank always truncates (its `truncate` contract).",
    )
    window_stride_tokens: int = Field(
        default=64, ge=0, description="Tokens consecutive windows of a long document share.", json_schema_extra=ADVANCED
    )
    max_windows_per_document: int = Field(
        default=32,
        ge=1,
        description="A long document is scored over at most this many windows, its first (the rest of it is not "
        "scored, as truncation would not score it). A query that leaves its document under a quarter of the "
        "model's window is not windowed at all: the pair is truncated (or refused, truncate=false).",
    )
    max_windows_per_request: int = Field(
        default=4096,
        ge=1,
        description="Windows one request's long documents may make in all; more is 413, counted before any "
        "window is tokenized. Where a pool cuts the windows (families the ingress does not tokenize for), each "
        "pool call may make its share, in proportion to its pairs.",
    )
    auto_truncate: bool = Field(
        default=True, description="Truncate over-long pairs when a TEI request leaves `truncate` unset."
    )
    quiet_ray: bool = Field(
        default=True,
        description="The local Ray that `make run` starts slows its periodic loops (serve_app/local_ray.py): idle "
        "CPU from ~10% to ~6.5% of a core on 2 cores; deploys and autoscaling react up to ~1 s later and task "
        "events are off. A cluster you start yourself is not touched.",
        json_schema_extra=ADVANCED,
    )
    tokenize_in: Literal["ingress", "pool"] = Field(
        default="ingress",
        description="Where text pairs of cross-encoder and embedding models are tokenized (and long documents "
        "cut into windows): ingress sends token ids to the pool, whose replicas then only pad and run forwards "
        "(tokenizing scales with the CPU-only ingress replicas, and a document's windows spread over pool "
        "replicas); pool sends text. Other families (images, yes/no prompts) always tokenize in the pool.",
        json_schema_extra=ADVANCED,
    )
    min_pairs_per_call: int = Field(
        default=8,
        ge=1,
        description="The ingress spreads a model's pairs over its pool's running replicas, in calls of "
        "ceil(pairs / replicas) pairs, at least this many (a call has a fixed cost), at most max_pairs_per_call: "
        "a request's pairs are scored on several replicas at once. The shared pool gets calls of "
        "max_pairs_per_call (a call on a replica without the model would load it).",
        json_schema_extra=ADVANCED,
    )
    pool_router: Literal["spread", "power_of_two"] = Field(
        default="spread",
        description="How a pool call picks its replica. spread: of the two replicas with the fewest calls "
        "outstanding from this ingress replica, the shorter queue (the calls of one request land on different "
        "replicas). power_of_two: Serve's default, two random replicas, the shorter queue (calls sent at the "
        "same moment often land on one replica).",
        json_schema_extra=ADVANCED,
    )
    calls_in_flight_per_replica: int = Field(
        default=2,
        ge=1,
        description="A request's calls to one pool in flight at once, per running replica of that pool; its further "
        "calls wait in the ingress, so that one large request does not fill the queue in front of other "
        "requests' calls.",
        json_schema_extra=ADVANCED,
    )
    score_cache_entries: int = Field(
        default=0,
        ge=0,
        description="Repeated pairs never scored twice: the ingress keeps the scores of this many text pairs (least "
        "recently used out; about 200 bytes each) keyed by the model, its scoring settings and score map, and the "
        "pair as the model reads it; a hit skips the pool (x-compute-pairs counts only what was computed; /v1/stats "
        "counts hits and misses). Per ingress replica; a settings change redeploys the ingress and starts it empty. "
        "0: off.",
    )
    max_pairs_per_call: int = Field(
        default=128,
        ge=1,
        description="The ingress cuts a pool's pairs into calls of this many, to spread them over replicas.",
        json_schema_extra=ADVANCED,
    )
    default_priority: Literal["batch", "realtime"] = Field(
        default="batch", description="A request's `priority` when it gives none."
    )
    batch_profiles_path: Path = Field(
        default=DEPLOY_DIR / "batch_profiles.yaml",
        description="(GPU kind, pool[, model]) -> batch cap, wait, dtype. Rows measured by calibrate live beside "
        "it in <name>.calibrated.yaml and win over hand-written rows of the same kind, pool and model.",
    )
    health_cache_s: float = Field(
        default=5.0, ge=0, description="How long /health reuses a measured latency.", json_schema_extra=ADVANCED
    )
    health_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="How long /health waits for a pool's probe before calling it unavailable.",
        json_schema_extra=ADVANCED,
    )
    instruction_templates_path: Path = Field(
        default=DEPLOY_DIR / "instruction_templates.json",
        description="A JSON object of name -> instruction, the names a request's instruction_template picks from.",
    )
    model_cache_dir: Path = Field(
        default=DEFAULT_MODEL_CACHE_DIR,
        description="Where models shipped inside Python packages are unpacked.",
    )

    def default_model(self, modality: str) -> PoolSettings:
        """The settings of a modality's default model (the `text` or `image_text` field)."""
        if modality not in MODALITIES:
            raise ValueError(f"no modality {modality!r}; the modalities are {MODALITIES}")
        return getattr(self, modality)

    @model_validator(mode="after")
    def _distinct_names(self) -> Settings:
        """Every served name and alias picks one model; every own pool gets its own deployment."""
        seen: dict[str, str] = {}
        keys: dict[str, str] = {}
        served = [(modality, self.default_model(modality)) for modality in MODALITIES]
        served += [(f"models[{i}]", m) for i, m in enumerate(self.models)]
        for where, model in served:
            if not model.enabled:
                continue
            for name in [model.served_name(), *model.aliases]:
                if name in seen and seen[name] != where:
                    raise ValueError(f"{where}: the name {name!r} is taken by {seen[name]}; each name picks one model")
                seen[name] = where
            if isinstance(model, ModelSettings) and model.placement == "own":
                key = deployment_key(model.name)
                if key in keys:
                    raise ValueError(
                        f"{where}: {model.name!r} and {keys[key]!r} would share the deployment {key}_pool; rename one"
                    )
                keys[key] = model.name
        return self

    @model_validator(mode="after")
    def _old_ingress_names(self) -> Settings:
        """ingress_replicas, ingress_num_cpus ...: read into the ingress group for one release; given beside the
        group's own field of the same setting, they are refused (which one would win is not obvious)."""
        old = {name: getattr(self, f"ingress_{name}") for name in OLD_INGRESS_NAMES}
        old = {name: value for name, value in old.items() if value is not None}
        if not old:
            return self
        both = sorted(set(old) & self.ingress.model_fields_set)
        if both:
            raise ValueError(
                f"ingress.{both[0]} and its old name ingress_{both[0]} are both set: keep ingress.{both[0]}"
            )
        log.warning(
            "settings ingress_%s: old names, read for one release; set ingress.%s", "/".join(old), "/".join(old)
        )
        self.ingress = IngressSettings(**{**self.ingress.model_dump(exclude_unset=True), **old})
        return self

    @field_validator("api_key")
    @classmethod
    def _strong_keys(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty variable (a missing secret in a compose file or a Kubernetes manifest) must not turn
        # authentication off: only an unset one does.
        if value is None:
            return value
        keys = value.get_secret_value().split(",")
        if any(len(key.strip()) < MIN_API_KEY_CHARS for key in keys):
            raise ValueError(
                f"every API key needs at least {MIN_API_KEY_CHARS} characters (an empty RERANK_API_KEY is refused, "
                "not taken as 'no key'): set a long random key, e.g. `openssl rand -hex 32`, or unset the variable "
                "to run without authentication"
            )
        return value

    def api_keys(self) -> list[bytes]:
        """The valid keys, as bytes for a constant-time comparison; empty when authentication is off."""
        if self.api_key is None:
            return []
        return [key.strip().encode() for key in self.api_key.get_secret_value().split(",")]

    @field_validator("image_url_allowlist", "image_formats", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        formats = [name.upper() for name in value]
        unknown = [name for name in formats if name not in Image.OPEN]
        if unknown or not formats:
            raise ValueError(f"image_formats: {unknown or 'none given'}; Pillow here opens {sorted(Image.OPEN)}")
        return formats

    def instruction_templates(self) -> dict[str, str]:
        with open(self.instruction_templates_path, encoding="utf-8") as f:
            templates = json.load(f)
        if not isinstance(templates, dict) or not all(isinstance(v, str) for v in templates.values()):
            raise ValueError(f"{self.instruction_templates_path} must hold a JSON object of name -> instruction text")
        return templates


def env_name(*path: str) -> str:
    """The environment variable of a (nested) setting: env_name("text", "model") -> RERANK_TEXT__MODEL."""
    delimiter = Settings.model_config["env_nested_delimiter"]
    return Settings.model_config["env_prefix"] + delimiter.join(part.upper() for part in path)


# docs/settings.md is written from the fields above: each field's description is its documentation.
SETTINGS_PAGE = "docs/settings.md"
FIRST_FIELDS = ("enabled", "model", "name", "aliases", "max_models_per_replica")  # what a pool is, before its replicas
START_HERE = ("text.model", "image_text.model", "models", "api_key", "host", "text.num_gpus", "text.accelerator_type")
SETTINGS_INTRO = """# Settings

<!-- Written by `python -m serve_app.settings --markdown` from the fields' descriptions in serve_app/settings.py;
tests/test_docs.py checks it is current. Edit the descriptions, not this page. -->

One object, `serve_app.settings.Settings`. Set a field as an environment variable `RERANK_<NAME>`, nested with
`__` (`RERANK_TEXT__MODEL=/models/ms-marco-MiniLM-L-6-v2`, `RERANK_IMAGE_TEXT__NUM_GPUS=1`; a list or a group as
JSON), or under `args` in `deploy/serve_config.yaml`. `python -m serve_app.settings` prints the settings the
environment gives. Rows marked *advanced* are tuning knobs: their defaults suit the cases the tests and the
benchmarks cover."""


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel) and not isinstance(value, (Calibration, Autoscaling)):
        return "see below"
    if value is None:
        return "unset"
    if isinstance(value, Path):
        for base, shown in ((DEPLOY_DIR.parent, ""), (Path.home(), "~/")):  # the repository's, or the user's
            if value.is_relative_to(base) and base != Path("/"):
                return shown + str(value.relative_to(base))
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "empty"
    return str(value)


def _one_line(text: str | None) -> str:
    """A description as one line of markdown (an `<NAME>` would be read as an HTML tag)."""
    return " ".join((text or "").split()).replace("<", "&lt;")


def _rows(model: type[BaseModel], skip: tuple[str, ...] = (), beside: type[BaseModel] | None = None) -> list[list]:
    """(advanced, cells) per field of `model`: name, default (and `beside`'s default), description."""
    rows = []
    # What a model is first, then what it runs on (a base class's fields come first in model_fields).
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] not in FIRST_FIELDS)
    for name, field in fields:
        if name in skip or (field.json_schema_extra or {}).get("old_name"):
            continue
        defaults = [_default(field)]
        if beside is not None:
            defaults.append(_default(beside.model_fields[name]))
        what = _one_line(field.description).replace("|", "\\|")
        advanced = bool((field.json_schema_extra or {}).get("advanced"))
        rows.append([advanced, [f"`{name}`", *[f"`{d}`" for d in defaults], what]])
    return rows


def _tables(title: str, head: list[str], rows: list[list], lead: str = "") -> list[str]:
    """A section: its basic rows, then its advanced ones."""
    out = [f"## {title}", ""] + ([lead, ""] if lead else [])
    line = "| " + " | ".join(head) + " |\n|" + "---|" * len(head)
    for advanced, label in ((False, ""), (True, "*Advanced:*\n\n")):
        chosen = [cells for flag, cells in rows if flag is advanced]
        if chosen:
            out += [label + line, *("| " + " | ".join(cells) + " |" for cells in chosen), ""]
    return out


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def markdown() -> str:
    """docs/settings.md, from the fields' descriptions."""
    groups = {"Settings": Settings, "PoolSettings": TextPoolSettings}
    start = []
    for path in START_HERE:
        group, _, name = path.rpartition(".")
        field = groups["PoolSettings" if group else "Settings"].model_fields[name]
        start.append(f"- `{path}` (`{env_name(*path.split('.'))}`): {_one_line(field.description)}")
    pool = ("text", "image_text", "models", "shared_pool", "ingress", "experiment")
    out = [SETTINGS_INTRO, "", "## Start here", "", *start, ""]
    out += _tables("The service", ["setting", "default", "what"], _rows(Settings, skip=pool))
    out += _tables(
        "The ingress: `ingress`",
        ["setting", "default", "what"],
        _rows(IngressSettings),
        "The old flat names (`ingress_replicas`, `ingress_num_cpus`, `ingress_autoscaling`, "
        "`ingress_max_ongoing_requests`, `ingress_max_queued_requests`) are still read, for one release.",
    )
    out += _tables(
        "A pool: `text`, `image_text`, and each entry of `models`",
        ["setting", "text", "image_text", "what"],
        _rows(TextPoolSettings, beside=ImageTextPoolSettings),
        "An entry of `models` takes these fields with `text`'s defaults (`name` and `model` required), and:",
    )
    out += _tables(
        "A named model: `models[]`",
        ["setting", "default", "what"],
        _rows(ModelSettings, skip=tuple(PoolSettings.model_fields)),
    )
    out += _tables(
        "The shared pool: `shared_pool`",
        ["setting", "default", "what"],
        _rows(SharedPoolSettings),
        _one_line(SharedPoolSettings.__doc__),
    )
    out += _tables(
        "Autoscaling: a pool's `autoscaling`, `shared_pool.autoscaling`, `ingress.autoscaling`",
        ["setting", "default", "what"],
        _rows(Autoscaling),
    )
    out += _tables("A score map by hand: a pool's `calibration`", ["setting", "default", "what"], _rows(Calibration))
    out += _tables(
        "An A/B test: `experiment`", ["setting", "default", "what"], _rows(Experiment), _one_line(Experiment.__doc__)
    )
    out += _tables("A variant of the test: `experiment.variants[]`", ["setting", "default", "what"], _rows(Variant))
    sections = [line[3:] for line in out if line.startswith("## ")]
    toc = [f"- [{title}](#{_anchor(title)})" for title in sections]
    return "\n".join([out[0], "", *toc, "", *out[1:]]).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    from serve_app import pages

    parser = argparse.ArgumentParser(prog="python -m serve_app.settings", description="The service's settings.")
    parser.add_argument("--markdown", action="store_true", help=f"write {SETTINGS_PAGE} from the fields' descriptions")
    args = parser.parse_args(argv)
    if args.markdown:
        (pages.ROOT / SETTINGS_PAGE).write_text(markdown())
        print(f"wrote {SETTINGS_PAGE}")
        return
    print(Settings().model_dump_json(indent=1))


if __name__ == "__main__":
    main()
