"""The Serve deployment that owns one scorer and batches pairs across callers with @serve.batch."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import ray
import torch
from PIL import Image
from ray import serve
from ray.util import metrics

from serve_app import hardware
from serve_app.errors import InputTooLarge, InvalidInput, PoolUnavailable
from serve_app.hardware import BatchProfile, ProfileRow, synthetic_pairs
from serve_app.scoring import Content, ModelLoadError, Pair, PairTooLong, ScoringError
from serve_app.scoring.base import BUCKET, TokenCount
from serve_app.settings import PoolSettings

log = logging.getLogger("ray.serve")

# What setting names a pool's model, for error messages that say how to fix things.
MODEL_SETTING = {"text": "RERANK_TEXT__MODEL", "image_text": "RERANK_IMAGE_TEXT__MODEL"}
DERIVE_PROBE_PAIRS = 8


def probe_pair(pool: str) -> Pair:
    """The small real pair /health scores through a pool."""
    if pool == "image_text":
        return Pair(Content(text="a grey square"), Content(image=Image.new("RGB", (32, 32), (128, 128, 128))))
    return Pair(Content(text="health check"), Content(text="the service is scoring pairs"))


def pairs_in(calls: list[list[Pair]]) -> int:
    return sum(len(call) for call in calls)


class PoolMetrics:
    """Prometheus series through Ray's metrics export, tagged by pool."""

    def __init__(self, pool: str) -> None:
        tags = {"pool": pool}
        self.pairs = metrics.Counter("rerank_pairs_scored", "Pairs scored.", tag_keys=("pool",))
        self.batch_pairs = metrics.Histogram(
            "rerank_batch_pairs", "Pairs per batch.", boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
            tag_keys=("pool",),
        )  # fmt: skip
        self.batch_ms = metrics.Histogram(
            "rerank_batch_latency_ms", "Prepare + forward time per batch.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000], tag_keys=("pool",),
        )  # fmt: skip
        self.queue = metrics.Gauge("rerank_pending_pairs", "Pairs waiting for or in a batch.", tag_keys=("pool",))
        self.memory = metrics.Gauge(
            "rerank_memory_bytes", "CUDA allocated bytes, or RSS on the CPU.", tag_keys=("pool", "kind")
        )
        for series in (self.pairs, self.batch_pairs, self.batch_ms, self.queue, self.memory):
            series.set_default_tags(tags)


