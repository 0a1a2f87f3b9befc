"""Tokenizing that scales out: pairs/s of the ingress's tokenizing in 1..N processes, and what it saves the pool.

    .venv/bin/python -m bench.tokenize [--seconds 5] [--readme]

The default text model's tokenizer (all-MiniLM-L6-v2, packaged), the benchmark's requests (bench/dataset.py).
(1) Scale-out: N worker processes, each as one ingress replica would (one request at a time, the Rust tokenizer
held to one thread with RAYON_NUM_THREADS=1), tokenize requests for `--seconds`; pairs/s for N = 1 .. cores,
and the ratio to N = 1. (2) The pool's share: a pool replica's `prepare` (tokenize + pad into batches) on text
pairs against the same pairs arriving as token ids (pad only), per pair, measured side by side.
Writes bench/results/tokenize-<date>-<host>.json and prints the table; `--readme` renders it into
bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import dataset  # noqa: E402
from bench import readme as readme_block  # noqa: E402
from serve_app import pages  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README_MARK = "bench:tokenize"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def worker(spec, bodies: list[dict], seconds: float, start_at: float, out) -> None:
    """One ingress's tokenizing: whole requests, one at a time, until the time is up."""
    from serve_app.scoring.text import TextEncoder
    from serve_app.scoring.types import Content, Pair

    encoder = TextEncoder(spec)
    requests = [[Pair(Content(text=b["query"]), Content(text=d)) for d in b["documents"]] for b in bodies]
    encoder.prepare(requests[0], True, 64)  # warm
    while time.time() < start_at:
        time.sleep(0.001)
    pairs, i = 0, 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        request = requests[i % len(requests)]
        encoder.prepare(request, True, 64)
        pairs += len(request)
        i += 1
    out.put(pairs)


def scale_out(spec, bodies: list[dict], processes: int, seconds: float) -> float:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 3.0  # every process has imported and warmed by then
    procs = [context.Process(target=worker, args=(spec, bodies, seconds, start_at, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def pool_share(scorer, spec, bodies: list[dict], rounds: int = 5) -> dict:
    """ms per pair of the pool replica's prepare: text pairs (it tokenizes) vs EncodedPairs (it pads)."""
    from serve_app.scoring.text import TextEncoder
    from serve_app.scoring.types import Content, Pair

    encoder = TextEncoder(spec)
    requests = [[Pair(Content(text=b["query"]), Content(text=d)) for d in b["documents"]] for b in bodies]
    encoded = [encoder.prepare(r, True, None)[1] for r in requests]
    pairs = sum(len(r) for r in requests)
    text_ms, ids_ms = [], []
    for _ in range(rounds):  # alternated, so both see the same machine
        start = time.perf_counter()
        for r in requests:
            scorer.prepare(r)
        text_ms.append((time.perf_counter() - start) * 1000 / pairs)
        start = time.perf_counter()
        for e in encoded:
            scorer.prepare(e)
        ids_ms.append((time.perf_counter() - start) * 1000 / pairs)
    text, ids = statistics.median(text_ms), statistics.median(ids_ms)
    return {
        "prepare_text_ms_per_pair": round(text, 4),
        "prepare_ids_ms_per_pair": round(ids, 4),
        "ratio_ids_to_text": round(ids / text, 3),
        "rounds": rounds,
    }


def run(seconds: float, requests: int) -> dict:
    from serve_app.scoring.family import LoadOptions
    from serve_app.scoring.loading import load_scorer

    scorer = load_scorer(MODEL, LoadOptions())
    spec = scorer.tokenizer_spec()
    bodies = [{"query": r.query, "documents": r.documents} for r in dataset.load_requests(requests, seed=0)]
    os.environ["RAYON_NUM_THREADS"] = "1"  # inherited by the spawned workers: one thread each
    cores = os.cpu_count() or 1
    rows = []
    for n in range(1, cores + 1):
        rate = scale_out(spec, bodies, n, seconds)
        rows.append({"processes": n, "pairs_per_s": round(rate, 1)})
        print(f"{n} process(es): {rate:.0f} pairs/s", flush=True)
    for row in rows:
        row["ratio_to_one"] = round(row["pairs_per_s"] / rows[0]["pairs_per_s"], 3)
    return {
        "date": datetime.date.today().isoformat(),
        "command": f"python -m bench.tokenize --seconds {seconds:g}",
        "machine": {"host": platform.node(), "cores": cores, "python": platform.python_version()},
        "model": f"{MODEL} tokenizer; windows of long documents cut (stride 64)",
        "requests": len(bodies),
        "pairs": sum(len(b["documents"]) for b in bodies),
        "scale_out": rows,
        "pool_prepare": pool_share(scorer, spec, bodies),
    }


def table(result: dict) -> str:
    lines = ["| tokenizing processes | pairs/s | ratio to 1 |", "|---|---|---|"]
    lines += [f"| {r['processes']} | {r['pairs_per_s']} | {r['ratio_to_one']} |" for r in result["scale_out"]]
    share = result["pool_prepare"]
    lines += [
        "",
        "| pool replica's prepare | ms per pair |",
        "|---|---|",
        f"| text pairs (tokenize + pad), tokenize_in=pool | {share['prepare_text_ms_per_pair']} |",
        f"| token ids (pad only), tokenize_in=ingress | {share['prepare_ids_ms_per_pair']} |",
        f"| ratio | {share['ratio_ids_to_text']} |",
    ]
    return "\n".join(lines)


def rendered_block(result_path: Path) -> str:
    """The docs block of this result (bench/README.md, `<!-- bench:tokenize -->`)."""
    result = json.loads(result_path.read_text())
    caption = (
        f"{result['model']}; {result['requests']} requests ({result['pairs']} pairs); {result['machine']['cores']} "
        f"cores (`{result['command']}`, {result['date']}, `{readme_block.relative(result_path)}`):"
    )
    return f"{caption}\n\n{table(result)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--readme", type=Path, help="only render this result file into its docs block")
    args = parser.parse_args(argv)
    if args.readme:
        pages.render(README_MARK, rendered_block(args.readme.resolve()))
        return
    result = run(args.seconds, args.requests)
    readme_block.save(result, args.out, "tokenize", table)


if __name__ == "__main__":
    main()
