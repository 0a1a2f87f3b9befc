"""Bulk job throughput against the raw forward pass of the same model on the same cores.

    .venv/bin/python -m bench.bulk [--rows 150] [--documents 20]

Runs the raw forward (pairs tokenized once, then model forwards only, batches of the profile cap, one
torch thread) and the bulk job (Ray Data, one scoring actor of 1 CPU, so one torch thread) on the same
pairs, in one run: the same cores for the model on both sides. The job
runs twice, at N and 2N rows; the difference cancels Ray's and the actors' start-up, leaving the
steady-state rate. Prints both rates and their ratio; writes bench/results/bulk-<date>-<host>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from serve_app.scoring.loading import load_scorer
from serve_app.scoring.types import Content, Pair
from serve_app.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = (
    "the river city capital market history science music water energy light north south ancient modern "
    "language people government economy winter summer mountain island bridge station library museum"
).split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def make_rows(count: int, documents: int, seed: int) -> list[dict]:
    """Queries of 5-15 words, documents of 10-120 words: varied lengths, as retrieval hands them over."""
    rng = random.Random(seed)
    return [
        {
            "id": f"q{seed}-{i}",
            "query": sentence(rng, 5, 15),
            "documents": [sentence(rng, 10, 120) for _ in range(documents)],
        }
        for i in range(count)
    ]


def raw_forward_rate(rows: list[dict], model: str, batch: int) -> float:
    torch.set_num_threads(1)  # what a 1-CPU actor gets (Ray sets OMP_NUM_THREADS from num_cpus)
    scorer = load_scorer(model)
    pairs = [Pair(Content(r["query"]), Content(d)) for r in rows for d in r["documents"]]
    prepared = [scorer.prepare(pairs[i : i + batch]) for i in range(0, len(pairs), batch)]
    scorer.forward(prepared[0])  # warm
    start = time.perf_counter()
    for item in prepared:
        scorer.forward(item)
    return len(pairs) / (time.perf_counter() - start)


def bulk_seconds(rows: list[dict], workdir: Path, tag: str) -> float:
    """Wall time of a whole bulk run (Ray start included) in a fresh process."""
    source = workdir / f"{tag}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "serve_app.bulk", "--input", str(source), "--output", str(workdir / f"out-{tag}"),
               "--pool", "text", "--text-actors", "1", "--shard-rows", "10"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=150)
    parser.add_argument("--documents", type=int, default=20)
    args = parser.parse_args()
    settings = Settings()
    small, large = make_rows(args.rows, args.documents, 1), make_rows(2 * args.rows, args.documents, 2)
    extra_pairs = (len(large) - len(small)) * args.documents
    with tempfile.TemporaryDirectory() as tmp:
        t_small = bulk_seconds(small, Path(tmp), "small")
        t_large = bulk_seconds(large, Path(tmp), "large")
    bulk_rate = extra_pairs / (t_large - t_small)
    raw_rate = raw_forward_rate(large, settings.text.model, 32)
    result = {
        "date": datetime.date.today().isoformat(),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "model": settings.text.model,
        "pairs_small": len(small) * args.documents,
        "pairs_large": len(large) * args.documents,
        "bulk_wall_s": {"small": round(t_small, 2), "large": round(t_large, 2)},
        "bulk_steady_pairs_per_s": round(bulk_rate, 1),
        "raw_forward_pairs_per_s": round(raw_rate, 1),
        "ratio_bulk_to_raw": round(bulk_rate / raw_rate, 3),
    }
    print(f"raw forward ({result['torch_threads']} threads): {raw_rate:8.1f} pairs/s")
    print(f"bulk job, steady state:        {bulk_rate:8.1f} pairs/s   (wall {t_small:.1f} s / {t_large:.1f} s)")
    print(f"bulk / raw forward:            {bulk_rate / raw_rate:8.3f}   (goal >= 0.8)")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bulk-{result['date']}-{result['host']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
