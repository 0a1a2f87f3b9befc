"""A model resident in a scoring replica: its scorer, counters and Prometheus series, and how /v1/models and
/v1/stats describe it. Both kinds of replica (a pool's own, the shared pool's) hold theirs in a Resident."""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass

from ray.util import metrics

from serve_app import pools
from serve_app.scoring.types import Pair, Score, TokenCount
from serve_app.settings import PoolSettings
from serve_app.stats import percentile


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

    def __init__(self, name: str, modality: str, settings: PoolSettings, loaded: pools.PoolScorer, load_s: float = 0.0):
        self.name = name
        self.modality = modality  # "text" or "image_text"
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
        self.vocabulary = len(loaded.scorer.tokenizer)  # token ids the ingress sends must be below it
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
