"""What every scoring replica does with the model(s) it holds: admits a call or refuses it at once, checks its
pairs (cut into windows), batches them with other callers' calls in @serve.batch, prepares on one thread and runs
the forward on another. replica.py (a pool's own replica) and shared_replica.py (the shared pool's) say which
model a call is for."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve

from serve_app import hardware, pools
from serve_app.errors import (
    InputTooLarge,
    InvalidInput,
    ModelFault,
    Overloaded,
    RerankError,
    StaleTokenizer,
    as_request_errors,
    scoring_error,
)
from serve_app.pool_call import Admit, CallResult, PoolRate
from serve_app.resident import Part, PoolMetrics, Resident, pairs_in
from serve_app.scoring.call import call_windows, estimated_tokens, finite
from serve_app.scoring.text import check_ids
from serve_app.scoring.types import (
    Content,
    EncodedPair,
    NotFiniteScores,
    Pair,
    ScoringError,
    TokenCount,
    WindowRule,
    Windows,
)
from serve_app.settings import PoolSettings
from serve_app.stats import Drain, Throughput

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


class ScoringReplica:
    """What every replica does with the model(s) it holds: checks a call, batches it with other callers' calls
    (of the same model), prepares on one thread and runs the forward pass on another. Subclasses say which
    model a call is for (`_resident`)."""

    realtime = False

    def _start(self, pool: str, model: str, torch_threads: int | None) -> None:
        self.device = hardware.this_device()
        self.device_fault: str | None = None
        self.started = time.monotonic()
        self.forward_lock = asyncio.Lock()
        self.pending_pairs = 0
        self.batch_cap = 32  # the batcher's max_batch_size (the decorator's): pieces are never cut larger
        self.lower_cap: int | None = None  # a lower cap waiting for the queued pieces to drain
        self.last_busy = time.perf_counter()  # when the last batch finished: the forward-cost re-probe waits for quiet
        self.throughput = Throughput()  # pairs/s under load, as /v1/stats shows it
        # Per model: the work/s the queue drains at (stats.Drain: estimated tokens plus each forward's fixed
        # cost), and the work of the calls admitted and not yet answered. Admission estimates waits with them.
        self.drains: dict[str, Drain] = {}
        self.pending_tokens: dict[str, int] = {}
        self.refused = 0
        self.calls_now = self.most_calls = 0  # callers' calls here at once, now and at most
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

    def _call_error(self, exc: Exception) -> Exception:
        """What a call whose scoring failed answers (its batch already retried it alone): the input's fault (413 /
        422), load (out of memory: 503 + Retry-After), a failed device (503: this replica is being replaced), or
        the model's (500 naming the error's type; the traceback stays in this replica's log)."""
        if isinstance(exc, RerankError):
            return exc
        if isinstance(exc, ScoringError):
            return scoring_error(exc)
        log.error("a call failed in its batch", exc_info=exc)
        if hardware.is_out_of_memory(exc):
            return Overloaded(
                "the replica ran out of memory scoring this call; retry after the Retry-After seconds, or send fewer "
                "or shorter documents",
                1,
            )
        if hardware.is_device_fault(exc):
            return Overloaded("this replica's GPU failed and it is being replaced; retry shortly", 20)
        return ModelFault(f"scoring failed in the model ({type(exc).__name__}); the replica log has the traceback")

    def set_batch_cap(self, cap: int) -> None:
        """The batcher's max_batch_size. Lowered only once no piece is queued (a queued piece larger than the new
        cap would fail: the cap drops when the queue drains)."""
        if cap < self.batch_cap and self.pending_pairs:
            self.lower_cap = cap
            return
        self.batch_cap, self.lower_cap = cap, None
        self._score_batch.set_max_batch_size(cap)

    def _on_call(self) -> None:
        """Called at each call, in the replica's event loop (what a subclass starts in the background)."""

    def _check_device(self, pool: str) -> None:
        if self.device_fault is not None:
            raise Overloaded(f"a {pool} replica's GPU failed and it is being replaced; retry shortly", 1)

    def _queued_s(self) -> float:
        """Seconds of work admitted here and not yet answered, each model's work at its own measured rate (a
        model without a measurement yet counts nothing)."""
        total = 0.0
        for name, work in self.pending_tokens.items():
            wait = self.drains[name].wait_s(work) if name in self.drains else None
            total += wait or 0.0
        return total

    def _admit(self, admit: Admit | None, model: str | None = None, work: int = 0) -> None:
        """Refuse at once a call that could not be scored by `admit.by`: its `work` (of `model`; Drain.work)
        behind the work already admitted here, at the rates this replica measured under load (without a model:
        the queue alone, checked before a model is loaded for it). 413 when the call alone takes longer than a
        fresh request's whole time (`admit.fresh_s`) even at the best rate the replica has shown: no retry could
        meet it. 503 otherwise, Retry-After when the queue will have drained enough. Admitted: a call on an
        empty queue (it starts at once; a refusal there could never be met by a retry, and a rate measured under
        a burst's load would refuse every call after it and never be measured again), and any call before the
        replica has a measurement."""
        if admit is None or self.realtime:
            return
        drain = self.drains.get(model) if model is not None else None
        rate = drain.pairs_per_s() if drain is not None else None
        if drain is not None and drain.best and work / drain.best > admit.fresh_s:
            raise InputTooLarge(
                f"this call's ~{work} tokens take about {work / drain.best:.1f} s even at the best "
                f"{drain.best:.0f} tokens/s this replica scored {model!r} at, more than the {admit.fresh_s:.1f} s "
                "any request has for scoring (settings request_timeout_s x admission_wait_fraction): send fewer or "
                "shorter documents per request",
                "documents",
            )
        if not any(self.pending_tokens.values()):
            return
        queued = self._queued_s()
        alone = work / rate if rate else 0.0
        wait, left = queued + alone, admit.by - time.time()
        if wait <= left:
            return
        self.refused += 1
        self.metrics.refused.inc()
        raise Overloaded(
            f"this replica's queue holds about {queued:.1f} s of work, and this call ~{alone:.1f} s more (~{work} "
            f"tokens at {rate or 0.0:.0f} tokens/s): more than the {max(left, 0.0):.1f} s the request has before "
            "its deadline (settings request_timeout_s, admission_wait_fraction); retry after the Retry-After "
            "seconds, or send fewer documents",
            max(1, math.ceil(wait - max(left, 0.0))),
        )

    async def score(
        self,
        pairs: list[Pair] | list[EncodedPair],
        truncate: bool = True,
        windows: WindowRule | None = None,
        admit: Admit | None = None,
    ) -> CallResult:
        self.calls_now += 1
        self.most_calls = max(self.most_calls, self.calls_now)
        try:
            return await self._score(pairs, truncate, windows, admit, counted=True)
        finally:
            self.calls_now -= 1

    async def embed(
        self, inputs: list[Content], truncate: bool = True, windows: None = None, admit: Admit | None = None
    ) -> CallResult:
        """An embedding per input, in order (`scores` empty, `embeddings` set): through the same admission and the
        same batcher as scoring, so embedding and reranking traffic share batches. A model that does not embed
        (its family scores pairs together) fails the call with 422."""
        self.calls_now += 1
        self.most_calls = max(self.most_calls, self.calls_now)
        try:
            arrived = time.perf_counter()
            resident, tokens, ready = await self._arrive(admit, inputs, None)
            with as_request_errors("input"):
                check = functools.partial(resident.loaded.scorer.check_inputs, inputs, truncate)
                await asyncio.get_running_loop().run_in_executor(self.prepare_thread, check)
            checked = time.perf_counter()
            with self._pending(resident, tokens):
                results = await self._in_batches(resident.loaded.profile, inputs)
            vectors = [vector for part in results for vector in part.scores]
            if not all(math.isfinite(x) for vector in vectors for x in vector):
                raise ModelFault(f"model {resident.name!r} gave embeddings that are not numbers")
            last = max(results, key=lambda part: part.done)
            return CallResult(
                scores=[],
                embeddings=vectors,
                pairs=len(inputs),
                tokens=sum(part.tokens for part in results),
                queue_ms=(ready - arrived + last.started - checked) * 1000,
                tokenize_ms=(checked - ready) * 1000 + last.tokenize_ms,
                inference_ms=last.inference_ms,
                rate=None if self.realtime else self._rate(resident),  # realtime: admits every call
            )
        finally:
            self.calls_now -= 1

    async def _score(
        self,
        pairs: list[Pair] | list[EncodedPair],
        truncate: bool = True,
        windows: WindowRule | None = None,
        admit: Admit | None = None,
        counted: bool = False,
    ) -> CallResult:
        """A score per pair, in order, and what they cost. With a `windows` rule, a document longer than the
        model's window is scored as overlapping windows (within the rule's bounds) and gets its best window's
        score; without, it is truncated (or refused, truncate=False). Bad input fails this call only, before it
        is batched. With `admit`, a call that could not be scored in time is refused at once (503, or 413 when no
        request's deadline could hold it), before its model is loaded and before its windows are cut."""
        arrived = time.perf_counter()
        resident, tokens, ready = await self._arrive(admit, pairs, windows)
        with self._pending(resident, tokens):
            cut = await self._checked_windows(resident, pairs, truncate, windows, counted)
            windowed = time.perf_counter()
            results = await self._in_batches(resident.loaded.profile, cut.pairs)
        # The slowest piece is this call's critical path: its wait for a batch, its preparation, its forward.
        last = max(results, key=lambda part: part.done)
        try:  # this call's own scores: another caller's in the same batch stand or fall on their own
            scores = finite([score for part in results for score in part.scores], resident.name)
        except NotFiniteScores as exc:
            raise ModelFault(str(exc)) from None
        return CallResult(
            scores=cut.merge(scores),
            pairs=len(cut.pairs),
            tokens=sum(part.tokens for part in results),
            split=cut.split,
            # Cutting documents into windows tokenizes them: tokenization time, not queueing.
            queue_ms=(ready - arrived + last.started - windowed) * 1000,
            tokenize_ms=(windowed - ready) * 1000 + last.tokenize_ms,
            inference_ms=last.inference_ms,
            rate=None if self.realtime else self._rate(resident),  # realtime: admits every call
        )

    async def _arrive(
        self, admit: Admit | None, items: list, windows: WindowRule | None
    ) -> tuple[Resident, int, float]:
        """A call's admission: by the queue alone (before a shared pool loads a model for it), then by its
        estimated tokens once its model is resident. The model, those tokens, and when the call was ready (a
        load counted as waiting)."""
        self._admit(admit)
        resident = await self._resident()
        self._on_call()
        ready = time.perf_counter()
        resident.last_used = time.monotonic()
        rate = self._rate(resident)
        tokens = Drain.work(
            estimated_tokens(items, rate.max_length, windows), len(items), rate.cap, rate.forward_tokens
        )
        self._admit(admit, resident.name, tokens)
        resident.calls += 1
        return resident, tokens, ready

    def _rate(self, resident: Resident) -> PoolRate:
        """The rate this replica drains the model's calls at, and how it counts a call's work (Drain.work)."""
        drain, scorer = self.drains.get(resident.name), resident.loaded.scorer
        return PoolRate(
            drain.pairs_per_s() if drain is not None else None,
            scorer.max_length,
            resident.loaded.profile.max_batch_size,
            scorer.options.forward_cost_tokens,
        )

    @contextlib.contextmanager
    def _pending(self, resident: Resident, tokens: int) -> Iterator[None]:
        """A call's tokens counted as pending (what admission waits behind) while it is checked and batched; any
        failure that is not already a request error becomes one (_call_error)."""
        self.pending_tokens[resident.name] = self.pending_tokens.get(resident.name, 0) + tokens
        try:
            yield
        except RerankError:
            raise
        except Exception as exc:
            raise self._call_error(exc) from None
        finally:
            self.pending_tokens[resident.name] -= tokens

    async def _checked_windows(
        self,
        resident: Resident,
        pairs: list[Pair] | list[EncodedPair],
        truncate: bool,
        windows: WindowRule | None,
        counted: bool,
    ) -> Windows:
        """The call's pairs as the windows to score, each checked: token ids from the ingress as they are (it
        tokenized, checked and cut them), text cut into windows by the `windows` rule and checked here. A pair
        the model cannot take fails this call, before anything is batched."""
        scorer = resident.loaded.scorer
        encoded = bool(pairs) and isinstance(pairs[0], EncodedPair)
        if encoded:
            # Tokenized, checked and cut into windows by the ingress: only padding and forwards are left.
            if resident.spec is None or not all(isinstance(p, EncodedPair) for p in pairs):
                raise InvalidInput(f"model {resident.name!r} takes pairs as text, not token ids", "documents")
            if any(p.tokenizer != resident.spec.fingerprint for p in pairs):
                raise StaleTokenizer(
                    f"model {resident.name!r}: the pairs were tokenized with another tokenizer than its pool's "
                    "(the model behind this name changed); retry",
                    model=resident.name,
                )
            resident.encoded_pairs += len(pairs) if counted else 0
            check = functools.partial(check_ids, pairs, resident.vocabulary, scorer.max_length)
        else:
            resident.tokenized_pairs += len(pairs) if counted else 0
            check = functools.partial(call_windows, scorer, pairs, windows, truncate)
        with as_request_errors():
            # Checking ids (thousands of windows' worth), cutting and tokenizing text: off the event loop.
            windows_cut = await asyncio.get_running_loop().run_in_executor(self.prepare_thread, check)
        return Windows.whole(pairs) if encoded else windows_cut

    async def _in_batches(self, profile, scored: list[Pair]) -> list[Part]:
        """The pairs scored through the batcher (or, on a realtime replica, each piece as its own batch), in pieces
        of the model's cap and at most the batcher's: a piece larger than the batcher's would be refused."""
        cap = min(profile.max_batch_size, self.batch_cap)
        pieces = [scored[i : i + cap] for i in range(0, len(scored), cap)]
        if self.realtime:
            return [(await self._run([piece]))[0] for piece in pieces]
        # Nothing queued or running: a batch would only wait for company, so it starts at once. Busy: the
        # batch forming now waits (the profile's wait) and fills while the device finishes the last one.
        self._score_batch.set_batch_wait_timeout_s(profile.batch_wait_timeout_s if self.pending_pairs else 0.0)
        self.pending_pairs += len(scored)
        self.metrics.queue.set(self.pending_pairs)
        try:
            results = await asyncio.gather(*(self._score_batch(piece) for piece in pieces))
        finally:
            # Also when the caller is cancelled: its queued pieces leave the batcher unscored.
            self.pending_pairs -= len(scored)
            self.metrics.queue.set(self.pending_pairs)
            if self.lower_cap is not None and not self.pending_pairs:
                self.set_batch_cap(self.lower_cap)
        for piece in results:
            if isinstance(piece, Exception):  # this call failed on its own inside a shared batch
                raise piece
        return results

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

    async def _run(self, calls: list[list[Pair]] | list[list[Content]]) -> list[Part]:
        """Prepare (CPU) then forward (device), in pieces of the model's cap (a shared replica's batch may be
        larger than a small model's cap). Two batches may be in flight: one prepares while the other holds the
        device, unless overlap_preprocessing is off. A batch may hold both scoring calls (pairs) and embedding
        calls (inputs): each kind is prepared and forwarded as its own pieces, and every call gets its own Part."""
        resident = await self._resident()
        scorer = resident.loaded.scorer
        embedding = [bool(call) and isinstance(call[0], Content) for call in calls]
        kinds = [
            (
                [call for call, e in zip(calls, embedding) if not e],
                scorer.prepare,
                scorer.forward,
                scorer.calibrate,
            ),
            (
                [call for call, e in zip(calls, embedding) if e],
                scorer.prepare_inputs,
                scorer.embed_inputs,
                list,
            ),
        ]
        parts = {}
        for group, prepare, forward, finish in kinds:
            if group:
                for call, part in zip(group, await self._run_kind(resident, group, prepare, forward, finish)):
                    parts[id(call)] = part
        return [parts[id(call)] for call in calls]

    async def _run_kind(self, resident: Resident, calls: list[list], prepare, forward, finish) -> list[Part]:
        """Calls of one kind (scoring or embedding) in pieces of the model's cap: `prepare` on the prepare
        thread, `forward` on the device thread, `finish` on its raw output (the score map, or nothing)."""
        scorer, cap = resident.loaded.scorer, resident.loaded.profile.max_batch_size
        flat = [item for call in calls for item in call]
        loop = asyncio.get_running_loop()
        scored, real_tokens = [], 0
        started = time.perf_counter()
        tokenize_s = inference_s = 0.0
        for offset in range(0, len(flat), cap):
            piece = flat[offset : offset + cap]
            start = time.perf_counter()
            try:
                if resident.settings.overlap_preprocessing:
                    prepared = await loop.run_in_executor(self.prepare_thread, prepare, piece)
                    tokenized = time.perf_counter()
                    async with self.forward_lock:
                        forward_start = time.perf_counter()
                        raw = await loop.run_in_executor(self.device_thread, forward, prepared)
                else:
                    async with self.forward_lock:
                        prepared = await loop.run_in_executor(self.prepare_thread, prepare, piece)
                        tokenized = forward_start = time.perf_counter()
                        raw = await loop.run_in_executor(self.device_thread, forward, prepared)
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
            scored.extend(finish(raw))
        done = self.last_busy = time.perf_counter()
        self.throughput.record(len(flat), started, done)
        work = Drain.work(
            estimated_tokens(flat, scorer.max_length, None), len(flat), cap, scorer.options.forward_cost_tokens
        )
        self.drains.setdefault(resident.name, Drain()).record(work, started, done)
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
            "node": self.device.node,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_kind": self.device.gpu_kind,
            "gpu_name": self.device.gpu_name,
            "device": self.device.torch_device,
            "torch_threads": self.torch_threads,
            "pid": os.getpid(),
        }

    def _admission(self) -> dict:
        """What admission by estimated wait sees: the measured rates, the queue's wait, the calls refused."""
        rate = self.throughput.pairs_per_s()
        tokens = {name: drain.pairs_per_s() for name, drain in self.drains.items()}
        best = {name: drain.best for name, drain in self.drains.items()}
        return {
            "pairs_per_s_under_load": None if rate is None else round(rate, 2),
            "tokens_per_s_under_load": {name: None if r is None else round(r, 1) for name, r in tokens.items()},
            "tokens_per_s_best": {name: None if r is None else round(r, 1) for name, r in best.items()},
            "estimated_wait_s": round(self._queued_s(), 3),
            "refused_calls": self.refused,
            "calls_now": self.calls_now,
            "most_calls_at_once": self.most_calls,
            "rate_window": self.throughput.window(),  # (pairs, service ms) of the batches the rate is taken over
        }

    def _memory(self, pool: str) -> dict:
        memory = hardware.memory_stats()
        self.metrics.memory.set(
            memory.get("allocated_bytes") or memory.get("rss_bytes") or 0, tags={"kind": memory["device"]}
        )
        return memory
