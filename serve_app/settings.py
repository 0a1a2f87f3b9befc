"""Every limit and knob of the service as one typed settings object (env, Serve config args)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "RERANK_"
DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"
DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_IMAGE_TEXT_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_MODEL_CACHE_DIR = Path.home() / ".cache" / "serve_app" / "models"
SCORE_MAPS_DIR = DEPLOY_DIR / "score_maps"

MIN_API_KEY_CHARS = 16

# The pools: text-only pairs, and pairs with an image on either side. Each is a Settings field of that name.
POOLS = ("text", "image_text")


class Calibration(BaseModel):
    """calibrated = sigmoid(scale * (raw - shift)); overrides a family's default map."""

    scale: float = Field(gt=0)
    shift: float = 0.0


class Autoscaling(BaseModel):
    """Serve's autoscaling_config for one deployment: replicas follow ongoing requests per replica."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)
    metrics_interval_s: float = Field(default=2.0, gt=0)
    look_back_period_s: float = Field(default=10.0, gt=0)


def replica_options(num_replicas: int, autoscaling: Autoscaling | None) -> dict:
    """Serve options: a fixed replica count, or an autoscaling config (then Serve owns the count)."""
    if autoscaling is None:
        return {"num_replicas": num_replicas}
    return {"num_replicas": "auto", "autoscaling_config": autoscaling.model_dump()}


# A served model's name: what clients send as `model`. No spaces or control characters, so logs and metric tags stay
# one token; a default model named by its path or hub id (the `model` setting) fits too.
MODEL_NAME_PATTERN = r"^[^\s\x00-\x1f\x7f]{1,200}$"
ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]


class PoolSettings(BaseModel):
    """One pool of scoring replicas: its model, its resources and its batch cap."""

    enabled: bool = True
    model: str = Field(description="Local model directory or model id, loaded with from_pretrained.")
    name: ModelName | None = Field(
        default=None, description="The name a request's `model` field picks this model by. Unset: the `model` setting."
    )
    aliases: list[ModelName] = Field(
        default_factory=list,
        description="More names that pick this model, e.g. a vendor's model name a client hard-codes "
        "(rerank-v3.5, jina-reranker-m0).",
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Calls a replica takes at once; must exceed the calls one batch gathers."
    )
    max_queued_requests: int = Field(
        default=256,
        ge=-1,
        description="Calls waiting for a replica; beyond it callers get 503 + Retry-After. -1: no cap.",
    )
    autoscaling: Autoscaling | None = Field(default=None, description="Unset: num_replicas, fixed.")
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    accelerator_type: str | None = Field(
        default=None, description="Ray accelerator type to pin replicas to, e.g. A10G or L4."
    )
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Most pairs per batch, counted across callers. Unset: the batch profile for the replica's GPU.",
    )
    batch_wait_timeout_s: float | None = Field(default=None, ge=0, description="Unset: from the batch profile.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto: the profile's (bf16/fp16) on a GPU, float32 on the CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa", description="flash_attention_2 is used where flash-attn is installed, else sdpa."
    )
    quantize: Literal["int8"] | None = Field(
        default=None,
        description="int8: dynamic quantisation on CPU (bitsandbytes on GPU). Faster and smaller, costs some accuracy.",
    )
    overlap_preprocessing: bool = Field(
        default=True, description="Tokenize the next batch while the previous one runs its forward pass."
    )
    realtime_replicas: int = Field(
        default=0, ge=0, description="Replicas of a realtime variant: each call is its own batch, no wait."
    )
    max_tokens_per_forward: int | None = Field(
        default=None,
        ge=64,
        description="Padded tokens per forward pass; a batch sorted by length is cut to fit. Unset: 16384 on "
        "the CPU, no limit on a GPU (the batch cap was sized for the card's memory at full length).",
    )
    forward_cost_tokens: int | None = Field(
        default=None,
        ge=0,
        description="What one more forward pass costs, in padded tokens; a sorted batch is cut where a cut saves "
        "more padding than this. Unset: measured at start-up and three times more when idle after the first "
        "call, the median kept (text pools); 0 otherwise.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Torch CPU threads per replica. Unset: Ray's OMP_NUM_THREADS, i.e. the replica's num_cpus.",
    )
    calibration: Calibration | None = Field(default=None, description="Override of the family's raw -> 0..1 map.")
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
    )
    health_check_period_s: float = Field(
        default=10.0,
        gt=0,
        description="How often Serve asks each replica whether it is healthy; three failed checks in a row replace "
        "it (a failed device, a model that did not load after load_retry_s). Serve's own default, 10 s: a broken "
        "replica is replaced about 30 s after it breaks.",
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
    )
    cuda_graphs: bool = Field(
        default=False,
        description="Text cross-encoders and embedding models on a CUDA device: replay each padded shape's forward "
        "from a CUDA graph (captured at warm-up) instead of launching its kernels from Python; a model that cannot be "
        "captured runs eagerly (/v1/models says why). No effect on the CPU or with flash_attention_2.",
    )
    prefix_reuse: bool = Field(
        default=True,
        description="yes/no rerankers (causal LMs): run the prompt prefix a query's documents share once per "
        "batch and score only each document's own tokens.",
    )

    def served_name(self) -> str:
        return self.name or self.model

    def deployment_options(self, name: str) -> dict:
        """Serve deployment options for this pool."""
        return {
            "name": name,
            **replica_options(self.num_replicas, self.autoscaling),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.ray_actor_options(),
            "health_check_period_s": self.health_check_period_s,
            "user_config": {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s},
        }

    def realtime_options(self, name: str) -> dict:
        options = self.deployment_options(name)
        options.pop("autoscaling_config", None)
        return {**options, "num_replicas": self.realtime_replicas}

    def ray_actor_options(self) -> dict:
        options: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        return options


class TextPoolSettings(PoolSettings):
    model: str = DEFAULT_TEXT_MODEL


class ImageTextPoolSettings(PoolSettings):
    """Half a CPU by default, so that ingress (0.5) + text (1) + image-text (0.5) fit a 2-core machine."""

    model: str = DEFAULT_IMAGE_TEXT_MODEL
    num_cpus: float = Field(default=0.5, ge=0)


class ModelSettings(PoolSettings):
    """One more served model, picked by name: a pool of its own (its own replicas, autoscaling and GPU pinning),
    or a place in the shared pool (loaded on demand, least recently used evicted). A shared model's replica
    settings (replicas, autoscaling, CPUs, GPUs, accelerator, queues) are the shared pool's; its own are unused."""

    name: ModelName = Field(description="The name a request's `model` field picks this model by.")
    modality: Literal["text", "image_text"] = Field(
        default="text",
        description="text: scores text pairs only (an image pair sent to it is a 422); image_text: takes image "
        "pairs, and text pairs where its family scores them.",
    )
    placement: Literal["own", "shared"] = Field(
        default="own", description="own: a pool (deployment) of its own; shared: the multiplexed shared pool."
    )


