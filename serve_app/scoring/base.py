"""The Scorer protocol, the Pair it scores, and loading the right family from a model's config."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL.Image import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Content:
    """One side of a pair: text, an image, or both."""

    text: str | None = None
    image: Image | None = None

    @property
    def has_image(self) -> bool:
        return self.image is not None


@dataclass(frozen=True)
class Pair:
    """A (query, document) pair with what the caller asked of its scoring."""

    query: Content
    document: Content
    instruction: str | None = None
    max_document_tokens: int | None = None

    @property
    def needs_image_model(self) -> bool:
        return self.query.has_image or self.document.has_image

    def query_text(self) -> str:
        """The query text as a text model sees it: the instruction, when given, leads it."""
        text = self.query.text or ""
        return f"{self.instruction} {text}".strip() if self.instruction else text


class ScoringError(Exception):
    """A pair this scorer cannot score as asked; the caller's input is at fault."""


class PairTooLong(ScoringError):
    pass


class UnsupportedPair(ScoringError):
    pass


class ModelLoadError(Exception):
    """The model could not be found or loaded."""


@dataclass(frozen=True)
class Logistic:
    """Monotone map raw -> 0..1: sigmoid(scale * (raw - shift))."""

    scale: float = 1.0
    shift: float = 0.0

    def __call__(self, raw: float) -> float:
        z = self.scale * (raw - self.shift)
        # Two branches keep exp() from overflowing for large |z|.
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)


@dataclass(frozen=True)
class Identity:
    """For families whose raw score already is a probability."""

    def __call__(self, raw: float) -> float:
        return min(1.0, max(0.0, raw))


Calibrator = Callable[[float], float]


@dataclass(frozen=True)
class ScorerInfo:
    model: str
    family: str
    device: str
    dtype: str
    max_length: int
    raw_score: str  # what the raw score is: logit, cosine, match probability
    calibration: str
    attn_implementation: str = "sdpa"
    quantization: str | None = None


class Scorer(Protocol):
    """Turns (query, document) pairs into raw scores and maps them to calibrated 0..1.

    `score` is `forward(prepare(pairs))`: `prepare` is the CPU part (tokenize, preprocess images,
    sort by length and pad), `forward` the device part, so a server can overlap one batch's
    preparation with the previous batch's forward.
    """

    info: ScorerInfo
    options: LoadOptions  # how batches are cut and shaped; a server may tune forward_cost_tokens once loaded

    def check(self, pairs: Sequence[Pair], truncate: bool) -> None:
        """Raise ScoringError when a pair cannot be scored as asked (cheap, before batching)."""

    def prepare(self, pairs: Sequence[Pair]) -> Any:
        """CPU tensors ready for forward()."""

    def forward(self, prepared: Any) -> list[float]:
        """Raw scores, one per pair, in the order the pairs were given to prepare()."""

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        """Raw scores, one per pair, in order."""

    def calibrate(self, raw_scores: Sequence[float]) -> list[float]:
        """Calibrated 0..1 scores: a monotone map of the raw ones."""

    def tokens(self, prepared: Any) -> TokenCount:
        """Real and padded text tokens of a prepared batch (padding waste = padded / real - 1)."""


@dataclass(frozen=True)
class TokenCount:
    real: int = 0
    padded: int = 0

    def __add__(self, other: TokenCount) -> TokenCount:
        return TokenCount(self.real + other.real, self.padded + other.padded)


def count_tokens(groups: Sequence[tuple[Sequence[int] | None, dict[str, torch.Tensor]]]) -> TokenCount:
    """Tokens in padded text batches: real ones are those the attention mask keeps in the group's own rows
    (rows past len(indices) only pad the batch to a warmed shape); None: every row is the group's."""
    real = padded = 0
    for indices, batch in groups:
        mask = batch["attention_mask"]
        real += int(mask[: len(indices) if indices is not None else None].sum())
        padded += mask.numel()
    return TokenCount(real, padded)


@dataclass
class LoadOptions:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_tokens_per_forward: int | None = 16384  # None: no cut beyond the batch cap (a GPU's cap already fits)
    # What one more forward pass costs, in padded tokens: the fixed cost (kernel launches, Python) over the
    # cost of one token. A batch sorted by length is cut where a new forward costs less than the padding it
    # saves. Near 0 on a CPU, thousands on a large GPU; the replica measures it at start-up.
    forward_cost_tokens: int = 0
    calibration: Calibrator | None = None
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "serve_app" / "models")
    # GPU kernels are chosen per shape: pad lengths to buckets and batches to powers of two, so the
    # shapes a replica meets are few and all warmed at start-up.
    shape_buckets: bool = False
    attn_implementation: str = "sdpa"
    quantize: str | None = None  # "int8"

    def shapes(self) -> Shapes:
        return Shapes(BUCKET if self.shape_buckets else 1, self.shape_buckets)


