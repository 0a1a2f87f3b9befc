"""Text embedding models (bi-encoders): mean pooling, then cosine similarity of query and document."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel

from serve_app.scoring.batching import count_tokens, padded_groups, to_device
from serve_app.scoring.family import FamilyScorer, LoadOptions, load_model, model_max_length
from serve_app.scoring.graphs import capturable_mask
from serve_app.scoring.text import pack, raise_if_too_long, unpack
from serve_app.scoring.types import Content, EncodedPair, Logistic, Pair, TokenCount, UnsupportedPair


def sentence_transformers_normalizes(model_dir: str) -> bool:
    """Whether the model's sentence-transformers pipeline ends in a Normalize module (its card's embeddings are
    unit length); a plain transformers export has no pipeline, and sentence-transformers then only pools."""
    path = Path(model_dir) / "modules.json"
    return path.exists() and any("Normalize" in module.get("type", "") for module in json.loads(path.read_text()))


def sentence_transformers_max_length(model_dir: str) -> int | None:
    """The sequence limit a sentence-transformers export was trained with, when it says."""
    path = Path(model_dir) / "sentence_bert_config.json"
    if path.exists():
        return json.loads(path.read_text()).get("max_seq_length")
    return None


@dataclass
class Prepared:
    texts: int  # distinct texts to embed
    groups: list[tuple[list[int], dict[str, torch.Tensor]]]
    queries: list[int]  # per pair: the row of its query among the distinct texts
    documents: list[int]


class EmbeddingScorer(FamilyScorer):
    """Embeds each distinct text once per batch; the raw score is the cosine of query and document."""

    family = "embedding"
    embeds = True
    pair_input = False  # each text embedded alone: a long document is windowed against the model's window
    # Cosine 0.5 maps to 0.5; 0.7 (a close answer for MiniLM-class models) to 0.88; 0.2 to 0.05.
    default_calibration = Logistic(scale=10.0, shift=0.5)

    def __init__(self, model: str, model_dir: str, options: LoadOptions) -> None:
        super().__init__(model_dir, options)
        self.model = load_model(AutoModel, model_dir, options)
        limit = model_max_length(self.tokenizer, getattr(self.model.config, "max_position_embeddings", None))
        self.max_length = min(limit, sentence_transformers_max_length(model_dir) or limit)
        self.normalizes = sentence_transformers_normalizes(model_dir)
        self.set_info(model, "cosine")
        self.graphs = self.graph(self.pooled)

    def check(self, pairs: Sequence[Pair], truncate: bool) -> None:
        queries, documents = self.text_pairs(pairs)
        if not truncate:
            lengths = [len(ids) for ids in self.tokenizer(queries + documents, truncation=False)["input_ids"]]
            # Texts 0..n-1 are the queries, n.. the documents: report the pair either sits in.
            lengths = [max(q, d) for q, d in zip(lengths[: len(pairs)], lengths[len(pairs) :])]
            raise_if_too_long(lengths, self.max_length, "pair")

    def mean_pooled(self, batch: dict[str, torch.Tensor], capturable: bool) -> torch.Tensor:
        """Mean-pooled embeddings of a device batch's rows (sentence-transformers' mean pooling); `capturable`:
        with the attention mask in the 4D form that a CUDA graph can record (graphs.capturable_mask)."""
        mask = batch["attention_mask"]
        if capturable:
            batch = {**batch, "attention_mask": capturable_mask(mask, self.model.dtype)}
        hidden = self.model(**batch).last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)

    def pooled(self, batch: dict[str, torch.Tensor], capturable: bool) -> torch.Tensor:
        """Unit-length mean-pooled embeddings (what cosine scores take)."""
        return F.normalize(self.mean_pooled(batch, capturable), dim=-1)

    @torch.inference_mode()
    def embed(
        self, count: int, groups: list[tuple[list[int], dict[str, torch.Tensor]]], unit: bool = True
    ) -> torch.Tensor:
        """Mean-pooled embeddings, one row per text; unit length unless `unit` is false (then never graphed)."""
        rows: list[torch.Tensor] = [torch.empty(0)] * count
        for group, batch in groups:
            pooled = (
                self.run_forward(self.pooled, batch) if unit else self.mean_pooled(to_device(batch, self.device), False)
            )
            for i, row in zip(group, pooled):
                rows[i] = row
        return torch.stack(rows)

    def check_inputs(self, inputs: Sequence[Content], truncate: bool) -> None:
        for i, content in enumerate(inputs):
            if content.image is not None or not content.text:
                raise UnsupportedPair(f"input {i}: a text embedding model embeds text only, and not empty text")
        if not truncate:
            lengths = [len(ids) for ids in self.tokenizer([c.text for c in inputs], truncation=False)["input_ids"]]
            raise_if_too_long(lengths, self.max_length, "input")

    def prepare_inputs(self, inputs: Sequence[Content]) -> Prepared:
        """Each distinct text tokenized once (cut to the model's window, as sentence-transformers cuts it)."""
        self.check_inputs(inputs, True)
        texts = [content.text for content in inputs]
        distinct = list(dict.fromkeys(texts))
        encoding = self.tokenizer(distinct, truncation=True, max_length=self.max_length)
        at = {text: i for i, text in enumerate(distinct)}
        pad = self.tokenizer.pad_token_id or 0
        groups = padded_groups(encoding, self.options.cuts(), pad, self.max_length)
        return Prepared(texts=len(distinct), groups=groups, queries=[at[t] for t in texts], documents=[])

    def embed_inputs(self, prepared: Prepared) -> list[list[float]]:
        """Normalised as the model's own pipeline says (modules.json), so they equal its `encode`."""
        return self.embed(prepared.texts, prepared.groups, unit=self.normalizes)[prepared.queries].tolist()

    def prepare(self, pairs: Sequence[Pair | EncodedPair]) -> Prepared:
        """Pairs are tokenized here, EncodedPairs (tokenized by the ingress, the same way) arrive as ids."""
        query_ids: list = [None] * len(pairs)
        document_ids: list = [None] * len(pairs)
        text, encoded = self.split_encoded(pairs)
        if text:
            queries, documents = self.text_pairs([pairs[i] for i in text])
            distinct = list(dict.fromkeys(queries + documents))
            tokenized = self.tokenizer(distinct, truncation=True, max_length=self.max_length)["input_ids"]
            ids = {t: pack(x) for t, x in zip(distinct, tokenized)}
            for k, i in enumerate(text):
                query_ids[i], document_ids[i] = ids[queries[k]], ids[documents[k]]
        for i in encoded:
            query_ids[i], document_ids[i] = pairs[i].ids, pairs[i].second
        # A request's pairs share one query: embed each distinct text once.
        distinct_ids = list(dict.fromkeys(query_ids + document_ids))
        position = {ids: i for i, ids in enumerate(distinct_ids)}
        pad = self.tokenizer.pad_token_id or 0
        return Prepared(
            texts=len(distinct_ids),
            groups=padded_groups(
                self.encoding([unpack(ids) for ids in distinct_ids], None), self.options.cuts(), pad, self.max_length
            ),
            queries=[position[ids] for ids in query_ids],
            documents=[position[ids] for ids in document_ids],
        )

    def forward(self, prepared: Prepared) -> list[float]:
        vectors = self.embed(prepared.texts, prepared.groups)
        return (vectors[prepared.queries] * vectors[prepared.documents]).sum(-1).tolist()

    def tokens(self, prepared: Prepared) -> TokenCount:
        return count_tokens(prepared.groups)
