"""What every model family shares: load options, from_pretrained with them, and a small base class."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import AutoTokenizer

from serve_app.scoring.batching import Cuts, Shapes, to_device, truncate_to_tokens
from serve_app.scoring.graphs import GRAPHED_ATTENTION, Batch, GraphedForward
from serve_app.scoring.text import (
    ENCODED_FAMILIES,
    TokenizerSpec,
    check_window_count,
    cut_windows,
    may_need_windows,
    worth_windows,
)
from serve_app.scoring.types import (
    Calibrator,
    Content,
    EncodedPair,
    Logistic,
    ModelLoadError,
    Pair,
    Score,
    ScorerInfo,
    TokenCount,
    UnsupportedPair,
    WindowRule,
    Windows,
)
from serve_app.settings import DEFAULT_MODEL_CACHE_DIR

log = logging.getLogger(__name__)

# Padded tokens per forward on a CPU, where a forward's cost grows with its size and cuts are nearly free.
CPU_MAX_TOKENS_PER_FORWARD = 16384


@dataclass
class LoadOptions:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_tokens_per_forward: int | None = CPU_MAX_TOKENS_PER_FORWARD  # None: no cut beyond the batch cap
    # What one more forward pass costs, in padded tokens: the fixed cost (kernel launches, Python) over the
    # cost of one token. A batch sorted by length is cut where a new forward costs less than the padding it
    # saves. Near 0 on a CPU, thousands on a large GPU; a pool measures it once loaded.
    forward_cost_tokens: int = 0
    calibration: Calibrator | None = None
    cache_dir: Path = field(default_factory=lambda: DEFAULT_MODEL_CACHE_DIR)
    # GPU kernels are chosen per shape: pad lengths to buckets and batches to powers of two, so the
    # shapes a replica meets are few and all warmed at start-up.
    shape_buckets: bool = False
    attn_implementation: str = "sdpa"
    quantize: str | None = None  # "int8"
    family: str | None = None  # None: from config.json
    answer_tokens: tuple[str, str] = ("no", "yes")  # yes/no rerankers: the (negative, positive) answer tokens
    prefix_reuse: bool = True  # yes/no rerankers: run a query's shared prompt prefix once per batch
    cuda_graphs: bool = False  # text encoders on a CUDA device: replay each shape's forward from a CUDA graph

    def cuts(self) -> Cuts:
        return Cuts(Shapes.bucketed(self.shape_buckets), self.max_tokens_per_forward, self.forward_cost_tokens)

    def describe(self) -> dict:
        """What /v1/models and calibrate report: how this scorer shapes and cuts its batches."""
        return {
            "device": self.device,
            "dtype": dtype_name(self.dtype),
            "max_tokens_per_forward": self.max_tokens_per_forward,
            "forward_cost_tokens": self.forward_cost_tokens,
            "shape_buckets": self.shape_buckets,
            "attn_implementation": self.attn_implementation,
            "quantize": self.quantize,
            "prefix_reuse": self.prefix_reuse,
            "cuda_graphs": self.cuda_graphs,
        }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def model_max_length(tokenizer, config_limit: int | None) -> int:
    """The tokens the model can take: the tokenizer's limit capped by the position embeddings."""
    limits = [n for n in (getattr(tokenizer, "model_max_length", None), config_limit) if n and n < 1_000_000]
    return min(limits) if limits else 512


