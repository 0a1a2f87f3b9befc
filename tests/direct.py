"""Reference scores: a plain transformers forward per family, written apart from serve_app's scorers."""

from __future__ import annotations

import torch
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BlipForImageTextRetrieval,
)


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.inference_mode()
def cross_encoder(model_dir, query: str, documents: list[str]) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    for document in documents:  # one pair at a time: no padding anywhere
        logits = model(**tokenizer(query, document, truncation=True, return_tensors="pt")).logits[0]
        out.append(float(logits[0]) if logits.numel() == 1 else float(logits[1] - logits[0]))
    return out


@torch.inference_mode()
def embedding(model_dir, query: str, documents: list[str], max_length: int) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    def embed(text: str) -> torch.Tensor:
        hidden = model(**tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")).last_hidden_state
        return torch.nn.functional.normalize(hidden[0].mean(0), dim=-1)

    q = embed(query)
    return [float(q @ embed(d)) for d in documents]


@torch.inference_mode()
def clip_text_image(model_dir, text: str, images: list) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    t = _features(model.get_text_features(**tokenizer([text], return_tensors="pt", return_token_type_ids=False)))
    i = _features(model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]))
    t = torch.nn.functional.normalize(t, dim=-1)
    i = torch.nn.functional.normalize(i, dim=-1)
    return (i @ t[0]).tolist()


@torch.inference_mode()
def blip_itm(model_dir, text: str, images: list) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = BlipForImageTextRetrieval.from_pretrained(model_dir).eval()
    out = []
    for image in images:
        tokens = tokenizer([text], return_tensors="pt")
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
        itm = model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels
        ).itm_score
        out.append(float(torch.softmax(itm, dim=-1)[0, 1]))
    return out
