"""Instruction-following yes/no rerankers (Qwen3-Reranker; Qwen2/2.5/3-VL rerankers such as lychee-rerank-mm):
the model reads a fixed prompt holding the instruction, the query and the document, and the score is the
probability of "yes" over "no" at the answer position."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL.Image import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DynamicCache,
)

from serve_app.scoring.batching import Group, count_tokens, padded_groups, to_device
from serve_app.scoring.family import FamilyScorer, LoadOptions, load_model, model_max_length
from serve_app.scoring.types import Content, ModelLoadError, Pair, PairTooLong, TokenCount, UnsupportedPair

log = logging.getLogger(__name__)

# Qwen3-Reranker's published prompt (model card reference code), kept exactly: scores then equal the card's.
SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the "
    'answer can only be "yes" or "no".'
)
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
THINKING_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
# Models that do not think (the Qwen-VL rerankers) answer right after the assistant turn opens.
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
THINKING_MODEL_TYPES = {"qwen3", "qwen3_moe"}
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# Qwen-VL's image placeholder; the image processor's grid says how many <|image_pad|> tokens it becomes.
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
# The model card's window. It also bounds a pair's key/value memory and the shapes a GPU replica warms.
MAX_LENGTH = 8192


def prompt_body(pair: Pair, document_text: str | None, image_marker: str = "") -> str:
    """The user turn: instruction, query and document, each image where its side begins."""
    query = (image_marker if pair.query.image is not None else "") + (pair.query.text or "")
    document = (image_marker if pair.document.image is not None else "") + (document_text or "")
    return f"<Instruct>: {pair.instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"


@dataclass
class SharedPrefix:
    """Documents of one query: the prompt up to where their tokens part, run once, then each suffix."""

    prefix: dict[str, torch.Tensor]  # input_ids, attention_mask: (1, width), left-padded
    length: int  # real tokens of the prefix
    groups: list[Group]  # suffix batches (left-padded), indices into the prepared pairs


@dataclass
class Prepared:
    count: int
    plain: list[Group] = field(default_factory=list)  # whole prompts, left-padded
    shared: list[SharedPrefix] = field(default_factory=list)


@dataclass
class Encoded:
    ids: list[int]
    images: list[int]  # indices into the distinct images, in prompt order


class YesNoScorer(FamilyScorer):
    """Reads instruction, query and document in one prompt; raw score = logit(yes) - logit(no)."""

    family = "yes_no"

    def __init__(self, model: str, model_dir: str, options: LoadOptions) -> None:
        super().__init__(model_dir, options)
        config = AutoConfig.from_pretrained(model_dir)
        self.vision = getattr(config, "vision_config", None) is not None
        self.model = load_model(
            AutoModelForImageTextToText if self.vision else AutoModelForCausalLM, model_dir, options
        )
        text_config = self.model.config.get_text_config()
        self.max_length = min(MAX_LENGTH, model_max_length(self.tokenizer, text_config.max_position_embeddings))
        self.no_id, self.yes_id = (self.answer_token(t, model) for t in options.answer_tokens)
        self.pad_id = next(
            i
            for i in (self.tokenizer.pad_token_id, self.token_id("<|endoftext|>"), self.tokenizer.eos_token_id, 0)
            if i is not None
        )
        suffix = THINKING_SUFFIX if config.model_type in THINKING_MODEL_TYPES else SUFFIX
        self.prefix_ids = self.template_ids(PREFIX)
        self.suffix_ids = self.template_ids(suffix)
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir) if self.vision else None
        self.image_marker = f"{VISION_START}{IMAGE_PAD}{VISION_END}" if self.vision else ""
        if self.vision:
            self.image_pad_id = self.token_id(IMAGE_PAD)
            if self.image_pad_id is None:
                raise ModelLoadError(f"{model}: a vision model without the {IMAGE_PAD} token in its tokenizer")
        # The key/value cache of a shared prefix is reused by causal LMs; VLMs place images by 3-D positions
        # computed over the whole prompt, so they take the plain path.
        self.reuse_prefix = options.prefix_reuse and not self.vision
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        self.set_info(model, "logit difference (yes - no)")

    def token_id(self, token: str) -> int | None:
        """The id of one vocabulary entry, None where the tokenizer lacks it."""
        found = self.tokenizer.convert_tokens_to_ids(token)
        if found is None or (found == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            return None
        return found

    def answer_token(self, token: str, model: str) -> int:
        found = self.token_id(token)
        if found is None:
            raise ModelLoadError(
                f"{model}: the tokenizer has no token {token!r} to read a yes/no answer from; set the pool's "
                'answer_tokens (RERANK_<POOL>__ANSWER_TOKENS, e.g. \'["no", "yes"]\') to the model\'s pair'
            )
        return found

    def template_ids(self, text: str) -> list[int]:
        """The prompt template's own text, its special tokens kept (<|im_start|>, <|image_pad|> ...)."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"]

    def encode_body(self, body: str) -> tuple[list[int], list[int]]:
        """The user turn's token ids and where each token starts in `body`: the client's text with any special
        token it types split as plain text, each image marker (ours) as its special tokens."""
        pieces = body.split(self.image_marker) if self.image_marker else [body]
        marker = self.template_ids(self.image_marker) if self.image_marker else []
        ids: list[int] = []
        starts: list[int] = []
        at = 0
        for k, piece in enumerate(pieces):
            if k:
                ids += marker
                starts += [at] * len(marker)
                at += len(self.image_marker)
            encoding = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            ids += encoding["input_ids"]
            starts += [at + start for start, _ in encoding["offset_mapping"]]
            at += len(piece)
        return ids, starts

    # --- prompts -> token ids ---------------------------------------------------------------------------------

    def image_tokens(self, image: Image) -> int:
        """The <|image_pad|> tokens an image becomes: its patch grid over the merge size."""
        merge = getattr(self.image_processor, "merge_size", 1) or 1
        count = getattr(self.image_processor, "get_number_of_image_patches", None)
        if count is not None:
            return int(count(image.height, image.width, {})) // merge**2
        grid = self.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        return int(grid.prod()) // merge**2

    def images_of(self, pairs: Sequence[Pair]) -> tuple[list[Image], list[list[int]]]:
        """The distinct images in order of first use, and each pair's images as indices into them."""
        at: dict[int, int] = {}
        images: list[Image] = []
        keys = []
        for i, pair in enumerate(pairs):
            if pair.needs_image_model and not self.vision:
                raise UnsupportedPair(
                    f"pair {i}: this yes/no model reads text only; images need a vision-language model"
                )
            mine = []
            for image in (pair.query.image, pair.document.image):
                if image is not None:
                    if id(image) not in at:
                        at[id(image)] = len(images)
                        images.append(image)
                    mine.append(at[id(image)])
            keys.append(mine)
        return images, keys

    def document_budget(self, pair: Pair) -> int:
        """The document tokens that fit: the window less the fixed prompt and this pair's instruction and query."""
        head = len(self.tokenizer(prompt_body(pair, ""), add_special_tokens=False)["input_ids"])
        return self.room(0) - head

    def room(self, image_tokens: int) -> int:
        """Tokens left for the prompt body once the fixed prefix, suffix and image placeholders are counted."""
        return self.max_length - len(self.prefix_ids) - len(self.suffix_ids) - image_tokens

    def encode_pairs(self, pairs: Sequence[Pair], truncate: bool) -> tuple[list[Encoded], list[Image]]:
        """Each pair's whole prompt as token ids (images expanded to their placeholder count), the document cut
        where the window ends; and the distinct images. The prefix, the suffix, the instruction and the query
        are never cut."""
        images, keys = self.images_of(pairs)
        counts = [self.image_tokens(image) for image in images]
        out = []
        for i, pair in enumerate(pairs):
            document = self.document_text(pair) or ""
            body = prompt_body(pair, document, self.image_marker)
            ids, starts = self.encode_body(body)
            room = self.room(sum(counts[k] - 1 for k in keys[i]))
            if len(ids) > room:
                # Tokens that start before the document's text belong to the instruction, the query or an image.
                text_start = len(body) - len(document)
                head = sum(1 for start in starts if start < text_start)
                if not truncate or head > room:
                    raise too_long(i, len(ids) - room + self.max_length, self.max_length, head <= room)
                ids = ids[:room]
            if keys[i]:
                expanded: list[int] = []
                at = iter(keys[i])
                for token in ids:
                    expanded.extend([token] * counts[next(at)] if token == self.image_pad_id else [token])
                ids = expanded
            out.append(Encoded(self.prefix_ids + ids + self.suffix_ids, keys[i]))
        return out, images

    def check(self, pairs: Sequence[Pair], truncate: bool) -> None:
        """Truncation cuts documents only: refuse pairs whose instruction and query alone overflow the window
        (tokenized once per distinct query), and with truncate=false, any pair that overflows."""
        if not truncate:
            self.encode_pairs(pairs, truncate=False)
            return
        images, keys = self.images_of(pairs)
        counts = [self.image_tokens(image) for image in images]
        heads: dict[tuple, int] = {}
        for i, pair in enumerate(pairs):
            key = (pair.instruction, pair.query.text, tuple(keys[i]))
            if key not in heads:
                # Everything but the document's text: the part truncation may not cut.
                head = Pair(pair.query, Content(text="", image=pair.document.image), pair.instruction)
                heads[key] = len(self.encode_body(prompt_body(head, "", self.image_marker))[0])
            room = self.room(sum(counts[k] - 1 for k in keys[i]))
            if heads[key] > room:
                raise too_long(i, heads[key] - room + self.max_length, self.max_length, False)

    # --- batches --------------------------------------------------------------------------------------------

    def prepare(self, pairs: Sequence[Pair]) -> Prepared:
        encoded, images = self.encode_pairs(pairs, truncate=True)
        prepared = Prepared(len(pairs))
        plain = list(range(len(pairs)))
        if self.reuse_prefix:
            plain = []
            for members in self.by_query(pairs):
                shared = self.shared_prefix([encoded[i].ids for i in members], members)
                if shared is None:
                    plain.extend(members)
                else:
                    prepared.shared.append(shared)
        if plain:
            ids = [encoded[i].ids for i in plain]
            groups = padded_groups(
                {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]},
                self.options.cuts(),
                self.pad_id,
                self.max_length,
                left=True,
            )
            pixels = self.pixels(images) if images else None
            for rows, batch in groups:
                members = [plain[r] for r in rows]
                if pixels is not None:
                    batch_rows = members + [members[-1]] * (batch["input_ids"].shape[0] - len(members))
                    self.add_images(batch, [k for r in batch_rows for k in encoded[r].images], pixels)
                prepared.plain.append((members, batch))
        return prepared

    @staticmethod
    def by_query(pairs: Sequence[Pair]) -> list[list[int]]:
        """Indices of the pairs that share an instruction and a text query (the head of their prompts)."""
        groups: dict[tuple[str | None, str | None], list[int]] = {}
        for i, pair in enumerate(pairs):
            groups.setdefault((pair.instruction, pair.query.text), []).append(i)
        return list(groups.values())

    def shared_prefix(self, ids: list[list[int]], members: list[int]) -> SharedPrefix | None:
        """The common token prefix of these prompts and their suffix batches; None when fewer than two share it."""
        if len(ids) < 2:
            return None
        first = ids[0]
        length = min(len(x) for x in ids) - 1  # every document keeps a token to read its answer from
        for other in ids[1:]:
            same = 0
            while same < length and other[same] == first[same]:
                same += 1
            length = same
        if length < 1:
            return None
        width = self.options.cuts().shapes.width(length, self.max_length)
        prefix_ids = torch.full((1, width), self.pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((1, width), dtype=torch.long)
        prefix_ids[0, width - length :] = torch.tensor(first[:length])
        prefix_mask[0, width - length :] = 1
        suffixes = [x[length:] for x in ids]
        groups = padded_groups(
            {"input_ids": suffixes, "attention_mask": [[1] * len(x) for x in suffixes]},
            self.options.cuts(),
            self.pad_id,
            self.max_length - length,
            left=True,
        )
        return SharedPrefix(
            {"input_ids": prefix_ids, "attention_mask": prefix_mask},
            length,
            [([members[r] for r in rows], batch) for rows, batch in groups],
        )

    def pixels(self, images: list[Image]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Pixel patches of each distinct image (concatenated), their grids and where each image's patches start."""
        processed = self.image_processor(images=images, return_tensors="pt")
        grids = processed["image_grid_thw"]
        sizes = grids.prod(dim=1).tolist()
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + int(size))
        return processed["pixel_values"], grids, starts

    def add_images(self, batch: dict, keys: list[int], pixels: tuple[torch.Tensor, torch.Tensor, list[int]]) -> None:
        values, grids, starts = pixels
        if not keys:
            return
        batch["pixel_values"] = torch.cat([values[starts[k] : starts[k + 1]] for k in keys])
        batch["image_grid_thw"] = grids[keys]
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_pad_id).long()

    # --- forward --------------------------------------------------------------------------------------------

    def raw_scores(self, logits: torch.Tensor) -> list[float]:
        last = logits[:, -1, :].float()
        return (last[:, self.yes_id] - last[:, self.no_id]).tolist()

    @torch.inference_mode()
    def forward(self, prepared: Prepared) -> list[float]:
        scores = [0.0] * prepared.count
        for members, batch in prepared.plain:
            inputs = to_device(batch, self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            else:
                inputs["position_ids"] = positions(inputs["attention_mask"])
            logits = self.model(**inputs, use_cache=False, logits_to_keep=1).logits
            for i, value in zip(members, self.raw_scores(logits)):
                scores[i] = value
        for shared in prepared.shared:
            prefix = to_device(shared.prefix, self.device)
            out = self.model(
                **prefix, position_ids=positions(prefix["attention_mask"]), use_cache=True, logits_to_keep=1
            )
            cache = getattr(out, "cache", None) or out.past_key_values
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            for members, batch in shared.groups:
                suffix = to_device(batch, self.device)
                rows = suffix["input_ids"].shape[0]
                mask = torch.cat([prefix["attention_mask"].expand(rows, -1), suffix["attention_mask"]], dim=1)
                logits = self.model(
                    input_ids=suffix["input_ids"],
                    attention_mask=mask,
                    position_ids=positions(suffix["attention_mask"]) + shared.length,
                    use_cache=True,
                    logits_to_keep=1,
                    **{self.cache_kwarg: expanded_cache(layers, rows)},
                ).logits
                for i, value in zip(members, self.raw_scores(logits)):
                    scores[i] = value
        return scores

    def tokens(self, prepared: Prepared) -> TokenCount:
        total = count_tokens(prepared.plain)
        for shared in prepared.shared:
            total += count_tokens([(None, shared.prefix)]) + count_tokens(shared.groups)
        return total


def too_long(index: int, tokens: int, max_length: int, truncate_helps: bool) -> PairTooLong:
    if truncate_helps:
        return PairTooLong(
            f"pair {index} takes {tokens} tokens, over the model's {max_length}; shorten its document or send "
            "truncate=true (the document is cut, never the instruction or the query)"
        )
    return PairTooLong(
        f"pair {index}: the instruction and the query alone take {tokens} of the model's {max_length} tokens, "
        "leaving none for the document; shorten the query or the instruction"
    )


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: each row's first real token is at 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def expanded_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> DynamicCache:
    """A cache holding the prefix's keys and values for `rows` documents: views of the one prefix, not copies
    (the attention's concatenation with each document's own keys is the only copy)."""
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        # Initialise the layer with nothing, then hand it the views: update() would concatenate, i.e. copy.
        cache.update(keys[:, :, :0].expand(rows, -1, -1, -1), values[:, :, :0].expand(rows, -1, -1, -1), index)
        cache.layers[index].keys = keys.expand(rows, -1, -1, -1)
        cache.layers[index].values = values.expand(rows, -1, -1, -1)
    return cache
