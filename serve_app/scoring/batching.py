"""Batches of text: lengths into forwards of least cost, padded shapes, token counts, document cuts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from serve_app.scoring.text import prefix_of
from serve_app.scoring.types import TokenCount

# Finer buckets pad less; each bucket is one more shape to warm at start-up (x power-of-two batch sizes).
BUCKET = 16

# (indices of the pairs or texts a padded batch holds, its CPU tensors); None: every row is the group's.
Group = tuple[Sequence[int] | None, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Shapes:
    """How padded batches are shaped: lengths rounded up to `length_multiple`, row counts up to powers of two.

    Rows are padded, not split: on a GPU a forward pass has a fixed cost of milliseconds (kernel launches),
    so one forward with a few repeated rows beats several smaller ones (measured on an H200: a 46-pair
    batch cut into 32+8+4+2 took 17 ms, three times one padded forward's cost)."""

    length_multiple: int = 1
    power_of_two_batches: bool = False

    @classmethod
    def bucketed(cls, on: bool) -> Shapes:
        return cls(BUCKET, True) if on else cls()

    def width(self, longest: int, max_length: int) -> int:
        return min(max_length, -(-longest // self.length_multiple) * self.length_multiple)

    def rows(self, count: int) -> int:
        return 1 << (count - 1).bit_length() if self.power_of_two_batches and count > 0 else count


@dataclass(frozen=True)
class Cuts:
    """Where a sorted batch is cut into forwards: at most `max_tokens` padded tokens each (None: no cap),
    and a cut only where it saves more padding than `forward_cost_tokens`."""

    shapes: Shapes
    max_tokens: int | None
    forward_cost_tokens: int


def count_tokens(groups: Sequence[Group]) -> TokenCount:
    """Tokens in padded text batches: real ones are those the attention mask keeps in the group's own rows
    (rows past len(indices) only pad the batch to a warmed shape)."""
    real = padded = 0
    for indices, batch in groups:
        mask = batch["attention_mask"]
        real += int(mask[: len(indices) if indices is not None else None].sum())
        padded += mask.numel()
    return TokenCount(real, padded)


def length_groups(
    lengths: Sequence[int],
    max_tokens: int,
    forward_cost_tokens: int = 0,
    width: Callable[[int], int] = int,
    power_of_two_rows: bool = False,
) -> list[list[int]]:
    """Indices sorted by length, cut into groups (forward passes) of least total cost.

    A group costs `forward_cost_tokens` plus its padded size (rows x width of its longest; rows = its
    count, or the next power of two); no group's padded size exceeds `max_tokens` unless a single pair
    does. Exact, by dynamic programming over the sorted lengths (O(n^2) in numpy; n is one batch).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    if n == 0:
        return []
    widths = [width(lengths[i]) for i in order]
    best = np.zeros(n + 1)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        # Sorted ascending: a group ending at j is as wide as its last member.
        w = widths[j - 1]
        first = max(0, j - max(1, max_tokens // max(w, 1)))
        counts = j - np.arange(first, j)
        if power_of_two_rows:
            counts = 1 << np.ceil(np.log2(counts)).astype(np.int64)
        costs = best[first:j] + forward_cost_tokens + counts * w
        k = int(np.argmin(costs))
        best[j] = costs[k]
        cut[j] = first + k
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    groups.reverse()
    return groups


def padded_groups(
    encoding, cuts: Cuts, pad_token_id: int, max_length: int, left: bool = False
) -> list[tuple[list[int], dict]]:
    """(indices, CPU tensors) for length-sorted groups of an unpadded tokenizer output, padded on the right
    (encoders) or on the `left` (decoders, whose answer is read at the last position).

    With power-of-two rows, a group's rows are padded by repeating its last row (a real row, so no
    all-masked attention); the forward reads the first len(indices) rows only."""
    input_ids = encoding["input_ids"]
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoding]
    shapes = cuts.shapes
    groups = length_groups(
        [len(ids) for ids in input_ids],
        cuts.max_tokens or 1 << 30,
        cuts.forward_cost_tokens,
        width=lambda n: shapes.width(n, max_length),
        power_of_two_rows=shapes.power_of_two_batches,
    )
    out = []
    for group in groups:
        width = shapes.width(max(len(input_ids[i]) for i in group), max_length)
        rows = group + [group[-1]] * (shapes.rows(len(group)) - len(group))
        batch = {}
        for key in keys:
            values = encoding[key]
            array = np.full((len(rows), width), pad_token_id if key == "input_ids" else 0, dtype=np.int64)
            for r, i in enumerate(rows):
                if left:
                    array[r, width - len(values[i]) :] = values[i]
                else:
                    array[r, : len(values[i])] = values[i]
            batch[key] = torch.from_numpy(array)
        out.append((group, batch))
    return out


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def truncate_to_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """The longest prefix of text that holds at most max_tokens tokens (no special tokens)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    return prefix_of(text, encoding["offset_mapping"], max_tokens)
