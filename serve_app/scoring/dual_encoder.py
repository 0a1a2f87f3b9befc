"""CLIP/SigLIP-style dual encoders: each side embedded on its own, raw score = cosine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from serve_app.scoring.base import (
    Content,
    LoadOptions,
    Logistic,
    Pair,
    ScorerInfo,
    TokenCount,
    UnsupportedPair,
    count_tokens,
    dtype_name,
    load_model,
    model_max_length,
    padded_groups,
    to_device,
    too_long_error,
    truncate_to_tokens,
)

# CLIP cosines sit in a narrow band (matches ~0.3, mismatches ~0.15-0.2); this centres that band.
CLIP_CALIBRATION = Logistic(scale=50.0, shift=0.25)
IMAGES_PER_FORWARD = 32


def features(output) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a pooled output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class Prepared:
    text_groups: list[tuple[list[int], dict[str, torch.Tensor]]]
    texts: int
    pixel_batches: list[torch.Tensor]
    # Per side (queries then documents): rows of its text and its image, or None.
    sides: list[tuple[int | None, int | None]]


class DualEncoderScorer:
    """A side with text and image is embedded as the normalised mean of both embeddings."""

    def __init__(self, model: str, model_dir: str, options: LoadOptions) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.model = load_model(AutoModel, model_dir, options)
        config = self.model.config
        self.device = options.device
        self.dtype = options.dtype
        self.options = options
        self.max_length = model_max_length(self.tokenizer, config.text_config.max_position_embeddings)
        # SigLIP was trained on text padded to its full length and learned its own sigmoid.
        self.pad_to_max_length = config.model_type.startswith("siglip")
        if hasattr(self.model, "logit_bias"):
            scale = self.model.logit_scale.detach().float().exp().item()
            learned = Logistic(scale=scale, shift=-self.model.logit_bias.detach().float().item() / scale)
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
            attn_implementation=config._attn_implementation,
            quantization=options.quantize,
        )

    def _document_text(self, pair: Pair) -> str | None:
        text = pair.document.text
        if text is not None and pair.max_document_tokens:
            text = truncate_to_tokens(self.tokenizer, text, pair.max_document_tokens)
        return text

    def _sides(self, pairs: Sequence[Pair]) -> list[Content]:
        """Query sides, then document sides."""
        queries = [Content(text=p.query_text() or None, image=p.query.image) for p in pairs]
        documents = [Content(text=self._document_text(p), image=p.document.image) for p in pairs]
        for i, side in enumerate(queries + documents):
            if side.text is None and side.image is None:
                raise UnsupportedPair(f"pair {i % len(pairs)} has an empty side: give it text, an image or both")
        return queries + documents

    def check(self, pairs: Sequence[Pair], truncate: bool) -> None:
        sides = self._sides(pairs)
        if truncate:
            return
        texts = [s.text for s in sides if s.text is not None]
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        error = too_long_error(lengths, self.max_length, "text")
        if error:
            raise error

    def _text_groups(self, texts: list[str]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        if self.pad_to_max_length:
            groups = []
            for start in range(0, len(texts), IMAGES_PER_FORWARD):
                chunk = texts[start : start + IMAGES_PER_FORWARD]
                batch = self.tokenizer(
                    chunk, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                groups.append((list(range(start, start + len(chunk))), dict(batch)))
            return groups
        encoding = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        groups = padded_groups(encoding, self.options, self.tokenizer.pad_token_id or 0, self.max_length)
        for _, batch in groups:
            batch.pop("token_type_ids", None)
        return groups

    def prepare(self, pairs: Sequence[Pair]) -> Prepared:
        sides = self._sides(pairs)
        # Pairs of one request share the query: embed each distinct text and image once.
        texts = list(dict.fromkeys(s.text for s in sides if s.text is not None))
        images = list({id(s.image): s.image for s in sides if s.image is not None}.values())
        text_at = {t: i for i, t in enumerate(texts)}
        image_at = {id(im): i for i, im in enumerate(images)}
        pixel_batches = [
            self.image_processor(images=images[start : start + IMAGES_PER_FORWARD], return_tensors="pt")["pixel_values"]
            for start in range(0, len(images), IMAGES_PER_FORWARD)
        ]
        return Prepared(
            text_groups=self._text_groups(texts) if texts else [],
            texts=len(texts),
            pixel_batches=pixel_batches,
            sides=[
                (
                    text_at[s.text] if s.text is not None else None,
                    image_at[id(s.image)] if s.image is not None else None,
                )
                for s in sides
            ],
        )

    @torch.inference_mode()
    def forward(self, prepared: Prepared) -> list[float]:
        text_rows: list[torch.Tensor] = [torch.empty(0)] * prepared.texts
        for group, batch in prepared.text_groups:
            embedded = F.normalize(
                features(self.model.get_text_features(**to_device(batch, self.device))).float(), dim=-1
            )
            for i, row in zip(group, embedded):
                text_rows[i] = row
        image_rows = [
            F.normalize(
                features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))).float(),
                dim=-1,
            )
            for pixels in prepared.pixel_batches
        ]
        images = torch.cat(image_rows) if image_rows else None
        vectors = []
        for text_row, image_row in prepared.sides:
            parts = []
            if text_row is not None:
                parts.append(text_rows[text_row])
            if image_row is not None:
                parts.append(images[image_row])
            vectors.append(F.normalize(torch.stack(parts).mean(0), dim=-1))
        stacked = torch.stack(vectors)
        half = len(stacked) // 2
        return (stacked[:half] * stacked[half:]).sum(-1).tolist()

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        return self.forward(self.prepare(pairs))

    def calibrate(self, raw_scores: Sequence[float]) -> list[float]:
        return [self.calibrator(r) for r in raw_scores]

    def tokens(self, prepared: Prepared) -> TokenCount:
        return count_tokens(prepared.text_groups)
