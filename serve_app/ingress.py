"""The ingress deployment: one internal job -> pairs split by content type -> pools in parallel -> merge."""

from __future__ import annotations

import asyncio
import logging
import math
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
from serve_app.catalog import SHARED, Catalog, Served
from serve_app.errors import (
    DeadlineExceeded,
    InputTooLarge,
    InvalidInput,
    Overloaded,
    PoolUnavailable,
    ReplicaLost,
)
from serve_app.media import RequestImages, load_image
from serve_app.schemas import (
    ContentSpec,
    HealthResponse,
    PoolHealth,
    RerankJob,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoredDocument,
    ScoreRequest,
    ScoreResponse,
    TeiRank,
    TeiRerankRequest,
    check_limits,
    rank,
)
from serve_app.scoring.text import TextEncoder
from serve_app.scoring.types import CallResult, Content, EncodedPair, Pair, PairTooLong, Score, ScoringError
from serve_app.settings import POOLS, Settings

log = logging.getLogger("ray.serve")
# What a pool call raises when its replica died under it.
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


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


class Encoders:
    """Per model: a TextEncoder built from the TokenizerSpec its pool hands out (asked of one replica, once), or
    None where its pairs travel as text (another family, tokenize_in=pool, the shared pool)."""

    SPEC_WAIT_S = 2.0  # a pool that has not answered by then gets this request's pairs as text

    def __init__(self) -> None:
        self.known: dict[str, TextEncoder | None] = {}
        self.asking: dict[str, asyncio.Future] = {}

    async def get(self, name: str, handle: DeploymentHandle) -> TextEncoder | None:
        if name in self.known:
            return self.known[name]
        task = self.asking.get(name)
        if task is None:
            task = self.asking[name] = asyncio.ensure_future(self._ask(name, handle))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, never logged as lost
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.SPEC_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - no spec yet: the pairs go as text, the pool says what is wrong
            if task.done():
                self.asking.pop(name, None)  # failed (pool unavailable): ask again next time
            log.info("model %s: no tokenizer from its pool yet (%s); sending text", name, type(exc).__name__)
            return None

    async def _ask(self, name: str, handle: DeploymentHandle) -> TextEncoder | None:
        spec = await handle.tokenizer_spec.remote()
        encoder = None if spec is None else await asyncio.to_thread(TextEncoder, spec)
        self.known[name] = encoder
        log.info("model %s: %s", name, f"tokenizing here ({spec.family})" if encoder else "its pool tokenizes")
        return encoder


def encode_call(encoder: TextEncoder, pairs: list[Pair], truncate: bool, stride: int | None):
    """A model's pairs as token ids (windows cut, lengths checked), the way its pool would tokenize them."""
    try:
        return encoder.prepare(pairs, truncate, stride)
    except PairTooLong as exc:
        raise InputTooLarge(str(exc), "documents") from None
    except ScoringError as exc:
        raise InvalidInput(str(exc), "documents") from None


