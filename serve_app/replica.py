"""The Serve deployment that owns one pool scorer and batches pairs across callers with @serve.batch."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
from ray import serve
from ray.util import metrics

from serve_app import hardware, pools
from serve_app.errors import InputTooLarge, InvalidInput, Overloaded, PoolUnavailable
from serve_app.hardware import ProfileRow
from serve_app.scoring.types import (
    CallResult,
    EncodedPair,
    ModelLoadError,
    Pair,
    PairTooLong,
    Score,
    ScoringError,
    TokenCount,
    Windows,
)
from serve_app.settings import PoolSettings, SharedPoolSettings, env_name
from serve_app.stats import Throughput, percentile

log = logging.getLogger("ray.serve")

# The forward cost a text replica measures at start-up is measured again this long after its first call (and
# each time after the one before), once it has been idle REFINE_IDLE_S: replicas that load side by side measure
# each other's loading, and one start-up measurement read 90 tokens where a quiet one reads 26-29. The median of
# all measurements is kept.
REFINE_AFTER_S = (1.0, 5.0, 15.0)
REFINE_IDLE_S = 1.0
# A measurement that calls keep interrupting (a request every second or two never leaves the replica idle for
# the whole probe) is given up after this many tries: each try costs its interrupting call one probe forward.
REFINE_MAX_INTERRUPTED = 5


async def remeasure_when_quiet(
    measure: Callable[[], Awaitable[int | None]],
    busy: Callable[[], bool],
    samples: list[int],
    apply: Callable[[int], None],
) -> None:
    """At each of REFINE_AFTER_S, wait until `busy()` is false (polled every REFINE_IDLE_S), then `measure()`
    (None: interrupted, tried again at the next quiet moment), append to `samples` and `apply` their median.
    Gives up after REFINE_MAX_INTERRUPTED interrupted tries."""
    interrupted = 0
    for delay in REFINE_AFTER_S:
        await asyncio.sleep(delay)
        while True:
            if interrupted >= REFINE_MAX_INTERRUPTED:
                return
            while busy():
                await asyncio.sleep(REFINE_IDLE_S)
            cost = await measure()
            if cost is not None:
                break
            interrupted += 1
        samples.append(cost)
        apply(round(statistics.median(samples)))


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
    """Prometheus series through Ray's metrics export, tagged by pool and model."""

    def __init__(self, pool: str, model: str) -> None:
        keys = ("pool", "model")
        self.pairs = metrics.Counter("rerank_pairs_scored", "Pairs scored.", tag_keys=keys)
        self.batch_pairs = metrics.Histogram(
            "rerank_batch_pairs", "Pairs per batch.", boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
            tag_keys=keys,
        )  # fmt: skip
        self.batch_ms = metrics.Histogram(
            "rerank_batch_latency_ms", "Prepare + forward time per batch.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000], tag_keys=keys,
        )  # fmt: skip
        self.queue = metrics.Gauge("rerank_pending_pairs", "Pairs waiting for or in a batch.", tag_keys=keys)
        self.memory = metrics.Gauge(
            "rerank_memory_bytes", "CUDA allocated bytes, or RSS on the CPU.", tag_keys=("pool", "model", "kind")
        )
        self.loads = metrics.Counter("rerank_model_loads", "Models loaded on demand (shared pool).", tag_keys=keys)
        self.evictions = metrics.Counter(
            "rerank_model_evictions", "Models evicted, least recently used (shared pool).", tag_keys=keys
        )
        self.refused = metrics.Counter(
            "rerank_refused_calls", "Calls refused at once: their estimated wait passed their deadline.", tag_keys=keys
        )
        for series in (
            self.pairs,
            self.batch_pairs,
            self.batch_ms,
            self.queue,
            self.memory,
            self.loads,
            self.evictions,
            self.refused,
        ):
            series.set_default_tags({"pool": pool, "model": model})


COUNTERS = ("calls", "pairs", "batches", "largest_batch")


