"""The plain data of scoring: pairs, scores, errors, scorer descriptions and the Scorer protocol. No torch."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from PIL.Image import Image

if TYPE_CHECKING:
    from serve_app.scoring.family import LoadOptions


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
    max_tokens_per_doc: int | None = None

    @property
    def needs_image_model(self) -> bool:
        return self.query.has_image or self.document.has_image

    def query_text(self) -> str:
        """The query text as a text model sees it: the instruction, when given, leads it."""
        text = self.query.text or ""
        return f"{self.instruction} {text}".strip() if self.instruction else text


@dataclass(frozen=True, slots=True)
class EncodedPair:
    """A text pair tokenized before it reached the pool (by the ingress): what a text pool's forward reads.
    A cross-encoder reads `ids` (query and document as one truncated sequence) with `type_ids` (None where
    the model takes none); an embedding model embeds `ids` (the query) and `second` (the document) alone.
    Token ids are packed little-endian int32 (scoring.text.pack): 4 bytes a token, where a tuple of Python ints
    takes ~36, so a request of many long documents' windows stays small in the ingress and on the wire."""

    ids: bytes
    type_ids: bytes | None = None
    second: bytes | None = None
    tokenizer: str = ""  # the fingerprint of the tokenizer that made the ids (TokenizerSpec.fingerprint)


@dataclass(frozen=True)
class Score:
    """One pair's score: the model's own (`raw`: a logit, a cosine, a probability) and its 0..1 map."""

    raw: float
    relevance: float


class ScoringError(Exception):
    """A pair this scorer cannot score as asked; the caller's input is at fault."""


class PairTooLong(ScoringError):
    pass


class UnsupportedPair(ScoringError):
    pass


class TooManyWindows(ScoringError):
    """A call's long documents would make more windows than it may score (a 413, as a pair too long is)."""


class NotFiniteScores(Exception):
    """The model gave scores that are not numbers (NaN, infinite): a fault of the model or its dtype, never a
    score to rank by."""


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


@dataclass(frozen=True)
class TokenCount:
    real: int = 0
    padded: int = 0

    def __add__(self, other: TokenCount) -> TokenCount:
        return TokenCount(self.real + other.real, self.padded + other.padded)


@dataclass(frozen=True)
class WindowRule:
    """How a call's long documents become windows: consecutive windows share `stride` tokens (at most half a
    window); a document is scored over at most its first `per_document` windows (the rest of it is not scored,
    as truncation would not score it); the call may make at most `per_call` windows in all (None: no bound but
    the per-document one), else TooManyWindows."""

    stride: int
    per_document: int = 32
    per_call: int | None = None


@dataclass(frozen=True)
class Windows:
    """A call's pairs with each long document cut into windows: `pairs` are what is scored, `owner[k]` the
    index of the original pair window k belongs to, `split` how many documents were cut."""

    pairs: list[Pair]
    owner: list[int]
    split: int
    count: int  # original pairs

    @classmethod
    def whole(cls, pairs: Sequence[Pair]) -> Windows:
        return cls(list(pairs), list(range(len(pairs))), 0, len(pairs))

    def merge(self, scores: Sequence[Score]) -> list[Score]:
        """Each original pair's score: its best window's."""
        return best_windows(self.owner, scores, self.count)  # type: ignore[return-value]


def best_windows(owner: Sequence[int], scores: Sequence[Score], count: int) -> list[Score | None]:
    """The one best-window merge (a replica's windows, the ingress' windows spread over calls): per original pair
    0..count-1, the best score of the windows it owns; None for a pair that owns none. The calibrated map is
    monotone, so the best raw score is the best relevance."""
    best: list[Score | None] = [None] * count
    for i, score in zip(owner, scores):
        if best[i] is None or score.raw > best[i].raw:
            best[i] = score
    return best


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

    def calibrate(self, raw_scores: Sequence[float]) -> list[Score]:
        """Each raw score with its calibrated 0..1 relevance (a monotone map of the raw one)."""

    def tokens(self, prepared: Any) -> TokenCount:
        """Real and padded text tokens of a prepared batch (padding waste = padded / real - 1)."""

    def expand_windows(self, pairs: Sequence[Pair], rule: WindowRule) -> Windows:
        """Each text document longer than the model's window (beside its query) as overlapping windows."""

    # Embedding: families that encode one input on its own (embedding models, dual encoders) set `embeds` and
    # embed inputs the way `prepare`/`forward` score pairs; the others raise UnsupportedPair.
    embeds: bool

    def check_inputs(self, inputs: Sequence[Content], truncate: bool) -> None:
        """Raise ScoringError when an input cannot be embedded as asked."""

    def prepare_inputs(self, inputs: Sequence[Content]) -> Any:
        """CPU tensors ready for embed_inputs()."""

    def embed_inputs(self, prepared: Any) -> list[list[float]]:
        """One embedding per input, in order (unit length where the model's own pipeline normalises)."""
