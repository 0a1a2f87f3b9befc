"""Admission by estimated wait: the same burst with admission off (504s after the deadline) and on (fast 503s).

    .venv/bin/python -m bench.admission [--requests 48] [--concurrency 32] [--readme]

What `make run` serves (the default text model, the embedding all-MiniLM-L6-v2 with its packaged weights, every
core as torch threads, no image pool), on a local Ray, over HTTP. The benchmark's requests (bench/dataset.py,
5-40 passages each) are sent by `--concurrency` clients at once, three times:

1. admission off (`admission_wait_fraction: null`): every request queues, those that cannot finish by the 30 s
   deadline answer 504 after waiting for it;
2. admission on (the default admission_wait_fraction): a request the pool cannot score in time is refused at
   once (503 + Retry-After);
3. admission on, clients that honour Retry-After and try again, for up to PATIENCE_S after their first try (as
   long as a client of the first phase waits for its 504).

Writes bench/results/admission-<date>-<host>.json and prints the table; `--readme` renders it into
docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402

from bench import dataset  # noqa: E402
from bench import readme as readme_block  # noqa: E402
from serve_app import pages  # noqa: E402
from serve_app.ports import free_port  # noqa: E402
from serve_app.stats import percentile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README_MARK = "bench:admission"
from serve_app.settings import Settings  # noqa: E402

ON = Settings.model_fields["admission_wait_fraction"].default
PHASES = (
    ("off", None, False),
    ("on", ON, False),
    ("on + retries", ON, True),
)
PATIENCE_S = 30.0  # the service's request_timeout_s


async def burst(url: str, requests: list[dict], concurrency: int, retry: bool) -> list[dict]:
    """Every request once (or until it is answered, honouring Retry-After): one record per request."""
    queue = list(enumerate(requests))
    records: list[dict] = []
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker() -> None:
            while queue:
                i, request = queue.pop(0)
                began = time.perf_counter()
                tries, waited = 0, 0.0
                while True:
                    tries += 1
                    sent = time.perf_counter()
                    response = await client.post(f"{url}/v2/rerank", json=request)
                    took = time.perf_counter() - sent
                    after = response.headers.get("retry-after")
                    patient = time.perf_counter() - began + float(after or 0) < PATIENCE_S
                    if response.status_code == 503 and retry and after and patient:
                        waited += float(after)
                        await asyncio.sleep(float(after))
                        continue
                    break
                records.append(
                    {
                        "request": i,
                        "status": response.status_code,
                        "pairs": len(request["documents"]),
                        "last_sent_at_s": round(sent - start, 3),
                        "last_answer_s": round(took, 3),
                        "total_s": round(time.perf_counter() - began, 3),
                        "tries": tries,
                        "retry_after": None if after is None else float(after),
                    }
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(records, key=lambda r: r["request"])


def summary(name: str, fraction: float | None, retry: bool, records: list[dict], wall_s: float, stats: dict) -> dict:
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    answered = [r for r in records if r["status"] == 200]
    refused = [r for r in records if r["status"] == 503]
    late = [r for r in records if r["status"] == 504]
    return {
        "phase": name,
        "admission_wait_fraction": fraction,
        "retries": retry,
        "requests": len(records),
        "statuses": statuses,
        "pairs_answered": sum(r["pairs"] for r in answered),
        "wall_s": round(wall_s, 2),
        "answered_pairs_per_s": round(sum(r["pairs"] for r in answered) / wall_s, 2),
        "latency_200_p50_s": percentile([r["total_s"] for r in answered], 0.5),
        "latency_200_p95_s": percentile([r["total_s"] for r in answered], 0.95),
        "answer_503_max_s": max((r["last_answer_s"] for r in refused), default=None),
        "answer_503_p50_s": percentile([r["last_answer_s"] for r in refused], 0.5),
        "answer_504_min_s": min((r["last_answer_s"] for r in late), default=None),
        "retry_after_s": sorted({r["retry_after"] for r in refused if r["retry_after"] is not None}),
        "tries_max": max((r["tries"] for r in records), default=0),
        "pool": stats,
        "records": records,
    }


def run(requests: int, concurrency: int) -> dict:
    import ray
    from ray import serve

    from serve_app.app import build_app

    bench_requests = dataset.load_requests(requests, seed=0)
    bodies = [{"query": r.query, "documents": r.documents} for r in bench_requests]
    port = free_port()
    ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    phases = []
    try:
        for name, fraction, retry in PHASES:
            args = {
                "text": {"torch_threads": os.cpu_count() or 1},
                "image_text": {"enabled": False},
                "admission_wait_fraction": fraction,
                "log_level": "WARNING",
            }
            serve.run(build_app(args), name="admission", route_prefix="/admission")
            url = f"http://127.0.0.1:{port}/admission"
            for body in bodies[:4]:  # warm-up, and the replica's first rate measurements
                httpx.post(f"{url}/v2/rerank", json=body, timeout=120).raise_for_status()
            started = time.perf_counter()
            records = asyncio.run(burst(url, bodies, concurrency, retry))
            wall = time.perf_counter() - started
            pool = httpx.get(f"{url}/v1/stats", timeout=60).json()["pools"]["text"][0]
            keys = ("pairs_per_s_under_load", "tokens_per_s_under_load", "refused_calls", "pairs", "batches")
            stats = {k: pool.get(k) for k in keys}
            stats["ingress_refused"] = httpx.get(f"{url}/v1/stats", timeout=60).json().get("ingress_refused")
            phases.append(summary(name, fraction, retry, records, wall, stats))
            print(table(phases), flush=True)
            serve.delete("admission")
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "date": datetime.date.today().isoformat(),
        "command": f"python -m bench.admission --requests {requests} --concurrency {concurrency}",
        "machine": {"host": platform.node(), "cores": os.cpu_count(), "python": platform.python_version()},
        "model": "sentence-transformers/all-MiniLM-L6-v2 (real weights, packaged), the default text model",
        "requests": requests,
        "pairs": sum(len(b["documents"]) for b in bodies),
        "concurrency": concurrency,
        "request_timeout_s": 30.0,
        "retry_patience_s": PATIENCE_S,
        "phases": phases,
    }


def retry_afters(values: list[float]) -> str | None:
    """The Retry-After values seen: a list, or their range where there are many."""
    if len(values) > 5:
        return f"{min(values):g} to {max(values):g} ({len(values)} values)"
    return ", ".join(f"{s:g}" for s in values) or None


def table(phases: list[dict]) -> str:
    head = (
        "| admission | statuses | answered pairs | x off | answered pairs/s | 200 p50 s | 200 p95 s | 503 p50 s | "
        "slowest 503 s | fastest 504 s | Retry-After s | most tries |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    off = next((p["pairs_answered"] for p in phases if p["admission_wait_fraction"] is None), None)
    rows = []
    for p in phases:
        cells = [
            p["phase"],
            ", ".join(f"{k}: {v}" for k, v in sorted(p["statuses"].items())),
            p["pairs_answered"],
            f"{p['pairs_answered'] / off:.2f}" if off else None,
            p["answered_pairs_per_s"],
            p["latency_200_p50_s"],
            p["latency_200_p95_s"],
            p.get("answer_503_p50_s"),
            p["answer_503_max_s"],
            p["answer_504_min_s"],
            retry_afters(p["retry_after_s"]),
            p["tries_max"],
        ]
        rows.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join([head, *rows])


def rendered_block(result_path: Path) -> str:
    """The docs block of this result (docs/operations.md, `<!-- bench:admission -->`)."""
    result = json.loads(result_path.read_text())
    caption = (
        f"{result['requests']} requests ({result['pairs']} pairs) from {result['concurrency']} clients at once, "
        f"{result['model']}, {result['machine']['cores']} cores, deadline {result['request_timeout_s']:g} s, "
        f"retries for up to {result.get('retry_patience_s', 30):g} s "
        f"(`{result['command']}`, {result['date']}, `{readme_block.relative(result_path)}`):"
    )
    return f"{caption}\n\n{table(result['phases'])}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--readme", type=Path, help="only render this result file into its docs block")
    args = parser.parse_args(argv)
    if args.readme:
        pages.render(README_MARK, rendered_block(args.readme.resolve()))
        return
    result = run(args.requests, args.concurrency)
    readme_block.save(result, args.out, "admission", lambda r: table(r["phases"]))


if __name__ == "__main__":
    main()