class SharedPoolSettings(BaseModel):
    """The multiplexed pool: its replicas load the `placement: shared` models on first use, at most
    max_models_per_replica each, evicting the least recently used; a batch never mixes models."""

    max_models_per_replica: int = Field(
        default=2, ge=1, description="Models one shared replica holds loaded; past it the least recently used goes."
    )
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: Autoscaling | None = Field(default=None, description="Unset: num_replicas, fixed.")
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    accelerator_type: str | None = None
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=256, ge=-1)
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Most pairs one gathered batch holds, all models together (each model's own cap still cuts its "
        "forward passes). Unset: the largest of the models' caps (their max_batch_size, else their profile row).",
    )
    torch_threads: int | None = Field(default=None, ge=1)

    def deployment_options(self, name: str) -> dict:
        actor: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            actor["accelerator_type"] = self.accelerator_type
        return {
            "name": name,
            **replica_options(self.num_replicas, self.autoscaling),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor,
        }


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
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(
        default=None,
        description=f"When set, every route but /health and /health/live needs it (Bearer or X-API-Key). Several "
        f"keys, comma-separated, are all valid (rotation: add the new key, move clients, drop the old one). Each "
        f"key needs {MIN_API_KEY_CHARS}+ characters; set but empty refuses to start (unset: authentication off).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

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
    shared_pool: SharedPoolSettings = Field(
        default=SharedPoolSettings(), description="Replicas of the models placed `shared`; deployed only if any is."
    )
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_num_cpus: float = Field(default=0.5, ge=0)
    ingress_max_ongoing_requests: int = Field(
        default=100, ge=1, description="HTTP requests one ingress replica takes at once."
    )
    ingress_max_queued_requests: int = Field(
        default=200, ge=-1, description="HTTP requests waiting for an ingress replica; beyond it: 503 + Retry-After."
    )
    ingress_autoscaling: Autoscaling | None = Field(default=None, description="Unset: ingress_replicas, fixed.")
    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Deadline of one request; past it the caller gets 504 and its pairs are cancelled.",
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After (seconds) sent with 503 when queues are full.")
    admission_wait_fraction: float | None = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Admission by estimated wait: a pool replica refuses a call at once (503, Retry-After computed "
        "from the estimate) when the pairs queued before it, plus its own, at the replica's measured pairs/s "
        "would take longer than this fraction of the time the request has left before request_timeout_s. "
        "null: admit every call (it may then wait in the queue until the deadline, and get 504).",
    )

    max_documents_per_request: int = Field(default=1000, ge=1)
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
    image_url_timeout_s: float = Field(default=5.0, gt=0)
    long_documents: Literal["windows", "truncate"] = Field(
        default="windows",
        description="A document longer than the model's window (beside its query): windows scores it as "
        "overlapping token windows and keeps the best window's score; truncate cuts it to the window. TEI's "
        "/rerank always truncates (its `truncate` contract).",
    )
    window_stride_tokens: int = Field(
        default=64, ge=0, description="Tokens consecutive windows of a long document share."
    )
    auto_truncate: bool = Field(
        default=True, description="Truncate over-long pairs when a TEI request leaves `truncate` unset."
    )
    quiet_ray: bool = Field(
        default=True,
        description="The local Ray that `make run` starts slows its periodic loops (serve_app/local_ray.py): idle "
        "CPU from ~10% to ~6.5% of a core on 2 cores; deploys and autoscaling react up to ~1 s later and task "
        "events are off. A cluster you start yourself is not touched.",
    )
    tokenize_in: Literal["ingress", "pool"] = Field(
        default="ingress",
        description="Where text pairs of cross-encoder and embedding models are tokenized (and long documents "
        "cut into windows): ingress sends token ids to the pool, whose replicas then only pad and run forwards "
        "(tokenizing scales with the CPU-only ingress replicas, and a document's windows spread over pool "
        "replicas); pool sends text. Other families (images, yes/no prompts) always tokenize in the pool.",
    )
    min_pairs_per_call: int = Field(
        default=8,
        ge=1,
        description="The ingress spreads a model's pairs over its pool's running replicas, in calls of "
        "ceil(pairs / replicas) pairs, at least this many (a call has a fixed cost), at most max_pairs_per_call: "
        "a request's pairs are scored on several replicas at once. The shared pool gets calls of "
        "max_pairs_per_call (a call on a replica without the model would load it).",
    )
    pool_router: Literal["spread", "power_of_two"] = Field(
        default="spread",
        description="How a pool call picks its replica. spread: of the two replicas with the fewest calls "
        "outstanding from this ingress replica, the shorter queue (the calls of one request land on different "
        "replicas). power_of_two: Serve's default, two random replicas, the shorter queue (calls sent at the "
        "same moment often land on one replica).",
    )
    max_pairs_per_call: int = Field(
        default=128,
        ge=1,
        description="The ingress cuts a pool's pairs into calls of this many, to spread them over replicas.",
    )
    default_priority: Literal["batch", "realtime"] = Field(
        default="batch", description="A request's `priority` when it gives none."
    )
    batch_profiles_path: Path = Field(
        default=DEPLOY_DIR / "batch_profiles.yaml",
        description="(GPU kind, pool[, model]) -> batch cap, wait, dtype. Rows measured by calibrate live beside "
        "it in <name>.calibrated.yaml and win over hand-written rows of the same kind, pool and model.",
    )
    health_cache_s: float = Field(default=5.0, ge=0, description="How long /health reuses a measured latency.")
    health_timeout_s: float = Field(default=10.0, gt=0)
    instruction_templates_path: Path = DEPLOY_DIR / "instruction_templates.json"
    model_cache_dir: Path = Field(
        default=DEFAULT_MODEL_CACHE_DIR,
        description="Where models shipped inside Python packages are unpacked.",
    )

    def pool(self, name: str) -> PoolSettings:
        """The settings of the pool called `name` (one of POOLS)."""
        if name not in POOLS:
            raise ValueError(f"no pool named {name!r}; the pools are {POOLS}")
        return getattr(self, name)

    @model_validator(mode="after")
    def _distinct_names(self) -> Settings:
        """Every served name and alias picks one model; every own pool gets its own deployment."""
        seen: dict[str, str] = {}
        keys: dict[str, str] = {}
        served = [(pool, self.pool(pool)) for pool in POOLS] + [(f"models[{i}]", m) for i, m in enumerate(self.models)]
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