@dataclass(frozen=True)
class Part:
    """One call's share of a batch: its scores, its share of the batch's real tokens, when the batch started
    and finished (perf_counter), and the batch's preparation and forward time in ms."""

    scores: list[Score]
    tokens: int
    started: float
    done: float
    tokenize_ms: float
    inference_ms: float


class Resident:
    """A model loaded in a replica: its scorer, its counters and when it was last asked for. In the shared
    pool Serve's multiplexer holds these, least recently used first, and calls __del__ when it evicts one."""

    def __init__(self, name: str, pool: str, settings: PoolSettings, loaded: pools.PoolScorer, load_s: float = 0.0):
        self.name = name
        self.pool = pool  # the modality: "text" or "image_text"
        self.settings = settings
        self.loaded = loaded
        self.load_s = load_s
        self.last_used = time.monotonic()
        self.calls = self.pairs = self.batches = self.largest_batch = 0
        self.tokens = TokenCount()
        self.batch_latencies_ms: deque[float] = deque(maxlen=1000)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        # Pairs that arrived as text and were tokenized here, and pairs that arrived as token ids (the ingress
        # tokenized them): with tokenize_in=ingress a text pool's first counter stays still.
        self.tokenized_pairs = self.encoded_pairs = 0
        # Seconds spent preparing batches (padding, bucketing; tokenizing what came as text) and in forwards:
        # forward_s over a window's wall time is the replica's forward utilization (how busy the device is kept).
        self.prepare_s = self.forward_s = 0.0
        self.spec = loaded.scorer.tokenizer_spec()  # None: this model's pairs travel as text
        self.forward_cost_samples = [loaded.scorer.options.forward_cost_tokens]  # start-up's, then idle re-probes
        self.forward_cost_settled = False  # True once the re-probes are done (or none is made)
        self.on_evict = None

    def __del__(self) -> None:
        hook, self.on_evict = self.on_evict, None
        if hook is not None:
            hook(self)

    def counters(self) -> dict:
        return {name: getattr(self, name) for name in COUNTERS}

    def describe(self) -> dict:
        """This model as /v1/models shows it: batch cap and its source, dtype, family, load options."""
        profile, scorer = self.loaded.profile, self.loaded.scorer
        return {
            "name": self.name,
            "model": self.settings.model,
            "dtype": profile.dtype,
            "max_batch_size": profile.max_batch_size,
            "max_batch_size_source": profile.source,
            "forward_cost_tokens": scorer.options.forward_cost_tokens,
            "forward_cost_samples": list(self.forward_cost_samples),
            "score_map": pools.describe_calibration(scorer),
            "load_options": scorer.options.describe(),
            "cuda_graphs": cuda_graphs(scorer),
            **asdict(scorer.info),
        }


