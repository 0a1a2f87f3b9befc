"""CLIP/SigLIP-style dual encoders: each side embedded on its own, raw score = cosine."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL.Image import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from serve_app.scoring.base import (
    Content,
    LoadOptions,
    Logistic,
    Pair,
    ScorerInfo,
    UnsupportedPair,
    dtype_name,
    model_max_length,
    padded_groups,
    too_long_error,
    truncate_to_tokens,
)

# CLIP cosines sit in a narrow band (matches ~0.3, mismatches ~0.15-0.2); this centres that band.
CLIP_CALIBRATION = Logistic(scale=50.0, shift=0.25)
IMAGES_PER_FORWARD = 32


def features(output) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a pooled output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DualEncoderScorer:
    """A side with text and image is embedded as the normalised mean of both embeddings."""

    def __init__(self, model: str, model_dir: str, options: LoadOptions) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=options.dtype)
        self.model.to(options.device).eval()
        config = self.model.config
        self.device = options.device
        self.dtype = options.dtype
        self.max_tokens_per_forward = options.max_tokens_per_forward
        self.max_length = model_max_length(self.tokenizer, config.text_config.max_position_embeddings)
        # SigLIP was trained on text padded to its full length and learned its own sigmoid.
        self.pad_to_max_length = config.model_type.startswith("siglip")
        if hasattr(self.model, "logit_bias"):
            scale = self.model.logit_scale.detach().exp().item()
            learned = Logistic(scale=scale, shift=-self.model.logit_bias.detach().item() / scale)
            self.calibrator = options.calibration or learned
        else:
            self.calibrator = options.calibration or CLIP_CALIBRATION
        self.info = ScorerInfo(
            model=model,
            family="dual_encoder",
            device=options.device,
            dtype=dtype_name(options.dtype),
            max_length=self.max_length,
            raw_score="cosine",
            calibration=repr(self.calibrator),
        )

    def _document_text(self, pair: Pair) -> str | None:
        text = pair.document.text
        if text is not None and pair.max_document_tokens:
            text = truncate_to_tokens(self.tokenizer, text, pair.max_document_tokens)
        return text

    def _sides(self, pairs: Sequence[Pair]) -> tuple[list[Content], list[Content]]:
        queries = [Content(text=p.query_text() or None, image=p.query.image) for p in pairs]
        documents = [Content(text=self._document_text(p), image=p.document.image) for p in pairs]
        for i, side in enumerate(queries + documents):
            if side.text is None and side.image is None:
                raise UnsupportedPair(f"pair {i % len(pairs)} has an empty side: give it text, an image or both")
        return queries, documents

    def check(self, pairs: Sequence[Pair], truncate: bool) -> None:
        queries, documents = self._sides(pairs)
        if truncate:
            return
        texts = [s.text for s in queries + documents if s.text is not None]
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        error = too_long_error(lengths, self.max_length, "text")
        if error:
            raise error

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        if self.pad_to_max_length:
            rows = []
            for start in range(0, len(texts), IMAGES_PER_FORWARD):
                batch = self.tokenizer(
                    texts[start : start + IMAGES_PER_FORWARD],
                    padding="max_length",
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                rows.append(features(self.model.get_text_features(**batch)).float())
            return torch.cat(rows)
        encoding = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        for group, batch in padded_groups(
            encoding, self.max_tokens_per_forward, self.tokenizer.pad_token_id or 0, self.device
        ):
            batch.pop("token_type_ids", None)
            for i, row in zip(group, features(self.model.get_text_features(**batch)).float()):
                out[i] = row
        return torch.stack(out)

    def _embed_images(self, images: list[Image]) -> torch.Tensor:
        rows = []
        for start in range(0, len(images), IMAGES_PER_FORWARD):
            pixels = self.image_processor(images=images[start : start + IMAGES_PER_FORWARD], return_tensors="pt")
            pixel_values = pixels["pixel_values"].to(self.device, self.dtype)
            rows.append(features(self.model.get_image_features(pixel_values=pixel_values)).float())
        return torch.cat(rows)

    @torch.inference_mode()
    def _embed_sides(self, sides: list[Content]) -> torch.Tensor:
        # Pairs of one request share the query: embed each distinct text and image once.
        texts = list(dict.fromkeys(s.text for s in sides if s.text is not None))
        images = list({id(s.image): s.image for s in sides if s.image is not None}.values())
        text_rows = F.normalize(self._embed_texts(texts), dim=-1) if texts else None
        image_rows = F.normalize(self._embed_images(images), dim=-1) if images else None
        text_at = {t: i for i, t in enumerate(texts)}
        image_at = {id(im): i for i, im in enumerate(images)}
        vectors = []
        for side in sides:
            parts = []
            if side.text is not None:
                parts.append(text_rows[text_at[side.text]])
            if side.image is not None:
                parts.append(image_rows[image_at[id(side.image)]])
            vectors.append(F.normalize(torch.stack(parts).mean(0), dim=-1))
        return torch.stack(vectors)

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        queries, documents = self._sides(pairs)
        vectors = self._embed_sides(queries + documents)
        return (vectors[: len(pairs)] * vectors[len(pairs) :]).sum(-1).tolist()

    def calibrate(self, raw_scores: Sequence[float]) -> list[float]:
        return [self.calibrator(r) for r in raw_scores]
