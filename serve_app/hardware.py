"""Which accelerator this replica has, the batch profile for it, and the device and dtype it computes in."""

from __future__ import annotations

import fnmatch
import logging
import re
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml
from PIL import Image

from serve_app.scoring import Content, LoadOptions, Pair, Scorer, load_scorer
from serve_app.scoring.base import Logistic
from serve_app.settings import PoolSettings

log = logging.getLogger(__name__)

CPU_MAX_TOKENS_PER_FORWARD = 16384

PROFILES_PATH = Path(__file__).resolve().parent.parent / "deploy" / "batch_profiles.yaml"

# torch.cuda.get_device_name() -> Ray's accelerator_type names. Longer names first: A100 before A10.
GPU_KINDS = [
    ("H200", "H200"),
    ("H100", "H100"),
    ("H20", "H20"),
    ("A100", "A100"),
    ("A10G", "A10G"),
    ("A10", "A10G"),
    ("L40S", "L40S"),
    ("L4", "L4"),
    ("T4", "T4"),
    ("V100", "V100"),
    ("RTX 4090", "RTX4090"),
    ("RTX 3090", "RTX3090"),
    ("RTX 3060", "RTX3060"),
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    device: str
    node: str
    gpu_kind: str  # Ray accelerator type name (A10G, H100 ...), or "cpu"
    gpu_name: str | None  # what CUDA calls the card, when there is one


@dataclass(frozen=True)
class BatchProfile:
    """How a replica batches on one kind of GPU for one modality."""

    max_batch_size: int
    batch_wait_timeout_s: float
    dtype: str
    source: str  # "table: <row>", "derived: ...", "config"

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> dict:
        return asdict(self)


def gpu_kind_of(device_name: str) -> str:
    """'NVIDIA A10G' -> 'A10G', 'NVIDIA GeForce RTX 3060' -> 'RTX3060'; unknown names lose their spaces."""
    for needle, kind in GPU_KINDS:
        if needle in device_name:
            return kind
    return re.sub(r"^(NVIDIA|Tesla)\s+", "", device_name).replace(" ", "")


def declared_accelerator() -> str | None:
    """The `accelerator_type:<NAME>` resource Ray assigned this actor, if any."""
    try:
        import ray

        assigned = ray.get_runtime_context().get_assigned_resources()
    except Exception:  # noqa: BLE001 - outside Ray there is nothing assigned
        return None
    for key in assigned:
        if key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    return None


def placement() -> Placement:
    """CUDA when Ray gave this process a GPU, else the CPU; the GPU kind from the card or the node's resource.

    Ray narrows CUDA_VISIBLE_DEVICES to the replica's own GPU, so `cuda:0` is the assigned card.
    """
    node = socket.gethostname()
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return Placement("cuda:0", node, gpu_kind_of(name), name)
    return Placement("cpu", node, declared_accelerator() or "cpu", None)


@dataclass(frozen=True)
class ProfileRow:
    gpu: str
    modality: str
    max_batch_size: int
    batch_wait_timeout_s: float
    dtype: str
    model: str | None = None  # glob over the model id or path; rows with one win over rows without
    source: str = ""


def load_profile_rows(path: Path = PROFILES_PATH) -> list[ProfileRow]:
    document = yaml.safe_load(path.read_text())
    return [ProfileRow(**row) for row in document["profiles"]]


def lookup_profile(rows: list[ProfileRow], gpu_kind: str, modality: str, model: str) -> BatchProfile | None:
    """The most specific row for (GPU kind, modality, model), or None when the kind has no row."""
    matches = [
        row
        for row in rows
        if row.gpu.lower() == gpu_kind.lower()
        and row.modality == modality
        and (row.model is None or fnmatch.fnmatch(model, row.model))
    ]
    if not matches:
        return None
    # An exact model beats a glob, a glob beats no model; among equals the first row wins.
    row = max(matches, key=lambda r: 0 if r.model is None else 2 if r.model == model else 1)
    where = f"{row.gpu}/{row.modality}" + (f"/{row.model}" if row.model else "")
    return BatchProfile(row.max_batch_size, row.batch_wait_timeout_s, row.dtype, f"table: {where}")


def choose_profile(rows: list[ProfileRow], where: Placement, modality: str, config: PoolSettings) -> BatchProfile:
    """The table row for this GPU kind, the CPU row on a CPU node, or a marker ("derive") for a GPU
    kind with no row: its cap is measured once the model is loaded. dtype: the config's, else the
    row's on a GPU, float32 on the CPU."""
    on_gpu = where.device.startswith("cuda")
    found = lookup_profile(rows, where.gpu_kind, modality, config.model)
    if found is None and not on_gpu:
        cpu = lookup_profile(rows, "cpu", modality, config.model) or BatchProfile(8, 0.005, "float32", "default")
        found = BatchProfile(
            cpu.max_batch_size, cpu.batch_wait_timeout_s, "float32", f"{cpu.source} (no row for {where.gpu_kind})"
        )
    if found is None:
        found = BatchProfile(8, 0.005, preferred_gpu_dtype(), "derive")
    dtype = found.dtype if on_gpu else "float32"  # bf16/fp16 rows are for the card, not a CPU fallback
    if config.dtype != "auto":
        dtype = config.dtype
    return BatchProfile(found.max_batch_size, found.batch_wait_timeout_s, dtype, found.source)


def load_pool_scorer(config: PoolSettings, where: Placement, profile: BatchProfile, cache_dir: Path) -> Scorer:
    """A pool's scorer as the service and the bulk job both load it."""
    on_gpu = where.device.startswith("cuda")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    calibration = config.calibration and Logistic(config.calibration.scale, config.calibration.shift)
    return load_scorer(
        config.model,
        LoadOptions(
            device=where.device,
            dtype=profile.torch_dtype(),
            max_tokens_per_forward=config.max_tokens_per_forward or (None if on_gpu else CPU_MAX_TOKENS_PER_FORWARD),
            calibration=calibration,
            cache_dir=cache_dir,
            shape_buckets=on_gpu,
            attn_implementation=config.attn_implementation,
            quantize=config.quantize,
            forward_cost_tokens=config.forward_cost_tokens or 0,
        ),
    )


def synthetic_pairs(pool: str, count: int, words: int) -> list[Pair]:
    """Distinct pairs of equal length, about `words` tokens, for warm-up and probes (the tokenizer truncates
    the excess). Distinct, since bi-encoders embed each distinct text of a batch once."""
    text = " ".join(["relevance"] * max(1, words))
    if pool == "image_text":
        image = Image.new("RGB", (224, 224), (90, 120, 150))
        return [Pair(Content(text=f"{text} {i // 10 % 10} {i % 10}"), Content(image=image)) for i in range(count)]
    return [Pair(Content(text="query"), Content(text=f"{text} {i // 10 % 10} {i % 10}")) for i in range(count)]


def tune_forward_cost(scorer: Scorer, pool: str, config: PoolSettings, max_batch_size: int) -> int:
    """Set the scorer's forward_cost_tokens: the pool's setting, else measured (text pools), else left as is.

    Measured as the time of a short one-pair forward over the time per token of a large one: what a cut
    into one more forward pass must save in padding to pay for itself.
    """
    if config.forward_cost_tokens is not None:
        scorer.options.forward_cost_tokens = config.forward_cost_tokens
    elif pool == "text":
        scorer.options.forward_cost_tokens = measure_forward_cost_tokens(scorer, max_batch_size)
    return scorer.options.forward_cost_tokens


def measure_forward_cost_tokens(scorer: Scorer, max_batch_size: int, words: int = 60, repeats: int = 5) -> int:
    """The fixed cost of a forward (one short pair) over the cost per token (many pairs of `words`)."""

    def best_time(pairs: list[Pair]) -> tuple[float, int]:
        prepared = scorer.prepare(pairs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            scorer.forward(prepared)  # returns Python floats: the device has finished
            times.append(time.perf_counter() - start)
        return min(times), scorer.tokens(prepared).padded

    # One forward per measurement: no cuts while measuring what a cut costs.
    options, scorer.options = scorer.options, replace(scorer.options, forward_cost_tokens=1 << 30)
    try:
        small_s, small_tokens = best_time(synthetic_pairs("text", 1, 4))
        # A full batch: on a large GPU anything smaller is still launch-bound and shows no per-token cost.
        big_s, big_tokens = best_time(synthetic_pairs("text", max(2, max_batch_size), words))
    finally:
        scorer.options = options
    per_token = (big_s - small_s) / max(1, big_tokens - small_tokens)
    if per_token <= 0:
        return 0
    cost = int(min(1 << 16, max(0.0, small_s / per_token - small_tokens)))
    log.info("forward costs %.2f ms + %.1f us/token: forward_cost_tokens=%d", small_s * 1e3, per_token * 1e6, cost)
    return cost


def derive_max_batch_size(free_bytes: int, bytes_per_pair: float, budget: float = 0.8, ceiling: int = 1024) -> int:
    """The largest power of two whose activations fit `budget` of the free memory, at least 1."""
    if bytes_per_pair <= 0:
        return ceiling
    fits = int(free_bytes * budget / bytes_per_pair)
    size = 1
    while size * 2 <= min(fits, ceiling):
        size *= 2
    return size


def preferred_gpu_dtype() -> str:
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def memory_stats() -> dict:
    """Memory this process uses: CUDA allocator figures on a GPU, resident set size on the CPU."""
    if torch.cuda.is_available():
        return {
            "device": "cuda",
            "allocated_bytes": torch.cuda.memory_allocated(),
            "reserved_bytes": torch.cuda.memory_reserved(),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        }
    status = Path("/proc/self/status")
    fields = {}
    if status.exists():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return {"device": "cpu", "rss_bytes": fields.get("VmRSS"), "peak_rss_bytes": fields.get("VmHWM")}


def reset_peak_memory() -> None:
    """Start a new peak: the CUDA allocator's, or the kernel's VmHWM (Linux clear_refs 5)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes() -> int | None:
    stats = memory_stats()
    return stats.get("peak_allocated_bytes") or stats.get("peak_rss_bytes")