class ScoringReplica:
    """What every replica does with the model(s) it holds: checks a call, batches it with other callers' calls
    (of the same model), prepares on one thread and runs the forward pass on another. Subclasses say which
    model a call is for (`_resident`)."""

    realtime = False

    def _start(self, pool: str, model: str, torch_threads: int | None) -> None:
        self.placement = hardware.placement()
        self.device_fault: str | None = None
        self.started = time.monotonic()
        self.forward_lock = asyncio.Lock()
        self.pending_pairs = 0
        self.last_busy = time.perf_counter()  # when the last batch finished: the forward-cost re-probe waits for quiet
        self.throughput = Throughput()  # the rate the queue drains at: admission estimates waits with it
        self.refused = 0
        self.metrics = PoolMetrics(pool, model)
        # Every forward pass runs on this one thread, loading and warm-up included: each thread that calls
        # into torch gets its own OpenMP team, and idle teams spinning beside the busy one cost a CPU replica ~15%.
        self.torch_threads = pools.set_torch_threads(torch_threads)
        self.device_thread = ThreadPoolExecutor(
            1, f"{pool}-device", initializer=pools.set_torch_threads, initargs=(self.torch_threads,)
        )
        self.prepare_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{pool}-prepare")

    async def _resident(self) -> Resident:
        raise NotImplementedError

    def _on_call(self) -> None:
        """Called at each call, in the replica's event loop (what a subclass starts in the background)."""

    def _check_device(self, pool: str) -> None:
        if self.device_fault is not None:
            raise Overloaded(f"a {pool} replica's GPU failed and it is being replaced; retry shortly", 1)

    def _admit(self, pairs: int, admit_by: float | None) -> None:
        """Overloaded (503) at once when this call's pairs, behind those already queued here, would not be scored
        by `admit_by` (epoch seconds) at the rate this replica measured under load. Retry-After is when the queue
        will have drained enough for a fresh request of this size to fit. No measurement yet: admitted."""
        if admit_by is None or self.realtime:
            return
        wait = self.throughput.wait_s(self.pending_pairs + pairs)
        left = admit_by - time.time()
        if wait is None or wait <= left:
            return
        self.refused += 1
        self.metrics.refused.inc()
        rate = self.throughput.pairs_per_s() or 0.0
        raise Overloaded(
            f"this replica's queue holds about {wait:.1f} s of work ({self.pending_pairs} pairs queued + {pairs} "
            f"of this request, at {rate:.0f} pairs/s), more than the {max(left, 0.0):.1f} s the request has before "
            "its deadline (settings request_timeout_s, admission_wait_fraction); retry after the Retry-After "
            "seconds, or send fewer documents",
            max(1, math.ceil(wait - max(left, 0.0))),
        )

    async def score(
        self,
        pairs: list[Pair] | list[EncodedPair],
        truncate: bool = True,
        window_stride: int | None = None,
        admit_by: float | None = None,
    ) -> CallResult:
        return await self._score(pairs, truncate, window_stride, admit_by, counted=True)

    async def _score(
        self,
        pairs: list[Pair] | list[EncodedPair],
        truncate: bool = True,
        window_stride: int | None = None,
        admit_by: float | None = None,
        counted: bool = False,
    ) -> CallResult:
        """A score per pair, in order, and what they cost. With `window_stride`, a document longer than the
        model's window is scored as overlapping windows (sharing that many tokens) and gets its best window's
        score; without, it is truncated (or refused, truncate=False). Bad input fails this call only, before it
        is batched. With `admit_by` (epoch seconds), a call that could not be scored by then is refused at once
        (503) instead of waiting for nothing."""
        arrived = time.perf_counter()
        resident = await self._resident()  # in the shared pool: perhaps a load, counted as waiting
        self._on_call()
        ready = time.perf_counter()
        resident.last_used = time.monotonic()
        loaded = resident.loaded
        encoded = bool(pairs) and isinstance(pairs[0], EncodedPair)
        if encoded:
            # Tokenized, checked and cut into windows by the ingress: only padding and forwards are left.
            if resident.spec is None or not all(isinstance(p, EncodedPair) for p in pairs):
                raise InvalidInput(f"model {resident.name!r} takes pairs as text, not token ids", "documents")
            resident.encoded_pairs += len(pairs) if counted else 0
        else:
            resident.tokenized_pairs += len(pairs) if counted else 0
        try:
            if encoded:
                windows = Windows.whole(pairs)
            elif window_stride is not None:
                windows = await asyncio.get_running_loop().run_in_executor(
                    self.prepare_thread, loaded.scorer.expand_windows, pairs, window_stride
                )
            else:
                windows = Windows.whole(pairs)
            windowed = time.perf_counter()
            if encoded:
                pass
            elif truncate:
                loaded.scorer.check(windows.pairs, truncate)
            else:
                await asyncio.to_thread(loaded.scorer.check, windows.pairs, truncate)
        except PairTooLong as exc:
            raise InputTooLarge(str(exc), "documents") from None
        except ScoringError as exc:
            raise InvalidInput(str(exc), "documents") from None
        scored = windows.pairs
        self._admit(len(scored), admit_by)
        resident.calls += 1
        # A call larger than the cap would be refused by the batcher: cut it here, where the cap is known.
        cap = loaded.profile.max_batch_size
        pieces = [scored[i : i + cap] for i in range(0, len(scored), cap)]
        if self.realtime:
            results = [(await self._run([piece]))[0] for piece in pieces]
        else:
            # Nothing queued or running: a batch would only wait for company, so it starts at once. Busy: the
            # batch forming now waits (the profile's wait) and fills while the device finishes the last one.
            wait = loaded.profile.batch_wait_timeout_s if self.pending_pairs else 0.0
            self._score_batch.set_batch_wait_timeout_s(wait)
            self.pending_pairs += len(scored)
            self.metrics.queue.set(self.pending_pairs)
            try:
                results = await asyncio.gather(*(self._score_batch(piece) for piece in pieces))
            finally:
                # Also when the caller is cancelled: its queued pieces leave the batcher unscored.
                self.pending_pairs -= len(scored)
                self.metrics.queue.set(self.pending_pairs)
            for piece in results:
                if isinstance(piece, Exception):  # this call failed on its own inside a shared batch
                    raise piece
        # The slowest piece is this call's critical path: its wait for a batch, its preparation, its forward.
        last = max(results, key=lambda part: part.done)
        return CallResult(
            scores=windows.merge([score for part in results for score in part.scores]),
            pairs=len(scored),
            tokens=sum(part.tokens for part in results),
            split=windows.split,
            # Cutting documents into windows tokenizes them: tokenization time, not queueing.
            queue_ms=(ready - arrived + last.started - windowed) * 1000,
            tokenize_ms=(windowed - ready) * 1000 + last.tokenize_ms,
            inference_ms=last.inference_ms,
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=pairs_in, max_concurrent_batches=2)
    async def _score_batch(self, calls: list[list[Pair]]) -> list[Part | Exception]:
        # Serve splits a gathered batch by multiplexed model id: every call here is for one model.
        try:
            return await self._run(calls)
        except Exception:
            if len(calls) == 1:
                raise
            # Never let one caller's pairs fail the others': score each call on its own.
            log.exception("batch of %d calls failed; scoring them one by one", len(calls))
            return [await self._run_alone(call) for call in calls]

    async def _run(self, calls: list[list[Pair]]) -> list[Part]:
        """Prepare (CPU) then forward (device), in pieces of the model's cap (a shared replica's batch may be
        larger than a small model's cap). Two batches may be in flight: one prepares while the other holds the
        device, unless overlap_preprocessing is off."""
        resident = await self._resident()
        scorer, cap = resident.loaded.scorer, resident.loaded.profile.max_batch_size
        flat = [pair for call in calls for pair in call]
        loop = asyncio.get_running_loop()
        scored, real_tokens = [], 0
        started = time.perf_counter()
        tokenize_s = inference_s = 0.0
        for offset in range(0, len(flat), cap):
            piece = flat[offset : offset + cap]
            start = time.perf_counter()
            try:
                if resident.settings.overlap_preprocessing:
                    prepared = await loop.run_in_executor(self.prepare_thread, scorer.prepare, piece)
                    tokenized = time.perf_counter()
                    async with self.forward_lock:
                        forward_start = time.perf_counter()
                        raw = await loop.run_in_executor(self.device_thread, scorer.forward, prepared)
                else:
                    async with self.forward_lock:
                        prepared = await loop.run_in_executor(self.prepare_thread, scorer.prepare, piece)
                        tokenized = forward_start = time.perf_counter()
                        raw = await loop.run_in_executor(self.device_thread, scorer.forward, prepared)
            except Exception as exc:
                if hardware.is_device_fault(exc):
                    self.device_fault = f"{type(exc).__name__}: {str(exc)[:300]}"
                raise
            done = time.perf_counter()
            tokenize_s += tokenized - start
            inference_s += done - forward_start
            resident.prepare_s += tokenized - start
            resident.forward_s += done - forward_start
            tokens = scorer.tokens(prepared)
            real_tokens += tokens.real
            self._record(resident, len(piece), (done - start) * 1000, tokens)
            scored.extend(scorer.calibrate(raw))
        done = self.last_busy = time.perf_counter()
        self.throughput.record(len(flat), started, done)
        out, offset = [], 0
        for call in calls:
            # A batch's tokens are shared out by pairs: exact when the batch is one caller's.
            share = round(real_tokens * len(call) / len(flat)) if flat else 0
            out.append(
                Part(scored[offset : offset + len(call)], share, started, done, tokenize_s * 1000, inference_s * 1000)
            )
            offset += len(call)
        return out

    async def _run_alone(self, call: list[Pair]) -> Part | Exception:
        try:
            return (await self._run([call]))[0]
        except Exception as exc:  # noqa: BLE001 - handed back to that caller only
            return exc

    def _record(self, resident: Resident, pairs: int, ms: float, tokens: TokenCount) -> None:
        resident.batches += 1
        resident.tokens += tokens
        resident.pairs += pairs
        resident.largest_batch = max(resident.largest_batch, pairs)
        resident.batch_sizes.append(pairs)
        resident.batch_latencies_ms.append(ms)
        tags = {"model": resident.name}
        self.metrics.pairs.inc(pairs, tags=tags)
        self.metrics.batch_pairs.observe(pairs, tags=tags)
        self.metrics.batch_ms.observe(ms, tags=tags)

    def _where(self) -> dict:
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": self.placement.node,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_kind": self.placement.gpu_kind,
            "gpu_name": self.placement.gpu_name,
            "device": self.placement.device,
            "torch_threads": self.torch_threads,
            "pid": os.getpid(),
        }

    def _admission(self) -> dict:
        """What admission by estimated wait sees: the measured rate, the queue's wait, the calls refused."""
        rate = self.throughput.pairs_per_s()
        wait = self.throughput.wait_s(self.pending_pairs)
        return {
            "pairs_per_s_under_load": None if rate is None else round(rate, 2),
            "estimated_wait_s": None if wait is None else round(wait, 3),
            "refused_calls": self.refused,
            "rate_window": self.throughput.window(),  # (pairs, service ms) of the batches the rate is taken over
        }

    def _memory(self, pool: str) -> dict:
        memory = hardware.memory_stats()
        self.metrics.memory.set(
            memory.get("allocated_bytes") or memory.get("rss_bytes") or 0, tags={"kind": memory["device"]}
        )
        return memory


