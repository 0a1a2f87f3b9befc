"""A load spike against the text pool's autoscaling: replicas rise under load and fall back after it.

    .venv/bin/python -m bench.spike [--clients 32] [--load-s 20]

Starts a local Ray and Serve (or uses a running Serve proxy, `serve_url`), deploys its own application with a
tiny cross-encoder and a small autoscaling text pool (1-4 replicas, target 2 ongoing requests, short delays),
then runs closed-loop clients that ramp from 1 to N over the first half of the load period, hold, and stop.
Each second it records active clients, running text-pool replicas, finished requests, status counts, p50/p95
latency and throughput; after the load it samples until the pool is back to one replica (at most 60 s).
Every answer must be 200, or 503 with Retry-After; anything else is counted as lost. Writes
bench/results/spike-<date>-<host>.json and .png and prints a summary table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import socket
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402

from serve_app.ports import free_port  # noqa: E402
from serve_app.stats import percentile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POOL = "text_pool"
DOCUMENTS = 8
SETTLE_S = 60.0
WORDS = "the river city capital market history science music water energy light north south bridge".split()


def spike_args(model: str, max_replicas: int = 4) -> dict:
    """Settings of the benchmark's application: a tiny text pool that scales early, no image-text pool."""
    return {
        "text": {
            "model": model,
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": max_replicas,
                "target_ongoing_requests": 2,
                "upscale_delay_s": 1,
                "downscale_delay_s": 5,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 2,
            },
            "max_ongoing_requests": 4,
            "max_queued_requests": 16,
            "num_cpus": 0.5,
            "max_batch_size": 8,
        },
        "image_text": {"enabled": False},
        "ingress": {"max_ongoing_requests": 64},
    }


