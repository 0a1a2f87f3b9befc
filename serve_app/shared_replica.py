"""The Serve deployment of the shared pool: Serve's model multiplexing over the `placement: shared` models, loaded
on the first call that names one, least recently used evicted (the call path is ScoringReplica's)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from ray import serve

from serve_app import hardware, pools
from serve_app.errors import InvalidInput, ModelUnavailable, PoolUnavailable
from serve_app.hardware import ProfileRow
from serve_app.resident import Resident, batch_stats
from serve_app.scoring.loading import on_this_node
from serve_app.scoring.types import ModelLoadError
from serve_app.scoring_replica import ScoringReplica
from serve_app.settings import PoolSettings, SharedPoolSettings

log = logging.getLogger("ray.serve")


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
        self.loads = self.evictions = self.failed_loads = 0
        self.load_errors: dict[str, str] = {}
        self.failed_at: dict[str, float] = {}  # model -> when its last load failed (monotonic)

        # Serve's multiplexer (LRU, at most N models) over our loader; N is a setting, so it is wired up here.
        # (It keeps its state on the function it wraps: a plain function, since a bound method takes no attributes.)
        async def load(name: str) -> Resident:
            return await self._load(name)

        self.get_model = serve.multiplexed(max_num_models_per_replica=shared.max_models_per_replica)(load)
        # One gathered batch holds up to the largest of the models' caps (each model's own setting, else its
        # profile row); each model's cap then cuts its own forwards.
        self.cap = shared.max_batch_size or max(
            (
                s.max_batch_size or hardware.choose_profile(profiles, self.device, pool, s).max_batch_size
                for pool, s in models.values()
            ),
            default=8,
        )
        self.set_batch_cap(self.cap)  # a model whose own cap is larger (derived once loaded) is cut to it

    def check_health(self) -> None:
        if self.device_fault is not None:
            raise RuntimeError(f"the device failed ({self.device_fault}); a new process gets a fresh context")

    async def _resident(self) -> Resident:
        self._check_device("shared")
        name = serve.get_multiplexed_model_id()
        if name not in self.models:
            raise InvalidInput(f"the shared pool serves {sorted(self.models)}, not {name!r}", "model")
        if name not in self.residents and (name not in self.loading or self.loading[name].done()):
            self._may_load(name)  # not loaded, no load under way
        return await self.get_model(name)

    def _may_load(self, name: str) -> None:
        """Refuse at once a load that should not happen now, before Serve's multiplexer evicts anything for it:
        the model's last load failed within load_backoff_s; it is not on this node (never pulled from a hub at
        request time); or it would evict a model that served, or has calls queued, within keep_resident_s."""
        now, shared = time.monotonic(), self.shared
        failed = self.failed_at.get(name)
        if failed is not None and shared.load_backoff_s is not None and now - failed < shared.load_backoff_s:
            raise ModelUnavailable(
                f"model {name!r} did not load {now - failed:.0f} s ago (GET /v1/models says why); it is tried again "
                f"once shared_pool.load_backoff_s ({shared.load_backoff_s:g} s) has passed",
                math.ceil(shared.load_backoff_s - (now - failed)),
            )
        if not on_this_node(self.models[name][1].model):
            self._load_failed(name, "not on this node (a local directory, a packaged model or the Hugging Face cache)")
            raise PoolUnavailable(
                f"model {name!r} is not on this node: the shared pool loads local directories, the packaged models "
                f"and models already in the Hugging Face cache, never from a hub at request time; set "
                f"models[name={name}].model to a local model directory"
            )
        coming = {n for n, task in self.loading.items() if not task.done()}
        if shared.keep_resident_s is None or len(set(self.residents) | coming) < shared.max_models_per_replica:
            return
        victim = min(self.residents.values(), key=lambda r: r.last_used)
        idle = now - victim.last_used
        if idle < shared.keep_resident_s or self.pending_tokens.get(victim.name):
            raise ModelUnavailable(
                f"loading {name!r} would evict {victim.name!r}, which served {idle:.1f} s ago (settings "
                f"shared_pool.keep_resident_s {shared.keep_resident_s:g} s, max_models_per_replica "
                f"{shared.max_models_per_replica}); retry after the Retry-After seconds, or give {name!r} a pool of "
                "its own",
                max(1, math.ceil(shared.keep_resident_s - idle)),
            )

    def _load_failed(self, name: str, reason: str) -> None:
        self.load_errors[name] = reason
        self.failed_at[name] = time.monotonic()
        self.failed_loads += 1

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
                    pool, settings, self.profiles, self.cache_dir, warm_up=False, where=self.device, name=name
                ),
            )
        except ModelLoadError as exc:
            self._load_failed(name, str(exc))
            log.error("shared pool: model %s did not load: %s", name, exc)
            raise PoolUnavailable(
                f"model {name!r} could not load (GET /v1/models and the shared pool's log say why); set "
                f"models[name={name}].model to a local model directory"
            ) from None
        self.load_errors.pop(name, None)
        self.failed_at.pop(name, None)
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
            "failed_loads": self.failed_loads,
            "evictions": self.evictions,
        }

    def stats(self) -> dict:
        return {
            "pool": "shared",
            "variant": "multiplexed",
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_kind": self.device.gpu_kind,
            "memory": self._memory("shared"),
            "models": {name: batch_stats(r) for name, r in self.residents.items()},
            "max_batch_size": self.cap,
            "pending_pairs": self.pending_pairs,
            **self._admission(),
        }
