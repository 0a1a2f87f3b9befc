"""Measure a pool's model on this machine and write its batch profile row.

    python -m serve_app.calibrate --pool text [--batch-sizes 1,2,4,...] [--dry-run]

The scorer loads as a replica of the pool loads it (`pools.load_pool`: the pool's settings, this machine's
profile row, dtype, shapes and measured forward cost). For each batch size it times the raw forward
(`scorer.forward` on a batch prepared once) and the path a replica serves (`scorer.score`: tokenize, sort,
pad, forward), records the peak memory, picks the knee (the largest size before doubling gains < 5%
throughput or memory passes the budget), prints a table, writes the row into the calibrated rows file
beside the profiles (`batch_profiles.calibrated.yaml`, unless --dry-run), and saves a plot and the sweep as JSON
(under bench/results; a dry run writes them to a new temporary directory unless --plot and --json say where).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from serve_app import hardware, pools
from serve_app.hardware import ProfileRow
from serve_app.scoring.batching import truncate_to_tokens
from serve_app.scoring.types import Content, Pair, Scorer
from serve_app.settings import MODALITIES, Settings

log = logging.getLogger(__name__)

MIN_GAIN = 0.05  # doubling the batch must buy at least this much more throughput
CPU_BATCH_LIMIT_S = 5.0  # on a CPU, stop the sweep after a batch slower than this
BATCH_WAIT_TIMEOUT_S = 0.005
IMAGE_SIZE = 224
RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"
# Common words most vocabularies hold as one token; documents are random runs of them, cut by the tokenizer.
WORDS = (
    "the of and to in is for on with as by at from that this it be are was or an which their has have not "
    "but all can more one new time year city river house water music school world state team game model "
    "data search query answer question paper image photo light music market price energy health policy "
    "history science garden travel report system power field study group value result change public"
).split()


@dataclass(frozen=True)
class SweepRow:
    """One batch size: medians over the timed repeats, and the peak memory while it ran."""

    batch_size: int
    raw_ms: float  # scorer.forward on a batch prepared once
    scorer_ms: float  # scorer.score: prepare + forward, what a replica serves
    raw_pairs_per_s: float
    scorer_pairs_per_s: float
    peak_bytes: int | None  # CUDA allocator peak on a GPU, process peak RSS on a CPU
    bytes_per_pair: float | None  # (peak - before) / batch size, when the peak rose

    @property
    def ratio(self) -> float:
        """Served-path throughput over raw-forward throughput (1.0: preparing costs nothing)."""
        return self.scorer_pairs_per_s / self.raw_pairs_per_s if self.raw_pairs_per_s else float("nan")


@dataclass(frozen=True)
class Machine:
    device: str  # "cuda:0" or "cpu"
    gpu_kind: str  # Ray accelerator type name, or "cpu"
    name: str  # what the device calls itself, for the row's source
    dtype: str  # key of hardware.DTYPES


def this_machine(loaded: pools.PoolScorer) -> Machine:
    """The device the pool's scorer loaded on, in the dtype it computes in (the profile's, or the pool's)."""
    where = loaded.device
    if where.torch_device.startswith("cuda"):
        return Machine(where.torch_device, where.gpu_kind, where.gpu_name or where.gpu_kind, loaded.profile.dtype)
    return Machine("cpu", "cpu", f"{cpu_name()} ({torch.get_num_threads()} threads)", loaded.profile.dtype)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def default_budget_bytes(device: str) -> int:
    """80% of the GPU's memory; on a CPU, 50% of the memory available now."""
    if device.startswith("cuda"):
        return int(torch.cuda.get_device_properties(0).total_memory * 0.8)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 * 2**30


def current_memory_bytes() -> int | None:
    stats = hardware.memory_stats()
    return stats.get("allocated_bytes") if stats["device"] == "cuda" else stats.get("rss_bytes")


# --- synthetic pairs -------------------------------------------------------------------------------------------


def synthetic_text(rng: random.Random, tokenizer, tokens: int) -> str:
    """Random words cut to `tokens` tokens (every word is at least one token)."""
    text = " ".join(rng.choice(WORDS) for _ in range(tokens))
    return truncate_to_tokens(tokenizer, text, tokens) if tokenizer is not None else text