# Finer buckets pad less; each bucket is one more shape to warm at start-up (x power-of-two batch sizes).
BUCKET = 16


@dataclass(frozen=True)
class Shapes:
    """How padded batches are shaped: lengths rounded up to `length_multiple`, row counts up to powers of two.

    Rows are padded, not split: on a GPU a forward pass has a fixed cost of milliseconds (kernel launches),
    so one forward with a few repeated rows beats several smaller ones (measured on an H200: a 46-pair
    batch cut into 32+8+4+2 took 17 ms, three times one padded forward's cost)."""

    length_multiple: int = 1
    power_of_two_batches: bool = False

    def width(self, longest: int, max_length: int) -> int:
        return min(max_length, -(-longest // self.length_multiple) * self.length_multiple)

    def rows(self, count: int) -> int:
        return 1 << (count - 1).bit_length() if self.power_of_two_batches and count > 0 else count


def load_model(cls, model_dir: str, options: LoadOptions):
    """from_pretrained with the options' dtype, attention kernel and quantisation, on the device, in eval mode."""
    attn = options.attn_implementation
    if attn == "flash_attention_2" and (options.device == "cpu" or importlib.util.find_spec("flash_attn") is None):
        log.warning("flash_attention_2 asked for but flash-attn is not installed (or no GPU); using sdpa")
        attn = "sdpa"
    kwargs: dict[str, Any] = {"dtype": options.dtype, "attn_implementation": attn}
    if options.quantize == "int8" and options.device != "cpu":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError("quantize=int8 on a GPU needs the bitsandbytes package; install it or unset quantize")
        from transformers import BitsAndBytesConfig

        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": options.device})
    try:
        model = cls.from_pretrained(model_dir, **kwargs)
    except (ValueError, ImportError) as exc:
        if "attn_implementation" not in str(exc) and "does not support" not in str(exc):
            raise
        log.warning("%s does not support attn_implementation=%s; using the model's default", model_dir, attn)
        kwargs.pop("attn_implementation")
        model = cls.from_pretrained(model_dir, **kwargs)
    if "quantization_config" not in kwargs:
        model.to(options.device)
    model.eval()
    if options.quantize == "int8" and options.device == "cpu":
        # Dynamic int8 on CPU: Linear weights in int8, activations quantised per batch. Costs some accuracy.
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


# Models whose weights ship inside a Python package: id -> (package, archive inside it).
PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("all_minilm_l6_v2", "model.zip"),
}

# config.json "architectures" -> family module name.
FAMILIES = {
    "ForSequenceClassification": "cross_encoder",
    "CLIPModel": "dual_encoder",
    "SiglipModel": "dual_encoder",
    "Siglip2Model": "dual_encoder",
    "BlipForImageTextRetrieval": "blip_itm",
}
# Bare encoders ("BertModel") are embedding models; other "...Model" classes (GPT2LMHeadModel,
# CLIPVisionModel) are not, so the embedding family also needs one of these model types.
ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "deberta", "deberta-v2", "electra",
    "camembert", "modernbert", "nomic_bert", "new", "gte",
}  # fmt: skip