def cuda_graphs(scorer) -> dict | None:
    """What /v1/models shows of a scorer's CUDA graphs (cuda_graphs on, a CUDA device, a text encoder): shapes
    captured, replays, eager forwards and why graphs were turned off, if they were; None without graphs."""
    graphs = getattr(scorer, "graphs", None)
    return graphs.describe() if graphs is not None else None


def batch_stats(resident: Resident | None) -> dict:
    """A model's batches as /v1/stats shows them: fill, padding, latency."""
    if resident is None:
        empty = {"batches": 0, "pairs": 0, "tokenized_pairs": 0, "encoded_pairs": 0}
        return {**empty, "prepare_seconds": 0.0, "forward_seconds": 0.0}
    p50, p95 = (percentile(resident.batch_latencies_ms, q) for q in (0.5, 0.95))
    tokens = resident.tokens
    return {
        "batches": resident.batches,
        "pairs": resident.pairs,
        "tokenized_pairs": resident.tokenized_pairs,
        "encoded_pairs": resident.encoded_pairs,
        "mean_batch_fill_pairs": round(statistics.fmean(resident.batch_sizes), 2) if resident.batch_sizes else None,
        # Counted since start-up (warm-up excluded): differences between two readings give a window's figures.
        "real_tokens": tokens.real,
        "padded_tokens": tokens.padded,
        "padding_waste": round(tokens.padded / tokens.real - 1, 4) if tokens.real else None,
        "prepare_seconds": round(resident.prepare_s, 6),
        "forward_seconds": round(resident.forward_s, 6),
        "max_batch_size": resident.loaded.profile.max_batch_size,
        "batch_latency_ms_p50": None if p50 is None else round(p50, 2),
        "batch_latency_ms_p95": None if p95 is None else round(p95, 2),
    }