@serve.deployment
class PoolReplica:
    """One replica of a pool. Its batch cap counts pairs and comes from the profile of its GPU kind,
    unless the pool's config sets one. A realtime replica scores each call as its own batch, at once."""

    def __init__(
        self, pool: str, config: PoolSettings, cache_dir: Path, profiles: list[ProfileRow], realtime: bool = False
    ) -> None:
        self.pool = pool
        self.config = config
        self.realtime = realtime
        self.placement = hardware.placement()
        self.profile = hardware.choose_profile(profiles, self.placement, pool, config)
        self.load_error: str | None = None
        self.scorer = None
        self.forward_lock = asyncio.Lock()
        self.pending_pairs = 0
        self.calls = self.pairs = self.batches = self.largest_batch = 0
        self.tokens = TokenCount()
        self.batch_latencies_ms: deque[float] = deque(maxlen=1000)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self.metrics = PoolMetrics(pool)
        try:
            self.scorer = hardware.load_pool_scorer(config, self.placement, self.profile, cache_dir)
        except ModelLoadError as exc:
            # The service stays up without this pool; /health and /v1/models say why.
            self.load_error = f"{exc}. Set {MODEL_SETTING.get(pool, 'the pool model')} to a local model directory."
            log.error("pool %s unavailable: %s", pool, self.load_error)
            return
        # Every forward pass runs on this one thread, warm-up included: each thread that calls into torch
        # gets its own OpenMP team, and idle teams spinning beside the busy one cost a CPU replica ~15%.
        self.device_thread = ThreadPoolExecutor(
            1, f"{pool}-device", initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)
        )
        self.prepare_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{pool}-prepare")
        self.device_thread.submit(self._start_up).result()

    def _start_up(self) -> None:
        """Batch cap (derived where the card has no row), warm-up, and the cost of one more forward."""
        if self.profile.source.startswith("derive"):
            self.profile = self._derive_profile()
        self.max_batch_size = self.profile.max_batch_size
        self.batch_wait_timeout_s = self.profile.batch_wait_timeout_s
        self._apply_config(self.config.max_batch_size, self.config.batch_wait_timeout_s)
        self._warm_up()
        hardware.tune_forward_cost(self.scorer, self.pool, self.config, self.max_batch_size)

    # ---- start-up: profile, derived cap, warm-up ------------------------------------------

    def _derive_profile(self) -> BatchProfile:
        """A GPU kind without a row: fit the activations of one probe batch into the free memory."""
        torch.cuda.synchronize()
        hardware.reset_peak_memory()
        before = torch.cuda.memory_allocated()
        self.scorer.score(synthetic_pairs(self.pool, DERIVE_PROBE_PAIRS, self.scorer.info.max_length))
        per_pair = (torch.cuda.max_memory_allocated() - before) / DERIVE_PROBE_PAIRS
        free, _ = torch.cuda.mem_get_info()
        cap = hardware.derive_max_batch_size(free, per_pair)
        tokens = self.scorer.info.max_length
        source = f"derived: {free / 2**30:.1f} GiB free, {per_pair / 2**20:.1f} MiB/pair at {tokens} tokens"
        log.info("pool %s on %s: %s -> max batch %d", self.pool, self.placement.gpu_kind, source, cap)
        return BatchProfile(cap, 0.005, self.profile.dtype, source)

    def _warm_up(self) -> None:
        """Run the shapes this replica will meet once, so no request pays for kernel selection.

        On a GPU: every length bucket at every power-of-two batch size up to the cap. On the CPU
        one batch at the cap is enough (no per-shape kernels to pick).
        """
        start = time.perf_counter()
        if not self.placement.device.startswith("cuda"):
            self.scorer.score(synthetic_pairs(self.pool, self.max_batch_size, 8))
        else:
            widths = range(BUCKET, self.scorer.info.max_length + 1, BUCKET)
            # Rows are padded to powers of two: up to the first one at or above the cap.
            sizes = [1 << i for i in range((self.max_batch_size - 1).bit_length() + 1)]
            for width in widths:
                for size in sizes:
                    # "query" + the words + 2 digits + 3 special tokens: `width` tokens for a BERT cross-encoder.
                    self.scorer.score(synthetic_pairs(self.pool, size, width - 6))
        log.info("pool %s warmed up in %.1f s", self.pool, time.perf_counter() - start)

    def reconfigure(self, user_config: dict) -> None:
        """The pool config's explicit cap and wait win over the profile (also on a live `serve deploy`)."""
        if self.scorer is None:
            return
        self._apply_config(user_config.get("max_batch_size"), user_config.get("batch_wait_timeout_s"))
        self._score_batch.set_max_batch_size(self.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(0.0 if self.realtime else self.batch_wait_timeout_s)

    def _apply_config(self, max_batch_size: int | None, batch_wait_timeout_s: float | None) -> None:
        if max_batch_size:
            self.max_batch_size = int(max_batch_size)
            self.profile = BatchProfile(
                self.max_batch_size, self.profile.batch_wait_timeout_s, self.profile.dtype, "config"
            )
        if batch_wait_timeout_s is not None:
            self.batch_wait_timeout_s = float(batch_wait_timeout_s)

    # ---- the scoring path -------------------------------------------------------------------

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
        if self.realtime:
            results = [await self._run([piece]) for piece in pieces]
            return [scored for result in results for scored in result[0]]
        # Nothing queued or running: a batch would only wait for company, so it starts at once. Busy: the
        # batch forming now waits (the profile's wait) and fills while the device finishes the last one.
        self._score_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s if self.pending_pairs else 0.0)
        self.pending_pairs += len(pairs)
        self.metrics.queue.set(self.pending_pairs)
        try:
            results = await asyncio.gather(*(self._score_batch(piece) for piece in pieces))
        finally:
            # Also when the caller is cancelled: its queued pieces leave the batcher unscored.
            self.pending_pairs -= len(pairs)
            self.metrics.queue.set(self.pending_pairs)
        for piece in results:
            if isinstance(piece, Exception):  # this call failed on its own inside a shared batch
                raise piece
        return [scored for piece in results for scored in piece]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=pairs_in, max_concurrent_batches=2)
    async def _score_batch(self, calls: list[list[Pair]]) -> list[list[tuple[float, float]] | Exception]:
        try:
            return await self._run(calls)
        except Exception:
            if len(calls) == 1:
                raise
            # Never let one caller's pairs fail the others': score each call on its own.
            log.exception("batch of %d calls failed; scoring them one by one", len(calls))
            return [await self._run_alone(call) for call in calls]

    async def _run(self, calls: list[list[Pair]]) -> list[list[tuple[float, float]]]:
        """Prepare (CPU) then forward (device). Two batches may be in flight: one prepares while the
        other holds the device, unless overlap_preprocessing is off."""
        flat = [pair for call in calls for pair in call]
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        if self.config.overlap_preprocessing:
            prepared = await loop.run_in_executor(self.prepare_thread, self.scorer.prepare, flat)
            async with self.forward_lock:
                raw = await loop.run_in_executor(self.device_thread, self.scorer.forward, prepared)
        else:
            async with self.forward_lock:
                prepared = await loop.run_in_executor(self.prepare_thread, self.scorer.prepare, flat)
                raw = await loop.run_in_executor(self.device_thread, self.scorer.forward, prepared)
        self._record(len(flat), (time.perf_counter() - start) * 1000, self.scorer.tokens(prepared))
        scored = list(zip(raw, self.scorer.calibrate(raw)))
        out, offset = [], 0
        for call in calls:
            out.append(scored[offset : offset + len(call)])
            offset += len(call)
        return out

    async def _run_alone(self, call: list[Pair]) -> list[tuple[float, float]] | Exception:
        try:
            return (await self._run([call]))[0]
        except Exception as exc:  # noqa: BLE001 - handed back to that caller only
            return exc

    def _record(self, pairs: int, ms: float, tokens: TokenCount) -> None:
        self.batches += 1
        self.tokens += tokens
        self.pairs += pairs
        self.largest_batch = max(self.largest_batch, pairs)
        self.batch_sizes.append(pairs)
        self.batch_latencies_ms.append(ms)
        self.metrics.pairs.inc(pairs)
        self.metrics.batch_pairs.observe(pairs)
        self.metrics.batch_ms.observe(ms)

    # ---- what the ingress asks of a replica --------------------------------------------------

    async def probe(self) -> float:
        """Score one small real pair through the scoring path; milliseconds taken."""
        start = time.perf_counter()
        await self.score([probe_pair(self.pool)])
        return (time.perf_counter() - start) * 1000

    def info(self) -> dict:
        """What /v1/models shows of this replica."""
        described = {
            "pool": self.pool,
            "variant": "realtime" if self.realtime else "batch",
            "model": self.config.model,
            "available": self.scorer is not None,
            "reason": self.load_error,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": self.placement.node,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_kind": self.placement.gpu_kind,
            "gpu_name": self.placement.gpu_name,
            "device": self.placement.device,
            "dtype": self.profile.dtype,
            "max_batch_size": getattr(self, "max_batch_size", None),
            "batch_wait_timeout_s": 0.0 if self.realtime else getattr(self, "batch_wait_timeout_s", None),
            "max_batch_size_source": self.profile.source,
            "forward_cost_tokens": self.scorer.options.forward_cost_tokens if self.scorer else None,
            "torch_threads": torch.get_num_threads(),
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
        return described

    def stats(self) -> dict:
        """What /v1/stats shows of this replica: memory, batches, fill, latency, queue."""
        memory = hardware.memory_stats()
        self.metrics.memory.set(
            memory.get("allocated_bytes") or memory.get("rss_bytes") or 0, tags={"kind": memory["device"]}
        )
        latencies = sorted(self.batch_latencies_ms)
        return {
            "pool": self.pool,
            "variant": "realtime" if self.realtime else "batch",
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_kind": self.placement.gpu_kind,
            "memory": memory,
            "batches": self.batches,
            "pairs": self.pairs,
            "mean_batch_fill_pairs": round(statistics.fmean(self.batch_sizes), 2) if self.batch_sizes else None,
            # Counted since start-up (warm-up excluded): differences between two readings give a window's figures.
            "real_tokens": self.tokens.real,
            "padded_tokens": self.tokens.padded,
            "padding_waste": round(self.tokens.padded / self.tokens.real - 1, 4) if self.tokens.real else None,
            "max_batch_size": getattr(self, "max_batch_size", None),
            "batch_latency_ms_p50": round(percentile(latencies, 0.5), 2) if latencies else None,
            "batch_latency_ms_p95": round(percentile(latencies, 0.95), 2) if latencies else None,
            "pending_pairs": self.pending_pairs,
        }


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
