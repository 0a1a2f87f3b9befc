"""Two models sharing one multiplexed replica against each on a replica of its own, and what a first request for
a model that is not loaded yet costs.

    python -m bench.multiplex [--seconds 20] [--rounds 2] [--clients 4] [--documents 16] [--readme]

Starts a local Ray and Serve and deploys one application serving a MiniLM-L6-sized cross-encoder (random weights,
ms-marco-MiniLM-L-6-v2's config: costs what the real one costs) and all-MiniLM-L6-v2 (real weights, from its
package) twice each: in pools of their own (`own-ce`, `own-emb`) and in the shared pool (`ce`, `emb`, plus
`ce-copy`, a third name for the cross-encoder, so that a limit of two models per replica forces loads). Every
replica gets the same CPU share and torch threads. Each round runs closed-loop clients for --seconds against
each placement in turn, in alternating order: own-ce alone, own-emb alone, and ce + emb together on the one
shared replica (half the clients each). Then it asks for models in an order that always names the one least
recently used, so that each request waits for a load (evicting another), and times that request against the
same request once the model is loaded. Writes bench/results/multiplex-<device>.json; --readme renders the
lines in docs/api.md from it.
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

log = logging.getLogger("bench.multiplex")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README_MARK = "bench:multiplex"
APP = "multiplex"


def app_args(models: dict[str, Path], threads: int) -> dict:
    """Every replica alike: one CPU, `threads` torch threads, the profile's batch cap."""
    replica = {"num_cpus": 1, "torch_threads": threads}
    ce, emb = str(models["cross_encoder"]), str(models["embedding"])
    return {
        "text": {"enabled": False},
        "image_text": {"enabled": False},
        "models": [
            {"name": "own-ce", "model": ce, **replica},
            {"name": "own-emb", "model": emb, **replica},
            {"name": "ce", "model": ce, "placement": "shared"},
            {"name": "emb", "model": emb, "placement": "shared"},
            {"name": "ce-copy", "model": ce, "placement": "shared"},
        ],
        # Evicted at once: the load figure is a first request that loads, not a refusal to evict a busy model.
        "shared_pool": {"max_models_per_replica": 2, "keep_resident_s": None, **replica},
        "request_timeout_s": 120,
    }


class Clients:
    """Closed-loop clients, each sending one model's requests back to back; pairs scored per second."""

    def __init__(self, url: str, bodies: list[dict], clients: int) -> None:
        self.url = url
        self.bodies = bodies
        self.clients = clients

    def run(self, models: list[str], seconds: float) -> dict:
        done = {model: 0 for model in models}
        failed = []
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def client(i: int) -> None:
            model = models[i % len(models)]
            with httpx.Client(base_url=self.url, timeout=180) as http:
                j = i
                while time.monotonic() < stop:
                    body = {**self.bodies[j % len(self.bodies)], "model": model}
                    j += 1
                    response = http.post("/v2/rerank", json=body)
                    with lock:
                        if response.status_code == 200:
                            done[model] += len(body["documents"])
                        else:
                            failed.append(response.status_code)

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        return {"pairs_per_s": sum(done.values()) / elapsed, "by_model": {m: n / elapsed for m, n in done.items()},
                "failed": failed}  # fmt: skip


def timed(http: httpx.Client, body: dict) -> float:
    start = time.perf_counter()
    response = http.post("/v2/rerank", json=body)
    response.raise_for_status()
    return time.perf_counter() - start


def held(http: httpx.Client) -> tuple[list[str], int]:
    """The models the (one) shared replica holds, and how many loads it has made."""
    (replica,) = http.get("/v1/models").json()["pools"]["shared"]["replicas"]
    return [m["name"] for m in replica["loaded"]], replica["loads"]


