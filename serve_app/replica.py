"""The Serve deployment that owns one pool scorer and batches pairs across callers with @serve.batch."""

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
from ray import serve
from ray.util import metrics

from serve_app import hardware, pools
from serve_app.errors import InputTooLarge, InvalidInput, Overloaded, PoolUnavailable
from serve_app.hardware import ProfileRow
from serve_app.scoring.types import ModelLoadError, Pair, PairTooLong, Score, ScoringError, TokenCount
from serve_app.settings import PoolSettings, env_name
from serve_app.stats import percentile

log = logging.getLogger("ray.serve")


def unhealthy_because(
    device_fault: str | None, loaded: bool, started: float, pool_settings: PoolSettings
) -> str | None:
    """Why a replica should be replaced, or None while it is fine."""
    if device_fault is not None:
        return f"the device failed ({device_fault}); a new process gets a fresh context"
    retry = pool_settings.load_retry_s
    if not loaded and retry is not None and time.monotonic() - started > retry:
        return f"the model did not load; replacing the replica to load it again (load_retry_s={retry})"
    return None


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
    unless the pool's settings set one. A realtime replica scores each call as its own batch, at once."""

    def __init__(
        self,
        pool: str,
        pool_settings: PoolSettings,
        cache_dir: Path,
        profiles: list[ProfileRow],
        realtime: bool = False,
    ) -> None:
        self.pool = pool
        self.pool_settings = pool_settings
        self.realtime = realtime
        self.placement = hardware.placement()
        self.load_error: str | None = None
        self.device_fault: str | None = None
        self.started = time.monotonic()
        self.forward_lock = asyncio.Lock()
        self.pending_pairs = 0
        self.calls = self.pairs = self.batches = self.largest_batch = 0
        self.tokens = TokenCount()
        self.batch_latencies_ms: deque[float] = deque(maxlen=1000)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self.metrics = PoolMetrics(pool)
        # Every forward pass runs on this one thread, loading and warm-up included: each thread that calls
        # into torch gets its own OpenMP team, and idle teams spinning beside the busy one cost a CPU replica ~15%.
        self.torch_threads = pools.set_torch_threads(pool_settings.torch_threads)
        self.device_thread = ThreadPoolExecutor(
            1, f"{pool}-device", initializer=pools.set_torch_threads, initargs=(self.torch_threads,)
        )
        self.prepare_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{pool}-prepare")
        self.loaded: pools.PoolScorer | None = None
        try:
            self.loaded = self.device_thread.submit(
                pools.load_pool, pool, pool_settings, profiles, cache_dir, where=self.placement
            ).result()
        except ModelLoadError as exc:
            # The service stays up without this pool; /health and /v1/models say why.
            self.load_error = f"{exc}. Set {env_name(pool, 'model')} to a local model directory."
            log.error("pool %s unavailable: %s", pool, self.load_error)

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: one whose GPU failed (every later call would fail too),
        and one whose model did not load, after load_retry_s, so that the new replica loads it again."""
        reason = unhealthy_because(self.device_fault, self.loaded is not None, self.started, self.pool_settings)
        if reason:
            log.error("pool %s replica unhealthy: %s", self.pool, reason)
            raise RuntimeError(reason)

    def reconfigure(self, user_config: dict) -> None:
        """The pool's explicit cap and wait win over the profile (also on a live `serve deploy`)."""
        if self.loaded is None:
            return
        profile = self.loaded.profile.overridden(
            user_config.get("max_batch_size"), user_config.get("batch_wait_timeout_s")
        )
        self.loaded.profile = profile
        self._score_batch.set_max_batch_size(profile.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(0.0 if self.realtime else profile.batch_wait_timeout_s)

    # ---- the scoring path -------------------------------------------------------------------

    def _scorer(self) -> pools.PoolScorer:
        if self.device_fault is not None:
            raise Overloaded(f"a {self.pool} replica's GPU failed and it is being replaced; retry shortly", 1)
        if self.loaded is None:
            raise PoolUnavailable(f"the {self.pool} pool is unavailable: {self.load_error}")
        return self.loaded

    async def score(self, pairs: list[Pair], truncate: bool = True) -> list[Score]:
        """A score per pair, in order. Bad input fails this call only, before it is batched."""
        loaded = self._scorer()
        try:
            if truncate:
                loaded.scorer.check(pairs, truncate)
            else:
                await asyncio.to_thread(loaded.scorer.check, pairs, truncate)
        except PairTooLong as exc:
            raise InputTooLarge(str(exc), "documents") from None
        except ScoringError as exc:
            raise InvalidInput(str(exc), "documents") from None
        self.calls += 1
        # A call larger than the cap would be refused by the batcher: cut it here, where the cap is known.
        cap = loaded.profile.max_batch_size
        pieces = [pairs[i : i + cap] for i in range(0, len(pairs), cap)]
        if self.realtime:
            results = [await self._run([piece]) for piece in pieces]
            return [scored for result in results for scored in result[0]]
        # Nothing queued or running: a batch would only wait for company, so it starts at once. Busy: the
        # batch forming now waits (the profile's wait) and fills while the device finishes the last one.
        self._score_batch.set_batch_wait_timeout_s(loaded.profile.batch_wait_timeout_s if self.pending_pairs else 0.0)
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
    async def _score_batch(self, calls: list[list[Pair]]) -> list[list[Score] | Exception]:
        try:
            return await self._run(calls)
        except Exception:
            if len(calls) == 1:
                raise
            # Never let one caller's pairs fail the others': score each call on its own.
            log.exception("batch of %d calls failed; scoring them one by one", len(calls))
            return [await self._run_alone(call) for call in calls]

    async def _run(self, calls: list[list[Pair]]) -> list[list[Score]]:
        """Prepare (CPU) then forward (device). Two batches may be in flight: one prepares while the
        other holds the device, unless overlap_preprocessing is off."""
        scorer = self._scorer().scorer
        flat = [pair for call in calls for pair in call]
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            if self.pool_settings.overlap_preprocessing:
                prepared = await loop.run_in_executor(self.prepare_thread, scorer.prepare, flat)
                async with self.forward_lock:
                    raw = await loop.run_in_executor(self.device_thread, scorer.forward, prepared)
            else:
                async with self.forward_lock:
                    prepared = await loop.run_in_executor(self.prepare_thread, scorer.prepare, flat)
                    raw = await loop.run_in_executor(self.device_thread, scorer.forward, prepared)
        except Exception as exc:
            if hardware.is_device_fault(exc):
                self.device_fault = f"{type(exc).__name__}: {str(exc)[:300]}"
            raise
        self._record(len(flat), (time.perf_counter() - start) * 1000, scorer.tokens(prepared))
        scored = scorer.calibrate(raw)
        out, offset = [], 0
        for call in calls:
            out.append(scored[offset : offset + len(call)])
            offset += len(call)
        return out

    async def _run_alone(self, call: list[Pair]) -> list[Score] | Exception:
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
        await self.score([pools.probe_pair(self.pool)])
        return (time.perf_counter() - start) * 1000

    def info(self) -> dict:
        """What /v1/models shows of this replica."""
        loaded = self.loaded
        profile = loaded.profile if loaded else None
        described = {
            "pool": self.pool,
            "variant": "realtime" if self.realtime else "batch",
            "model": self.pool_settings.model,
            "available": loaded is not None,
            "reason": self.load_error,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": self.placement.node,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_kind": self.placement.gpu_kind,
            "gpu_name": self.placement.gpu_name,
            "device": self.placement.device,
            "dtype": profile.dtype if profile else None,
            "max_batch_size": profile.max_batch_size if profile else None,
            "batch_wait_timeout_s": (0.0 if self.realtime else profile.batch_wait_timeout_s) if profile else None,
            "max_batch_size_source": profile.source if profile else None,
            "forward_cost_tokens": loaded.scorer.options.forward_cost_tokens if loaded else None,
            "load_options": loaded.scorer.options.describe() if loaded else None,
            "torch_threads": self.torch_threads,
            "pid": os.getpid(),
            "counters": {
                "calls": self.calls,
                "pairs": self.pairs,
                "batches": self.batches,
                "largest_batch": self.largest_batch,
            },
        }
        if loaded is not None:
            described.update(asdict(loaded.scorer.info))
        return described

    def stats(self) -> dict:
        """What /v1/stats shows of this replica: memory, batches, fill, latency, queue."""
        memory = hardware.memory_stats()
        self.metrics.memory.set(
            memory.get("allocated_bytes") or memory.get("rss_bytes") or 0, tags={"kind": memory["device"]}
        )
        p50, p95 = (percentile(self.batch_latencies_ms, q) for q in (0.5, 0.95))
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
            "max_batch_size": self.loaded.profile.max_batch_size if self.loaded else None,
            "batch_latency_ms_p50": None if p50 is None else round(p50, 2),
            "batch_latency_ms_p95": None if p95 is None else round(p95, 2),
            "pending_pairs": self.pending_pairs,
        }
