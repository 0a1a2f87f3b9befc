"""Text cross-encoders (AutoModelForSequenceClassification): one logit -> sigmoid, two -> softmax."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForSequenceClassification

from serve_app.scoring.batching import count_tokens, padded_groups
from serve_app.scoring.family import FamilyScorer, LoadOptions, load_model, model_max_length
from serve_app.scoring.graphs import capturable_mask
from serve_app.scoring.text import raise_if_too_long, unpack
from serve_app.scoring.types import EncodedPair, ModelLoadError, Pair, TokenCount

Prepared = tuple[int, list[tuple[list[int], dict[str, torch.Tensor]]]]


class CrossEncoderScorer(FamilyScorer):
    """Reads query and document together; the raw score is the relevance logit."""

    family = "cross_encoder"

    def __init__(self, model: str, model_dir: str, options: LoadOptions) -> None:
        super().__init__(model_dir, options)
        self.model = load_model(AutoModelForSequenceClassification, model_dir, options)
        labels = self.model.config.num_labels
        if labels not in (1, 2):
            raise ModelLoadError(f"{model} has {labels} labels; a cross-encoder needs 1 (relevance) or 2 (no, yes)")
        self.max_length = model_max_length(self.tokenizer, self.model.config.max_position_embeddings)
        # Two labels: softmax's positive class equals sigmoid(l1 - l0), so that difference is the raw score.
        self.set_info(model, "logit" if labels == 1 else "logit difference (yes - no)")
        self.graphs = self.graph(self.raw_scores)

    def check(self, pairs: Sequence[Pair], truncate: bool) -> None:
        queries, documents = self.text_pairs(pairs)
        if not truncate:
            lengths = [len(ids) for ids in self.tokenizer(queries, documents, truncation=False)["input_ids"]]
            raise_if_too_long(lengths, self.max_length, "pair")

    def prepare(self, pairs: Sequence[Pair | EncodedPair]) -> Prepared:
        """Padded, length-grouped batches. Pairs are tokenized here; EncodedPairs (tokenized by the ingress, the
        same way) are only padded."""
        ids: list = [None] * len(pairs)
        type_ids: list = [None] * len(pairs)
        text, encoded = self.split_encoded(pairs)
        if text:
            queries, documents = self.text_pairs([pairs[i] for i in text])
            tokenized = self.tokenizer(queries, documents, truncation=True, max_length=self.max_length)
            types = tokenized.get("token_type_ids")
            for k, i in enumerate(text):
                ids[i] = tokenized["input_ids"][k]
                type_ids[i] = types[k] if types is not None else None
        for i in encoded:
            item = pairs[i]
            ids[i] = unpack(item.ids)
            type_ids[i] = unpack(item.type_ids) if item.type_ids is not None else None
        pad = self.tokenizer.pad_token_id or 0
        return len(pairs), padded_groups(self.encoding(ids, type_ids), self.options.cuts(), pad, self.max_length)

    def raw_scores(self, batch: dict[str, torch.Tensor], capturable: bool) -> torch.Tensor:
        """One raw score per row of a device batch; `capturable`: with the attention mask in the 4D form that a
        CUDA graph can record (graphs.capturable_mask)."""
        if capturable:
            batch = {**batch, "attention_mask": capturable_mask(batch["attention_mask"], self.model.dtype)}
        logits = self.model(**batch).logits.float()
        return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]

    @torch.inference_mode()
    def forward(self, prepared: Prepared) -> list[float]:
        count, groups = prepared
        scores = [0.0] * count
        for group, batch in groups:
            for i, value in zip(group, self.run_forward(self.raw_scores, batch).tolist()):
                scores[i] = value
        return scores

    def tokens(self, prepared: Prepared) -> TokenCount:
        return count_tokens(prepared[1])