def replica_states(app_name: str) -> dict[str, int]:
    """The text pool's replicas by state (RUNNING, STARTING, STOPPING, ...)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or POOL not in app.deployments:
        return {}
    return {str(getattr(state, "value", state)): count for state, count in app.deployments[POOL].replica_states.items()}


def request_body(rng: random.Random) -> dict:
    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return {"query": words(4), "documents": [words(rng.randint(5, 12)) for _ in range(DOCUMENTS)]}


class Load:
    """Closed-loop clients: client i starts at i/(N-1) of the ramp, all stop at the end of the load."""

    def __init__(self, url: str, clients: int, load_s: float) -> None:
        self.url, self.clients, self.load_s = url, clients, load_s
        self.ramp_s = load_s / 2
        self.events: list[tuple[float, int | None, float, bool]] = []  # (finished at, status, latency, retry-after)
        self.lock = threading.Lock()
        self.active = 0
        self.start = 0.0

    def starts_at(self, i: int) -> float:
        return 0.0 if self.clients == 1 else self.ramp_s * i / (self.clients - 1)

    def client(self, i: int) -> None:
        rng = random.Random(i)
        end = self.start + self.load_s
        time.sleep(max(0.0, self.start + self.starts_at(i) - time.monotonic()))
        with self.lock:
            self.active += 1
        try:
            with httpx.Client(base_url=self.url, timeout=60) as http:
                while time.monotonic() < end:
                    began = time.monotonic()
                    status, retry_after = None, False
                    try:
                        response = http.post("/v2/rerank", json=request_body(rng))
                        status, retry_after = response.status_code, "retry-after" in response.headers
                    except httpx.HTTPError:
                        pass
                    now = time.monotonic()
                    with self.lock:
                        self.events.append((now - self.start, status, now - began, retry_after))
                    if status == 503 and retry_after:  # a well-behaved client waits as told (capped)
                        wait = min(float(response.headers["retry-after"] or 0), 2.0)
                        time.sleep(max(0.0, min(wait, end - time.monotonic())))
        finally:
            with self.lock:
                self.active -= 1

    def run(self, app_name: str) -> list[dict]:
        """Runs the load and samples once a second until the pool is back to one replica (bounded)."""
        self.start = time.monotonic()
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in threads:
            thread.start()
        samples = []
        tick = 0
        while True:
            tick += 1
            time.sleep(max(0.0, self.start + tick - time.monotonic()))
            with self.lock:
                active = self.active
            states = replica_states(app_name)
            # replicas: RUNNING ones; target: the autoscaler's count (RUNNING plus those still starting).
            target = sum(n for state, n in states.items() if state != "STOPPING")
            samples.append(
                {
                    "t": tick,
                    "active_clients": active,
                    "replicas": states.get("RUNNING", 0),
                    "target_replicas": target,
                    "replica_states": states,
                }
            )
            after = tick - self.load_s
            done = all(not t.is_alive() for t in threads)
            if after >= 0 and done and (states == {"RUNNING": 1} or after >= SETTLE_S):
                break
        for thread in threads:
            thread.join()
        return samples


def timeline(samples: list[dict], events: list[tuple]) -> list[dict]:
    rows = []
    for sample in samples:
        t = sample["t"]
        second = [e for e in events if t - 1 <= e[0] < t]
        latencies = [e[2] for e in second if e[1] == 200]
        statuses: dict[str, int] = {}
        for e in second:
            key = "lost" if e[1] is None else str(e[1])
            statuses[key] = statuses.get(key, 0) + 1
        p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
        rows.append(
            {
                **sample,
                "finished": len(second),
                "statuses": statuses,
                "p50_ms": None if p50 is None else round(p50 * 1000, 1),
                "p95_ms": None if p95 is None else round(p95 * 1000, 1),
                "requests_per_s": len(latencies),
                "pairs_per_s": len(latencies) * DOCUMENTS,
            }
        )
    return rows


def summarize(rows: list[dict], events: list[tuple], clients: int, load_s: float) -> dict:
    totals: dict[str, int] = {}
    for e in events:
        key = "lost" if e[1] is None else str(e[1])
        totals[key] = totals.get(key, 0) + 1
    lost = sum(n for status, n in totals.items() if status not in ("200", "503"))
    lost += sum(1 for e in events if e[1] == 503 and not e[3])  # a 503 without Retry-After is lost too
    hold = [e for e in events if load_s / 2 <= e[0] < load_s and e[1] == 200]
    hold_s = load_s - load_s / 2
    return {
        "clients": clients,
        "load_s": load_s,
        "max_replicas": max(r["replicas"] for r in rows),
        "max_replicas_during_load": max(r["replicas"] for r in rows if r["t"] <= load_s),
        "max_target_replicas_during_load": max(r["target_replicas"] for r in rows if r["t"] <= load_s),
        "first_upscale_s": next((r["t"] for r in rows if r["target_replicas"] > 1), None),
        "first_added_replica_running_s": next((r["t"] for r in rows if r["replicas"] > 1), None),
        "final_replicas": rows[-1]["replicas"],
        "back_to_one_after_load_s": next(
            (r["t"] - load_s for r in rows if r["t"] >= load_s and r["replica_states"] == {"RUNNING": 1}), None
        ),
        "totals": totals,
        "lost": lost,
        "503_without_retry_after": sum(1 for e in events if e[1] == 503 and not e[3]),
        "peak_p50_ms": round(percentile([e[2] for e in hold], 0.5) * 1000, 1) if hold else None,
        "peak_p95_ms": round(percentile([e[2] for e in hold], 0.95) * 1000, 1) if hold else None,
        "peak_requests_per_s": round(len(hold) / hold_s, 1),
        "peak_pairs_per_s": round(len(hold) * DOCUMENTS / hold_s, 1),
    }


def plot(rows: list[dict], load_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.step(t, [r["replicas"] for r in rows], where="post", label="text_pool replicas (RUNNING)", color="C0")
    top.step(
        t,
        [r["target_replicas"] for r in rows],
        where="post",
        label="target (running + starting)",
        color="C0",
        linestyle="--",
        alpha=0.6,
    )
    top.set_ylabel("replicas")
    clients = top.twinx()
    clients.plot(t, [r["active_clients"] for r in rows], label="active clients", color="C1")
    clients.set_ylabel("active clients")
    top.legend(loc="upper left")
    clients.legend(loc="center right")
    top.set_title("Spike: text pool autoscaling (1-4 replicas, target 2 ongoing)")
    nan = float("nan")
    bottom.plot(t, [r["p50_ms"] if r["p50_ms"] is not None else nan for r in rows], label="p50 latency", color="C2")
    bottom.plot(t, [r["p95_ms"] if r["p95_ms"] is not None else nan for r in rows], label="p95 latency", color="C3")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds")
    rate = bottom.twinx()
    rate.plot(t, [r["pairs_per_s"] for r in rows], label="pairs/s (200s)", color="C4", linestyle="--")
    rate.set_ylabel("pairs/s")
    bottom.legend(loc="upper left")
    rate.legend(loc="upper right")
    for axis in (top, bottom):
        axis.axvline(load_s, color="grey", linestyle=":")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(rows: list[dict], summary: dict) -> None:
    print(
        f"{'t':>4} {'clients':>7} {'replicas':>8} {'target':>6} {'done':>5} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'pairs/s':>8}  statuses"
    )
    for r in rows:
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.0f}"
        p95 = "-" if r["p95_ms"] is None else f"{r['p95_ms']:.0f}"
        print(
            f"{r['t']:>4} {r['active_clients']:>7} {r['replicas']:>8} {r['target_replicas']:>6} {r['finished']:>5} "
            f"{p50:>8} {p95:>8} "
            f"{r['pairs_per_s']:>8}  {r['statuses']}"
        )
    for key, value in summary.items():
        print(f"{key:>26}: {value}")


def run_spike(
    clients: int = 32,
    load_s: float = 20,
    app_name: str = "spike",
    out_dir: Path = RESULTS,
    serve_url: str | None = None,
    max_replicas: int = 4,
) -> dict:
    """Deploys the benchmark's application, runs the spike, writes JSON and PNG; returns the JSON's content."""
    import ray
    from ray import serve

    from serve_app.app import build_app
    from tests.tiny_models import build_cross_encoder

    started_ray = False
    if serve_url is None:
        if not ray.is_initialized():
            started_ray = True
            # address="local": a fresh Ray of our own, never a cluster someone else started on this machine.
            ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve_url = f"http://127.0.0.1:{port}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_cross_encoder(Path(tmp) / "cross_encoder")
        url = f"{serve_url}/{app_name}"
        try:
            serve.run(build_app(spike_args(str(model), max_replicas)), name=app_name, route_prefix=f"/{app_name}")
            warm = httpx.post(f"{url}/v2/rerank", json=request_body(random.Random(-1)), timeout=60)
            warm.raise_for_status()
            load = Load(url, clients, load_s)
            samples = load.run(app_name)
        finally:
            # On the caller's Serve (a test's), not waited for: its replicas stop on their own meanwhile.
            serve.delete(app_name, _blocking=started_ray)
            if started_ray:
                serve.shutdown()
                ray.shutdown()
    rows = timeline(samples, load.events)
    summary = summarize(rows, load.events, clients, load_s)
    stem = f"spike-{datetime.date.today().isoformat()}-{socket.gethostname()}"
    result = {
        "settings": spike_args("<tiny cross-encoder>", max_replicas),
        "documents_per_request": DOCUMENTS,
        "summary": summary,
        "timeline": rows,
        "json": str(out_dir / f"{stem}.json"),
        "png": str(out_dir / f"{stem}.png"),
    }
    Path(result["json"]).write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, load_s, Path(result["png"]))
    print_table(rows, summary)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--load-s", type=float, default=20)
    parser.add_argument("--app-name", default="spike")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    run_spike(args.clients, args.load_s, args.app_name, args.out_dir)


if __name__ == "__main__":
    main()