def cold_and_warm(url: str, body: dict, loads: int) -> dict:
    """Each step names a shared model the replica does not hold (so its request waits for the load, evicting the
    least recently used); the same request again, now loaded, is the warm figure. A step that made no load is
    an error, not a figure."""
    cold, warm = [], []
    with httpx.Client(base_url=url, timeout=300) as http:
        for _ in range(loads):
            holding, before = held(http)
            model = next(m for m in ("ce", "emb", "ce-copy") if m not in holding)
            cold.append(timed(http, {**body, "model": model}))
            if held(http)[1] != before + 1:
                raise RuntimeError(f"the request for {model} made no load: the first-request figure would be wrong")
            warm.append(min(timed(http, {**body, "model": model}) for _ in range(3)))
            log.info("%s: first request %.2f s, loaded %.3f s", model, cold[-1], warm[-1])
    return {"first_request_s": cold, "loaded_request_s": warm}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every replica")
    parser.add_argument("--loads", type=int, default=6, help="first requests for a model not loaded")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--readme", action="store_true", help="render the docs' lines from bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.readme:
        render_readme()
        return

    import ray
    from ray import serve

    from bench.compare import prepare_models
    from serve_app.app import build_app

    args.cache.mkdir(parents=True, exist_ok=True)
    models = prepare_models(args.cache)
    requests = dataset.load_requests(16, seed=5, min_documents=args.documents, max_documents=args.documents)
    bodies = [{"query": r.query, "documents": r.documents} for r in requests]
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/{APP}"
    try:
        serve.run(build_app(app_args(models, args.threads)), name=APP, route_prefix=f"/{APP}")
        clients = Clients(url, bodies, args.clients)
        # Warm: every own pool once, and ce + emb loaded on the shared replica.
        with httpx.Client(base_url=url, timeout=300) as http:
            for model in ("own-ce", "own-emb", "ce", "emb"):
                log.info("warm-up %s: %.2f s", model, timed(http, {**bodies[0], "model": model}))
        phases = {"own-ce": ["own-ce"], "own-emb": ["own-emb"], "shared": ["ce", "emb"]}
        runs: dict[str, list[dict]] = {name: [] for name in phases}
        for round_ in range(args.rounds):
            order = list(phases) if round_ % 2 == 0 else list(reversed(phases))
            for name in order:
                runs[name].append(clients.run(phases[name], args.seconds))
                log.info("round %d %s: %.1f pairs/s", round_, name, runs[name][-1]["pairs_per_s"])
        loads = cold_and_warm(url, bodies[1], args.loads)
        with httpx.Client(base_url=url, timeout=60) as http:
            (shared,) = http.get("/v1/models").json()["pools"]["shared"]["replicas"]
    finally:
        serve.shutdown()
        ray.shutdown()

    median = {name: statistics.median(r["pairs_per_s"] for r in rs) for name, rs in runs.items()}
    shared_by_model = {
        model: statistics.median(r["by_model"][model] for r in runs["shared"]) for model in phases["shared"]
    }
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m bench.multiplex", *(sys.argv[1:] if argv is None else argv)]),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"{args.threads} torch thread(s) per replica",
        "models": {
            "ce": "MiniLM-L6-sized cross-encoder, random weights (ms-marco-MiniLM-L-6-v2's config; cost as real)",
            "emb": "all-MiniLM-L6-v2, real weights (embedding family)",
        },
        "clients": args.clients,
        "documents_per_request": args.documents,
        "seconds_per_phase": args.seconds,
        "rounds": args.rounds,
        "runs": runs,
        "median_pairs_per_s": median,
        "shared_pairs_per_s_by_model": shared_by_model,
        # The shared replica's rate over the mean of the two own replicas' rates (each alone on the machine).
        "shared_over_own_mean": median["shared"] / statistics.mean([median["own-ce"], median["own-emb"]]),
        "failed": sum(len(r["failed"]) for rs in runs.values() for r in rs),
        "first_request_s": loads["first_request_s"],
        "loaded_request_s": loads["loaded_request_s"],
        "median_first_request_s": statistics.median(loads["first_request_s"]),
        "median_loaded_request_s": statistics.median(loads["loaded_request_s"]),
        "shared_replica": {key: shared[key] for key in ("loads", "evictions", "max_models_per_replica")},
    }
    out = args.out or RESULTS / "multiplex-cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    shown = ("median_pairs_per_s", "shared_over_own_mean", "median_first_request_s", "median_loaded_request_s")
    print(json.dumps({k: result[k] for k in shown}, indent=2))
    print(f"wrote {out}")


def render_lines(path: Path) -> str:
    r = json.loads(path.read_text())
    m = r["median_pairs_per_s"]
    by = r["shared_pairs_per_s_by_model"]
    return (
        f"Measured on {r['device']}, {r['documents_per_request']} documents per request, {r['clients']} "
        f"closed-loop clients, median of {r['rounds']} rounds of {r['seconds_per_phase']:g} s "
        f"(`{r['command']}`, `{path.relative_to(ROOT)}`). The cross-encoder is MiniLM-L6-sized with random weights "
        "(it costs what the real one costs); the embedding model is all-MiniLM-L6-v2 with its real weights:\n\n"
        "| placement | pairs/s |\n|---|---|\n"
        f"| cross-encoder on a replica of its own | {m['own-ce']:,.1f} |\n"
        f"| embedding model on a replica of its own | {m['own-emb']:,.1f} |\n"
        f"| both on one shared (multiplexed) replica | {m['shared']:,.1f} (cross-encoder {by['ce']:,.1f}, "
        f"embedding {by['emb']:,.1f}): {r['shared_over_own_mean']:.2f}x the mean of the two alone |\n\n"
        f"First request for a model the shared replica does not hold (load from disk, forward-cost probe, "
        f"eviction of the least recently used): median {r['median_first_request_s']:.2f} s over "
        f"{len(r['first_request_s'])} loads, against {r['median_loaded_request_s'] * 1000:.0f} ms for the same "
        "request once loaded.\n"
    )


def rendered_block() -> str:
    """The docs block (docs/api.md, `<!-- bench:multiplex -->`) from the committed result."""
    return render_lines(RESULTS / "multiplex-cpu.json")


def render_readme() -> None:
    pages.render(README_MARK, rendered_block())


if __name__ == "__main__":
    main()
