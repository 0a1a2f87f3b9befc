"""The Serve deployment that owns one scorer and batches pairs across callers with @serve.batch."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from PIL import Image
from ray import serve

from serve_app.errors import InputTooLarge, InvalidInput, PoolUnavailable
from serve_app.hardware import placement
from serve_app.scoring import (
    Content,
    LoadOptions,
    ModelLoadError,
    Pair,
    PairTooLong,
    ScoringError,
    load_scorer,
)
from serve_app.scoring.base import Logistic
from serve_app.settings import PoolSettings

log = logging.getLogger("ray.serve")

# What setting names a pool's model, for error messages that say how to fix things.
MODEL_SETTING = {"text": "RERANK_TEXT__MODEL", "image_text": "RERANK_IMAGE_TEXT__MODEL"}


def probe_pair(pool: str) -> Pair:
    """The small real pair /health scores through a pool."""
    if pool == "image_text":
        return Pair(Content(text="a grey square"), Content(image=Image.new("RGB", (32, 32), (128, 128, 128))))
    return Pair(Content(text="health check"), Content(text="the service is scoring pairs"))


def pairs_in(calls: list[list[Pair]]) -> int:
    return sum(len(call) for call in calls)


@serve.deployment
class PoolReplica:
    """One replica of a pool. The batch cap counts pairs, not calls, and comes from user_config."""

    def __init__(self, pool: str, config: PoolSettings, cache_dir: Path) -> None:
        self.pool = pool
        self.config = config
        where = placement()
        self.placement = where
        self.load_error: str | None = None
        self.scorer = None
        calibration = config.calibration and Logistic(config.calibration.scale, config.calibration.shift)
        try:
            self.scorer = load_scorer(
                config.model,
                LoadOptions(
                    device=where.device,
                    dtype=where.dtype,
                    max_tokens_per_forward=config.max_tokens_per_forward,
                    calibration=calibration,
                    cache_dir=cache_dir,
                ),
            )
        except ModelLoadError as exc:
            # The service stays up without this pool; /health and /v1/models say why.
            self.load_error = f"{exc}. Set {MODEL_SETTING.get(pool, 'the pool model')} to a local model directory."
            log.error("pool %s unavailable: %s", pool, self.load_error)
        self.max_batch_size = config.max_batch_size
        self.batch_wait_timeout_s = config.batch_wait_timeout_s
        self.calls = 0
        self.pairs = 0
        self.batches = 0
        self.largest_batch = 0

    def reconfigure(self, user_config: dict) -> None:
        self.max_batch_size = int(user_config["max_batch_size"])
        self.batch_wait_timeout_s = float(user_config["batch_wait_timeout_s"])
        self._score_batch.set_max_batch_size(self.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    async def score(self, pairs: list[Pair], truncate: bool = True) -> list[tuple[float, float]]:
        """(raw, calibrated) per pair, in order. Bad input fails this call only, before it is batched."""
        if self.scorer is None:
            raise PoolUnavailable(f"the {self.pool} pool is unavailable: {self.load_error}")
        try:
            if truncate:
                self.scorer.check(pairs, truncate)
            else:
                await asyncio.to_thread(self.scorer.check, pairs, truncate)
        except PairTooLong as exc:
            raise InputTooLarge(str(exc), "documents") from None
        except ScoringError as exc:
            raise InvalidInput(str(exc), "documents") from None
        self.calls += 1
        # A call larger than the cap would be refused by the batcher: cut it here, where the cap is known.
        pieces = [pairs[i : i + self.max_batch_size] for i in range(0, len(pairs), self.max_batch_size)]
        results = await asyncio.gather(*(self._score_batch(piece) for piece in pieces))
        for piece in results:
            if isinstance(piece, Exception):  # this call failed on its own inside a shared batch
                raise piece
        return [scored for piece in results for scored in piece]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=pairs_in)
    async def _score_batch(self, calls: list[list[Pair]]) -> list[list[tuple[float, float]]]:
        flat = [pair for call in calls for pair in call]
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(flat))
        try:
            raw = await asyncio.to_thread(self.scorer.score, flat)
        except Exception:
            if len(calls) == 1:
                raise
            # Never let one caller's pairs fail the others': score each call on its own.
            log.exception("batch of %d calls failed; scoring them one by one", len(calls))
            return [await self._score_alone(call) for call in calls]
        self.pairs += len(flat)
        scored = list(zip(raw, self.scorer.calibrate(raw)))
        out, start = [], 0
        for call in calls:
            out.append(scored[start : start + len(call)])
            start += len(call)
        return out

    async def _score_alone(self, call: list[Pair]) -> list[tuple[float, float]] | Exception:
        try:
            raw = await asyncio.to_thread(self.scorer.score, call)
        except Exception as exc:  # noqa: BLE001 - handed back to that caller only
            return exc
        self.pairs += len(call)
        return list(zip(raw, self.scorer.calibrate(raw)))

    async def probe(self) -> float:
        """Score one small real pair through the batch path; milliseconds taken."""
        start = time.perf_counter()
        await self.score([probe_pair(self.pool)])
        return (time.perf_counter() - start) * 1000

    def info(self) -> dict:
        """What /v1/models shows of this replica."""
        described = {
            "pool": self.pool,
            "model": self.config.model,
            "available": self.scorer is not None,
            "reason": self.load_error,
            "node": self.placement.node,
            "accelerator": self.placement.accelerator,
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "counters": {
                "calls": self.calls,
                "pairs": self.pairs,
                "batches": self.batches,
                "largest_batch": self.largest_batch,
            },
        }
        if self.scorer is not None:
            described.update(asdict(self.scorer.info))
        else:
            described.update(device=self.placement.device, dtype=str(self.placement.dtype).removeprefix("torch."))
        return described
