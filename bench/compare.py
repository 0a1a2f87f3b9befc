"""One run, one machine: our reranker against the raw forward pass, sentence-transformers and Infinity.

    python -m bench.compare            # what `make bench` runs (CPU)
    python -m bench.compare --gpu      # `make bench GPU=1`: the same table on the card, plus MFU
    python -m bench.compare --readme bench/results/X.json   # render bench/README.md's table from a result

For each model (the default text model, a MiniLM-L6-sized cross-encoder, a tiny CLIP for the image-text
path) the same requests go through: (1) the raw forward pass at its best batch size, (2) sentence-
transformers, (3) Infinity on 127.0.0.1 (its own virtualenv), (4) our Serve handle, (5) our HTTP API at
concurrency 1, 8 and 32. Writes bench/results/<date>-<host>.json and .png and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import httpx

from bench import dataset
from serve_app import pages
from serve_app.ports import free_port
from serve_app.stats import percentile

log = logging.getLogger("bench.compare")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
INFINITY_BIN = ROOT / ".venv-infinity" / "bin" / "infinity_emb"
CONCURRENCY = (1, 8, 32)
BENCH_INGRESS = {"long_documents": "truncate", "request_timeout_s": 120.0}
# Dense bf16 peak of the card, from the vendor's datasheet (SXM parts); matmuls reach ~790 TFLOP/s there.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


@dataclass
class Row:
    model: str
    system: str
    concurrency: int | None
    pairs: int
    seconds: float
    pairs_per_s: float
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    peak_memory_bytes: int | None
    padding_waste: float | None = None
    mean_batch_fill: float | None = None
    flops_per_s: float | None = None
    note: str = ""
    errors: int = 0  # requests of the phase that got no answer (504, 503, ...): counted, not fatal
    ratio_to_raw: float | None = None
    ratio_to_infinity: float | None = None
    extra: dict = field(default_factory=dict)


# ---- models and requests ----------------------------------------------------------------------------------


def prepare_models(cache: Path, embedding_dir: Path | None = None, base: bool = False) -> dict[str, Path]:
    """The default text model (real weights, from its package), a MiniLM-L6-sized cross-encoder with random
    weights (ms-marco-MiniLM-L-6-v2's config; costs what the real one costs) and a tiny CLIP; with `base`, a
    BERT-base-sized cross-encoder too (bge-reranker-base's size; random weights).

    `embedding_dir` without weights (a machine without the model's package): random weights from its config.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from serve_app.scoring.loading import resolve_model_dir
    from serve_app.settings import DEFAULT_TEXT_MODEL, Settings
    from tests.tiny_models import MINILM_L6_SIZES, build_clip

    embedding = embedding_dir or Path(resolve_model_dir(DEFAULT_TEXT_MODEL, Settings().model_cache_dir))
    if not (embedding / "model.safetensors").exists():
        random_embedding = cache / "all-MiniLM-L6-v2-random"
        if not (random_embedding / "model.safetensors").exists():
            shutil.copytree(embedding, random_embedding, dirs_exist_ok=True)
            torch.manual_seed(0)
            BertModel(BertConfig.from_pretrained(embedding)).eval().save_pretrained(random_embedding)
        embedding = random_embedding
    # "MiniLM" in the name: the batch profiles' *MiniLM* rows apply, as they would to the real model.
    cross_encoder = cache / "MiniLM-L6-cross-encoder-random"
    if not (cross_encoder / "model.safetensors").exists():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=30522, num_labels=1, **MINILM_L6_SIZES)
        BertForSequenceClassification(config).eval().save_pretrained(cross_encoder)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (embedding / name).exists():
                shutil.copy(embedding / name, cross_encoder / name)
    models = {"embedding": embedding, "cross_encoder": cross_encoder}
    if base:  # BERT-base: 12 layers of 768, 12 heads, 3072 inner (bert-base-uncased's config)
        sizes = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        models["cross_encoder_base"] = cache / "bert-base-cross-encoder-random"
        if not (models["cross_encoder_base"] / "model.safetensors").exists():
            torch.manual_seed(0)
            config = BertConfig(vocab_size=30522, num_labels=1, **sizes)
            BertForSequenceClassification(config).eval().save_pretrained(models["cross_encoder_base"])
            for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
                if (embedding / name).exists():
                    shutil.copy(embedding / name, models["cross_encoder_base"] / name)
    models["clip"] = cache / "tiny-clip"
    if not (models["clip"] / "config.json").exists():
        build_clip(models["clip"])
    return models


def image_requests(requests: list[dataset.BenchRequest], seed: int = 0) -> list[dict]:
    """The same queries against images: one PNG of a few coloured shapes per document."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for request in requests:
        images = []
        for _ in request.documents:
            image = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            for _ in range(3):
                x, y = rng.randrange(80), rng.randrange(80)
                draw.ellipse((x, y, x + 16, y + 16), fill=tuple(rng.randrange(256) for _ in range(3)))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            images.append(base64.b64encode(buffer.getvalue()).decode())
        out.append({"query": request.query, "images": images})
    return out


def pairs_of(requests: list[dict]) -> int:
    return sum(len(r.get("documents") or r["images"]) for r in requests)


# ---- (1) and (2): in fresh processes ------------------------------------------------------------------------


def inprocess_row(family: str, system: str, result: dict) -> Row:
    return Row(
        model=family, system=system, concurrency=None, pairs=result["pairs"], seconds=result["seconds"],
        pairs_per_s=result["pairs_per_s"], latency_ms_p50=result["latency_ms_p50"],
        latency_ms_p95=result["latency_ms_p95"], peak_memory_bytes=result["peak_memory_bytes"],
        padding_waste=result["padding_waste"], flops_per_s=result["flops_per_s"],
        note=f"batch {result['batch_size']}, one process",
        extra={"batch_size_sweep": result["batch_size_sweep"], "torch_threads": result["torch_threads"]},
    )  # fmt: skip


def run_inprocess(system: str, family: str, model: Path, requests_file: Path, plan: Plan, sweep: bool = True) -> dict:
    """One baseline in a fresh process; raw's best batch size is kept for the others (and for `sweep=False`)."""
    sizes = plan.batch_sizes if system == "raw" and sweep else str(plan.best_batch.get(family, 32))
    command = [
        sys.executable, "-m", "bench.inprocess", "--system", system, "--model", str(model),
        "--family", "cross_encoder" if family == "cross_encoder_base" else family,
        "--requests", str(requests_file), "--device", plan.device, "--dtype", plan.dtype,
        "--batch-sizes", sizes,
        "--latency-requests", str(plan.latency_requests), "--repeats", str(plan.repeats),
        "--sweep-requests", str(plan.sweep_requests),
    ]  # fmt: skip
    log.info("%s / %s ...", family, system)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=plan.step_timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if system == "raw" and sweep:
        plan.best_batch[family] = result["batch_size"]
    return result


# ---- (3) Infinity -------------------------------------------------------------------------------------------


class Infinity:
    """infinity_emb v2 serving the cross-encoder and the embedding model on 127.0.0.1 (torch engine)."""

    def __init__(self, models: dict[str, Path], plan: Plan) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ, "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }  # fmt: skip
        command = [str(INFINITY_BIN), "v2"]
        for name in ("cross_encoder", "embedding"):
            command += ["--model-id", str(models[name]), "--served-model-name", name]
        command += [
            "--host", "127.0.0.1", "--port", str(self.port), "--engine", "torch", "--device", plan.infinity_device,
            "--batch-size", str(plan.best_batch.get("cross_encoder", 32)), "--no-bettertransformer", "--no-compile",
        ]  # fmt: skip
        self.log = tempfile.NamedTemporaryFile("w+", prefix="infinity-", suffix=".log", delete=False)
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Infinity exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"Infinity did not become healthy in 180 s: {Path(self.log.name).read_text()[-2000:]}")

    def peak_memory_bytes(self) -> int | None:
        return peak_rss(self.process.pid)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()

    async def score(self, client: httpx.AsyncClient, family: str, request: dict) -> None:
        if family == "cross_encoder":
            body = {"model": family, "query": request["query"], "documents": request["documents"]}
            response = await client.post(f"{self.url}/rerank", json=body)
            response.raise_for_status()
            assert len(response.json()["results"]) == len(request["documents"])
            return
        # A bi-encoder behind Infinity: embed the query and documents, cosine on the client.
        body = {"model": family, "input": [request["query"], *request["documents"]]}
        response = await client.post(f"{self.url}/embeddings", json=body)
        response.raise_for_status()
        vectors = [item["embedding"] for item in response.json()["data"]]
        # The ranking a client of Infinity computes itself (Infinity's vectors are unit length).
        scores = [sum(a * b for a, b in zip(vectors[0], v)) for v in vectors[1:]]
        assert len(scores) == len(request["documents"])


def peak_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Driven:
    """One phase: wall seconds, latencies (ms) of the answered requests, and which failed (index -> why)."""

    seconds: float
    latencies: list[float]
    failed: dict[int, str]


async def drive(call, requests: list[dict], concurrency: int) -> Driven:
    """Send every request with at most `concurrency` in flight. A request that fails (a 504 past the deadline,
    a 503) is counted in its phase's row, never ends the run."""
    queue = list(enumerate(requests))
    latencies: dict[int, float] = {}
    failed: dict[int, str] = {}

    async def worker() -> None:
        while queue:
            i, request = queue.pop(0)
            start = time.perf_counter()
            try:
                await call(request)
            except Exception as exc:  # noqa: BLE001 - the row reports it
                status = getattr(getattr(exc, "response", None), "status_code", None)
                failed[i] = f"{type(exc).__name__}{f' {status}' if status else ''}"
                continue
            latencies[i] = (time.perf_counter() - start) * 1000

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Driven(time.perf_counter() - start, [latencies[i] for i in sorted(latencies)], failed)


def client_for(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=600, limits=limits)


async def bench_infinity(infinity: Infinity, family: str, sets: RequestSets, plan: Plan) -> list[Row]:
    rows = []
    async with client_for(max(CONCURRENCY)) as client:
        await drive(lambda r: infinity.score(client, family, r), sets.text[:2], 2)  # warm-up
        for concurrency in CONCURRENCY:
            requests = sets.latency if concurrency == 1 else sets.text
            driven = await drive(lambda r: infinity.score(client, family, r), requests, concurrency)
            rows.append(load_row(family, "infinity", concurrency, requests, driven))
    peak = infinity.peak_memory_bytes()
    for row in rows:
        row.peak_memory_bytes = peak
        row.note = "; ".join(filter(None, ["peak: whole server, both models", row.note]))
    return rows


def load_row(model: str, system: str, concurrency: int | None, requests: list[dict], driven: Driven) -> Row:
    """A phase's row: pairs/s counts the answered requests' pairs only; failed requests are counted by kind."""
    answered = [r for i, r in enumerate(requests) if i not in driven.failed]
    pairs = pairs_of(answered)
    kinds: dict[str, int] = {}
    for why in driven.failed.values():
        kinds[why] = kinds.get(why, 0) + 1
    p50, p95 = percentile(driven.latencies, 0.5), percentile(driven.latencies, 0.95)
    return Row(
        model=model,
        system=system,
        concurrency=concurrency,
        pairs=pairs,
        seconds=round(driven.seconds, 3),
        pairs_per_s=round(pairs / driven.seconds, 2),
        latency_ms_p50=None if p50 is None else round(p50, 2),
        latency_ms_p95=None if p95 is None else round(p95, 2),
        peak_memory_bytes=None,
        errors=len(driven.failed),
        note=f"{len(driven.failed)} of {len(requests)} requests failed: {kinds}" if driven.failed else "",
    )


# ---- (4) and (5): our service -------------------------------------------------------------------------------


class Service:
    """Our application, one per model family (the pools hold the model), on a local Ray instance."""

    def __init__(self, models: dict[str, Path], plan: Plan) -> None:
        import ray
        from ray import serve

        from serve_app.app import build_app
        from serve_app.local_ray import quiet_ray_env

        self.serve = serve
        self.build_app = build_app
        self.models = models
        self.plan = plan
        self.port = free_port()
        quiet_ray_env()  # as `make run` starts its Ray (quiet_ray): Ray's loops slowed for a small box
        ray.init(
            address="local", num_cpus=plan.ray_cpus, num_gpus=plan.gpus, include_dashboard=False,
            logging_level="WARNING", log_to_driver=False,
        )  # fmt: skip
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.apps = {}
        for family in plan.text_models:
            text = {"model": str(models[family]), **plan.pool_options}
            image_text = {"model": str(models["clip"]), **plan.image_pool_options}
            args = {"text": text, "image_text": image_text, "log_level": "WARNING", **plan.ingress_options}
            serve.run(build_app(args), name=family, route_prefix=f"/{family}")
            self.apps[family] = f"http://127.0.0.1:{self.port}/{family}"
        self.apps["clip"] = self.apps["cross_encoder"]

    def deploy_layout(self, family: str, pool_options: dict) -> str:
        """The family's text pool alone in another layout (image pool off): its URL."""
        name = f"{family}_layout"
        text = {"model": str(self.models[family]), **pool_options}
        args = {"text": text, "image_text": {"enabled": False}, "log_level": "WARNING", **self.plan.ingress_options}
        self.serve.run(self.build_app(args), name=name, route_prefix=f"/{name}")
        return f"http://127.0.0.1:{self.port}/{name}"

    def handle(self, family: str):
        return self.serve.get_app_handle("cross_encoder" if family == "clip" else family)

    def stats(self, family: str, url: str | None = None) -> dict:
        """The pool replicas' counters, summed (forward seconds: per replica), of the family's app or `url`'s."""
        pool = "image_text" if family == "clip" else "text"
        replicas = httpx.get(f"{url or self.apps[family]}/v1/stats", timeout=60).json()["pools"][pool]
        keys = ("batches", "pairs", "real_tokens", "padded_tokens")
        total = {key: sum(r[key] or 0 for r in replicas) for key in keys}
        memory = [r["memory"] for r in replicas]
        total["peak_memory_bytes"] = max(
            (m.get("peak_allocated_bytes") or m.get("peak_rss_bytes") or 0) for m in memory
        )
        total["forward_seconds"] = {r["replica"]: r.get("forward_seconds") or 0.0 for r in replicas}
        return total

    def stop(self) -> None:
        import ray

        self.serve.shutdown()
        ray.shutdown()


def forward_utilization(before: dict, after: dict, seconds: float, each: bool = False):
    """The pool replicas' time in forwards over the phase's wall time, the busiest replica's (with one replica
    per device, how busy the phase kept the device); None when no replica ran a forward. `each`: every
    replica's, highest first."""
    spent = [after["forward_seconds"][r] - before["forward_seconds"].get(r, 0.0) for r in after["forward_seconds"]]
    if not spent or max(spent) <= 0 or seconds <= 0:
        return [] if each else None
    shares = sorted((round(s / seconds, 3) for s in spent), reverse=True)
    return shares if each else shares[0]


def body_of(request: dict) -> dict:
    if "images" in request:
        return {"query": request["query"], "documents": [{"image": image} for image in request["images"]]}
    return {"query": request["query"], "documents": request["documents"]}


async def settle(url: str, pool: str, timeout_s: float = 90.0) -> None:
    """Wait until the pool's replicas have measured their forward cost again (they do when idle, in the first
    seconds after their first call): the phases then time the settled service, not a re-measurement."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() < deadline:
            replicas = (await client.get(f"{url}/v1/models")).json()["pools"][pool]["replicas"]
            if all(r.get("forward_cost_settled") for r in replicas):
                return
            await asyncio.sleep(0.5)
    log.warning("%s: the %s pool did not finish measuring its forward cost in %.0f s", url, pool, timeout_s)


async def bench_service(service: Service, family: str, requests_by_use: RequestSets, plan: Plan) -> list[Row]:
    from serve_app.schemas import RerankRequest

    sets = requests_by_use.images if family == "clip" else requests_by_use.text
    latency_set = requests_by_use.image_latency if family == "clip" else requests_by_use.latency
    handle = service.handle(family)

    async def via_handle(request: dict) -> None:
        answer, _headers = await handle.rerank.remote(RerankRequest(**body_of(request)), False, "v2")
        assert len(answer.results) == pairs_of([request])

    rows = []
    async with client_for(max(plan.concurrency)) as client:

        async def via_http(request: dict) -> None:
            response = await client.post(f"{service.apps[family]}/v2/rerank", json=body_of(request))
            response.raise_for_status()
            assert len(response.json()["results"]) == pairs_of([request])

        await drive(via_http, sets[:4], 4)  # warm-up: connections, first batches
        await settle(service.apps[family], "image_text" if family == "clip" else "text")
        await drive(via_handle, sets[:4], 4)
        phases = [("serve_handle", 32, via_handle, sets)] + [
            ("http", c, via_http, latency_set if c == 1 else sets) for c in plan.concurrency
        ]
        for system, concurrency, call, requests in phases:
            before = service.stats(family)
            driven = await drive(call, requests, concurrency)
            after = service.stats(family)
            row = load_row(family, system, concurrency, requests, driven)
            delta = {key: after[key] - before[key] for key in ("batches", "pairs", "real_tokens", "padded_tokens")}
            row.mean_batch_fill = round(delta["pairs"] / delta["batches"], 2) if delta["batches"] else None
            if delta["real_tokens"]:
                row.padding_waste = round(delta["padded_tokens"] / delta["real_tokens"] - 1, 4)
            row.peak_memory_bytes = after["peak_memory_bytes"]
            row.note = "; ".join(filter(None, ["peak: the pool replica", row.note]))
            row.extra = {
                "batches": delta["batches"],
                "padded_tokens": delta["padded_tokens"],
                "forward_utilization": forward_utilization(before, after, driven.seconds),
                "forward_utilization_each": forward_utilization(before, after, driven.seconds, each=True),
            }
            if family in plan.flops_per_token:
                row.flops_per_s = round(delta["padded_tokens"] * plan.flops_per_token[family] / driven.seconds)
            rows.append(row)
        if plan.layout_pool_options and family != "clip":
            # The other way to spend the cores, side by side: one replica computing with all of them.
            url = service.deploy_layout(family, plan.layout_pool_options)

            async def via_layout(request: dict) -> None:
                response = await client.post(f"{url}/v2/rerank", json=body_of(request))
                response.raise_for_status()

            await drive(via_layout, sets[:4], 4)
            await settle(url, "text")
            # Both ends: one request alone (its latency) and the c=32 load (throughput).
            for concurrency, requests in ((1, latency_set), (max(plan.concurrency), sets)):
                before = service.stats(family, url)
                driven = await drive(via_layout, requests, concurrency)
                after = service.stats(family, url)
                row = load_row(family, plan.layout_system, concurrency, requests, driven)
                row.note = "; ".join(filter(None, [f"text pool {plan.layout_pool_options}", row.note]))
                row.extra["forward_utilization"] = forward_utilization(before, after, driven.seconds)
                rows.append(row)
            replicas = httpx.get(f"{url}/v1/models", timeout=60).json()["pools"]["text"]["replicas"]
            for row in rows[-2:]:  # what became of the graphs (shapes captured, replays, why turned off); its cuts
                row.extra["cuda_graphs"] = [r.get("cuda_graphs") for r in replicas]
                row.extra["forward_cost_tokens"] = sorted({r["forward_cost_tokens"] for r in replicas})
            service.serve.delete(f"{family}_layout")
    # What the replicas measured at start-up decides how batches were cut: keep it beside the figures.
    pool = "image_text" if family == "clip" else "text"
    replicas = httpx.get(f"{service.apps[family]}/v1/models", timeout=60).json()["pools"][pool]["replicas"]
    for row in rows:  # the layout rows keep their own pool's
        row.extra.setdefault("forward_cost_tokens", sorted({r["forward_cost_tokens"] for r in replicas}))
    return rows


# ---- the plan, the run, the table ---------------------------------------------------------------------------


@dataclass
class RequestSets:
    text: list[dict]
    latency: list[dict]
    images: list[dict]
    image_latency: list[dict]


@dataclass
class Plan:
    device: str = "cpu"
    dtype: str = "float32"
    infinity_device: str = "cpu"
    batch_sizes: str = "8,32"
    requests: int = 48
    max_documents: int = 20
    latency_requests: int = 24  # c=1 rows: a p50 of 24 requests moves less with this machine's noise
    sweep_requests: int = 6
    repeats: int = 1
    ray_cpus: int = 12  # logical: every replica of the run (two per text pool on a CPU) must be placed
    gpus: int = 0
    step_timeout_s: int = 600
    pool_options: dict = field(default_factory=dict)
    layout_pool_options: dict = field(default_factory=dict)  # a second layout of the text pool, at c=1 and the top
    layout_system: str = "http_one_replica"  # the rows' name for that layout
    concurrency: tuple[int, ...] = CONCURRENCY  # HTTP phases; the last one is the load the goals are judged at
    text_models: tuple[str, ...] = ("cross_encoder", "embedding")
    forward_only: bool = False  # also the raw pass with tokenizing and padding done before the clock (raw_forward)
    image_pool_options: dict = field(default_factory=dict)
    # The same work as the raw pass and Infinity, which truncate a long document: no windows. A deadline that a
    # slow machine's queued c=32 phase cannot reach (a request that still misses it is counted in its row).
    ingress_options: dict = field(default_factory=lambda: dict(BENCH_INGRESS))
    best_batch: dict = field(default_factory=dict)
    flops_per_token: dict = field(default_factory=dict)  # per cross-encoder: matmul FLOPs of one token


def cpu_plan() -> Plan:
    cores = os.cpu_count() or 1
    # A text replica per core, one torch thread each: every core computes, as in the raw pass, and no OpenMP
    # team waits for a thread that Ray's own processes preempted. The row http_one_replica measures the other
    # layout (one replica, every core as a torch thread) in the same run.
    return Plan(
        pool_options={"torch_threads": 1, "num_replicas": cores},
        layout_pool_options={"torch_threads": cores, "num_replicas": 1},
        image_pool_options={"torch_threads": cores},
    )


def gpu_plan() -> Plan:
    return Plan(
        device="cuda",
        dtype="bfloat16",
        infinity_device="cuda",
        batch_sizes="32,64,128,256,512",
        requests=400,
        max_documents=40,
        latency_requests=32,
        sweep_requests=100,
        repeats=3,
        ray_cpus=16,
        gpus=1,
        # One card for all: three text pools, three image pools and the layout pool deployed beside them.
        pool_options={"num_gpus": 0.2},
        # The same pool with its forwards replayed from CUDA graphs, side by side.
        layout_pool_options={"num_gpus": 0.2, "cuda_graphs": True},
        layout_system="http_cuda_graphs",
        image_pool_options={"num_gpus": 0.05},
        ingress_options={**BENCH_INGRESS, "ingress": {"replicas": 4}, "max_pairs_per_call": 256},
        concurrency=(1, 8, 32, 128),  # 128: enough requests in flight to keep the card's batches full
        text_models=("cross_encoder", "cross_encoder_base", "embedding"),
        forward_only=True,
    )


def machine() -> dict:
    import torch

    info = {
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bf16_peak(gpu_name: str | None) -> float | None:
    for kind, peak in BF16_PEAK.items():
        if gpu_name and kind in gpu_name:
            return peak
    return None


def add_ratios(rows: list[Row]) -> None:
    for model in {r.model for r in rows}:
        mine = [r for r in rows if r.model == model]
        raw = next((r for r in mine if r.system == "raw"), None)
        infinity = [r for r in mine if r.system == "infinity"]
        best_infinity = max(infinity, key=lambda r: r.pairs_per_s) if infinity else None
        for r in mine:
            if raw:
                r.ratio_to_raw = round(r.pairs_per_s / raw.pairs_per_s, 3)
            if best_infinity:
                r.ratio_to_infinity = round(r.pairs_per_s / best_infinity.pairs_per_s, 3)


def goals(rows: list[Row]) -> list[dict]:
    """The issue's goals, per text model, each with the figures it was judged on: HTTP at the run's top
    concurrency (32 on a CPU, a saturating one on a GPU) against the raw pass, Infinity and the forward alone."""
    out = []
    for model in ("embedding", "cross_encoder", "cross_encoder_base"):
        find = {(r.system, r.concurrency): r for r in rows if r.model == model}
        top = max((c for system, c in find if system == "http"), default=None)
        raw, http_top, http1 = find.get(("raw", None)), find.get(("http", top)), find.get(("http", 1))
        infinity = [r for r in rows if r.model == model and r.system == "infinity"]
        if not (raw and http_top and http1):
            continue
        at = f"c={top}"
        ratio = http_top.pairs_per_s / raw.pairs_per_s
        out.append(goal(model, f"HTTP {at} throughput >= 0.9x raw forward", ratio, 0.9, "x"))
        if infinity:
            best = max(infinity, key=lambda r: r.pairs_per_s)
            ratio = http_top.pairs_per_s / best.pairs_per_s
            out.append(goal(model, f"HTTP {at} throughput >= 1.2x Infinity (its best)", ratio, 1.2, "x"))
        forward = find.get(("raw_forward", None))
        if forward:  # the device's own limit: the raw pass with tokenizing and padding done before the clock
            ratio = http_top.pairs_per_s / forward.pairs_per_s
            out.append(goal(model, f"HTTP {at} >= 0.9x raw forward with tokenizing excluded", ratio, 0.9, "x"))
            graphed = find.get(("http_cuda_graphs", top))
            if graphed:
                ratio = graphed.pairs_per_s / forward.pairs_per_s
                out.append(
                    goal(model, f"(CUDA graphs) HTTP {at} >= 0.9x raw forward, tokenizing excluded", ratio, 0.9, "x")
                )
        added = http1.latency_ms_p50 - raw.latency_ms_p50
        out.append(goal(model, "added p50 latency at c=1 <= 10 ms over raw", added, 10, "ms", lower=True))
        beside = find.get(("raw_beside_idle_ray", None))
        if beside:  # the same goals against the raw pass measured with Ray's processes running beside it
            ratio = http_top.pairs_per_s / beside.pairs_per_s
            out.append(goal(model, f"(control) HTTP {at} >= 0.9x raw beside idle Ray", ratio, 0.9, "x"))
            added = http1.latency_ms_p50 - beside.latency_ms_p50
            out.append(
                goal(model, "(control) added p50 at c=1 <= 10 ms over raw beside idle Ray", added, 10, "ms", True)
            )
        one = find.get(("http_one_replica", 1))
        if one:  # the other layout of the same cores (one replica, every core a torch thread) at c=1
            added = one.latency_ms_p50 - raw.latency_ms_p50
            out.append(goal(model, "(layout) one replica: added p50 at c=1 <= 10 ms over raw", added, 10, "ms", True))
        if http_top.padding_waste is not None:
            out.append(goal(model, "padding waste <= 10%", http_top.padding_waste * 100, 10, "%", lower=True))
        if http_top.extra.get("forward_utilization") is not None:
            busy = http_top.extra["forward_utilization"]
            out.append(goal(model, f"pool replica's forward utilization at {at} >= 0.8", busy, 0.8, ""))
    return out


def goal(model: str, what: str, value: float, target: float, unit: str, lower: bool = False) -> dict:
    met = value <= target if lower else value >= target
    return {"model": model, "goal": what, "value": round(value, 3), "target": target, "unit": unit, "met": met}


def fmt(value, spec: str = ".1f", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    mfu = any("mfu_bf16" in r.extra for r in rows)
    lines = [
        "| model | system | conc. | pairs/s | x raw | x Infinity | p50 ms | p95 ms | peak MiB | padding | batch fill "
        "| fwd util |" + (" MFU bf16 |" if mfu else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mfu else ""),
    ]
    for r in rows:
        peak = r.peak_memory_bytes / 2**20 if r.peak_memory_bytes else None
        padding = f"{r.padding_waste * 100:.1f}%" if r.padding_waste is not None else "-"
        lines.append(
            f"| {r.model} | {r.system} | {fmt(r.concurrency, 'd')} | {r.pairs_per_s:.1f} "
            f"| {fmt(r.ratio_to_raw, '.2f')} "
            f"| {fmt(r.ratio_to_infinity, '.2f')} | {fmt(r.latency_ms_p50)} | {fmt(r.latency_ms_p95)} "
            f"| {fmt(peak, '.0f')} | {padding} | {fmt(r.mean_batch_fill)} "
            f"| {fmt(r.extra.get('forward_utilization'), '.2f')} |"
            + (f" {fmt(r.extra.get('mfu_bf16'), '.2%')} |" if mfu else "")
        )
    return "\n".join(lines)


def goals_table(found: list[dict]) -> str:
    lines = ["| model | goal | measured | met |", "|---|---|---|---|"]
    for g in found:
        lines.append(f"| {g['model']} | {g['goal']} | {g['value']:.2f} {g['unit']} | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        rows = [r for r in result["rows"] if r["model"] == model]
        labels = [r["system"] + (f"\nc={r['concurrency']}" if r["concurrency"] else "") for r in rows]
        colours = ["tab:green" if r["system"] in ("http", "serve_handle") else "tab:grey" for r in rows]
        top, bottom = axes[0][column], axes[1][column]
        top.bar(labels, [r["pairs_per_s"] for r in rows], color=colours)
        top.set_title(f"{model}: pairs/s")
        bottom.bar(labels, [r["latency_ms_p50"] or 0 for r in rows], color=colours, label="p50")
        bottom.scatter(labels, [r["latency_ms_p95"] or 0 for r in rows], color="black", marker="_", s=300, label="p95")
        bottom.set_title(f"{model}: latency per request (ms)")
        bottom.legend()
        for ax in (top, bottom):
            ax.tick_params(axis="x", labelsize=7, rotation=45)
    fig.suptitle(
        f"{result['date']} {result['machine']['host']}: {result['machine'].get('gpu') or result['machine']['cpu']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def rendered_block(result_path: Path) -> tuple[str, str]:
    """The docs block for this result's kind (`bench:cpu` or `bench:gpu` in bench/README.md) and its body, rendered
    from the result file; the tables are never typed by hand (tests/test_docs.py checks they agree)."""
    result = json.loads(result_path.read_text())
    mark = "bench:gpu" if result["plan"]["device"] == "cuda" else "bench:cpu"
    rows = [Row(**r) for r in result["rows"]]
    where = f"{result['machine']['cpu']}, {result['machine']['cores']} cores"
    if result["machine"].get("gpu"):
        where = f"{result['machine']['gpu']} ({where})"
    relative = result_path.resolve().relative_to(ROOT)
    section = "\n".join(
        [
            f"`{result['command']}` on {result['date']}, {where}: {result['dataset']['pairs']} pairs in "
            f"{result['dataset']['requests']} requests ({result['dataset']['source']}); `{relative}`, "
            f"{result['wall_s']} s.",
            "",
            table(rows),
            "",
            goals_table(result["goals"]),
            "",
            f"![benchmark]({pages.link(mark, result_path.with_suffix('.png'))})",
        ]
    )
    return mark, section


def load_requests(plan: Plan, requests_file: Path | None) -> tuple[list[dataset.BenchRequest], dict]:
    """The plan's requests, from the dataset package or from a file written by --dump-requests."""
    if requests_file:
        saved = json.loads(requests_file.read_text())
        requests = [dataset.BenchRequest(r["query"], r["documents"]) for r in saved["requests"][: plan.requests]]
        return requests, {**dataset.summary(requests), "source": saved["dataset"]["source"]}
    requests = dataset.load_requests(plan.requests, seed=0, max_documents=plan.max_documents)
    return requests, {**dataset.summary(requests), "source": dataset.source_description()}


def run(
    plan: Plan,
    gpu: bool,
    skip_infinity: bool,
    embedding_dir: Path | None,
    requests_file: Path | None,
    partial: Path | None = None,
) -> dict:
    """Every row of the plan. `partial`: rewritten with the rows so far after each step, so that a run cut off
    (a device session's time limit) leaves what it measured."""
    models = prepare_models(ROOT / "bench" / ".cache", embedding_dir, base="cross_encoder_base" in plan.text_models)
    requests, described = load_requests(plan, requests_file)
    text = [{"query": r.query, "documents": r.documents} for r in requests]
    images = image_requests(requests[: max(8, plan.requests // 4)])
    sets = RequestSets(text, text[: plan.latency_requests], images, images[: plan.latency_requests // 2])
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:  # request files for the in-process runs
        scratch = Path(tmp)
        (scratch / "text.json").write_text(json.dumps(sets.text))
        (scratch / "images.json").write_text(json.dumps(sets.images))
        if gpu:
            from transformers import AutoConfig

            from bench.inprocess import bert_flops

            for family in ("cross_encoder", "cross_encoder_base"):
                if family in models:  # the per-token part; attention adds a few percent more
                    plan.flops_per_token[family] = bert_flops(AutoConfig.from_pretrained(models[family]), 1, 1)

        rows: list[Row] = []
        for family in (*plan.text_models, "clip"):
            file = "images.json" if family == "clip" else "text.json"
            systems = ("raw", "raw_forward") if plan.forward_only else ("raw",)
            if family in ("cross_encoder", "embedding"):
                systems += ("sentence_transformers",)
            for system in systems if family != "clip" else ("raw",):
                result = run_inprocess(system, family, models[family], scratch / file, plan)
                rows.append(inprocess_row(family, system, result))
                save_partial(partial, rows)
        if skip_infinity or not INFINITY_BIN.exists():
            log.warning("Infinity skipped (%s)", "asked" if skip_infinity else f"{INFINITY_BIN} not installed")
        else:
            infinity = Infinity(models, plan)
            try:
                for family in ("cross_encoder", "embedding"):
                    rows += asyncio.run(bench_infinity(infinity, family, sets, plan))
            finally:
                infinity.stop()
        service = Service(models, plan)
        try:
            # A control: the raw pass again, with Ray and the (idle) service beside it. On a small machine
            # Ray's own processes take a share of the cores that no server on Ray can have back (on a GPU
            # machine's 16 cores they do not: no control there, and the device's minutes go to the table).
            for family in ("cross_encoder", "embedding") if plan.device == "cpu" else ():
                result = run_inprocess("raw", family, models[family], scratch / "text.json", plan, sweep=False)
                rows.append(inprocess_row(family, "raw_beside_idle_ray", result))
            for family in (*plan.text_models, "clip"):
                rows += asyncio.run(bench_service(service, family, sets, plan))
                save_partial(partial, rows)
        finally:
            service.stop()
        order = {"cross_encoder": 0, "cross_encoder_base": 1, "embedding": 2, "clip": 3}
        rows.sort(key=lambda r: order[r.model])
        add_ratios(rows)
        info = machine()
        peak = bf16_peak(info.get("gpu"))
        if peak:
            for r in rows:
                if r.flops_per_s:
                    r.extra["mfu_bf16"] = round(r.flops_per_s / peak, 4)
        return {
            "date": date.today().isoformat(),
            "command": "python -m bench.compare " + " ".join(sys.argv[1:]) if sys.argv[1:] else "make bench",
            "machine": info,
            "dataset": {**described, "image_requests": len(images)},
            "models": {
                "embedding": "sentence-transformers/all-MiniLM-L6-v2 "
                + ("(random weights from its config)" if "random" in models["embedding"].name else "(real weights)"),
                "cross_encoder": "MiniLM-L6-sized BertForSequenceClassification, random weights "
                "(config of cross-encoder/ms-marco-MiniLM-L-6-v2: same cost as the real one)",
                "cross_encoder_base": "BERT-base-sized BertForSequenceClassification, random weights (bge-reranker-"
                "base's size: same cost as a real one)",
                "clip": "tiny random CLIP (tests/tiny_models.py), image documents",
            },
            "plan": {k: v for k, v in plan.__dict__.items() if k != "best_batch"} | {"best_batch": plan.best_batch},
            "rows": [r.__dict__ for r in rows],
            "goals": goals(rows),
            "bf16_peak_flops": peak,
        }


def save_partial(path: Path | None, rows: list[Row]) -> None:
    if path is not None:
        path.write_text(json.dumps({"partial": True, "rows": [r.__dict__ for r in rows]}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the same on the CUDA device, plus MFU")
    parser.add_argument("--skip-infinity", action="store_true")
    parser.add_argument("--requests", type=int, help="requests in the throughput set (default: the plan's)")
    parser.add_argument("--out", type=Path, help="result path (default bench/results/<date>-<host>.json)")
    parser.add_argument("--readme", type=Path, help="only render this result file into its docs block")
    parser.add_argument("--embedding-dir", type=Path, help="the default text model's directory (no weights: random)")
    parser.add_argument("--requests-file", type=Path, help="requests written by --dump-requests")
    parser.add_argument("--dump-requests", type=Path, help="only write the plan's requests to this file")
    parser.add_argument("--gpu-plan-on-cpu", action="store_true", help="smoke-test the GPU plan's plumbing on the CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.readme:
        pages.render(*rendered_block(args.readme.resolve()))
        return
    plan = gpu_plan() if args.gpu or args.gpu_plan_on_cpu else cpu_plan()
    if args.gpu_plan_on_cpu:
        plan.device = plan.infinity_device = "cpu"
        plan.dtype, plan.batch_sizes, plan.sweep_requests, plan.latency_requests = "float32", "32,64", 4, 4
    if args.requests:
        plan.requests = args.requests
    if args.dump_requests:
        requests, described = load_requests(plan, None)
        saved = {"dataset": described, "requests": [r.__dict__ for r in requests]}
        args.dump_requests.write_text(json.dumps(saved))
        return
    started = time.perf_counter()
    out = args.out or RESULTS / f"{date.today().isoformat()}-{socket.gethostname()}{'-gpu' if args.gpu else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")
    result = run(plan, args.gpu, args.skip_infinity, args.embedding_dir, args.requests_file, partial)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    plot(result, out.with_suffix(".png"))
    rows = [Row(**r) for r in result["rows"]]
    print(table(rows))
    print()
    print(goals_table(result["goals"]))
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['wall_s']} s")


if __name__ == "__main__":
    main()
