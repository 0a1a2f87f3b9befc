"""CUDA graphs of an encoder's forward pass, one per padded shape: a forward replays its recorded kernels
instead of launching each from Python.

On a large GPU a small model's forward is launch-bound: MiniLM-L6 takes ~2.5 ms at batch 1 on an H200
(../shared/measured/GPU-H200.md), nearly all of it Python and kernel launches, and that fixed cost is why
batches are cut into few forwards. Shape buckets (lengths to multiples of 16, rows to powers of two) make the
shapes a replica meets few, so each gets a graph of its own, captured the first time it is seen (the
start-up warm-up runs them all).

A graph records kernels and addresses, not Python: a branch taken on a tensor's value while capturing is
baked into the graph. Transformers' encoders take one: with a 2D attention mask they check `mask.all()` to
drop the mask for a faster kernel, a host sync that CUDA refuses while capturing (and, were it allowed, would
bake in the batch's padding). The graphed forward therefore hands the model a 4D additive mask, which the
mask code passes through untouched (no branch on its values; `capturable_mask`). tests/test_graphs.py
holds, on the CPU, that this forward equals the plain one and makes no host sync at all; on a CUDA card, that
the graphed scores equal the eager ones.

At the first capture, the capturable forward and the graph's replay are checked against the plain forward
on a copy of the batch with padding in it; a model that reads the 4D mask otherwise (DeBERTa takes it
for a 0/1 mask and scores NaN) or fails to capture runs eagerly from then on, with the reason in `failed`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
# Shapes captured at most per scorer: the warm-up's buckets x power-of-two rows are a few hundred (320 for a
# 512-token model at 512 rows); a shape past this count runs eagerly.
MAX_GRAPHS = 1024
# Attention kernels that take a 4D additive mask (flash-attention reads a 2D one).
GRAPHED_ATTENTION = ("sdpa", "eager")


def capturable_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, width) 0/1 padding mask as the (rows, 1, 1, width) additive mask the attention adds to its
    scores: 0 where a token is kept, the dtype's minimum where it is padding."""
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def with_padding(batch: Batch) -> Batch:
    """A copy of `batch` whose first row keeps only the first half of its tokens: a capture's check, so that a
    model reading the capturable mask wrongly cannot pass on batches without padding."""
    checked = {key: value.clone() for key, value in batch.items()}
    width = checked["attention_mask"].shape[1]
    checked["attention_mask"][0, max(1, width // 2) :] = 0
    return checked


def disagreement(
    graphed: Callable[[Batch], torch.Tensor], eager: Callable[[Batch], torch.Tensor], batch: Batch, tolerance: float
) -> str | None:
    """Why the capturable forward cannot stand in for the plain one on `batch` (None: it can): its largest
    difference, relative to the output's scale, exceeds `tolerance` (NaN does too: a model that reads a 4D mask
    as 0/1, as DeBERTa does, scores NaN)."""
    got, expected = graphed(batch).float(), eager(batch).float()
    if got.shape != expected.shape:
        return f"its output has shape {tuple(got.shape)}, the eager forward's {tuple(expected.shape)}"
    difference = (got - expected).abs().max().item()
    if not difference <= tolerance * (1 + expected.abs().max().item()):
        return f"it differs from the eager forward by {difference:.3g}"
    return None


class CudaRecorder:
    """Records a forward as a CUDA graph: `record(forward, inputs)` gives (replay, output), where replay() runs
    the recorded kernels again on whatever `inputs` then hold and leaves the result in `output`. Graphs share
    the first one's memory pool (they are replayed one at a time)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.pool = None

    def record(self, forward: Callable[[Batch], torch.Tensor], inputs: Batch):
        # Kernels are chosen and lazily built pieces made on a side stream first, as capture requires.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            forward(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call of another thread while this one captures (the replica's /v1/stats reading
        # memory) neither breaks the capture nor fails itself.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = forward(inputs)
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, output


class InputArena:
    """The graphs' static inputs: per input name, one flat device buffer, and each graph's input a view of its
    prefix. Replays run one at a time and each copies its batch in first, so graphs may share the same bytes:
    the inputs cost about the largest shape's, not the sum over every shape's (~200 MB of int64 ids, masks and
    type ids for the 320 shapes of a MiniLM pool at 512 rows, computed). A shape larger than the buffer gets a
    new buffer of at least twice the size (the graphs recorded on the old one keep it): at most ~4x the
    largest shape's bytes in all."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}
        self.bytes = 0  # every buffer allocated (the graphs of an outgrown one still hold it)

    def take(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """A view of `name`'s buffer shaped as `value`, holding `value`."""
        size = value.numel()
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != value.dtype or buffer.numel() < size:
            grown = 2 * buffer.numel() if buffer is not None and buffer.dtype == value.dtype else 0
            buffer = torch.empty(max(size, grown), dtype=value.dtype, device=self.device)
            self.buffers[name] = buffer
            self.bytes += buffer.numel() * buffer.element_size()
        view = buffer[:size].view(value.shape)
        view.copy_(value)
        return view


class GraphedForward:
    """`graphed(batch)` (a device batch in, one tensor out, no host sync) replayed from a CUDA graph per input
    shape; `eager(batch)` is the plain forward the captures are checked against and the fallback. Calls may
    come from any thread; they run one at a time (replays share one memory pool)."""

    def __init__(
        self,
        graphed: Callable[[Batch], torch.Tensor],
        eager: Callable[[Batch], torch.Tensor],
        device: str,
        tolerance: float,
        max_graphs: int = MAX_GRAPHS,
        recorder=None,  # CudaRecorder(device) unless given (tests record on the CPU with a stand-in)
    ) -> None:
        self.graphed, self.eager, self.device = graphed, eager, device
        self.tolerance = tolerance  # a capture's largest difference to the eager output, relative to its scale
        self.max_graphs = max_graphs
        self.recorder = recorder or CudaRecorder(device)
        self.arena = InputArena(device)
        # Per input shape: the replay, its static inputs (views of the arena: each call's batch is copied in
        # before its replay) and static output.
        self.graphs: dict[tuple, tuple[Callable[[], None], Batch, torch.Tensor]] = {}
        self.checked = False  # whether a capture passed the check against the eager forward
        self.failed: str | None = None
        self.replays = self.eager_calls = 0
        self.lock = threading.Lock()

    def __call__(self, batch: Batch) -> torch.Tensor:
        """The forward of `batch` (CPU or device tensors); a tensor of its own (a graph's output is copied out:
        the next replay overwrites it)."""
        key = tuple((name, tuple(value.shape), value.dtype) for name, value in sorted(batch.items()))
        with self.lock:
            entry = self.graphs.get(key)
            if entry is None and self.failed is None and len(self.graphs) < self.max_graphs:
                entry = self._capture(key, batch)
            if entry is None:
                self.eager_calls += 1
                return self.eager(self._on_device(batch))
            replay, inputs, output = entry
            for name, value in batch.items():
                inputs[name].copy_(value, non_blocking=True)
            replay()
            self.replays += 1
            return output.clone()

    def describe(self) -> dict:
        return {
            "graphs": len(self.graphs),
            "replays": self.replays,
            "eager": self.eager_calls,
            "failed": self.failed,
            "input_mib": round(self.arena.bytes / 2**20, 2),
        }

    def _on_device(self, batch: Batch) -> Batch:
        return {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}

    def _capture(self, key: tuple, batch: Batch):
        inputs = {name: self.arena.take(name, value) for name, value in batch.items()}
        # The model's reading of the capturable mask, and a replay, are checked at the first capture: a shape's
        # own graph cannot branch on values (no host sync) and a failed capture raises. The warm-up captures a
        # few hundred shapes; a check of each would triple its time.
        checked = None if self.checked else with_padding(inputs)
        if checked is not None and (reason := disagreement(self.graphed, self.eager, checked, self.tolerance)):
            return self._fail(key, f"the capturable forward: {reason}")
        try:
            replay, output = self.recorder.record(self.graphed, inputs)
        except Exception as exc:  # noqa: BLE001 - any model may refuse capture: it then runs eagerly
            return self._fail(key, f"capture failed: {type(exc).__name__}: {str(exc)[:300]}")

        # The replay checked on the padded copy too (the caller then copies its own batch in).
        def replayed(padded: Batch) -> torch.Tensor:
            for name, value in padded.items():
                inputs[name].copy_(value)
            replay()
            return output

        if checked is not None and (reason := disagreement(replayed, self.eager, checked, self.tolerance)):
            return self._fail(key, f"the graph: {reason}")
        self.checked = True
        self.graphs[key] = (replay, inputs, output)
        return self.graphs[key]

    def _fail(self, key: tuple, reason: str) -> None:
        self.failed = f"shape {[shape for _, shape, _ in key]}: {reason}"
        self.graphs.clear()  # none is replayed again: every forward runs eagerly from now on
        log.warning("CUDA graphs off for this model (%s); forwards run eagerly", self.failed)
        return None
