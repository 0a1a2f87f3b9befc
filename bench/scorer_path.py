"""Where a replica's batch time goes: our scorer's prepare and forward per batch against the raw forward.

    python -m bench.scorer_path [--requests-file F] [--family cross_encoder] [--per-batch 2,20]

One process, no Serve: the scorer is loaded and warmed as a replica loads it on this device (shape
buckets and bf16 on a GPU, every warmed shape run once, forward cost measured), then batches of
`per-batch` requests are prepared and scored one after the other. Prints per-batch prepare and forward
times, forwards per batch and padding, beside the raw forward pass over the same requests.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from bench import dataset
from bench.compare import prepare_models
from bench.inprocess import SYSTEMS, Forwards
from serve_app import hardware, pools
from serve_app.scoring.types import Content, Pair
from serve_app.settings import Settings, TextPoolSettings

log = logging.getLogger("bench.scorer_path")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-file", type=Path, help="written by bench.compare --dump-requests")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--family", choices=["cross_encoder", "embedding"], default="cross_encoder")
    parser.add_argument("--per-batch", default="2,20", help="requests per batch, comma-separated")
    parser.add_argument("--cap", type=int, default=512, help="the batch cap the warm-up covers")
    parser.add_argument("--embedding-dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    if args.requests_file:
        saved = json.loads(args.requests_file.read_text())["requests"][: args.requests]
    else:
        saved = [r.__dict__ for r in dataset.load_requests(args.requests, seed=0, max_documents=40)]
    model = str(prepare_models(Path("bench/.cache"), args.embedding_dir)[args.family])
    pairs_total = sum(len(r["documents"]) for r in saved)

    raw = SYSTEMS[("raw", args.family)](model, device, dtype)
    for size in (64, 256):
        raw(saved, size, Forwards())
        sync(device)
        start = time.perf_counter()
        raw(saved, size, Forwards())
        sync(device)
        log.info("raw forward, batch %d: %.0f pairs/s", size, pairs_total / (time.perf_counter() - start))

    # Loaded as a text replica loads it: warm-up, then the measured forward cost.
    start = time.perf_counter()
    pool_settings = TextPoolSettings(
        model=model, max_batch_size=args.cap, dtype="bfloat16" if device != "cpu" else "auto"
    )
    settings = Settings()
    rows = hardware.load_profile_rows(settings.batch_profiles_path)
    scorer = pools.load_pool("text", pool_settings, rows, settings.model_cache_dir).scorer
    sync(device)
    log.info("load, warm-up and forward cost %.1f s: %s", time.perf_counter() - start, scorer.options.describe())
    for per_batch in [int(n) for n in args.per_batch.split(",")]:
        for attempt in ("first", "again"):
            prepare_ms, forward_ms, forwards, real, padded = [], [], 0, 0, 0
            for i in range(0, len(saved), per_batch):
                pairs = [
                    Pair(Content(r["query"]), Content(d)) for r in saved[i : i + per_batch] for d in r["documents"]
                ]
                t0 = time.perf_counter()
                prepared = scorer.prepare(pairs)
                t1 = time.perf_counter()
                scorer.forward(prepared)
                sync(device)
                t2 = time.perf_counter()
                prepare_ms.append((t1 - t0) * 1000)
                forward_ms.append((t2 - t1) * 1000)
                tokens = scorer.tokens(prepared)
                real, padded = real + tokens.real, padded + tokens.padded
                forwards += len(prepared[1]) if isinstance(prepared, tuple) else len(prepared.groups)
            batches = len(prepare_ms)
            log.info(
                "%d requests/batch (%s): %.0f pairs/s; prepare p50 %.1f ms, forward p50 %.1f ms (max %.1f), "
                "%.1f forwards/batch, padding %.2f",
                per_batch, attempt, pairs_total / (sum(prepare_ms) + sum(forward_ms)) * 1000,
                statistics.median(prepare_ms), statistics.median(forward_ms), max(forward_ms), forwards / batches,
                padded / real - 1,
            )  # fmt: skip


if __name__ == "__main__":
    main()
