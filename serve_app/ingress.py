"""The ingress deployment: one internal job -> pairs split by content type -> pools in parallel -> merge."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_app import experiment
from serve_app.api import build_api
from serve_app.catalog import SHARED, Catalog, Served, modality_counts, modality_of
from serve_app.encoders import Encoders, encode_call
from serve_app.errors import DeadlineExceeded, DeadlyInput, Overloaded, ReplicaLost, StaleTokenizer
from serve_app.experiment import ChosenVariant, Experiments
from serve_app.media import load_contents
from serve_app.pool_call import Admit, CallResult, LostCalls, Ranked, Sent, call_size
from serve_app.pool_queues import PoolQueues, admission
from serve_app.ranking import model_strategies, per_document, rank
from serve_app.schemas import (
    HealthResponse,
    MixedbreadRank,
    MixedbreadRerankRequest,
    MixedbreadRerankResponse,
    NimRanking,
    NimRankingRequest,
    NimRankingResponse,
    RerankJob,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    TeiRank,
    TeiRerankRequest,
    as_sent,
    check_limits,
    document_out,
)
from serve_app.score_cache import ScoreCache
from serve_app.scoring.call import window_rule, window_share
from serve_app.scoring.text import TextEncoder
from serve_app.scoring.types import EncodedPair, Pair, Score, WindowRule, best_windows
from serve_app.settings import Settings
from serve_app.status import RunningReplicas, ServiceStatus

log = logging.getLogger("ray.serve")
# What a pool call raises when its replica died under it.
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


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
        self.pairs_sent: dict[str, int] = {}
        self.replicas = RunningReplicas()
        self.status = ServiceStatus(
            settings, self.catalog, pools, realtime_pools, shared, self.replicas, self.pairs_sent
        )
        self.encoders = Encoders()
        self.cache = ScoreCache(settings.score_cache_entries)
        self.strategies = {m.name: model_strategies(m.settings, m.name) for m in self.catalog.models}
        self.experiments = Experiments(settings.experiment, self.catalog)
        self.lost = LostCalls(settings.deadly_input_ttl_s, settings.deadly_input_deaths)
        self.queues = PoolQueues(settings)
        # Tokenizing and image decoding: on a bounded set of threads, each single-threaded (the Rust tokenizer's
        # parallelism would take every core of the node for one request).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.threads = ThreadPoolExecutor(settings.ingress.threads, thread_name_prefix="ingress-work")
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
                **({"variant": ranked.variant} if ranked.variant else {}),
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

    async def rerank_mixedbread(self, request: MixedbreadRerankRequest) -> tuple[MixedbreadRerankResponse, dict]:
        ranked = await self._rerank(request.to_job())
        data = [
            MixedbreadRank(
                index=s.index,
                score=s.relevance_score,
                input=as_sent(request.input[s.index]) if request.return_input else None,
            )
            for s in ranked.scored
        ]
        usage = {"prompt_tokens": ranked.tokens, "total_tokens": ranked.tokens}
        model = request.model or ",".join(ranked.per_model)
        body = MixedbreadRerankResponse(
            usage=usage, model=model, data=data, top_k=len(data), return_input=request.return_input
        )
        return body, ranked.headers()

    async def rank_nim(self, request: NimRankingRequest) -> tuple[NimRankingResponse, dict[str, str]]:
        ranked = await self._rerank(request.to_job())
        rankings = sorted(ranked.scored, key=lambda s: -s.raw_score)
        body = NimRankingResponse(rankings=[NimRanking(index=s.index, logit=s.raw_score) for s in rankings])
        return body, ranked.headers()

    async def score_pairs(self, request: ScoreRequest) -> tuple[ScoreResponse, dict[str, str]]:
        """vLLM's /score: a score per pair, in the pairs' order; the pairs are one job, whatever their queries."""
        job = request.to_job(self.settings.max_documents_per_request)
        ranked = await self._rerank(job)
        scores = [0.0] * len(job.documents)
        for scored in ranked.scored:
            scores[scored.index] = scored.relevance_score
        response = ScoreResponse(
            id=f"score-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=request.model,
            data=[ScoreData(index=i, score=score) for i, score in enumerate(scores)],
            usage={"prompt_tokens": ranked.tokens, "total_tokens": ranked.tokens},
        )
        return response, ranked.headers()

    # What the service says about itself: serve_app/status.py.
    async def health(self) -> tuple[HealthResponse, int]:
        return await self.status.health()

    async def models(self) -> dict:
        return await self.status.models()

    async def stats(self) -> dict:
        return {
            **await self.status.stats(),
            "score_cache": self.cache.stats(),
            "variants": self.experiments.counts,
            **self.queues.stats(),
        }

    # ---- the one internal path ----------------------------------------------------------

    async def _rerank(self, job: RerankJob) -> Ranked:
        """The ranking (threshold and top_n applied) and what it took, within the deadline.

        Past the deadline, or when the client goes away (Serve cancels this task), the pending pool
        calls are cancelled with it, and pairs still queued in a replica's batcher are never scored."""
        try:
            started = time.perf_counter()
            deadline = time.time() + self.settings.request_timeout_s
            variant = self.experiments.assign(experiment.KEY.get())  # an A/B test's variant: its model, its thresholds
            job = Experiments.applied(job, variant)
            try:
                ranked = await asyncio.wait_for(self._rank_pairs(job, deadline, variant), deadline - time.time())
            except StaleTokenizer as exc:  # the model behind a name changed: its pool's tokenizer, once more
                self.encoders.forget(exc.model)
                self.cache.forget(exc.model)
                left = max(0.0, deadline - time.time())
                ranked = await asyncio.wait_for(self._rank_pairs(job, deadline, variant), left)
            ranked.total_ms = (time.perf_counter() - started) * 1000
            ranked.variant = variant.name if variant is not None else None
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

    async def _rank_pairs(self, job: RerankJob, deadline: float, variant: ChosenVariant | None = None) -> Ranked:
        """The request's steps: its limits; a model per pair (before any image is fetched: a wrong name costs
        nothing); its contents; each model's pairs sent as pool calls, all in flight at once; each document's best
        window; the ranking."""
        check_limits(job, self.settings)
        modalities = [
            modality_of(job.query_of(i).image is not None, d.image is not None) for i, d in enumerate(job.documents)
        ]
        counts = modality_counts(modalities)
        routes = self.catalog.route(job.model, counts)
        queries, documents = await load_contents(job, self.settings, self.http, self.threads)
        pairs = [Pair(q, d, job.instruction, job.max_tokens_per_doc) for q, d in zip(queries, documents)]
        by_model: dict[str, list[int]] = {}
        for i, modality in enumerate(modalities):
            by_model.setdefault(routes[modality].name, []).append(i)
        keys, hits = await self._cached(job, by_model, pairs)
        sent = Sent()
        try:
            admit = admission(self.settings, deadline)
            for name, indices in by_model.items():
                if indices := [i for i in indices if hits[i] is None]:  # repeated pairs are not sent again
                    await self._send(job, self.catalog.find(name), [pairs[i] for i in indices], indices, admit, sent)
            results = await asyncio.gather(*(response for _, response in sent.calls))
        except BaseException:
            # Cancelled (deadline, client gone), or a pool or a pair failed: the other calls' pairs are not needed.
            for _, response in sent.calls:
                response.cancel()
            raise
        finally:
            self.queues.release(sent.held)
        owner = [i for chunk, _ in sent.calls for i in chunk]
        best = best_windows(owner, [score for result in results for score in result.scores], len(pairs))
        self.cache.put(keys, best)
        best = [hit or score or Score(0.0, 0.0) for hit, score in zip(hits, best)]
        thresholds = per_document(job, by_model, variant and variant.strategies or self.strategies)
        return Ranked(
            scored=rank(best, thresholds, job.top_n),
            per_kind={modality: count for modality, count in counts.items() if count},
            per_model={name: len(i) for name, i in by_model.items()},
            calls=results,
            split_here=sent.split_here,
            tokenize_ms=sent.tokenize_s * 1000,
        )

    async def _cached(self, job: RerankJob, by_model: dict[str, list[int]], pairs: list[Pair]) -> tuple[list, list]:
        """Each pair's cache key (None: not cached) and its cached score (None: not held)."""
        models = {name: self.catalog.find(name) for name in by_model} if self.cache.on else {}
        specs = {name: getattr(await self._encoder(served), "spec", None) for name, served in models.items()}
        tokenizers = {name: spec.fingerprint if spec is not None else None for name, spec in specs.items()}
        return self.cache.lookup(pairs, by_model, models, tokenizers, (job.truncate, job.split_long_documents))

    async def _send(
        self, job: RerankJob, served: Served, items: list[Pair], owners: list[int], admit: Admit | None, sent: Sent
    ) -> None:
        """One model's pairs as pool calls, each sent at once (in `sent`, with the documents its pairs belong to).
        Where the ingress tokenizes for the model, long documents are cut into windows here, and the windows spread
        over the calls; otherwise the replica cuts them."""
        handle = self._handle(served, job.priority or self.settings.default_priority)
        rule = window_rule(self.settings) if job.split_long_documents and job.truncate else None
        running = await self.replicas.running(handle.deployment_name) or 1
        realtime = handle is self._realtime(served)  # its variant admits every call
        self.queues.admit(served, items, rule, admit, running, sent.held, realtime)  # before tokenizing: 503s are cheap
        encoder = await self._encoder(served)
        if encoder is not None:
            start = time.perf_counter()
            share = window_share(rule, len(items), len(job.documents), self.settings)
            windows, items = await encode_call(encoder, items, job.truncate, share, self.threads)
            sent.tokenize_s += time.perf_counter() - start
            owners, rule = [owners[k] for k in windows.owner], None
            sent.split_here += windows.split
        self.pairs_sent[served.key] = self.pairs_sent.get(served.key, 0) + len(items)
        step = call_size(self.settings, served.placement, len(items), running)
        # At most calls_in_flight_per_replica calls per running replica: the rest wait here, not in the router's
        # queue in front of other requests' calls.
        gate = asyncio.Semaphore(self.settings.calls_in_flight_per_replica * running)
        for start in range(0, len(items), step):
            piece = items[start : start + step]
            share = window_share(rule, len(piece), len(job.documents), self.settings)
            call = functools.partial(self._score_call, served, handle, piece, job.truncate, share, admit)
            sent.calls.append((owners[start : start + step], asyncio.ensure_future(sent.gated(gate, call))))

    async def _encoder(self, served: Served) -> TextEncoder | None:
        """The model's TextEncoder when its pairs are tokenized here (tokenize_in=ingress, a pool of its own)."""
        if self.settings.tokenize_in != "ingress" or served.placement != "own" or served.modality != "text":
            return None
        handle = self.pools.get(served.key)
        return None if handle is None else await self.encoders.get(served.name, handle)

    async def _score_call(
        self,
        served: Served,
        handle: DeploymentHandle,
        pairs: list[Pair] | list[EncodedPair],
        truncate: bool,
        windows: WindowRule | None,
        admit: Admit | None = None,
        method: str = "score",
    ) -> CallResult:
        """One pool call. A replica that dies with it (killed, out of memory, a failed GPU, a crash in the model)
        is not given the call again: the call may be what killed it. 503 + Retry-After replica_start_s instead, as
        when no replica is running (refused at once, rather than a call parked in the router until the deadline).
        Pairs lost with deadly_input_deaths replicas are refused (422) for deadly_input_ttl_s."""
        if self.lost.deadly(served.key, pairs):
            raise DeadlyInput(
                f"these documents were being scored when {self.settings.deadly_input_deaths} {served.key} replica(s) "
                "died; they are refused for "
                f"{self.settings.deadly_input_ttl_s:.0f} s after the last death (setting deadly_input_ttl_s): report "
                "them to the service's operators",
                "documents",
            )
        await self._refuse_without_replicas(served, handle, fresh=False)
        response = getattr(handle, method).remote(pairs, truncate, windows, admit)  # score, or embed
        waiting = asyncio.ensure_future(response)
        try:
            # While the call waits, keep asking whether the pool still has a running replica: a call the router
            # holds for a replica that is not there yet is refused within a second or two.
            while not (await asyncio.wait({waiting}, timeout=RunningReplicas.REFRESH_S))[0]:
                await self._refuse_without_replicas(served, handle, fresh=False)
            self.queues.seen(served.key, waiting.result().rate)
            return waiting.result()
        except REPLICA_GONE as exc:
            if getattr(exc, "preempted", False):  # its node was taken away: the call is not at fault
                deaths = 0
            else:
                deaths = self.lost.record(served.key, pairs, getattr(exc, "actor_id", None) or uuid.uuid4().hex)
            died = f"a replica died with a call of {len(pairs)} pairs ({type(exc).__name__}, death {deaths} of them)"
            log.warning("pool %s: %s; not sent again", served.key, died)
        except BaseException:  # cancelled (deadline, client gone), refused above, or the call failed
            response.cancel()
            waiting.cancel()
            raise
        raise ReplicaLost(
            f"a {served.key} replica died while scoring this request (Serve is replacing it); the request is not "
            "sent again by the service, since it may be what killed it: retry after the Retry-After seconds",
            self.settings.replica_start_s,
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
                self.settings.replica_start_s,
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
