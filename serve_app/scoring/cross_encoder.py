"""Text cross-encoders (AutoModelForSequenceClassification): one logit -> sigmoid, two -> softmax."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from serve_app.scoring.base import (
    LoadOptions,
    Logistic,
    ModelLoadError,
    Pair,
    ScorerInfo,
    TokenCount,
    count_tokens,
    dtype_name,
    load_model,
    model_max_length,
    padded_groups,
    text_pairs,
    to_device,
    too_long_error,
)

Prepared = tuple[int, list[tuple[list[int], dict[str, torch.Tensor]]]]


class CrossEncoderScorer:
    """Reads query and document together; the raw score is the relevance logit."""

    def __init__(self, model: str, model_dir: str, options: LoadOptions) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = load_model(AutoModelForSequenceClassification, model_dir, options)
        labels = self.model.config.num_labels
        if labels not in (1, 2):
            raise ModelLoadError(f"{model} has {labels} labels; a cross-encoder needs 1 (relevance) or 2 (no, yes)")
        self.device = options.device
        self.options = options
        self.max_length = model_max_length(self.tokenizer, self.model.config.max_position_embeddings)
        # Two labels: softmax's positive class equals sigmoid(l1 - l0), so that difference is the raw score.
        self.calibrator = options.calibration or Logistic()
        self.info = ScorerInfo(
            model=model,
            family="cross_encoder",
            device=options.device,
            dtype=dtype_name(options.dtype),
            max_length=self.max_length,
            raw_score="logit" if labels == 1 else "logit difference (yes - no)",
            calibration=repr(self.calibrator),
            attn_implementation=self.model.config._attn_implementation,
            quantization=options.quantize,
        )

    def check(self, pairs: Sequence[Pair], truncate: bool) -> None:
        queries, documents = text_pairs(pairs, self.tokenizer, "cross-encoder")
        if truncate:
            return
        lengths = [len(ids) for ids in self.tokenizer(queries, documents, truncation=False)["input_ids"]]
        error = too_long_error(lengths, self.max_length, "pair")
        if error:
            raise error

    def prepare(self, pairs: Sequence[Pair]) -> Prepared:
        queries, documents = text_pairs(pairs, self.tokenizer, "cross-encoder")
        encoding = self.tokenizer(queries, documents, truncation=True, max_length=self.max_length)
        pad = self.tokenizer.pad_token_id or 0
        return len(pairs), padded_groups(encoding, self.options, pad, self.max_length)

    @torch.inference_mode()
    def forward(self, prepared: Prepared) -> list[float]:
        count, groups = prepared
        scores = [0.0] * count
        for group, batch in groups:
            logits = self.model(**to_device(batch, self.device)).logits.float()
            raw = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
            for i, value in zip(group, raw.tolist()):
                scores[i] = value
        return scores

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        return self.forward(self.prepare(pairs))

    def calibrate(self, raw_scores: Sequence[float]) -> list[float]:
        return [self.calibrator(r) for r in raw_scores]

    def tokens(self, prepared: Prepared) -> TokenCount:
        return count_tokens(prepared[1])
