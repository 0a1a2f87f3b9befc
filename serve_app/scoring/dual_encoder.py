"""CLIP/SigLIP-style dual encoders: each side embedded on its own, raw score = cosine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel

from serve_app.scoring.batching import count_tokens, padded_groups, to_device
from serve_app.scoring.family import FamilyScorer, LoadOptions, load_model, model_max_length
from serve_app.scoring.text import raise_if_too_long
from serve_app.scoring.types import Content, Logistic, Pair, TokenCount, UnsupportedPair

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


class DualEncoderScorer(FamilyScorer):
    """A side with text and image is embedded as the normalised mean of both embeddings."""

    family = "dual_encoder"
    embeds = True  # a text, an image, or both (their normalised mean), in one space
    pair_input = False  # each text embedded alone: a long document is windowed against the model's window
    # CLIP cosines sit in a narrow band (matches ~0.3, mismatches ~0.15-0.2); this centres that band.
    default_calibration = Logistic(scale=50.0, shift=0.25)

    def __init__(self, model: str, model_dir: str, options: LoadOptions) -> None:
        super().__init__(model_dir, options)
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.model = load_model(AutoModel, model_dir, options)
        config = self.model.config
        self.max_length = model_max_length(self.tokenizer, config.text_config.max_position_embeddings)
        # SigLIP was trained on text padded to its full length and learned its own sigmoid.
        self.pad_to_max_length = config.model_type.startswith("siglip")
        if hasattr(self.model, "logit_bias") and options.calibration is None:
            scale = self.model.logit_scale.detach().float().exp().item()
            self.calibrator = Logistic(scale=scale, shift=-self.model.logit_bias.detach().float().item() / scale)
        self.set_info(model, "cosine")

    def _sides(self, pairs: Sequence[Pair]) -> list[Content]:
        """Query sides, then document sides."""
        queries = [Content(text=p.query_text() or None, image=p.query.image) for p in pairs]
        documents = [Content(text=self.document_text(p), image=p.document.image) for p in pairs]
        for i, side in enumerate(queries + documents):
            if side.text is None and side.image is None:
                raise UnsupportedPair(f"pair {i % len(pairs)} has an empty side: give it text, an image or both")
        return queries + documents

    def check(self, pairs: Sequence[Pair], truncate: bool) -> None:
        sides = self._sides(pairs)
        if not truncate:
            texts = [s.text for s in sides if s.text is not None]
            lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
            raise_if_too_long(lengths, self.max_length, "text")

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
        groups = padded_groups(encoding, self.options.cuts(), self.tokenizer.pad_token_id or 0, self.max_length)
        for _, batch in groups:
            batch.pop("token_type_ids", None)
        return groups

    def prepare(self, pairs: Sequence[Pair]) -> Prepared:
        return self._prepared(self._sides(pairs))

    def check_inputs(self, inputs: Sequence[Content], truncate: bool) -> None:
        for i, side in enumerate(inputs):
            if side.text is None and side.image is None:
                raise UnsupportedPair(f"input {i} is empty: give it text, an image or both")
        if not truncate:
            lengths = [
                len(ids) for ids in self.tokenizer([s.text for s in inputs if s.text], truncation=False)["input_ids"]
            ]
            raise_if_too_long(lengths, self.max_length, "text")

    def prepare_inputs(self, inputs: Sequence[Content]) -> Prepared:
        self.check_inputs(inputs, True)
        return self._prepared([Content(text=side.text or None, image=side.image) for side in inputs])

    def embed_inputs(self, prepared: Prepared) -> list[list[float]]:
        return self._vectors(prepared).tolist()

    def _prepared(self, sides: list[Content]) -> Prepared:
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

    def forward(self, prepared: Prepared) -> list[float]:
        stacked = self._vectors(prepared)  # query sides, then document sides
        half = len(stacked) // 2
        return (stacked[:half] * stacked[half:]).sum(-1).tolist()

    @torch.inference_mode()
    def _vectors(self, prepared: Prepared) -> torch.Tensor:
        """A unit-length vector per side: its text's, its image's, or the normalised mean of both."""
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
        return torch.stack(vectors)

    def tokens(self, prepared: Prepared) -> TokenCount:
        return count_tokens(prepared.text_groups)