def noise_image(seed: int, size: int = IMAGE_SIZE):
    from PIL import Image

    return Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))


def synthetic_pairs(modality: str, scorer: Scorer, count: int, tokens: int, seed: int = 0) -> list[Pair]:
    """`count` distinct pairs (no family can share work between them).

    text: query (1/8 of the tokens) + document, about `tokens` tokens with the special tokens.
    image_text: a text query of up to `tokens` tokens (the model's limit caps it) vs a noise image.
    """
    tokenizer = getattr(scorer, "tokenizer", None)
    max_length = scorer.info.max_length
    rng = random.Random(seed)
    pairs = []
    if modality == "text":
        if tokens > max_length:
            log.warning("--tokens %d exceeds the model's %d; pairs are truncated to it", tokens, max_length)
        query_tokens = max(2, tokens // 8)
        document_tokens = max(1, tokens - query_tokens - 3)  # [CLS] q [SEP] d [SEP]
        for _ in range(count):
            query = synthetic_text(rng, tokenizer, query_tokens)
            pairs.append(Pair(Content(text=query), Content(text=synthetic_text(rng, tokenizer, document_tokens))))
        return pairs
    query_tokens = max(1, min(tokens, max_length - 2))
    for i in range(count):
        query = synthetic_text(rng, tokenizer, query_tokens)
        pairs.append(Pair(Content(text=query), Content(image=noise_image(seed * 1_000_003 + i))))
    return pairs


# --- measuring -------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[object], object], arg: object, device: str) -> float:
    """Seconds one call of fn(arg) takes, the device's queue drained before and after."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(arg)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_batch(
    scorer: Scorer, batch: list[Pair], repeats: int, device: str, batch_limit_s: float | None
) -> tuple[list[float], list[float]]:
    """Seconds per run of the raw forward (prepared once) and of the scorer path, after one warm-up of each."""
    prepared = scorer.prepare(batch)
    warm = _timed(scorer.forward, prepared, device) + _timed(scorer.score, batch, device)
    if batch_limit_s is not None and warm > 2 * batch_limit_s:
        repeats = 1  # one timed run is enough to show it is past the limit
    raw = [_timed(scorer.forward, prepared, device) for _ in range(repeats)]
    served = [_timed(scorer.score, batch, device) for _ in range(repeats)]
    return raw, served


def sweep(
    scorer: Scorer,
    pairs: Sequence[Pair],
    batch_sizes: Sequence[int],
    repeats: int,
    device: str,
    budget_bytes: int,
    batch_limit_s: float | None = None,
) -> list[SweepRow]:
    """Time each batch size (the first `size` of `pairs`); stop after one passes the budget or the limit."""
    rows: list[SweepRow] = []
    # First calls pay one-time costs (allocator growth, kernel selection): keep them out of the first size.
    scorer.score(list(pairs[: min(batch_sizes)]))
    for size in batch_sizes:
        if size > len(pairs):
            raise ValueError(f"batch size {size} needs {size} pairs; {len(pairs)} given")
        batch = list(pairs[:size])
        hardware.reset_peak_memory()
        before = current_memory_bytes()
        try:
            raw, served = time_batch(scorer, batch, repeats, device, batch_limit_s)
        except torch.cuda.OutOfMemoryError:
            log.warning("batch %d: out of device memory; sweep stops", size)
            torch.cuda.empty_cache()
            break
        peak = hardware.peak_memory_bytes()
        raw_s, served_s = statistics.median(raw), statistics.median(served)
        per_pair = (peak - before) / size if peak is not None and before is not None and peak > before else None
        row = SweepRow(size, raw_s * 1e3, served_s * 1e3, size / raw_s, size / served_s, peak, per_pair)
        rows.append(row)
        log.info(
            "batch %5d: raw %8.1f ms %9.1f pairs/s | scorer %8.1f ms %9.1f pairs/s | peak %s",
            size,
            row.raw_ms,
            row.raw_pairs_per_s,
            row.scorer_ms,
            row.scorer_pairs_per_s,
            mib(peak),
        )
        if peak is not None and peak > budget_bytes:
            log.info("batch %d peaked at %s, past the %s budget; sweep stops", size, mib(peak), mib(budget_bytes))
            break
        if batch_limit_s is not None and served_s > batch_limit_s:
            log.info("batch %d took %.1f s, past the %.1f s limit; sweep stops", size, served_s, batch_limit_s)
            break
    return rows


def pick_knee(rows: Sequence[SweepRow], budget_bytes: int | None) -> SweepRow:
    """The largest batch size before the next one gains < 5% scorer-path throughput or passes the budget.

    Rows are taken in batch-size order. When even the smallest passes the budget, it is still the answer.
    """
    if not rows:
        raise ValueError("no sweep rows to pick a knee from")
    ordered = sorted(rows, key=lambda r: r.batch_size)
    knee = ordered[0]
    for row in ordered[1:]:
        if budget_bytes is not None and row.peak_bytes is not None and row.peak_bytes > budget_bytes:
            break
        if row.scorer_pairs_per_s < knee.scorer_pairs_per_s * (1 + MIN_GAIN):
            break
        knee = row
    return knee


def why_knee(rows: Sequence[SweepRow], knee: SweepRow, budget_bytes: int | None) -> str:
    """Why the sweep's knee is where it is, in words."""
    ordered = sorted(rows, key=lambda r: r.batch_size)
    after = [r for r in ordered if r.batch_size > knee.batch_size]
    if budget_bytes is not None and knee.peak_bytes is not None and knee.peak_bytes > budget_bytes:
        return f"even the smallest batch passes the {mib(budget_bytes)} budget"
    if not after:
        return "the largest size measured (throughput still rising: try larger sizes)"
    following = after[0]
    if budget_bytes is not None and following.peak_bytes is not None and following.peak_bytes > budget_bytes:
        return f"{following.batch_size} peaks at {mib(following.peak_bytes)}, past the {mib(budget_bytes)} budget"
    gain = following.scorer_pairs_per_s / knee.scorer_pairs_per_s - 1
    return f"{following.batch_size} gains {gain:+.1%} pairs/s (< {MIN_GAIN:.0%})"


# --- the profile row ---------------------------------------------------------------------------------------------


CALIBRATED_HEADER = """\
# Written by `python -m serve_app.calibrate`: one row per (GPU kind, pool, model) measured on that device.
# Merged with the hand-written profiles beside it; a row here wins a tie with a row there. Edit by rerunning.
"""


def format_row(row: ProfileRow) -> str:
    """One row as flow-style YAML, unset fields left out."""
    fields = {k: v for k, v in asdict(row).items() if v is not None}
    return yaml.safe_dump(fields, default_flow_style=True, sort_keys=False, allow_unicode=True, width=1 << 16).strip()


def write_profile_row(path: Path, row: ProfileRow) -> str:
    """Put `row` into the calibrated rows file at `path`: replace the row of the same GPU kind, pool and model,
    else add it. Returns "replaced" or "added". The whole file is machine-written, so it is rewritten."""
    if row.model is None:
        raise ValueError("a calibrated row names its model")

    def same(other: ProfileRow) -> bool:
        return (other.gpu.lower(), other.pool, other.model) == (row.gpu.lower(), row.pool, row.model)

    rows = hardware.read_rows(path)
    done = "replaced" if any(same(r) for r in rows) else "added"
    rows = [r for r in rows if not same(r)] + [row]
    document = {"profiles": [{k: v for k, v in asdict(r).items() if v is not None} for r in rows]}
    text = CALIBRATED_HEADER + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1 << 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return done


def profile_row(pool: str, model: str, machine: Machine, knee: SweepRow, today: datetime.date) -> ProfileRow:
    peak = f"{knee.peak_bytes / 2**20:,.0f} MiB peak" if knee.peak_bytes is not None else "peak n/a"
    source = (
        f"calibrate {today.isoformat()}: {knee.scorer_pairs_per_s:,.0f} pairs/s at {knee.batch_size}, "
        f"{knee.scorer_ms:.1f} ms, {peak} on {machine.name}"
    )
    return ProfileRow(
        gpu=machine.gpu_kind,
        pool=pool,
        max_batch_size=knee.batch_size,
        batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S,
        dtype=machine.dtype,
        model=model,
        source=source,
    )


# --- reporting ---------------------------------------------------------------------------------------------------


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


def table(rows: Sequence[SweepRow], knee: SweepRow) -> str:
    head = (
        f"{'batch':>6} {'raw ms':>9} {'scorer ms':>10} {'raw pairs/s':>12} {'scorer pairs/s':>15} "
        f"{'scorer/raw':>11} {'peak MiB':>9} {'KiB/pair':>9}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r.peak_bytes / 2**20:,.0f}" if r.peak_bytes is not None else "n/a"
        per_pair = f"{r.bytes_per_pair / 1024:,.1f}" if r.bytes_per_pair is not None else "n/a"
        mark = "  <- knee" if r.batch_size == knee.batch_size else ""
        out.append(
            f"{r.batch_size:>6} {r.raw_ms:>9.1f} {r.scorer_ms:>10.1f} {r.raw_pairs_per_s:>12,.1f} "
            f"{r.scorer_pairs_per_s:>15,.1f} {r.ratio:>11.2f} {peak:>9} {per_pair:>9}{mark}"
        )
    return "\n".join(out)


def plot(rows: Sequence[SweepRow], knee: SweepRow, path: Path, title: str = "") -> None:
    """Throughput (raw, scorer) and peak memory against batch size, log2 x, the knee marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    sizes = [r.batch_size for r in rows]
    fig, left = plt.subplots(figsize=(8, 5))
    try:
        left.plot(sizes, [r.raw_pairs_per_s for r in rows], "o-", label="raw forward pairs/s")
        left.plot(sizes, [r.scorer_pairs_per_s for r in rows], "s-", label="scorer path pairs/s")
        left.set_xscale("log", base=2)
        left.set_xticks(sizes, [str(s) for s in sizes])
        left.set_xlabel("batch size (pairs)")
        left.set_ylabel("pairs/s")
        left.axvline(knee.batch_size, color="grey", linestyle="--", label=f"knee {knee.batch_size}")
        left.grid(True, alpha=0.3)
        right = left.twinx()
        memory = [(r.batch_size, r.peak_bytes / 2**20) for r in rows if r.peak_bytes is not None]
        if memory:
            right.plot(*zip(*memory), "^:", color="tab:red", label="peak MiB")
        right.set_ylabel("peak memory (MiB)")
        handles = left.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        left.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize="small")
        left.set_title(title, fontsize="small")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


# --- the command -------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("batch sizes are positive integers, e.g. 1,2,4,8")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve_app.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", choices=MODALITIES, required=True)
    parser.add_argument("--model", help="model id or directory (default: the pool's model in Settings)")
    parser.add_argument("--batch-sizes", type=parse_sizes, help="comma list (default: 1..1024 GPU, 1..64 CPU)")
    parser.add_argument("--tokens", type=int, default=128, help="text tokens per pair (default 128)")
    parser.add_argument("--repeats", type=int, help="timed runs per size (default 5 GPU, 3 CPU)")
    parser.add_argument("--budget-gib", type=float, help="memory budget (default 80%% of the GPU, 50%% of free RAM)")
    parser.add_argument(
        "--profiles",
        type=Path,
        help="the hand-written profiles (default: setting batch_profiles_path); the row goes beside it, "
        "into <name>.calibrated.yaml",
    )
    parser.add_argument("--plot", type=Path, help="PNG (default bench/results/calibrate-<pool>-<gpu>.png)")
    parser.add_argument("--json", type=Path, help="sweep as JSON (default: the plot's name, .json)")
    parser.add_argument("--dry-run", action="store_true", help="measure and report, but leave the YAML alone")
    args = parser.parse_args(argv)
    if args.tokens < 4:
        parser.error("--tokens must be at least 4")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def warn_if_shared_cpu(on_gpu: bool) -> None:
    if not on_gpu and hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) * 0.5:
        log.warning(
            "load average %.1f on %d cores: other work shares the CPU, timings will be noisy",
            os.getloadavg()[0],
            os.cpu_count() or 1,
        )


def print_summary(pool: str, model: str, machine, tokens: int, rows: list[SweepRow], knee: SweepRow, budget: int):
    print(f"{pool} pool: {model} on {machine.name} ({machine.device}, {machine.dtype}), {tokens} tokens/pair")
    print(table(rows, knee))
    print(f"knee: {knee.batch_size} pairs/batch ({why_knee(rows, knee, budget)}; budget {mib(budget)})")
    print(
        f"served (scorer) path at the knee: {knee.ratio:.2f}x the raw forward "
        f"({knee.scorer_pairs_per_s:,.1f} vs {knee.raw_pairs_per_s:,.1f} pairs/s)"
    )


def output_paths(args: argparse.Namespace, gpu_kind: str) -> tuple[Path, Path]:
    """Where the plot and the sweep's JSON go: where --plot and --json say; else bench/results/calibrate-<pool>-<gpu>,
    or, for a dry run, a new temporary directory (a dry run writes nothing into the repository unless told where)."""
    if args.plot is None:
        folder = Path(tempfile.mkdtemp(prefix="calibrate-")) if args.dry_run else RESULTS_DIR
        plot_path = folder / f"calibrate-{args.pool}-{gpu_kind}.png"
    else:
        plot_path = args.plot
    return plot_path, args.json or plot_path.with_suffix(".json")


def sweep_report(args, model: str, machine, loaded, rows: list[SweepRow], knee: SweepRow, budget: int) -> dict:
    """The sweep as JSON: the machine, how the scorer was loaded (the same options a replica of this pool reports
    in /v1/models), the knee and its profile row, every row."""
    return {
        "pool": args.pool,
        "model": model,
        "device": machine.device,
        "device_name": machine.name,
        "gpu_kind": machine.gpu_kind,
        "dtype": machine.dtype,
        "load_options": loaded.scorer.options.describe(),
        "profile": asdict(loaded.profile),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "budget_bytes": budget,
        "knee": knee.batch_size,
        "knee_reason": why_knee(rows, knee, budget),
        "profile_row": asdict(profile_row(args.pool, model, machine, knee, datetime.date.today())),
        "rows": [dict(asdict(r), ratio=r.ratio) for r in rows],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    pool_settings = settings.default_model(args.pool)
    if args.model:
        pool_settings = pool_settings.model_copy(update={"model": args.model})
    model = pool_settings.model
    profiles_path = args.profiles or settings.batch_profiles_path
    calibrated = hardware.calibrated_path(profiles_path)
    profile_rows = hardware.load_profile_rows(profiles_path)
    # The replica's own loading path; its warm-up is the sweep's first batch.
    loaded = pools.load_pool(args.pool, pool_settings, profile_rows, settings.model_cache_dir, warm_up=False)
    machine = this_machine(loaded)
    on_gpu = machine.device.startswith("cuda")
    sizes = args.batch_sizes or [2**i for i in range(11 if on_gpu else 7)]
    args.repeats = args.repeats or (5 if on_gpu else 3)
    budget = int(args.budget_gib * 2**30) if args.budget_gib else default_budget_bytes(machine.device)
    log.info("calibrating %s pool: %s on %s (%s, %s)", args.pool, model, machine.name, machine.device, machine.dtype)
    pairs = synthetic_pairs(args.pool, loaded.scorer, max(sizes), args.tokens)
    log.info("sizes %s, %d repeats, budget %s", sizes, args.repeats, mib(budget))
    warn_if_shared_cpu(on_gpu)
    rows = sweep(
        loaded.scorer, pairs, sizes, args.repeats, machine.device, budget, None if on_gpu else CPU_BATCH_LIMIT_S
    )
    if not rows:
        log.error("no batch size could be measured")
        return 1
    knee = pick_knee(rows, budget)
    print_summary(args.pool, model, machine, args.tokens, rows, knee, budget)

    plot_path, json_path = output_paths(args, machine.gpu_kind)
    plot(rows, knee, plot_path, f"{args.pool}: {model} on {machine.name}, {machine.dtype}, knee {knee.batch_size}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    report = sweep_report(args, model, machine, loaded, rows, knee, budget)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"plot: {plot_path}\njson: {json_path}")
    row = profile_row(args.pool, model, machine, knee, datetime.date.today())
    if args.dry_run:
        print(f"dry run, {calibrated} left alone; the row would be:\n  {format_row(row)}")
    else:
        done = write_profile_row(calibrated, row)
        print(f"{done} in {calibrated}:\n  {format_row(row)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
