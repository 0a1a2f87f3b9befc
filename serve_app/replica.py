"""The Serve deployment of a pool of its own: one model, loaded at start, batched across callers (the call path
is ScoringReplica's, serve_app/scoring_replica.py); and the idle re-measurement of its forward cost."""

from __future__ import annotations

import asyncio
import functools
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import ray
from ray import serve

from serve_app import pools
from serve_app.errors import PoolUnavailable
from serve_app.hardware import ProfileRow
from serve_app.resident import COUNTERS, Resident, batch_stats
from serve_app.scoring.types import ModelLoadError
from serve_app.scoring_replica import ScoringReplica, unhealthy_because
from serve_app.settings import PoolSettings, env_name

log = logging.getLogger("ray.serve")
# What /v1/models shows as null for a replica whose model did not load.
NOT_LOADED = (
    "dtype",
    "max_batch_size",
    "batch_wait_timeout_s",
    "max_batch_size_source",
    "forward_cost_tokens",
    "forward_cost_samples",
    "forward_cost_settled",
    "score_map",
    "load_options",
    "cuda_graphs",
)

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


@serve.deployment
class PoolReplica(ScoringReplica):
    """One replica of a pool of its own: one model, loaded at start. Its batch cap counts pairs and comes from
    the profile of its GPU kind, unless the pool's settings set one. A realtime replica scores each call as its
    own batch, at once."""

    def __init__(
        self,
        modality: str,
        pool_settings: PoolSettings,
        cache_dir: Path,
        profiles: list[ProfileRow],
        realtime: bool = False,
        name: str | None = None,
        key: str | None = None,
        set_where: str | None = None,
    ) -> None:
        self.modality = modality
        self.pool = key or modality  # the pool: "text", "image_text" or "model_<name>"
        self.name = name or pool_settings.served_name()
        self.pool_settings = pool_settings
        self.realtime = realtime
        self.load_error: str | None = None
        self.unavailable = ""
        self._start(modality, self.name, pool_settings.torch_threads)
        self.resident: Resident | None = None
        self.refining: asyncio.Task | None = None
        try:
            start = time.perf_counter()
            loaded = self.device_thread.submit(
                pools.load_pool, modality, pool_settings, profiles, cache_dir, where=self.device, name=self.name
            ).result()
            self.resident = Resident(self.name, modality, pool_settings, loaded, time.perf_counter() - start)
        except ModelLoadError as exc:
            # The service stays up without this pool; /health and /v1/models say why.
            setting = set_where or env_name(modality, "model")
            self.load_error = f"{exc}. Set {setting} to a local model directory."
            log.error("pool %s unavailable: %s", self.pool, self.load_error)
            # What a caller is told: not the error itself (it names local paths); /v1/models (behind the key)
            # and the replica's log do.
            self.unavailable = (
                f"the {self.pool} pool is unavailable: its model did not load (GET /v1/models and the replica log "
                f"say why); set {setting} to a local model directory"
            )

    @property
    def loaded(self) -> pools.PoolScorer | None:
        return self.resident.loaded if self.resident else None

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: one whose GPU failed (every later call would fail too),
        and one whose model did not load, after load_retry_s, so that the new replica loads it again."""
        reason = unhealthy_because(self.device_fault, self.resident is not None, self.started, self.pool_settings)
        if reason:
            log.error("pool %s replica unhealthy: %s", self.pool, reason)
            raise RuntimeError(reason)

    def reconfigure(self, user_config: dict) -> None:
        """The pool's explicit cap and wait win over the profile (also on a live `serve deploy`)."""
        if self.resident is None:
            return
        loaded = self.resident.loaded
        loaded.profile = loaded.profile.overridden(
            user_config.get("max_batch_size"), user_config.get("batch_wait_timeout_s")
        )
        self.set_batch_cap(loaded.profile.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(0.0 if self.realtime else loaded.profile.batch_wait_timeout_s)

    async def _resident(self) -> Resident:
        self._check_device(self.pool)
        if self.resident is None:
            raise PoolUnavailable(self.unavailable)
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
            loaded.scorer, self.modality, self.pool_settings, loaded.profile.max_batch_size
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
            log.exception("pool %s: measuring the forward cost again failed", self.pool)
        finally:
            resident.forward_cost_settled = True

    # ---- what the ingress asks of a replica --------------------------------------------------

    async def probe(self) -> float:
        """Score one small real pair through the scoring path; milliseconds taken."""
        start = time.perf_counter()
        await self._score([pools.probe_pair(self.modality)])  # not counted: the pairs counters are callers' pairs
        return (time.perf_counter() - start) * 1000

    def tokenizer_spec(self):
        """The model's tokenizing as plain data (scoring.text.TokenizerSpec), for the ingress to tokenize with;
        None where its pairs must travel as text."""
        if self.resident is None:
            raise PoolUnavailable(self.unavailable)
        return self.resident.spec

    def info(self) -> dict:
        """What /v1/models shows of this replica: where it runs and its model, described as the shared pool
        describes each model it holds (Resident.describe)."""
        resident = self.resident
        described = {
            "pool": self.pool,
            "modality": self.modality,
            "variant": "realtime" if self.realtime else "batch",
            "name": self.name,
            "model": self.pool_settings.model,
            "available": resident is not None,
            "reason": self.load_error,
            **self._where(),
        }
        if resident is None:
            return {**described, **dict.fromkeys(NOT_LOADED), "counters": dict.fromkeys(COUNTERS, 0)}
        return {
            **described,
            **resident.describe(),
            "batch_wait_timeout_s": 0.0 if self.realtime else resident.loaded.profile.batch_wait_timeout_s,
            "forward_cost_settled": resident.forward_cost_settled,
            "counters": resident.counters(),
        }

    def stats(self) -> dict:
        """What /v1/stats shows of this replica: memory, batches, fill, latency, queue."""
        return {
            "pool": self.pool,
            "name": self.name,
            "variant": "realtime" if self.realtime else "batch",
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_kind": self.device.gpu_kind,
            "memory": self._memory(self.modality),
            **batch_stats(self.resident),
            "max_batch_size": self.loaded.profile.max_batch_size if self.loaded else None,
            "pending_pairs": self.pending_pairs,
            **self._admission(),
        }
