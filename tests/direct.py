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


# Qwen3-Reranker's model card, as published (https://huggingface.co/Qwen/Qwen3-Reranker-0.6B): its prompt,
# its tokenization (prefix, pair, suffix apart), left padding and softmax over the last position's (no, yes).
QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def format_instruction(instruction, query, doc):
    if instruction is None:
        instruction = "Given a web search query, retrieve relevant passages that answer the query"
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


@torch.inference_mode()
def qwen3_reranker(model_dir, query: str, documents: list[str], instruction=None, max_length=8192) -> list[float]:
    """Relevance (the "yes" probability) of each document, by the model card's code."""
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    prefix_tokens = tokenizer.encode(QWEN3_PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(QWEN3_SUFFIX, add_special_tokens=False)
    pairs = [format_instruction(instruction, query, doc) for doc in documents]
    inputs = tokenizer(
        pairs,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
    )
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    batch_scores = model(**inputs).logits[:, -1, :]
    true_vector = batch_scores[:, token_true_id]
    false_vector = batch_scores[:, token_false_id]
    batch_scores = torch.stack([false_vector, true_vector], dim=1)
    batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
    return batch_scores[:, 1].exp().tolist()


@torch.inference_mode()
def qwen_vl_reranker(model_dir, pairs: list[tuple[str, object, str, object]], instruction=None) -> list[float]:
    """Relevance of (query text, query image, document text, document image) pairs, one forward each: the
    same prompt as Qwen3-Reranker's with each image's placeholder where its side begins, no think block."""
    from transformers import AutoModelForImageTextToText

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    out = []
    for query, query_image, doc, doc_image in pairs:
        images = [im for im in (query_image, doc_image) if im is not None]
        vision = processor(images=images, return_tensors="pt") if images else {}

        placeholders = [
            "<|vision_start|>" + "<|image_pad|>" * (int(grid.prod()) // processor.merge_size**2) + "<|vision_end|>"
            for grid in (vision["image_grid_thw"] if images else [])
        ]
        query_mark = placeholders.pop(0) if query_image is not None else ""
        doc_mark = placeholders.pop(0) if doc_image is not None else ""
        user = format_instruction(instruction, query_mark + query, doc_mark + doc)
        text = QWEN3_PREFIX + user + "<|im_end|>\n<|im_start|>assistant\n"
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        extra = {}
        if images:
            extra = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"],
                     "mm_token_type_ids": (ids == pad).long()}  # fmt: skip
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1]
        out.append(float(torch.softmax(torch.stack([logits[no], logits[yes]]), dim=0)[1]))
    return out
