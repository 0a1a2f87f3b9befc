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


# Qwen's chat and vision markers: special tokens of the byte-level BPE tokenizer below.
CHAT_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
PROMPT_TEXT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the "
    'answer can only be "yes" or "no". <Instruct>: <Query>: <Document>: system user assistant Given a web search '
    "query, retrieve relevant passages that answer the query"
)


def save_chat_tokenizer(
    directory: Path,
    max_length: int = 512,
    answers: tuple[str, ...] = ("yes", "no"),
    corpus: list[str] | None = None,
    vocab_size: int = 600,
):
    """A byte-level BPE tokenizer (Qwen's kind) trained on a few sentences (or `corpus`): every text tokenizes,
    the chat markers are single special tokens and each of `answers` is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHAT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((corpus or []) + [" ".join(WORDS), PROMPT_TEXT, " ".join(answers * 4)] * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>", model_max_length=max_length
    )
    fast.save_pretrained(directory)
    return fast


def _qwen_text_sizes(tokenizer, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,  # wide weights: random models give scores that differ per pair
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def build_qwen3_reranker(directory: Path, seed: int = 0, answers: tuple[str, ...] = ("yes", "no")) -> Path:
    """A Qwen3 causal LM (Qwen3-Reranker's architecture) with random weights and a chat tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = save_chat_tokenizer(directory, answers=answers)
    config = Qwen3Config(**_qwen_text_sizes(tokenizer, head_dim=8), tie_word_embeddings=True)
    Qwen3ForCausalLM(config).eval().save_pretrained(directory)
    return directory


def build_qwen2_vl_reranker(directory: Path, seed: int = 0) -> Path:
    """A Qwen2-VL model (lychee-rerank-mm's family) with random weights, its image processor and a chat tokenizer."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    torch.manual_seed(seed)
    tokenizer = save_chat_tokenizer(directory)
    ids = {
        name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("image_pad", "video_pad", "vision_start", "vision_end")
    }
    # mrope_section: the rotary halves of a head (head_dim 8 -> 4) split over time, height and width.
    text = _qwen_text_sizes(
        tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
    )
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, initializer_range=0.3)  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        tie_word_embeddings=True,
    )
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(directory)
    # Small images stay small: 16x16 to 64x64 pixels, i.e. 1 to 16 placeholder tokens.
    Qwen2VLImageProcessor(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64
    ).save_pretrained(directory)
    return directory
