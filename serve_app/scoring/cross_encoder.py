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
    dtype_name,
    model_max_length,
    padded_groups,
    text_pairs,
    too_long_error,
)


class CrossEncoderScorer:
    """Reads query and document together; the raw score is the relevance logit."""

    def __init__(self, model: str, model_dir: str, options: LoadOptions) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=options.dtype)
        self.model.to(options.device).eval()
        labels = self.model.config.num_labels
        if labels not in (1, 2):
            raise ModelLoadError(f"{model} has {labels} labels; a cross-encoder needs 1 (relevance) or 2 (no, yes)")
        self.device = options.device
        self.max_tokens_per_forward = options.max_tokens_per_forward
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
        )

    def check(self, pairs: Sequence[Pair], truncate: bool) -> None:
        queries, documents = text_pairs(pairs, self.tokenizer, "cross-encoder")
        if truncate:
            return
        lengths = [len(ids) for ids in self.tokenizer(queries, documents, truncation=False)["input_ids"]]
        error = too_long_error(lengths, self.max_length, "pair")
        if error:
            raise error

    @torch.inference_mode()
    def score(self, pairs: Sequence[Pair]) -> list[float]:
        queries, documents = text_pairs(pairs, self.tokenizer, "cross-encoder")
        encoding = self.tokenizer(queries, documents, truncation=True, max_length=self.max_length)
        scores = [0.0] * len(pairs)
        for group, batch in padded_groups(
            encoding, self.max_tokens_per_forward, self.tokenizer.pad_token_id or 0, self.device
        ):
            logits = self.model(**batch).logits.float()
            raw = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
            for i, value in zip(group, raw.tolist()):
                scores[i] = value
        return scores

    def calibrate(self, raw_scores: Sequence[float]) -> list[float]:
        return [self.calibrator(r) for r in raw_scores]
