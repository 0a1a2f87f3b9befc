"""The score cache (setting score_cache_entries) on a trace where half the pairs repeat, against the same trace
with the cache off, side by side in one run.

    python -m bench.cache [--requests 96] [--clients 4] [--documents 16] [--rounds 2] [--readme]

Starts a local Ray and Serve and deploys two applications that differ only in score_cache_entries (0 and 100,000),
each with the default text model (all-MiniLM-L6-v2, real weights, from its package) on one replica of one CPU.
The trace: requests drawn from bench/dataset.py, each followed by a request of the same query reranking the same
documents in another order (the repeats an agent or a RAG pipeline sends when it reranks again): half the pairs.
Each round sends the whole trace through closed-loop clients to each application in turn (alternating order),
each application's cache emptied by a fresh deploy; pairs/s, p50 and p95 latency, and the pairs the pool
computed (x-compute-pairs). Writes bench/results/cache-cpu.json; --readme renders the block in docs/operations.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402

from bench import dataset  # noqa: E402
from serve_app import pages  # noqa: E402
from serve_app.ports import free_port  # noqa: E402

log = logging.getLogger("bench.cache")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README_MARK = "bench:cache"
ENTRIES = 100_000


def app_args(entries: int) -> dict:
    return {
        "text": {"num_cpus": 1, "torch_threads": 1},
        "image_text": {"enabled": False},
        "score_cache_entries": entries,
        "request_timeout_s": 120,
    }


def trace(requests: int, documents: int, seed: int = 11) -> list[dict]:
    """Requests in pairs of the same query: the second reranks the first's documents again, in another order
    (an agent's second look, a RAG pipeline's retry), so half of the trace's pairs repeat an earlier one."""
    drawn = dataset.load_requests(requests // 2, seed=seed, min_documents=documents, max_documents=documents)
    bodies = []
    for r in drawn:
        bodies.append({"query": r.query, "documents": r.documents})
        bodies.append({"query": r.query, "documents": list(reversed(r.documents))})
    return bodies


def run_trace(url: str, bodies: list[dict], clients: int) -> dict:
    """The trace through `clients` closed-loop clients, each request once, in order (the second request of a
    query is sent after the first has been answered: a repeat only counts as one once it was computed)."""
    latencies, computed, failed = [], 0, []
    lock = threading.Lock()
    pairs = [(bodies[i], bodies[i + 1]) for i in range(0, len(bodies), 2)]
    next_pair = iter(range(len(pairs)))

    def client() -> None:
        nonlocal computed
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    k = next(next_pair, None)
                if k is None:
                    return
                for body in pairs[k]:
                    start = time.perf_counter()
                    response = http.post("/v2/rerank", json=body)
                    took = time.perf_counter() - start
                    with lock:
                        if response.status_code != 200:
                            failed.append(response.status_code)
                            continue
                        latencies.append(took)
                        computed += int(response.headers["x-compute-pairs"])

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    total = sum(len(b["documents"]) for b in bodies)
    latencies.sort()
    return {
        "pairs_per_s": total / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] * 1000,
        "pairs": total,
        "computed_pairs": computed,
        "failed": failed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--readme", action="store_true", help="render the docs' block from bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.readme:
        render_readme()
        return

    import ray
    from ray import serve

    from serve_app.app import build_app

    bodies = trace(args.requests, args.documents)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for round_ in range(args.rounds):
            order = ["off", "on"] if round_ % 2 == 0 else ["on", "off"]
            for name in order:
                # A fresh deploy (another round, another name): an empty cache, the model warmed by one request.
                app = f"cache-{name}-{round_}"
                serve.run(build_app(app_args(ENTRIES if name == "on" else 0)), name=app, route_prefix=f"/{app}")
                url = f"http://127.0.0.1:{port}/{app}"
                httpx.post(f"{url}/v2/rerank", json={"query": "warm", "documents": ["up"]}, timeout=300)
                runs[name].append(run_trace(url, bodies, args.clients))
                log.info("round %d cache %s: %s", round_, name, runs[name][-1])
                serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()

    median = {
        name: {key: statistics.median(r[key] for r in rs) for key in ("pairs_per_s", "p50_ms", "p95_ms")}
        for name, rs in runs.items()
    }
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m bench.cache", *(sys.argv[1:] if argv is None else argv)]),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), one text replica "
        "of one CPU and one torch thread",
        "model": "all-MiniLM-L6-v2, real weights (the default text model)",
        "requests": len(bodies),
        "documents_per_request": args.documents,
        "clients": args.clients,
        "rounds": args.rounds,
        "repeated_pair_fraction": sum(len(b["documents"]) for b in bodies[1::2])
        / sum(len(b["documents"]) for b in bodies),
        "runs": runs,
        "median": median,
        "speedup": median["on"]["pairs_per_s"] / median["off"]["pairs_per_s"],
        "failed": sum(len(r["failed"]) for rs in runs.values() for r in rs),
    }
    out = args.out or RESULTS / "cache-cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "speedup", "failed")}, indent=2))
    print(f"wrote {out}")


def render_lines(path: Path) -> str:
    r = json.loads(path.read_text())
    off, on = r["median"]["off"], r["median"]["on"]
    computed = {name: statistics.median(run["computed_pairs"] for run in runs) for name, runs in r["runs"].items()}
    return (
        f"Measured on {r['device']}, {r['requests']} requests of {r['documents_per_request']} documents from "
        f"{r['clients']} closed-loop clients, {r['repeated_pair_fraction']:.0%} of the pairs repeating an earlier "
        f"request's, median of {r['rounds']} rounds (`{r['command']}`, `{path.relative_to(ROOT)}`; {r['model']}):\n\n"
        "| score cache | pairs/s | p50 | p95 | pairs computed (windows included) |\n|---|---|---|---|---|\n"
        f"| off (`score_cache_entries: 0`) | {off['pairs_per_s']:,.1f} | {off['p50_ms']:,.0f} ms | "
        f"{off['p95_ms']:,.0f} ms | {computed['off']:,.0f} |\n"
        f"| on ({ENTRIES:,} entries) | {on['pairs_per_s']:,.1f} | {on['p50_ms']:,.0f} ms | {on['p95_ms']:,.0f} ms | "
        f"{computed['on']:,.0f} |\n\n"
        f"The cache: {r['speedup']:.2f}x the pairs/s.\n"
    )


def rendered_block(path: Path | None = None) -> str:
    """The docs block (docs/operations.md, `<!-- bench:cache -->`) from a result file (default: the committed one)."""
    return render_lines(path or RESULTS / "cache-cpu.json")


def render_readme() -> None:
    pages.render(README_MARK, rendered_block())


if __name__ == "__main__":
    main()
