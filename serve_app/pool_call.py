"""The message a pool call answers with: a message between the ingress and a pool replica, not a scoring type."""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.scoring.types import Score


@dataclass(frozen=True)
class CallResult:
    """One pool call's scores and what they cost: the pairs and real tokens computed (windows included),
    documents split into windows, and the times of its slowest piece (waiting for a batch, preparing,
    the forward pass), in ms."""

    scores: list[Score]
    pairs: int = 0
    tokens: int = 0
    split: int = 0
    queue_ms: float = 0.0
    tokenize_ms: float = 0.0
    inference_ms: float = 0.0

    @property
    def busy_ms(self) -> float:
        return self.queue_ms + self.tokenize_ms + self.inference_ms
