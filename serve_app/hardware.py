"""Which device and dtype this replica computes with, and where Ray placed it."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: torch.dtype
    node: str
    accelerator: str  # GPU name, the node's declared accelerator type, or "cpu"


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
    """CUDA when this process was given a GPU (Ray sets CUDA_VISIBLE_DEVICES), else CPU in fp32."""
    node = socket.gethostname()
    if torch.cuda.is_available():
        # Ray narrows CUDA_VISIBLE_DEVICES to this replica's GPU, so index 0 is the assigned one.
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Placement("cuda:0", dtype, node, torch.cuda.get_device_name(0))
    return Placement("cpu", torch.float32, node, declared_accelerator() or "cpu")


def cpu_threads() -> int:
    """Threads torch may use: Ray sets OMP_NUM_THREADS from the actor's num_cpus."""
    return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