@dataclass
class Ranked:
    """A request's ranking and what it took: pairs per kind and per model, and its pool calls' costs."""

    scored: list[ScoredDocument]
    per_kind: dict[str, int]
    per_model: dict[str, int]
    calls: list[CallResult]
    total_ms: float = 0.0
    split_here: int = 0  # documents the ingress cut into windows (the pools count the ones they cut)
    tokenize_ms: float = 0.0  # tokenizing in the ingress, before the pool calls

    @property
    def tokens(self) -> int:
        return sum(call.tokens for call in self.calls)

    @property
    def split(self) -> int:
        return self.split_here + sum(call.split for call in self.calls)

    def headers(self) -> dict[str, str]:
        """text-embeddings-inference's timing headers (ms). The calls run in parallel: queue, tokenization and
        inference are those of the slowest call (the request's critical path), so queue + inference <= total."""
        slowest = max(self.calls, key=lambda call: call.busy_ms, default=CallResult([]))
        # Whole ms: the parts rounded down and the total up, so the sums the headers promise survive rounding.
        return {
            "x-total-time": str(math.ceil(self.total_ms)),
            "x-queue-time": str(math.floor(slowest.queue_ms)),
            "x-tokenization-time": str(math.floor(self.tokenize_ms + slowest.tokenize_ms)),
            "x-inference-time": str(math.floor(slowest.inference_ms)),
            "x-compute-tokens": str(self.tokens),
            "x-compute-pairs": str(sum(call.pairs for call in self.calls)),
        }


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
        shared: DeploymentHandle | None = None,
    ) -> None:
        self.pools = pools  # own pools by key: "text", "image_text" (None: disabled), "model_<name>"
        self.realtime_pools = realtime_pools
        self.shared = shared
        self.settings = settings
        self.catalog = Catalog(settings)
        self.templates = templates
        self.http = httpx.AsyncClient(follow_redirects=False)
        self.cached_health: CachedHealth | None = None
        self.pairs_sent: dict[str, int] = {}
        self.replicas = RunningReplicas()
        self.encoders = Encoders()
        # One handle per shared model, made once: each call names its model to the multiplexing router.
        self.shared_handles = {
            name: shared.options(multiplexed_model_id=name) for name in self.catalog.shared() if shared is not None
        }

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    async def rerank(
        self, request: RerankRequest, return_documents: bool, api_version: str
    ) -> tuple[RerankResponse, dict[str, str]]:
        """The Cohere (v2) / Jina (v1) answer: sorted results, documents echoed when asked; meta with billed units,
        tokens, pairs per kind and model, documents split into windows; Jina's `usage` on v1. And the timing
        headers."""
        ranked = await self._rerank(request.to_job(self.templates))
        results = [
            RerankResult(
                index=s.index,
                relevance_score=s.relevance_score,
                raw_score=s.raw_score if request.raw_scores else None,
                document=document_out(request.documents[s.index]) if return_documents else None,
            )
            for s in ranked.scored
        ]
        response = RerankResponse(
            id=str(uuid.uuid4()),
            model=request.model,
            results=results,
            meta={
                "api_version": {"version": api_version},
                "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": ranked.tokens, "output_tokens": 0},
                "pairs": ranked.per_kind,
                "models": ranked.per_model,
                "split_documents": ranked.split,
            },
            usage={"total_tokens": ranked.tokens} if api_version == "1" else None,
        )
        return response, ranked.headers()

    async def rerank_tei(self, request: TeiRerankRequest) -> tuple[list[TeiRank], dict[str, str]]:
        ranked = await self._rerank(request.to_job(self.settings.auto_truncate))
        ranks = [
            TeiRank(
                index=s.index,
                score=s.raw_score if request.raw_scores else s.relevance_score,
                text=request.texts[s.index] if request.return_text else None,
            )
            for s in ranked.scored
        ]
        return ranks, ranked.headers()

    async def score_pairs(self, request: ScoreRequest) -> tuple[ScoreResponse, dict[str, str]]:
        """vLLM's /score: a score per pair, in the pairs' order. Pairs of one query are one job (its documents
        batched together); the jobs of several queries run at once."""
        started = time.perf_counter()
        pairs = request.pairs()
        if len(pairs) > self.settings.max_documents_per_request:
            raise InputTooLarge(
                f"text_2: {len(pairs)} pairs; the limit is {self.settings.max_documents_per_request} "
                "(setting max_documents_per_request)",
                "text_2",
            )
        groups: dict[ContentSpec, list[int]] = {}
        for i, (query, _) in enumerate(pairs):
            groups.setdefault(query, []).append(i)
        jobs = [
            RerankJob(
                query=query,
                documents=[pairs[i][1] for i in indices],
                max_tokens_per_doc=request.truncate_prompt_tokens,
                model=request.model,
            )
            for query, indices in groups.items()
        ]
        tasks = [asyncio.ensure_future(self._rerank(job)) for job in jobs]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        scores = [0.0] * len(pairs)
        for indices, ranked in zip(groups.values(), answers):
            for scored in ranked.scored:
                scores[indices[scored.index]] = scored.relevance_score
        combined = Ranked([], {}, {}, [call for ranked in answers for call in ranked.calls])
        combined.total_ms = (time.perf_counter() - started) * 1000
        response = ScoreResponse(
            id=f"score-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            data=[ScoreData(index=i, score=score) for i, score in enumerate(scores)],
            usage={"prompt_tokens": combined.tokens, "total_tokens": combined.tokens},
        )
        return response, combined.headers()

    async def health(self) -> tuple[HealthResponse, int]:
        now = time.monotonic()
        if self.cached_health is None or now - self.cached_health.at > self.settings.health_cache_s:
            response, status_code = await self._probe_pools()
            self.cached_health = CachedHealth(now, response, status_code)
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
            replicas = await each_replica(handle, "info", self.settings.retry_after_s)
            described = {"replica_count": replica_count(handle.deployment_name), "replicas": replicas}
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
                pools[name] = await each_replica(handle, "stats", self.settings.retry_after_s)
        return {"object": "list", "pools": pools}

    # ---- the one internal path ----------------------------------------------------------

    async def _rerank(self, job: RerankJob) -> Ranked:
        """The ranking (threshold and top_n applied) and what it took, within the deadline.

        Past the deadline, or when the client goes away (Serve cancels this task), the pending pool
        calls are cancelled with it, and pairs still queued in a replica's batcher are never scored."""
        try:
            started = time.perf_counter()
            deadline = time.time() + self.settings.request_timeout_s
            ranked = await asyncio.wait_for(self._rank_pairs(job, deadline), self.settings.request_timeout_s)
            ranked.total_ms = (time.perf_counter() - started) * 1000
            return ranked
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

    async def _rank_pairs(self, job: RerankJob, deadline: float) -> Ranked:
        check_limits(job, self.settings)
        kinds = ["image_text" if d.image is not None or job.query.image is not None else "text" for d in job.documents]
        counts = {pool: kinds.count(pool) for pool in POOLS}
        routes = self.catalog.route(job.model, counts)  # before any image is fetched: a wrong name costs nothing
        query, documents = await self._load(job)
        pairs = [Pair(query, d, job.instruction, job.max_tokens_per_doc) for d in documents]
        priority = job.priority or self.settings.default_priority
        windows = job.windows and job.truncate and self.settings.long_documents == "windows"
        stride = self.settings.window_stride_tokens if windows else None
        by_model: dict[str, list[int]] = {}
        for i, kind in enumerate(kinds):
            by_model.setdefault(routes[kind].name, []).append(i)
        served = {name: self.catalog.find(name) for name in by_model}
        handles = {name: self._handle(served[name], priority) for name in by_model}
        calls = []
        split_here, tokenize_s = 0, 0.0
        admit_by = self._admit_by(deadline)
        for name, indices in by_model.items():
            key = served[name].key
            items: list[Pair] | list[EncodedPair] = [pairs[i] for i in indices]
            owners, call_stride = indices, stride
            encoder = await self._encoder(served[name])
            if encoder is not None:
                # Tokenized here, long documents cut into windows here: the windows spread over the pool's calls.
                start = time.perf_counter()
                windows, items = await asyncio.to_thread(encode_call, encoder, items, job.truncate, stride)
                tokenize_s += time.perf_counter() - start
                owners, call_stride, split_here = [indices[k] for k in windows.owner], None, split_here + windows.split
            self.pairs_sent[key] = self.pairs_sent.get(key, 0) + len(items)
            step = await self._call_size(served[name], handles[name], len(items))
            for start in range(0, len(items), step):
                chunk = owners[start : start + step]
                call = self._score_call(
                    served[name], handles[name], items[start : start + step], job.truncate, call_stride, admit_by
                )
                calls.append((chunk, asyncio.ensure_future(call)))
        # Every model's chunks are in flight at once; merge them back into document order.
        try:
            results = await asyncio.gather(*(response for _, response in calls))
        except BaseException:
            # Cancelled (deadline, client gone) or one pool failed: the other calls' pairs are not needed.
            for _, response in calls:
                response.cancel()
            raise
        # A document cut into windows (here) has several scores: its best window's is its score.
        best: list[Score | None] = [None] * len(pairs)
        for (chunk, _), result in zip(calls, results):
            for i, value in zip(chunk, result.scores):
                if best[i] is None or value.raw > best[i].raw:
                    best[i] = value
        scores = [score or Score(0.0, 0.0) for score in best]
        return Ranked(
            scored=rank(scores, job.threshold, job.top_n),
            per_kind={kind: count for kind, count in counts.items() if count},
            per_model={name: len(i) for name, i in by_model.items()},
            calls=results,
            split_here=split_here,
            tokenize_ms=tokenize_s * 1000,
        )

    async def _call_size(self, served: Served, handle: DeploymentHandle, pairs: int) -> int:
        """Pairs per pool call: spread over the pool's running replicas (ceil(pairs / replicas)), within
        min_pairs_per_call .. max_pairs_per_call. The shared pool's calls stay whole: a replica without the model
        would load it."""
        most = self.settings.max_pairs_per_call
        if served.placement == "shared" or pairs <= self.settings.min_pairs_per_call:
            return most
        running = await self.replicas.running(handle.deployment_name) or 1
        return max(min(self.settings.min_pairs_per_call, most), min(most, -(-pairs // running)))

    async def _encoder(self, served: Served) -> TextEncoder | None:
        """The model's TextEncoder when its pairs are tokenized here (tokenize_in=ingress, a pool of its own)."""
        if self.settings.tokenize_in != "ingress" or served.placement != "own" or served.modality != "text":
            return None
        handle = self.pools.get(served.key)
        return None if handle is None else await self.encoders.get(served.name, handle)

    def _admit_by(self, deadline: float) -> float | None:
        """The epoch second by which a pool call must expect its scores, or be refused at once (503): the
        admission fraction of the time the request has left. None: admission by estimated wait is off."""
        fraction = self.settings.admission_wait_fraction
        if fraction is None:
            return None
        now = time.time()
        return now + max(0.0, deadline - now) * fraction

    async def _score_call(
        self,
        served: Served,
        handle: DeploymentHandle,
        pairs: list[Pair] | list[EncodedPair],
        truncate: bool,
        stride: int | None,
        admit_by: float | None = None,
    ) -> CallResult:
        """One pool call. A replica that dies with it (killed, out of memory, a failed GPU) gets the call again
        once, where another replica may be alive. Lost with none left, or twice, or no replica running: 503 +
        Retry-After at once, rather than a call parked in the router until the deadline."""
        for attempt in range(2):
            await self._refuse_without_replicas(served, handle, fresh=attempt > 0)
            response = handle.score.remote(pairs, truncate, stride, admit_by)
            waiting = asyncio.ensure_future(response)
            try:
                # While the call waits, keep asking whether the pool still has a running replica: a call the
                # router holds for a replica that is not there yet is refused within a second or two.
                while not (await asyncio.wait({waiting}, timeout=RunningReplicas.REFRESH_S))[0]:
                    await self._refuse_without_replicas(served, handle, fresh=False)
                return waiting.result()
            except REPLICA_GONE as exc:
                log.warning(
                    "pool %s: a replica died with a call of %d pairs (%s)", served.key, len(pairs), type(exc).__name__
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
            f"a {served.key} replica died while scoring this request; Serve is replacing it: retry after the "
            "Retry-After seconds",
            self.settings.retry_after_s,
        )

    async def _refuse_without_replicas(self, served: Served, handle: DeploymentHandle, fresh: bool) -> None:
        """ReplicaLost when the pool should have replicas and none is running. A pool that may scale to zero
        waits for its scale-up instead."""
        autoscaling = self.settings.shared_pool.autoscaling if served.key == SHARED else served.settings.autoscaling
        if autoscaling is not None and autoscaling.min_replicas == 0 and handle is not self._realtime(served):
            return
        running = await self.replicas.running(handle.deployment_name, fresh)
        if running == 0:
            raise ReplicaLost(
                f"no {served.key} replica is running right now (Serve is starting its replacement); retry after the "
                "Retry-After seconds",
                self.settings.retry_after_s,
            )

    def _realtime(self, served: Served) -> DeploymentHandle | None:
        return self.realtime_pools.get(served.key) if served.placement == "own" else None

    def _handle(self, served: Served, priority: str) -> DeploymentHandle:
        """The model's realtime variant when asked for and deployed, else its batched pool; the shared pool for a
        model placed there."""
        if served.placement == "shared":
            return self.shared_handles[served.name]
        if priority == "realtime" and self._realtime(served) is not None:
            return self._realtime(served)
        return self.pools[served.key]

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
