"""What the service says about itself: /health (each pool probed), /v1/models, /v1/stats, and the one cached reader
of Serve's status (running replicas per deployment) that they and the request path share. No torch here."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.catalog import SHARED, Catalog, Served
from serve_app.errors import Overloaded, PoolUnavailable
from serve_app.ranking import model_strategies
from serve_app.schemas import HealthResponse, PoolHealth
from serve_app.settings import Settings

log = logging.getLogger("ray.serve")


class RunningReplicas:
    """Running replicas per deployment of this application, from Serve's status, read at most once a second
    (a controller call) unless a fresh count is asked for. A read that fails keeps the last counts (a busy
    controller must not collapse a request's calls into one); None until a read succeeds."""

    REFRESH_S = 1.0

    def __init__(self) -> None:
        self.at = -1.0e9
        self.counts: dict[str, int] | None = None
        self.reading: asyncio.Future | None = None  # one read in flight, awaited by every call that needs it

    async def running(self, deployment: str, fresh: bool = False) -> int | None:
        if fresh or time.monotonic() - self.at > self.REFRESH_S:
            if self.reading is None:
                self.reading = asyncio.ensure_future(asyncio.to_thread(running_replicas))
            reading = self.reading
            try:
                counts = await asyncio.shield(reading)
            finally:
                if self.reading is reading and reading.done():
                    self.reading = None
            self.counts, self.at = counts if counts is not None else self.counts, time.monotonic()
        return None if self.counts is None else self.counts.get(deployment)


def running_replicas() -> dict[str, int] | None:
    try:
        application = serve.status().applications[serve.get_replica_context().app_name]
        return {name: d.replica_states.get("RUNNING", 0) for name, d in application.deployments.items()}
    except Exception:  # noqa: BLE001 - unknown counts never refuse a request
        return None


@dataclass
class CachedHealth:
    at: float
    response: HealthResponse
    status_code: int


class ServiceStatus:
    """The ingress' answers about the service: health, models, stats. It holds the same pool handles as the
    ingress, and reads (never changes) the pairs the ingress has sent per pool."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        pools: dict[str, DeploymentHandle | None],
        realtime_pools: dict[str, DeploymentHandle | None],
        shared: DeploymentHandle | None,
        replicas: RunningReplicas,
        pairs_sent: dict[str, int],
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.pools = pools
        self.realtime_pools = realtime_pools
        self.shared = shared
        self.replicas = replicas
        self.pairs_sent = pairs_sent
        self.cached_health: CachedHealth | None = None
        self.probing: asyncio.Future | None = None

    async def health(self) -> tuple[HealthResponse, int]:
        """The pools' health, probed at most once per health_cache_s: callers that arrive while a probe runs
        share it (single flight), so a burst of load balancer checks costs one probe of every pool."""
        now = time.monotonic()
        if self.cached_health is None or now - self.cached_health.at > self.settings.health_cache_s:
            if self.probing is None or self.probing.done():
                self.probing = asyncio.ensure_future(self._probe_pools())
                self.probing.add_done_callback(lambda t: t.cancelled() or t.exception())  # never logged as lost
            response, status_code = await asyncio.shield(self.probing)
            self.cached_health = CachedHealth(time.monotonic(), response, status_code)
        return self.cached_health.response, self.cached_health.status_code

    def _deployments(self) -> dict[str, DeploymentHandle | None]:
        """Every pool deployment by the key /v1/models and /v1/stats show: text, image_text, model_<name>,
        text_realtime ..., shared."""
        named = dict(self.pools)
        named.update({f"{key}_realtime": handle for key, handle in self.realtime_pools.items() if handle})
        if self.shared is not None:
            named[SHARED] = self.shared
        return named

    async def models(self) -> dict:
        """Every served model (`data`, OpenAI's list shape) and every pool with its replicas (`pools`)."""
        pools = {}
        for key, handle in self._deployments().items():
            if handle is None:
                pools[key] = {"pool": key, "available": False, "reason": "disabled in settings"}
                continue
            count = await self.replicas.running(handle.deployment_name, fresh=True)
            replicas = await each_replica(handle, "info", count, self.settings.retry_after_s)
            described = {"replica_count": count, "replicas": replicas}
            if key != SHARED:
                counters = {name: sum(r["counters"][name] for r in replicas) for name in replicas[0]["counters"]}
                counters["largest_batch"] = max(r["counters"]["largest_batch"] for r in replicas)
                described = {**replicas[0], "counters": counters, **described}
            pools[key] = {**described, "pairs_sent": self.pairs_sent.get(key, 0)}
        return {"object": "list", "data": [self._describe(m, pools) for m in self.catalog.models], "pools": pools}

    def _describe(self, served: Served, pools: dict) -> dict:
        """One model of /v1/models: name, aliases, family, modality, placement, replicas, batch cap and source."""
        pool = pools.get(served.key) or {}
        described = {
            "id": served.name,
            "object": "model",
            "aliases": list(served.aliases),
            "default_for": served.modality if served.default else None,
            "modality": served.modality,
            "placement": served.placement,
            "pool": served.key,
            "model": served.settings.model,
            "family": served.settings.family,
            # Each strategy's threshold for this model: fitted on labels (its score map) or the fixed fallback.
            "strategies": model_strategies(served.settings, served.name),
        }
        if served.placement == "own":
            return {
                **described,
                "family": pool.get("family") or served.settings.family,
                "available": pool.get("available", False),
                "reason": pool.get("reason"),
                "replicas": pool.get("replica_count"),
                "realtime_replicas": served.settings.realtime_replicas,
                "max_batch_size": pool.get("max_batch_size"),
                "max_batch_size_source": pool.get("max_batch_size_source"),
                "score_map": pool.get("score_map"),
            }
        # Shared: loaded where a replica holds it; family and cap known once loaded somewhere.
        holding = [
            (replica["replica"], held)
            for replica in pool.get("replicas", [])
            for held in replica["loaded"]
            if held["name"] == served.name
        ]
        errors = [r["load_errors"][served.name] for r in pool.get("replicas", []) if served.name in r["load_errors"]]
        first = holding[0][1] if holding else {}
        return {
            **described,
            "family": first.get("family") or served.settings.family,
            "available": bool(holding) or not errors,
            "reason": errors[0] if errors and not holding else None,
            "replicas": pool.get("replica_count"),
            "loaded_on": [replica for replica, _ in holding],
            "max_models_per_replica": self.settings.shared_pool.max_models_per_replica,
            "max_batch_size": first.get("max_batch_size", served.settings.max_batch_size),
            "max_batch_size_source": first.get("max_batch_size_source", "known once loaded"),
            "score_map": first.get("score_map"),
        }

    async def stats(self) -> dict:
        pools = {}
        for name, handle in self._deployments().items():
            if handle is not None:
                count = await self.replicas.running(handle.deployment_name)
                pools[name] = await each_replica(handle, "stats", count, self.settings.retry_after_s)
        return {"object": "list", "pools": pools}

    async def _probe_pools(self) -> tuple[HealthResponse, int]:
        async def probe(name: str, handle: DeploymentHandle | None) -> PoolHealth:
            if handle is None:
                return PoolHealth(status="disabled")
            try:
                latency = await asyncio.wait_for(handle.probe.remote(), self.settings.health_timeout_s)
            except PoolUnavailable as exc:
                # /health answers without a key: the details (paths, addresses, ids) go to the log, not to it.
                log.warning("health: pool %s unavailable: %s", name, exc.message)
                return PoolHealth(status="unavailable", reason="its model did not load; the replica log says why")
            except asyncio.TimeoutError:
                log.warning("health: pool %s gave no probe score within %s s", name, self.settings.health_timeout_s)
                return PoolHealth(status="down", reason=f"no answer within {self.settings.health_timeout_s} s")
            except Exception as exc:  # noqa: BLE001 - any failure of a loaded pool means it is down
                log.warning("health: pool %s failed a probe pair: %s: %s", name, type(exc).__name__, exc)
                return PoolHealth(status="down", reason="scoring a probe pair failed; the ingress log says why")
            return PoolHealth(status="ok", latency_ms=round(latency, 2))

        async def shared() -> PoolHealth:
            # Probing would load a model on demand: the shared pool is up while a replica runs.
            running = await self.replicas.running(self.shared.deployment_name, fresh=True)
            autoscaling = self.settings.shared_pool.autoscaling
            if running == 0 and not (autoscaling and autoscaling.min_replicas == 0):
                return PoolHealth(status="down", reason="no shared replica is running")
            return PoolHealth(status="ok")

        start = time.perf_counter()
        names = list(self.pools)
        probes = [probe(name, self.pools[name]) for name in names]
        if self.shared is not None:
            names.append(SHARED)
            probes.append(shared())
        pools = dict(zip(names, await asyncio.gather(*probes)))
        latency_ms = round((time.perf_counter() - start) * 1000, 2)
        # Ready while any pool scores: a pool that is down or overloaded sheds its own requests (503) instead
        # of taking every node out of the load balancer.
        if not any(p.status == "ok" for p in pools.values()):
            return HealthResponse(status="down", latency_ms=None, pools=pools), 503
        status = "ok" if all(p.status in ("ok", "disabled") for p in pools.values()) else "degraded"
        return HealthResponse(status=status, latency_ms=latency_ms, pools=pools), 200


async def each_replica(handle: DeploymentHandle, method: str, running: int | None, retry_after_s: int) -> list[dict]:
    """Ask every running replica of a deployment, not just one: a handle call goes to one replica,
    so send a few calls at once (the router spreads them) until every replica has answered."""
    expected = running or 1
    seen: dict[str, dict] = {}
    for _ in range(5):
        try:
            answers = await asyncio.gather(*(getattr(handle, method).remote() for _ in range(2 * expected)))
        except BackPressureError:
            raise Overloaded(
                "the pool's queues are full; ask again after the Retry-After seconds", retry_after_s
            ) from None
        seen.update({answer["replica"]: answer for answer in answers})
        if len(seen) >= expected:
            break
    return sorted(seen.values(), key=lambda answer: answer["replica"])
