"""Tiny random-weight models built from configs, saved like real checkpoints (no hub needed)."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

WORDS = (
    "the a an of to in is and for on with what where who capital city france paris berlin germany "
    "country largest river cat dog photo picture red blue green house car tree question answer "
    "document relevant judge whether weather today rain sun learning machine model search query "
    "python snake language code fast slow small big image text"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IMAGE_SIZE = 32
# The sizes of MiniLM-L6 (all-MiniLM-L6-v2, ms-marco-MiniLM-L-6-v2): random weights of these cost what real ones do.
MINILM_L6_SIZES = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}


def save_tokenizer(directory: Path, max_length: int = 64) -> BertTokenizerFast:
    """A WordPiece tokenizer over letters, digits and a few words: every text tokenizes."""
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = SPECIALS + pieces + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, model_max_length=max_length)
    tokenizer.save_pretrained(directory)
    return tokenizer


def _bert_config(vocab_size: int, **extra) -> BertConfig:
    sizes = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "initializer_range": 0.3,  # wide weights, so random models give scores that differ per pair
    }
    return BertConfig(vocab_size=vocab_size, **{**sizes, **extra})


def build_slow_cross_encoder(directory: Path) -> Path:
    """MiniLM-L6-sized with 512 positions: seconds per request on one CPU, for deadline and overload tests."""
    torch.manual_seed(0)
    tokenizer = save_tokenizer(directory, max_length=512)
    config = _bert_config(len(tokenizer), **MINILM_L6_SIZES, initializer_range=0.02, num_labels=1)
    BertForSequenceClassification(config).eval().save_pretrained(directory)
    return directory


def build_cross_encoder(directory: Path, num_labels: int = 1, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(directory)
    model = BertForSequenceClassification(_bert_config(len(tokenizer), num_labels=num_labels)).eval()
    model.save_pretrained(directory)
    return directory


def build_embedding(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(directory)
    BertModel(_bert_config(len(tokenizer)), add_pooling_layer=False).eval().save_pretrained(directory)
    return directory


def _text_config(vocab_size: int, tokenizer: BertTokenizerFast) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,
        initializer_factor=5.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )


def _vision_config() -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        initializer_range=0.5,
        initializer_factor=5.0,
    )


def build_clip(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(directory)
    config = CLIPConfig(
        text_config=_text_config(len(tokenizer), tokenizer), vision_config=_vision_config(), projection_dim=16
    )
    CLIPModel(config).eval().save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(directory)
    return directory


def build_siglip(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(directory)
    text = _text_config(len(tokenizer), tokenizer)
    text["max_position_embeddings"] = 16
    config = SiglipConfig(text_config=text, vision_config=_vision_config())
    SiglipModel(config).eval().save_pretrained(directory)
    SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return directory


def build_blip(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(directory)
    text = _text_config(len(tokenizer), tokenizer)
    text.update(sep_token_id=tokenizer.sep_token_id, encoder_hidden_size=32)
    config = BlipConfig(text_config=text, vision_config=_vision_config(), projection_dim=16, image_text_hidden_size=16)
    BlipForImageTextRetrieval(config).eval().save_pretrained(directory)
    BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return directory