def resolve_model_dir(model: str, cache_dir: Path) -> str:
    """A local directory, a packaged model unpacked once into cache_dir, or the id as given."""
    if os.path.isdir(model):
        return model
    if model in PACKAGED_MODELS:
        package, archive = PACKAGED_MODELS[model]
        target = cache_dir / model.replace("/", "--")
        if (target / "config.json").exists():
            return str(target)
        try:
            source = resources.files(package) / archive
        except ModuleNotFoundError as exc:
            raise ModelLoadError(f"{model} ships in the Python package for {package}, which is not installed") from exc
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Unpack beside the target and rename: replicas on one node may unpack at once.
        scratch = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".unpack-"))
        with resources.as_file(source) as path, zipfile.ZipFile(path) as zf:
            zf.extractall(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
            if not (target / "config.json").exists():
                raise
        return str(target)
    return model


def read_config(model_dir: str) -> dict:
    if model_dir.startswith(("/", ".", "~")) and not os.path.isdir(model_dir):
        raise ModelLoadError(f"no such model directory: {model_dir}")
    if os.path.isdir(model_dir):
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise ModelLoadError(f"{model_dir} has no config.json")
        return json.loads(path.read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir).to_dict()
    except Exception as exc:  # noqa: BLE001 - any hub or parse failure means "cannot load"
        raise ModelLoadError(
            f"cannot load {model_dir!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from exc


def family_of(config: dict) -> str:
    architectures = config.get("architectures") or []
    for arch in architectures:
        for suffix, family in FAMILIES.items():
            if arch.endswith(suffix):
                return family
        if arch.endswith("Model") and config.get("model_type") in ENCODER_TYPES:
            return "embedding"
    raise ModelLoadError(
        f"no scorer family for architectures {architectures}: supported are sequence-classification "
        "cross-encoders, encoder models (embedding), CLIP/SigLIP and BLIP image-text retrieval"
    )


def load_scorer(model: str, options: LoadOptions | None = None) -> Scorer:
    """Load `model` (directory or id) with the family its config.json names."""
    options = options or LoadOptions()
    model_dir = resolve_model_dir(model, options.cache_dir)
    config = read_config(model_dir)
    family = family_of(config)
    log.info("loading %s as %s on %s", model, family, options.device)
    try:
        if family == "cross_encoder":
            from serve_app.scoring.cross_encoder import CrossEncoderScorer as cls
        elif family == "embedding":
            from serve_app.scoring.embedding import EmbeddingScorer as cls  # type: ignore[assignment]
        elif family == "dual_encoder":
            from serve_app.scoring.dual_encoder import DualEncoderScorer as cls  # type: ignore[assignment]
        else:
            from serve_app.scoring.blip_itm import BlipItmScorer as cls  # type: ignore[assignment]
        return cls(model, model_dir, options)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load {model!r} as {family}: {type(exc).__name__}: {exc}") from exc


def model_max_length(tokenizer, config_limit: int | None) -> int:
    """The tokens the model can take: the tokenizer's limit capped by the position embeddings."""
    limits = [n for n in (getattr(tokenizer, "model_max_length", None), config_limit) if n and n < 1_000_000]
    return min(limits) if limits else 512


def length_groups(
    lengths: Sequence[int],
    max_tokens: int,
    forward_cost_tokens: int = 0,
    width: Callable[[int], int] = int,
    power_of_two_rows: bool = False,
) -> list[list[int]]:
    """Indices sorted by length, cut into groups (forward passes) of least total cost.

    A group costs `forward_cost_tokens` plus its padded size (rows x width of its longest; rows = its
    count, or the next power of two); no group's padded size exceeds `max_tokens` unless a single pair
    does. Exact, by dynamic programming over the sorted lengths (O(n^2) in numpy; n is one batch).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    if n == 0:
        return []
    widths = [width(lengths[i]) for i in order]
    best = np.zeros(n + 1)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        # Sorted ascending: a group ending at j is as wide as its last member.
        w = widths[j - 1]
        first = max(0, j - max(1, max_tokens // max(w, 1)))
        counts = j - np.arange(first, j)
        if power_of_two_rows:
            counts = 1 << np.ceil(np.log2(counts)).astype(np.int64)
        costs = best[first:j] + forward_cost_tokens + counts * w
        k = int(np.argmin(costs))
        best[j] = costs[k]
        cut[j] = first + k
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    groups.reverse()
    return groups


def truncate_to_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """The longest prefix of text that holds at most max_tokens tokens (no special tokens)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    offsets = encoding["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text
    return text[: offsets[max_tokens - 1][1]]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def padded_groups(
    encoding, options: LoadOptions, pad_token_id: int, max_length: int
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """(indices, CPU tensors) for length-sorted groups of an unpadded tokenizer output.

    With shape buckets, a group's rows are padded to a power of two by repeating its last row (a real
    row, so no all-masked attention); the forward reads the first len(indices) rows only."""
    input_ids = encoding["input_ids"]
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoding]
    shapes = options.shapes()
    groups = length_groups(
        [len(ids) for ids in input_ids],
        options.max_tokens_per_forward or 1 << 30,
        options.forward_cost_tokens,
        width=lambda n: shapes.width(n, max_length),
        power_of_two_rows=shapes.power_of_two_batches,
    )
    out = []
    for group in groups:
        width = shapes.width(max(len(input_ids[i]) for i in group), max_length)
        rows = group + [group[-1]] * (shapes.rows(len(group)) - len(group))
        batch = {}
        for key in keys:
            values = encoding[key]
            array = np.full((len(rows), width), pad_token_id if key == "input_ids" else 0, dtype=np.int64)
            for r, i in enumerate(rows):
                array[r, : len(values[i])] = values[i]
            batch[key] = torch.from_numpy(array)
        out.append((group, batch))
    return out


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def text_pairs(pairs: Sequence[Pair], tokenizer, family: str) -> tuple[list[str], list[str]]:
    """Query texts (instruction first) and document texts (cut to max_document_tokens) of text pairs."""
    queries, documents = [], []
    for pair in pairs:
        if pair.needs_image_model or pair.document.text is None:
            raise UnsupportedPair(f"a text {family} scores text queries against text documents only")
        document = pair.document.text
        if pair.max_document_tokens:
            document = truncate_to_tokens(tokenizer, document, pair.max_document_tokens)
        queries.append(pair.query_text())
        documents.append(document)
    return queries, documents


def too_long_error(lengths: Sequence[int], max_length: int, what: str) -> PairTooLong | None:
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if not too_long:
        return None
    first = too_long[0]
    return PairTooLong(
        f"{len(too_long)} {what}(s) exceed the model's {max_length} tokens (first: {what} {first}, "
        f"{lengths[first]} tokens); shorten them or send truncate=true"
    )
