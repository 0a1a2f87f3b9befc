"""The ingress deployment: one internal job -> pairs split by content type -> pools in parallel -> merge."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import httpx
from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app.api import build_api
from serve_app.errors import DeadlineExceeded, Overloaded, PoolUnavailable, ReplicaLost
from serve_app.media import RequestImages, load_image
from serve_app.schemas import (
    ContentSpec,
    HealthResponse,
    PoolHealth,
    RerankJob,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoredDocument,
    TeiRank,
    TeiRerankRequest,
    check_limits,
    rank,
)
from serve_app.scoring.types import Content, Pair, Score
from serve_app.settings import POOLS, Settings, env_name

log = logging.getLogger("ray.serve")
# What a pool call raises when its replica died under it.
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


class RunningReplicas:
    """Running replicas per deployment of this application, from Serve's status, read at most once a second
    (a controller call) unless a fresh count is asked for. None where the status cannot be read."""

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
            self.counts, self.at = counts, time.monotonic()
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


@serve.deployment
@serve.ingress()
class Ingress:
    """Validates, routes pairs by content type, fans out to the pools in parallel, merges."""

    def __init__(
        self,
        pools: dict[str, DeploymentHandle | None],
        realtime_pools: dict[str, DeploymentHandle | None],
        settings: Settings,
        templates: dict[str, str],
    ) -> None:
        self.pools = pools
        self.realtime_pools = realtime_pools
        self.settings = settings
        self.templates = templates
        self.http = httpx.AsyncClient(follow_redirects=False)
        self.cached_health: CachedHealth | None = None
        self.pairs_sent = dict.fromkeys(POOLS, 0)
        self.replicas = RunningReplicas()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    async def rerank(self, request: RerankRequest, return_documents: bool, api_version: str) -> RerankResponse:
        """The Cohere/Jina answer: sorted results, documents echoed when asked, pairs per pool in meta."""
        scored, pairs = await self._rerank(request.to_job(self.templates))
        results = [
            RerankResult(
                index=s.index,
                relevance_score=s.relevance_score,
                raw_score=s.raw_score if request.raw_scores else None,
                document=document_out(request.documents[s.index]) if return_documents else None,
            )
            for s in scored
        ]
        return RerankResponse(
            id=str(uuid.uuid4()),
            model=request.model,
            results=results,
            meta={"api_version": {"version": api_version}, "billed_units": {"search_units": 1}, "pairs": pairs},
        )

    async def rerank_tei(self, request: TeiRerankRequest) -> list[TeiRank]:
        scored, _ = await self._rerank(request.to_job(self.settings.auto_truncate))
        return [
            TeiRank(
                index=s.index,
                score=s.raw_score if request.raw_scores else s.relevance_score,
                text=request.texts[s.index] if request.return_text else None,
            )
            for s in scored
        ]

    async def health(self) -> tuple[HealthResponse, int]:
        now = time.monotonic()
        if self.cached_health is None or now - self.cached_health.at > self.settings.health_cache_s:
            response, status_code = await self._probe_pools()
            self.cached_health = CachedHealth(now, response, status_code)
        return self.cached_health.response, self.cached_health.status_code

    def _deployments(self) -> dict[str, DeploymentHandle | None]:
        """Every pool deployment by the name /v1/models shows: text, image_text, text_realtime ..."""
        named = dict(self.pools)
        named.update({f"{name}_realtime": handle for name, handle in self.realtime_pools.items() if handle})
        return named

    async def models(self) -> dict:
        described = {}
        for name, handle in self._deployments().items():
            if handle is None:
                described[name] = {"pool": name, "available": False, "reason": "disabled in settings"}
                continue
            replicas = await each_replica(handle, "info", self.settings.retry_after_s)
            counters = {key: sum(r["counters"][key] for r in replicas) for key in replicas[0]["counters"]}
            counters["largest_batch"] = max(r["counters"]["largest_batch"] for r in replicas)
            described[name] = {
                **replicas[0],
                "counters": counters,
                "replica_count": replica_count(handle.deployment_name),
                "replicas": replicas,
                "pairs_sent": self.pairs_sent.get(name, 0),
            }
        return {"object": "list", "pools": described}

    async def stats(self) -> dict:
        pools = {}
        for name, handle in self._deployments().items():
            if handle is not None:
                pools[name] = await each_replica(handle, "stats", self.settings.retry_after_s)
        return {"object": "list", "pools": pools}

    # ---- the one internal path ----------------------------------------------------------

    async def _rerank(self, job: RerankJob) -> tuple[list[ScoredDocument], dict[str, int]]:
        """The ranking (threshold and top_n applied) and how many pairs each pool scored, within the deadline.

        Past the deadline, or when the client goes away (Serve cancels this task), the pending pool
        calls are cancelled with it, and pairs still queued in a replica's batcher are never scored."""
        try:
            return await asyncio.wait_for(self._rank_pairs(job), self.settings.request_timeout_s)
        except asyncio.TimeoutError:  # the builtin TimeoutError from 3.11 on
            raise DeadlineExceeded(
                f"the request took longer than {self.settings.request_timeout_s} s (setting request_timeout_s); "
                "send fewer documents per request or retry when the service is less busy"
            ) from None
        except BackPressureError:
            raise Overloaded(
                "every replica of a scoring pool is busy and its queue is full; retry after the Retry-After seconds",
                self.settings.retry_after_s,
            ) from None

    async def _rank_pairs(self, job: RerankJob) -> tuple[list[ScoredDocument], dict[str, int]]:
        check_limits(job, self.settings)
        query, documents = await self._load(job)
        pairs = [Pair(query, d, job.instruction, job.max_tokens_per_doc) for d in documents]
        priority = job.priority or self.settings.default_priority
        by_pool: dict[str, list[int]] = {pool: [] for pool in POOLS}
        for i, pair in enumerate(pairs):
            by_pool["image_text" if pair.needs_image_model else "text"].append(i)
        handles = {pool: self._handle(pool, priority, len(indices)) for pool, indices in by_pool.items() if indices}
        calls = []
        for pool, handle in handles.items():
            indices = by_pool[pool]
            self.pairs_sent[pool] += len(indices)
            step = self.settings.max_pairs_per_call
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                call = self._score_call(pool, handle, [pairs[i] for i in chunk], job.truncate)
                calls.append((chunk, asyncio.ensure_future(call)))
        # Every pool's chunks are in flight at once; merge them back into document order.
        try:
            results = await asyncio.gather(*(response for _, response in calls))
        except BaseException:
            # Cancelled (deadline, client gone) or one pool failed: the other calls' pairs are not needed.
            for _, response in calls:
                response.cancel()
            raise
        scores: list[Score] = [Score(0.0, 0.0)] * len(pairs)
        for (chunk, _), chunk_scores in zip(calls, results):
            for i, value in zip(chunk, chunk_scores):
                scores[i] = value
        return rank(scores, job.threshold, job.top_n), {
            pool: len(indices) for pool, indices in by_pool.items() if indices
        }

    async def _score_call(self, pool: str, handle: DeploymentHandle, pairs: list[Pair], truncate: bool) -> list[Score]:
        """One pool call. A replica that dies with it (killed, out of memory, a failed GPU) gets the call again
        once, where another replica may be alive. Lost with none left, or twice, or no replica running: 503 +
        Retry-After at once, rather than a call parked in the router until the deadline."""
        for attempt in range(2):
            await self._refuse_without_replicas(pool, handle, fresh=attempt > 0)
            response = handle.score.remote(pairs, truncate)
            waiting = asyncio.ensure_future(response)
            try:
                # While the call waits, keep asking whether the pool still has a running replica: a call the
                # router holds for a replica that is not there yet is refused within a second or two.
                while not (await asyncio.wait({waiting}, timeout=RunningReplicas.REFRESH_S))[0]:
                    await self._refuse_without_replicas(pool, handle, fresh=False)
                return waiting.result()
            except REPLICA_GONE as exc:
                log.warning(
                    "pool %s: a replica died with a call of %d pairs (%s)", pool, len(pairs), type(exc).__name__
                )
                # Retry only where another replica may be alive: Serve's count may still include the dead one
                # for a few seconds, and a retry with none alive would wait in the router for the replacement.
                if (await self.replicas.running(handle.deployment_name, fresh=True) or 0) < 2:
                    break
            except BaseException:  # cancelled (deadline, client gone), refused above, or the call failed
                response.cancel()
                waiting.cancel()
                raise
        raise ReplicaLost(
            f"a {pool} replica died while scoring this request; Serve is replacing it: retry after the "
            "Retry-After seconds",
            self.settings.retry_after_s,
        )

    async def _refuse_without_replicas(self, pool: str, handle: DeploymentHandle, fresh: bool) -> None:
        """ReplicaLost when the pool should have replicas and none is running. A pool that may scale to zero
        waits for its scale-up instead."""
        pool_settings = self.settings.pool(pool)
        autoscaling = pool_settings.autoscaling
        if autoscaling is not None and autoscaling.min_replicas == 0 and handle is self.pools.get(pool):
            return
        running = await self.replicas.running(handle.deployment_name, fresh)
        if running == 0:
            raise ReplicaLost(
                f"no {pool} replica is running right now (Serve is starting its replacement); retry after the "
                "Retry-After seconds",
                self.settings.retry_after_s,
            )

    def _handle(self, pool: str, priority: str, pairs: int) -> DeploymentHandle:
        """The pool's realtime variant when asked for and deployed, else its batched deployment."""
        handle = self.pools[pool]
        if priority == "realtime" and self.realtime_pools.get(pool) is not None:
            handle = self.realtime_pools[pool]
        if handle is None:
            raise PoolUnavailable(
                f"this request has {pairs} {pool.replace('_', '-')} pair(s) but the {pool} pool is disabled; "
                f"enable it ({env_name(pool, 'enabled')}=true) with a model ({env_name(pool, 'model')})",
                "documents",
            )
        return handle

    async def _load(self, job: RerankJob) -> tuple[Content, list[Content]]:
        """Decode every image of the job at once; each document keeps its text."""
        if job.query.image is None and all(d.image is None for d in job.documents):
            return Content(text=job.query.text), [Content(text=d.text) for d in job.documents]

        budget = RequestImages(self.settings)

        async def content(spec: ContentSpec, field: str) -> Content:
            if spec.image is None:
                return Content(text=spec.text)
            image = await load_image(spec.image, self.settings, f"{field}.image", self.http, budget)
            return Content(text=spec.text, image=image)

        specs = [(job.query, "query"), *((d, f"documents[{i}]") for i, d in enumerate(job.documents))]
        tasks = [asyncio.create_task(content(spec, field)) for spec, field in specs]
        try:
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:  # the deadline, or the client went away
            for task in tasks:
                task.cancel()
            raise
        # One image failed: its siblings' fetches and queued decodes stop too (a decode already running in a
        # thread finishes, bounded by the per-image limits).
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        failed = [task for task in tasks if not task.cancelled() and task.exception() is not None]
        if failed:
            raise failed[0].exception()
        query, *documents = [task.result() for task in tasks]
        return query, documents

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

        start = time.perf_counter()
        pools = dict(zip(POOLS, await asyncio.gather(*(probe(n, self.pools[n]) for n in POOLS))))
        latency_ms = round((time.perf_counter() - start) * 1000, 2)
        # Ready while any pool scores: a pool that is down or overloaded sheds its own requests (503) instead
        # of taking every node out of the load balancer.
        if not any(p.status == "ok" for p in pools.values()):
            return HealthResponse(status="down", latency_ms=None, pools=pools), 503
        status = "ok" if all(p.status in ("ok", "disabled") for p in pools.values()) else "degraded"
        return HealthResponse(status=status, latency_ms=latency_ms, pools=pools), 200


def document_out(document) -> dict:
    if isinstance(document, str):
        return {"text": document}
    return document.model_dump(exclude_none=True)


async def each_replica(handle: DeploymentHandle, method: str, retry_after_s: int) -> list[dict]:
    """Ask every running replica of a deployment, not just one: a handle call goes to one replica,
    so send a few calls at once (the router spreads them) until every replica has answered."""
    expected = replica_count(handle.deployment_name) or 1
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


def replica_count(deployment: str) -> int | None:
    """Running replicas of a deployment of this application, from Serve's status."""
    try:
        status = serve.status()
        application = status.applications[serve.get_replica_context().app_name]
        return application.deployments[deployment].replica_states.get("RUNNING", 0)
    except Exception:  # noqa: BLE001 - the count is informative; never fail /v1/models over it
        return None