@serve.deployment
class PoolReplica(ScoringReplica):
    """One replica of a pool of its own: one model, loaded at start. Its batch cap counts pairs and comes from
    the profile of its GPU kind, unless the pool's settings set one. A realtime replica scores each call as its
    own batch, at once."""

    def __init__(
        self,
        pool: str,
        pool_settings: PoolSettings,
        cache_dir: Path,
        profiles: list[ProfileRow],
        realtime: bool = False,
        name: str | None = None,
        key: str | None = None,
        set_where: str | None = None,
    ) -> None:
        self.pool = pool
        self.key = key or pool
        self.name = name or pool_settings.served_name()
        self.pool_settings = pool_settings
        self.realtime = realtime
        self.load_error: str | None = None
        self._start(pool, self.name, pool_settings.torch_threads)
        self.resident: Resident | None = None
        self.refining: asyncio.Task | None = None
        try:
            start = time.perf_counter()
            loaded = self.device_thread.submit(
                pools.load_pool, pool, pool_settings, profiles, cache_dir, where=self.placement, name=self.name
            ).result()
            self.resident = Resident(self.name, pool, pool_settings, loaded, time.perf_counter() - start)
        except ModelLoadError as exc:
            # The service stays up without this pool; /health and /v1/models say why.
            self.load_error = f"{exc}. Set {set_where or env_name(pool, 'model')} to a local model directory."
            log.error("pool %s unavailable: %s", self.key, self.load_error)

    @property
    def loaded(self) -> pools.PoolScorer | None:
        return self.resident.loaded if self.resident else None

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: one whose GPU failed (every later call would fail too),
        and one whose model did not load, after load_retry_s, so that the new replica loads it again."""
        reason = unhealthy_because(self.device_fault, self.resident is not None, self.started, self.pool_settings)
        if reason:
            log.error("pool %s replica unhealthy: %s", self.key, reason)
            raise RuntimeError(reason)

    def reconfigure(self, user_config: dict) -> None:
        """The pool's explicit cap and wait win over the profile (also on a live `serve deploy`)."""
        if self.resident is None:
            return
        loaded = self.resident.loaded
        loaded.profile = loaded.profile.overridden(
            user_config.get("max_batch_size"), user_config.get("batch_wait_timeout_s")
        )
        self._score_batch.set_max_batch_size(loaded.profile.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(0.0 if self.realtime else loaded.profile.batch_wait_timeout_s)

    async def _resident(self) -> Resident:
        self._check_device(self.key)
        if self.resident is None:
            raise PoolUnavailable(f"the {self.key} pool is unavailable: {self.load_error}")
        return self.resident

    def _on_call(self) -> None:
        if self.refining is None and self.resident is not None:
            self.refining = asyncio.get_running_loop().create_task(self._refine_forward_cost(self.resident))

    async def _refine_forward_cost(self, resident: Resident) -> None:
        """Measure the forward cost again when the replica is idle (REFINE_AFTER_S) and keep the median of all
        measurements. A call that arrives during a measurement waits for the forward in progress (one batch of
        the probe), then the measurement is dropped and made again at the next quiet second, at most
        REFINE_MAX_INTERRUPTED times."""
        loaded = resident.loaded
        pairs = pools.forward_cost_probe_pairs(
            loaded.scorer, self.pool, self.pool_settings, loaded.profile.max_batch_size
        )
        if pairs is None or self.realtime:
            resident.forward_cost_settled = True
            return
        loop = asyncio.get_running_loop()

        async def measure() -> int | None:
            async with self.forward_lock:
                return await loop.run_in_executor(
                    self.device_thread,
                    functools.partial(
                        pools.measure_forward_cost_tokens,
                        loaded.scorer,
                        pairs,
                        interrupted=lambda: self.pending_pairs > 0,
                    ),
                )

        def busy() -> bool:
            return bool(self.pending_pairs) or time.perf_counter() - self.last_busy < REFINE_IDLE_S

        def apply(cost: int) -> None:
            loaded.scorer.options.forward_cost_tokens = cost

        try:
            await remeasure_when_quiet(measure, busy, resident.forward_cost_samples, apply)
        except Exception:  # noqa: BLE001 - the start-up measurement stays; scoring is not affected
            log.exception("pool %s: measuring the forward cost again failed", self.key)
        finally:
            resident.forward_cost_settled = True

    # ---- what the ingress asks of a replica --------------------------------------------------

    async def probe(self) -> float:
        """Score one small real pair through the scoring path; milliseconds taken."""
        start = time.perf_counter()
        await self._score([pools.probe_pair(self.pool)])  # not counted: the pairs counters are callers' pairs
        return (time.perf_counter() - start) * 1000

    def tokenizer_spec(self):
        """The model's tokenizing as plain data (scoring.text.TokenizerSpec), for the ingress to tokenize with;
        None where its pairs must travel as text."""
        if self.resident is None:
            raise PoolUnavailable(f"the {self.key} pool is unavailable: {self.load_error}")
        return self.resident.spec

    def info(self) -> dict:
        """What /v1/models shows of this replica."""
        resident = self.resident
        profile = resident.loaded.profile if resident else None
        described = {
            "pool": self.key,
            "modality": self.pool,
            "variant": "realtime" if self.realtime else "batch",
            "name": self.name,
            "model": self.pool_settings.model,
            "available": resident is not None,
            "reason": self.load_error,
            **self._where(),
            "dtype": profile.dtype if profile else None,
            "max_batch_size": profile.max_batch_size if profile else None,
            "batch_wait_timeout_s": (0.0 if self.realtime else profile.batch_wait_timeout_s) if profile else None,
            "max_batch_size_source": profile.source if profile else None,
            "forward_cost_tokens": resident.loaded.scorer.options.forward_cost_tokens if resident else None,
            "forward_cost_samples": list(resident.forward_cost_samples) if resident else None,
            "forward_cost_settled": resident.forward_cost_settled if resident else None,
            "score_map": pools.describe_calibration(resident.loaded.scorer) if resident else None,
            "load_options": resident.loaded.scorer.options.describe() if resident else None,
            "cuda_graphs": cuda_graphs(resident.loaded.scorer) if resident else None,
            "counters": resident.counters()
            if resident
            else dict.fromkeys(("calls", "pairs", "batches", "largest_batch"), 0),
        }
        if resident is not None:
            described.update(asdict(resident.loaded.scorer.info))
        return described

    def stats(self) -> dict:
        """What /v1/stats shows of this replica: memory, batches, fill, latency, queue."""
        return {
            "pool": self.key,
            "name": self.name,
            "variant": "realtime" if self.realtime else "batch",
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_kind": self.placement.gpu_kind,
            "memory": self._memory(self.pool),
            **batch_stats(self.resident),
            "max_batch_size": self.loaded.profile.max_batch_size if self.loaded else None,
            "pending_pairs": self.pending_pairs,
            **self._admission(),
        }


@serve.deployment
class SharedReplica(ScoringReplica):
    """A replica of the shared pool: it loads a `placement: shared` model the first time a call names it
    (`multiplexed_model_id`), holds at most max_models_per_replica, and evicts the least recently used.
    Calls for models it holds go on while another loads (the load runs on its own thread)."""

    def __init__(
        self,
        models: dict[str, tuple[str, PoolSettings]],
        shared: SharedPoolSettings,
        cache_dir: Path,
        profiles: list[ProfileRow],
    ) -> None:
        self.models = models  # name -> (modality, settings)
        self.shared = shared
        self.cache_dir = cache_dir
        self.profiles = profiles
        self._start("shared", "", shared.torch_threads)
        self.load_thread = ThreadPoolExecutor(
            1, "shared-load", initializer=pools.set_torch_threads, initargs=(self.torch_threads,)
        )
        self.residents: dict[str, Resident] = {}
        self.loading: dict[str, asyncio.Future] = {}
        self.loads = self.evictions = 0
        self.load_errors: dict[str, str] = {}

        # Serve's multiplexer (LRU, at most N models) over our loader; N is a setting, so it is wired up here.
        # (It keeps its state on the function it wraps: a plain function, since a bound method takes no attributes.)
        async def load(name: str) -> Resident:
            return await self._load(name)

        self.get_model = serve.multiplexed(max_num_models_per_replica=shared.max_models_per_replica)(load)
        # One gathered batch holds up to the largest of the models' caps (each model's own setting, else its
        # profile row); each model's cap then cuts its own forwards.
        self.cap = shared.max_batch_size or max(
            (
                s.max_batch_size or hardware.choose_profile(profiles, self.placement, pool, s).max_batch_size
                for pool, s in models.values()
            ),
            default=8,
        )
        self._score_batch.set_max_batch_size(self.cap)

    def check_health(self) -> None:
        if self.device_fault is not None:
            raise RuntimeError(f"the device failed ({self.device_fault}); a new process gets a fresh context")

    async def _resident(self) -> Resident:
        self._check_device("shared")
        name = serve.get_multiplexed_model_id()
        if name not in self.models:
            raise InvalidInput(f"the shared pool serves {sorted(self.models)}, not {name!r}", "model")
        return await self.get_model(name)

    async def _load(self, name: str) -> Resident:
        """Load `name` on the load thread. A load outlives a caller that gives up (its deadline): the next call
        for the model takes the finished load instead of starting again."""
        task = self.loading.get(name)
        if task is None or (task.done() and task.exception() is not None):
            task = self.loading[name] = asyncio.ensure_future(self._load_now(name))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, never logged as lost
        resident = await asyncio.shield(task)
        self.loading.pop(name, None)
        self.loop = asyncio.get_running_loop()
        resident.on_evict = self._evicted
        self.residents[name] = resident
        return resident

    async def _load_now(self, name: str) -> Resident:
        pool, settings = self.models[name]
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            # No start-up warm-up: the caller is waiting (a GPU pays each new shape's kernel choice once).
            loaded = await loop.run_in_executor(
                self.load_thread,
                lambda: pools.load_pool(
                    pool, settings, self.profiles, self.cache_dir, warm_up=False, where=self.placement, name=name
                ),
            )
        except ModelLoadError as exc:
            self.load_errors[name] = str(exc)
            log.error("shared pool: model %s did not load: %s", name, exc)
            raise PoolUnavailable(
                f"model {name!r} could not load: {exc}. Set models[name={name}].model to a local model directory"
            ) from None
        self.load_errors.pop(name, None)
        self.loads += 1
        self.metrics.loads.inc(tags={"model": name})
        seconds = time.perf_counter() - start
        log.info("shared pool: loaded %s in %.1f s", name, seconds)
        return Resident(name, pool, settings, loaded, seconds)

    def _evicted(self, resident: Resident) -> None:
        """Serve's multiplexer evicted `resident` (least recently used; it calls this from a worker thread): forget
        it on the event loop, where everything else reads the models held. Its memory is freed once the batches
        still running on it finish."""
        self.loop.call_soon_threadsafe(self._forget, resident)

    def _forget(self, resident: Resident) -> None:
        if self.residents.get(resident.name) is resident:
            del self.residents[resident.name]
        self.evictions += 1
        self.metrics.evictions.inc(tags={"model": resident.name})
        log.info("shared pool: evicted %s (least recently used)", resident.name)

    def info(self) -> dict:
        """What /v1/models shows of this replica: the models it holds, least recently used first."""
        held = sorted(self.residents.values(), key=lambda r: r.last_used)
        return {
            "pool": "shared",
            "variant": "multiplexed",
            **self._where(),
            "max_models_per_replica": self.shared.max_models_per_replica,
            "max_batch_size": self.cap,
            "loaded": [{**r.describe(), "load_s": round(r.load_s, 3), "counters": r.counters()} for r in held],
            "loading": sorted(name for name, task in self.loading.items() if not task.done()),
            "load_errors": dict(self.load_errors),
            "loads": self.loads,
            "evictions": self.evictions,
        }

    def stats(self) -> dict:
        return {
            "pool": "shared",
            "variant": "multiplexed",
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_kind": self.placement.gpu_kind,
            "memory": self._memory("shared"),
            "models": {name: batch_stats(r) for name, r in self.residents.items()},
            "max_batch_size": self.cap,
            "pending_pairs": self.pending_pairs,
            **self._admission(),
        }
