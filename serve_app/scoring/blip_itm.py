"""BLIP image-text matching: the ITM head reads one image with one text; raw score = match probability."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL.Image import Image
from transformers import AutoImageProcessor, BlipForImageTextRetrieval

from serve_app.scoring.batching import count_tokens, to_device
from serve_app.scoring.family import FamilyScorer, LoadOptions, load_model, model_max_length
from serve_app.scoring.text import raise_if_too_long
from serve_app.scoring.types import Identity, Pair, TokenCount, UnsupportedPair

PAIRS_PER_FORWARD = 32
Prepared = list[tuple[dict[str, torch.Tensor], torch.Tensor]]


class BlipItmScorer(FamilyScorer):
    """Scores the image of one side against the text of the other."""

    family = "blip_itm"
    default_calibration = Identity()

    def __init__(self, model: str, model_dir: str, options: LoadOptions) -> None:
        super().__init__(model_dir, options)
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.model = load_model(BlipForImageTextRetrieval, model_dir, options)
        self.max_length = model_max_length(self.tokenizer, self.model.config.text_config.max_position_embeddings)
        self.set_info(model, "match probability")

    def _image_text(self, pairs: Sequence[Pair]) -> tuple[list[Image], list[str]]:
        images, texts = [], []
        for i, pair in enumerate(pairs):
            if pair.document.image is not None and pair.query.text:
                images.append(pair.document.image)
                texts.append(pair.query_text())
            elif pair.query.image is not None and pair.document.text:
                images.append(pair.query.image)
                texts.append(self.document_text(pair))
            else:
                raise UnsupportedPair(
                    f"pair {i}: BLIP image-text matching needs an image on one side and text on the other"
                )
        return images, texts

    def check(self, pairs: Sequence[Pair], truncate: bool) -> None:
        _, texts = self._image_text(pairs)
        if not truncate:
            lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
            raise_if_too_long(lengths, self.max_length, "text")

    def prepare(self, pairs: Sequence[Pair]) -> Prepared:
        images, texts = self._image_text(pairs)
        # Preprocess each distinct image once; the vision tower still runs per pair (ITM is cross-attention).
        distinct = list({id(im): im for im in images}.values())
        pixels = self.image_processor(images=distinct, return_tensors="pt")["pixel_values"]
        at = {id(im): i for i, im in enumerate(distinct)}
        index = torch.tensor([at[id(im)] for im in images])
        batches = []
        for start in range(0, len(pairs), PAIRS_PER_FORWARD):
            stop = start + PAIRS_PER_FORWARD
            tokens = self.tokenizer(
                texts[start:stop], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            batches.append(
                (
                    {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]},
                    pixels[index[start:stop]],
                )
            )
        return batches

    @torch.inference_mode()
    def forward(self, prepared: Prepared) -> list[float]:
        scores: list[float] = []
        for tokens, pixel_values in prepared:
            itm = self.model(
                **to_device(tokens, self.device),
                pixel_values=pixel_values.to(self.device, self.dtype),
                use_itm_head=True,
            ).itm_score
            scores.extend(torch.softmax(itm.float(), dim=-1)[:, 1].tolist())
        return scores

    def tokens(self, prepared: Prepared) -> TokenCount:
        return count_tokens([(None, tokens) for tokens, _ in prepared])
