"""A pool's scorer, loaded one way for the replica, the bulk job and calibrate: device, batch profile,
load options, derived cap, warm-up and the measured cost of one more forward pass."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from serve_app import hardware
from serve_app.hardware import BatchProfile, Device, ProfileRow
from serve_app.score_fit import FittedMap, ScoreMap
from serve_app.scoring.batching import BUCKET
from serve_app.scoring.family import CPU_MAX_TOKENS_PER_FORWARD, LoadOptions
from serve_app.scoring.loading import load_scorer
from serve_app.scoring.types import Calibrator, Content, Logistic, ModelLoadError, Pair, Scorer
from serve_app.settings import PoolSettings, score_map_path

log = logging.getLogger(__name__)

DERIVE_PROBE_PAIRS = 8
CPU_COST_PROBE_PAIRS = 8
# GPU warm-up runs every length bucket up to this many tokens: a BERT-class window whole, an LLM reranker's
# 8192 only in part (longer shapes pay their kernel choice once, on first use).
WARM_UP_MAX_TOKENS = 1024


@dataclass
class PoolScorer:
    """A loaded pool scorer and how it batches: `profile` is final (derived where the card has no row,
    the pool's own cap and wait applied)."""

    device: Device
    profile: BatchProfile
    scorer: Scorer


def load_pool(
    modality: str,
    pool_settings: PoolSettings,
    profiles: list[ProfileRow],
    cache_dir: Path,
    warm_up: bool = True,
    where: Device | None = None,
    name: str | None = None,
    fitted_map: bool = True,
) -> PoolScorer:
    """The one way to load a pool's scorer (`name`: the model's served name, which finds its fitted score map).
    Raises ModelLoadError when the model cannot load."""
    set_torch_threads(pool_settings.torch_threads)
    where = where or hardware.this_device()
    profile = hardware.choose_profile(profiles, where, modality, pool_settings)
    options = load_options(pool_settings, where, profile, cache_dir)
    if fitted_map:  # off: the family's own map (or the `calibration` setting), as calibrate_scores' "before"
        options.calibration = calibration(pool_settings, name or pool_settings.served_name())
    scorer = load_scorer(pool_settings.model, options)
    if profile.source.startswith("derive"):
        profile = derive_profile(scorer, modality, profile, where)
    profile = profile.overridden(pool_settings.max_batch_size, pool_settings.batch_wait_timeout_s)
    if warm_up:
        warm_up_shapes(scorer, modality, where, profile.max_batch_size)
    tune_forward_cost(scorer, modality, pool_settings, profile.max_batch_size)
    return PoolScorer(where, profile, scorer)


def set_torch_threads(threads: int | None) -> int:
    """Set torch's CPU threads for the calling thread (None: leave them); the count torch now uses."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_options(pool_settings: PoolSettings, where: Device, profile: BatchProfile, cache_dir: Path) -> LoadOptions:
    on_gpu = where.torch_device.startswith("cuda")
    calibration = pool_settings.calibration
    return LoadOptions(
        device=where.torch_device,
        dtype=profile.torch_dtype(),
        max_tokens_per_forward=pool_settings.max_tokens_per_forward or (None if on_gpu else CPU_MAX_TOKENS_PER_FORWARD),
        calibration=calibration and Logistic(calibration.scale, calibration.shift),
        cache_dir=cache_dir,
        shape_buckets=on_gpu,
        attn_implementation=pool_settings.attn_implementation,
        quantize=pool_settings.quantize,
        forward_cost_tokens=pool_settings.forward_cost_tokens or 0,
        family=pool_settings.family,
        answer_tokens=pool_settings.answer_tokens,
        prefix_reuse=pool_settings.prefix_reuse,
        cuda_graphs=pool_settings.cuda_graphs,
    )


def calibration(pool_settings: PoolSettings, name: str) -> Calibrator | None:
    """The model's raw -> 0..1 map: the `calibration` setting, else its fitted score map (the `score_map` setting,
    else deploy/score_maps/<name>.json where that exists), else None: its family's own map."""
    if pool_settings.calibration is not None:
        return Logistic(pool_settings.calibration.scale, pool_settings.calibration.shift)
    explicit = pool_settings.score_map is not None
    path = Path(pool_settings.score_map) if explicit else score_map_path(name)
    if not path.exists():
        if explicit:
            raise ModelLoadError(
                f"score_map {path} does not exist: fit one (python -m serve_app.calibrate_scores) or unset score_map"
            )
        return None
    try:
        fitted = json.loads(path.read_text())
        score_map = ScoreMap.from_json(fitted["map"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"score_map {path} cannot be read: {type(exc).__name__}: {exc}") from None
    if fitted.get("model") != pool_settings.model:
        message = (
            f"the score map {path} was fitted for {fitted.get('model')}, not for {pool_settings.model}: refit it "
            "(python -m serve_app.calibrate_scores)"
        )
        if explicit:
            raise ModelLoadError(message)
        log.warning("%s; the family's own map is used", message)
        return None
    return FittedMap(score_map, int(fitted.get("labels", 0)), str(path))


def describe_calibration(scorer: Scorer) -> dict:
    """What /v1/models shows of a scorer's map: a fitted one's kind, label count and file, else which map."""
    calibrator = scorer.calibrator
    if isinstance(calibrator, FittedMap):
        return calibrator.describe()
    kind = "family default" if calibrator is type(scorer).default_calibration else "calibration setting"
    return {"kind": kind, "map": repr(calibrator)}


def derive_profile(scorer: Scorer, modality: str, profile: BatchProfile, where: Device) -> BatchProfile:
    """A GPU kind without a row: fit the activations of one probe batch at full length into the free memory."""
    torch.cuda.synchronize()
    hardware.reset_peak_memory()
    before = torch.cuda.memory_allocated()
    scorer.score(synthetic_pairs(modality, DERIVE_PROBE_PAIRS, scorer.info.max_length))
    per_pair = (torch.cuda.max_memory_allocated() - before) / DERIVE_PROBE_PAIRS
    free, _ = torch.cuda.mem_get_info()
    cap = hardware.derive_max_batch_size(free, per_pair)
    tokens = scorer.info.max_length
    source = f"derived: {free / 2**30:.1f} GiB free, {per_pair / 2**20:.1f} MiB/pair at {tokens} tokens"
    log.info("%s pool on %s: %s -> max batch %d", modality, where.gpu_kind, source, cap)
    return BatchProfile(cap, profile.batch_wait_timeout_s, profile.dtype, source)


def warm_up_shapes(scorer: Scorer, modality: str, where: Device, max_batch_size: int) -> None:
    """Run the shapes a replica will meet once, so no request pays for kernel selection.

    On a GPU: every length bucket at every power-of-two batch size up to the cap. On the CPU
    one batch at the cap is enough (no per-shape kernels to pick).
    """
    start = time.perf_counter()
    if not where.torch_device.startswith("cuda"):
        scorer.score(synthetic_pairs(modality, max_batch_size, 8))
    else:
        widths = range(BUCKET, min(scorer.info.max_length, WARM_UP_MAX_TOKENS) + 1, BUCKET)
        # Rows are padded to powers of two: up to the first one at or above the cap.
        sizes = [1 << i for i in range((max_batch_size - 1).bit_length() + 1)]
        for width in widths:
            for size in sizes:
                # "query" + the words + 2 digits + 3 special tokens: `width` tokens for a BERT cross-encoder.
                scorer.score(synthetic_pairs(modality, size, width - 6))
    log.info("%s pool warmed up in %.1f s", modality, time.perf_counter() - start)


def probe_pair(modality: str) -> Pair:
    """The small real pair /health scores through a pool of this modality."""
    if modality == "image_text":
        return Pair(Content(text="a grey square"), Content(image=Image.new("RGB", (32, 32), (128, 128, 128))))
    return Pair(Content(text="health check"), Content(text="the service is scoring pairs"))


def synthetic_pairs(modality: str, count: int, words: int) -> list[Pair]:
    """Distinct pairs of equal length, about `words` tokens, for warm-up and probes (the tokenizer truncates
    the excess). Distinct, since bi-encoders embed each distinct text of a batch once."""
    text = " ".join(["relevance"] * max(1, words))
    if modality == "image_text":
        image = Image.new("RGB", (224, 224), (90, 120, 150))
        return [Pair(Content(text=f"{text} {i // 10 % 10} {i % 10}"), Content(image=image)) for i in range(count)]
    return [Pair(Content(text="query"), Content(text=f"{text} {i // 10 % 10} {i % 10}")) for i in range(count)]


def tune_forward_cost(scorer: Scorer, modality: str, pool_settings: PoolSettings, max_batch_size: int) -> int:
    """Set the scorer's forward_cost_tokens: the pool's setting, else measured (text pools), else left as is.

    Measured as the time of a short one-pair forward over the time per token of a large one: what a cut
    into one more forward pass must save in padding to pay for itself.
    """
    if pool_settings.forward_cost_tokens is not None:
        scorer.options.forward_cost_tokens = pool_settings.forward_cost_tokens
    elif (batch := forward_cost_probe_pairs(scorer, modality, pool_settings, max_batch_size)) is not None:
        scorer.options.forward_cost_tokens = measure_forward_cost_tokens(scorer, batch)
    return scorer.options.forward_cost_tokens


def forward_cost_probe_pairs(
    scorer: Scorer, modality: str, pool_settings: PoolSettings, max_batch_size: int
) -> int | None:
    """Pairs in the forward-cost probe's large forward; None where the cost is not measured (set in the pool's
    settings, or not a text pool)."""
    if pool_settings.forward_cost_tokens is not None or modality != "text":
        return None
    # A GPU needs a full batch to show a per-token cost (smaller ones are launch-bound); a CPU shows it in a few
    # pairs, and a full batch of a MiniLM-sized model would cost a CPU replica's start (or an on-demand load in
    # the shared pool) tens of seconds.
    on_gpu = scorer.options.device.startswith("cuda")
    return max_batch_size if on_gpu else min(max_batch_size, CPU_COST_PROBE_PAIRS)


class Interrupted(Exception):
    """A measurement stopped because work arrived."""


def measure_forward_cost_tokens(
    scorer: Scorer,
    max_batch_size: int,
    words: int = 60,
    repeats: int = 5,
    interrupted: Callable[[], bool] | None = None,
) -> int | None:
    """The fixed cost of a forward (one short pair) over the cost per token (many pairs of `words`). With
    `interrupted`, asked before each forward: None as soon as it says yes (a replica's callers come first)."""

    # One forward per measurement: no cuts while measuring what a cut costs. On a copy of the scorer (the same
    # model), so that callers reading the scorer's forward cost meanwhile (admission) never see this one.
    probe = copy.copy(scorer)
    probe.options = replace(scorer.options, forward_cost_tokens=1 << 30)

    def best_time(pairs: list[Pair]) -> tuple[float, int]:
        prepared = probe.prepare(pairs)
        times = []
        for _ in range(repeats):
            if interrupted is not None and interrupted():
                raise Interrupted
            start = time.perf_counter()
            probe.forward(prepared)  # returns Python floats: the device has finished
            times.append(time.perf_counter() - start)
        return min(times), probe.tokens(prepared).padded

    try:
        small_s, small_tokens = best_time(synthetic_pairs("text", 1, 4))
        # A full batch: on a large GPU anything smaller is still launch-bound and shows no per-token cost.
        # Each pair its own query: a yes/no scorer would otherwise share the prompt's prefix among them, and a
        # token of that batch would not cost what a token of any forward costs.
        pairs = synthetic_pairs("text", max(2, max_batch_size), words)
        big_s, big_tokens = best_time([replace(p, query=Content(text=f"query {i}")) for i, p in enumerate(pairs)])
    except Interrupted:
        return None
    per_token = (big_s - small_s) / max(1, big_tokens - small_tokens)
    if per_token <= 0:
        return 0
    cost = int(min(1 << 16, max(0.0, small_s / per_token - small_tokens)))
    log.info("forward costs %.2f ms + %.1f us/token: forward_cost_tokens=%d", small_s * 1e3, per_token * 1e6, cost)
    return cost