class FamilyScorer:
    """The part of a Scorer every family writes the same way: `score`, `calibrate`, `info`, document cuts.

    The base loads the tokenizer; a family's constructor loads its model (`self.model`, `self.max_length`),
    then calls `describe`; it writes `check`, `prepare`, `forward` and `tokens` itself.
    """

    family: ClassVar[str]
    default_calibration: ClassVar[Calibrator] = Logistic()
    tokenizer: Any
    model: Any
    max_length: int

    def __init__(self, model_dir: str, options: LoadOptions) -> None:
        # Text a client sends is text: a "[SEP]" or "<|im_end|>" typed in a document is tokenized as its characters,
        # never as the control token (which would end the segment or the prompt's turn). The tokenizer still adds
        # its own special tokens; a prompt's own come from its template (yes_no.py).
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, split_special_tokens=True)
        self.options = options
        self.device = options.device
        self.dtype = options.dtype
        self.calibrator: Calibrator = options.calibration or self.default_calibration

    def set_info(self, model: str, raw_score: str) -> None:
        """What `info` says of this scorer (its model, family, device, raw score and map), set once it has loaded."""
        self.info = ScorerInfo(
            model=model,
            family=self.family,
            device=self.options.device,
            dtype=dtype_name(self.options.dtype),
            max_length=self.max_length,
            raw_score=raw_score,
            calibration=repr(self.calibrator),
            attn_implementation=self.model.config._attn_implementation,
            quantization=self.options.quantize,
        )

    # The CUDA-graphed forward, where the options ask for one and the model can have it (text encoders).
    graphs: GraphedForward | None = None

    def graph(self, forward: Callable[[Batch, bool], torch.Tensor]) -> GraphedForward | None:
        """`forward(batch, capturable)` replayed from CUDA graphs, where the options ask for it on a CUDA device
        and the attention kernel takes a 4D mask; None otherwise (the forward then runs as it is)."""
        attention = self.model.config._attn_implementation
        if not (self.options.cuda_graphs and self.device.startswith("cuda")):
            return None
        if attention not in GRAPHED_ATTENTION or self.options.quantize is not None:
            log.warning("cuda_graphs is on, but not with %s attention or quantize: forwards run eagerly", attention)
            return None
        # How far a capture's output may stand from the eager forward's: the two pass the mask differently, so
        # attention kernels (and their rounding) may differ.
        tolerance = {torch.float32: 1e-4, torch.float16: 1e-2}.get(self.dtype, 3e-2)
        return GraphedForward(
            lambda batch: forward(batch, True), lambda batch: forward(batch, False), self.device, tolerance
        )

    def run_forward(self, forward: Callable[[Batch, bool], torch.Tensor], batch: Batch) -> torch.Tensor:
        """One padded CPU batch through the graphed forward where there is one, else the plain one."""
        if self.graphs is not None:
            return self.graphs(batch)
        return forward(to_device(batch, self.device), False)

    def prepare(self, pairs: Sequence[Pair]) -> Any:
        raise NotImplementedError

    # Families that embed one input on its own say so and override the three below (the Scorer protocol).
    embeds: ClassVar[bool] = False

    def check_inputs(self, inputs: Sequence[Content], truncate: bool) -> None:
        raise UnsupportedPair(
            f"a {self.family} model scores (query, document) pairs together: it has no embedding of one input"
        )

    def prepare_inputs(self, inputs: Sequence[Content]) -> Any:
        self.check_inputs(inputs, True)

    def embed_inputs(self, prepared: Any) -> list[list[float]]:
        raise NotImplementedError

    def forward(self, prepared: Any) -> list[float]:
        raise NotImplementedError

    def tokens(self, prepared: Any) -> TokenCount:
        raise NotImplementedError

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        return self.forward(self.prepare(pairs))

    def calibrate(self, raw_scores: Sequence[float]) -> list[Score]:
        return [Score(raw, self.calibrator(raw)) for raw in raw_scores]

    def document_text(self, pair: Pair) -> str | None:
        """The document's text, cut to the pair's max_tokens_per_doc."""
        text = pair.document.text
        if text is not None and pair.max_tokens_per_doc:
            text = truncate_to_tokens(self.tokenizer, text, pair.max_tokens_per_doc)
        return text

    # Whether the model reads query and document as one sequence (cross-encoders) or each text alone.
    pair_input: ClassVar[bool] = True

    def document_budget(self, pair: Pair) -> int:
        """Document tokens that fit the model's window beside this pair's query and special tokens."""
        specials = self.tokenizer.num_special_tokens_to_add(pair=self.pair_input)
        if not self.pair_input:
            return self.max_length - specials
        query = len(self.tokenizer(pair.query_text(), add_special_tokens=False)["input_ids"])
        return self.max_length - specials - query

    def windows(self, pair: Pair, rule: WindowRule) -> list[str] | None:
        """The pair's document (cut to max_tokens_per_doc) as overlapping windows of the tokens that fit beside
        its query, as `rule` cuts them (text.cut_windows); None when it fits whole, has no text, or its query
        leaves it under a quarter of the model's window (then truncation applies)."""
        text = self.document_text(pair)
        if text is None or pair.needs_image_model:
            return None
        budget = self.document_budget(pair)
        if not worth_windows(budget, self.max_length) or not may_need_windows(text, budget):
            return None
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return cut_windows(text, offsets, budget, rule)

    def expand_windows(self, pairs: Sequence[Pair], rule: WindowRule) -> Windows:
        expanded, owner, split = [], [], 0
        for i, pair in enumerate(pairs):
            texts = self.windows(pair, rule)
            if texts is None:
                expanded.append(pair)
                owner.append(i)
                continue
            split += 1
            for text in texts:
                expanded.append(replace(pair, document=Content(text=text), max_tokens_per_doc=None))
                owner.append(i)
        return check_window_count(Windows(expanded, owner, split, len(pairs)), rule)

    def tokenizer_spec(self) -> TokenizerSpec | None:
        """This model's tokenizing as plain data, for a caller that tokenizes before the pool (the ingress); None
        where the family's tokenizing is not reproduced outside (images, prompts) or the tokenizer is not a fast
        one."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if self.family not in ENCODED_FAMILIES or backend is None:
            return None
        return TokenizerSpec(
            family=self.family,
            tokenizer_json=backend.to_str(),
            max_length=self.max_length,
            truncation_side=getattr(self.tokenizer, "truncation_side", "right"),
            type_ids="token_type_ids" in self.tokenizer.model_input_names,
        )

    def encoding(self, ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int] | None] | None) -> dict:
        """An unpadded tokenizer output (what padded_groups takes) of token ids; type ids where the model takes
        them (zeros where a sequence has none)."""
        encoding: dict[str, list] = {"input_ids": list(ids), "attention_mask": [[1] * len(x) for x in ids]}
        if "token_type_ids" in self.tokenizer.model_input_names:
            types = type_ids or [None] * len(ids)
            encoding["token_type_ids"] = [t if t is not None else [0] * len(x) for x, t in zip(ids, types)]
        return encoding

    @staticmethod
    def split_encoded(items: Sequence[Pair | EncodedPair]) -> tuple[list[int], list[int]]:
        """Positions of the pairs still to tokenize here and of those that arrived as token ids."""
        text = [i for i, item in enumerate(items) if not isinstance(item, EncodedPair)]
        encoded = [i for i, item in enumerate(items) if isinstance(item, EncodedPair)]
        return text, encoded

    def text_pairs(self, pairs: Sequence[Pair]) -> tuple[list[str], list[str]]:
        """Query texts (instruction first) and document texts of text-only pairs."""
        queries, documents = [], []
        for pair in pairs:
            document = self.document_text(pair)
            if pair.needs_image_model or document is None:
                raise UnsupportedPair(f"a text {self.family} model scores text queries against text documents only")
            queries.append(pair.query_text())
            documents.append(document)
        return queries, documents
