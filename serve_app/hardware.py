"""Which accelerator this replica has, the batch profile for it, and the device and dtype it computes in."""

from __future__ import annotations

import fnmatch
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from serve_app.settings import PoolSettings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

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
# The dtypes a profile may name (torch's names): torch is imported where a model loads, not here, so that the
# bulk job's driver and its row-reading tasks (which choose batch sizes from the profiles) load no torch.
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Device:
    """Where a replica computes: the torch device ("cuda:0" or "cpu"), its node, and the kind of card."""

    torch_device: str
    node: str
    gpu_kind: str  # Ray accelerator type name (A10G, H100 ...), or "cpu"
    gpu_name: str | None  # what CUDA calls the card, when there is one


@dataclass(frozen=True)
class BatchProfile:
    """How a replica batches on one kind of GPU for one pool."""

    max_batch_size: int
    batch_wait_timeout_s: float
    dtype: str
    source: str  # "table: <row>", "derived: ...", "config"

    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.dtype not in DTYPES:
            raise ValueError(f"batch profile dtype {self.dtype!r}: one of {', '.join(DTYPES)}")
        return getattr(torch, self.dtype)

    def overridden(self, max_batch_size: int | None, batch_wait_timeout_s: float | None) -> BatchProfile:
        """A pool's own cap and wait win over the table's; unset ones keep this profile's."""
        return BatchProfile(
            int(max_batch_size) if max_batch_size else self.max_batch_size,
            self.batch_wait_timeout_s if batch_wait_timeout_s is None else float(batch_wait_timeout_s),
            self.dtype,
            "config" if max_batch_size else self.source,
        )


def gpu_kind_of(device_name: str) -> str:
    """'NVIDIA A10G' -> 'A10G', 'NVIDIA GeForce RTX 3060' -> 'RTX3060'; unknown names lose their spaces."""
    for needle, kind in GPU_KINDS:
        if needle in device_name:
            return kind
    return re.sub(r"^(NVIDIA|Tesla)\s+", "", device_name).replace(" ", "")


def declared_accelerator() -> str | None:
    """The `accelerator_type:<NAME>` resource Ray assigned this actor, if any. Outside Ray (calibrate, a
    benchmark) there is none, and asking would start or join a Ray instance."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        assigned = ray.get_runtime_context().get_assigned_resources()
    except Exception:  # noqa: BLE001 - no Ray installed, or no runtime context: nothing assigned
        return None
    for key in assigned:
        if key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    return None


def this_device() -> Device:
    """CUDA when Ray gave this process a GPU, else the CPU; the GPU kind from the card or the node's resource.

    Ray narrows CUDA_VISIBLE_DEVICES to the replica's own GPU, so `cuda:0` is the assigned card.
    """
    import torch

    node = socket.gethostname()
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return Device("cuda:0", node, gpu_kind_of(name), name)
    return Device("cpu", node, declared_accelerator() or "cpu", None)


@dataclass(frozen=True)
class ProfileRow:
    gpu: str
    pool: str
    max_batch_size: int
    batch_wait_timeout_s: float
    dtype: str
    model: str | None = None  # glob over the model id or path; rows with one win over rows without
    source: str = ""


def calibrated_path(path: Path) -> Path:
    """Where `python -m serve_app.calibrate` writes its rows: beside the hand-written file."""
    return path.with_name(f"{path.stem}.calibrated{path.suffix}")


def read_rows(path: Path) -> list[ProfileRow]:
    document = yaml.safe_load(path.read_text()) if path.exists() else None
    return [ProfileRow(**row) for row in (document or {}).get("profiles") or []]


def load_profile_rows(path: Path) -> list[ProfileRow]:
    """The calibrated rows, then the hand-written ones (a tie in lookup_profile goes to the calibrated row)."""
    if not path.exists():
        raise FileNotFoundError(f"no batch profiles at {path} (setting batch_profiles_path)")
    return read_rows(calibrated_path(path)) + read_rows(path)


def lookup_profile(rows: list[ProfileRow], gpu_kind: str, modality: str, model: str) -> BatchProfile | None:
    """The most specific row for (GPU kind, modality, model), or None when the kind has no row."""
    matches = [
        row
        for row in rows
        if row.gpu.lower() == gpu_kind.lower()
        and row.pool == modality
        and (row.model is None or fnmatch.fnmatch(model, row.model))
    ]
    if not matches:
        return None
    # An exact model beats a glob, a glob beats no model; among equals the first row wins.
    row = max(matches, key=lambda r: 0 if r.model is None else 2 if r.model == model else 1)
    where = f"{row.gpu}/{row.pool}" + (f"/{row.model}" if row.model else "")
    return BatchProfile(row.max_batch_size, row.batch_wait_timeout_s, row.dtype, f"table: {where}")


def choose_profile(rows: list[ProfileRow], where: Device, modality: str, pool_settings: PoolSettings) -> BatchProfile:
    """The table row for this GPU kind, the CPU row on a CPU node, or a marker ("derive") for a GPU
    kind with no row: its cap is measured once the model is loaded. dtype: the pool's setting, else the
    row's on a GPU, float32 on the CPU."""
    on_gpu = where.torch_device.startswith("cuda")
    found = lookup_profile(rows, where.gpu_kind, modality, pool_settings.model)
    if found is None and not on_gpu:
        cpu = lookup_profile(rows, "cpu", modality, pool_settings.model) or BatchProfile(8, 0.005, "float32", "default")
        found = BatchProfile(
            cpu.max_batch_size, cpu.batch_wait_timeout_s, "float32", f"{cpu.source} (no row for {where.gpu_kind})"
        )
    if found is None:
        found = BatchProfile(8, 0.005, preferred_gpu_dtype(), "derive")
    dtype = found.dtype if on_gpu else "float32"  # bf16/fp16 rows are for the card, not a CPU fallback
    if pool_settings.dtype != "auto":
        dtype = pool_settings.dtype
    return BatchProfile(found.max_batch_size, found.batch_wait_timeout_s, dtype, found.source)


def derive_max_batch_size(free_bytes: int, bytes_per_pair: float, budget: float = 0.8, ceiling: int = 1024) -> int:
    """The largest power of two whose activations fit `budget` of the free memory, at least 1."""
    if bytes_per_pair <= 0:
        return ceiling
    fits = int(free_bytes * budget / bytes_per_pair)
    size = 1
    while size * 2 <= min(fits, ceiling):
        size *= 2
    return size


# What a GPU says once its context is lost: every later call fails too, only a new process recovers.
DEVICE_FAULTS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert", "NCCL error")


def is_out_of_memory(exc: BaseException) -> bool:
    """Out of device (or host) memory: load, which a smaller batch or a later retry survives."""
    import torch

    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))


def is_device_fault(exc: BaseException) -> bool:
    """A failure of the device itself (not of the input, not out-of-memory, which a smaller batch survives)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in DEVICE_FAULTS)


def preferred_gpu_dtype() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def memory_stats() -> dict:
    """Memory this process uses: CUDA allocator figures on a GPU, resident set size on the CPU."""
    import torch

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
    import torch

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
