"""The in-process baselines, each run in a fresh process: the raw forward pass and sentence-transformers.

`python -m bench.inprocess --system raw|raw_forward|sentence_transformers --family F --model DIR --requests FILE ...`
prints one JSON object: throughput over every pair of the file (sorted by length, at the best batch
size), latency of each of the first `--latency-requests` requests scored alone, and the process' peak
memory. `raw_forward` is the raw pass with tokenizing and padding done before the clock starts: the device's
own limit. Run by bench.compare; a process of its own so that each peak is its own.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from serve_app import hardware
from serve_app.stats import percentile

Request = dict  # {"query": str, "documents": [str]} or, for images, {"query": str, "images": [base64 PNG]}


@dataclass
class Forwards:
    """What a scoring function did: padded and real tokens, and FLOPs of a cross-encoder's forwards."""

    real_tokens: int = 0
    padded_tokens: int = 0
    flops: float = 0.0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bert_flops(config, batch: int, width: int) -> float:
    """Matmul FLOPs of one BERT-style encoder forward: projections, feed-forward and attention scores."""
    h, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token = 2 * (4 * h * h + 2 * h * inner)
    attention = 2 * 2 * width * width * h  # QK^T and AV, per sequence
    return layers * (batch * width * per_token + batch * attention)


# ---- the raw forward: tokenizer + model, nothing else ------------------------------------------------


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_batches(encoding: dict, batch_size: int) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """(indices, padded CPU tensors) of a tokenizer output, in length-sorted batches of `batch_size`."""
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoding]
    groups = sorted_batches([len(x) for x in encoding["input_ids"]], batch_size)
    return [(group, {key: pad([encoding[key][i] for i in group], 0) for key in keys}) for group in groups]


class RawCrossEncoder:
    def __init__(self, model_dir: str, device: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device

    def tokenize(self, requests: list[Request]) -> dict:
        queries = [r["query"] for r in requests for _ in r["documents"]]
        documents = [d for r in requests for d in r["documents"]]
        return {"encoding": self.tokenizer(queries, documents, truncation=True, max_length=512)}

    def batches(self, tokenized: dict, batch_size: int) -> list:
        return padded_batches(tokenized["encoding"], batch_size)

    @torch.inference_mode()
    def forward(self, tokenized: dict, batches: list, counts: Forwards) -> list[float]:
        scores = [0.0] * len(tokenized["encoding"]["input_ids"])
        for group, cpu in batches:
            batch = {key: value.to(self.device) for key, value in cpu.items()}
            logits = self.model(**batch).logits.float()[:, 0].tolist()
            for i, value in zip(group, logits):
                scores[i] = value
            b, w = batch["input_ids"].shape
            counts.padded_tokens += b * w
            counts.real_tokens += int(cpu["attention_mask"].sum())
            counts.flops += bert_flops(self.model.config, b, w)
        return scores

    def __call__(self, requests: list[Request], batch_size: int, counts: Forwards) -> list[float]:
        tokenized = self.tokenize(requests)
        return self.forward(tokenized, self.batches(tokenized, batch_size), counts)


class RawEmbedding(RawCrossEncoder):
    def __init__(self, model_dir: str, device: str, dtype: torch.dtype) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        config = Path(model_dir) / "sentence_bert_config.json"
        self.max_length = json.loads(config.read_text()).get("max_seq_length", 512) if config.exists() else 512
        self.device = device

    def tokenize(self, requests: list[Request]) -> dict:
        texts = list(dict.fromkeys([t for r in requests for t in (r["query"], *r["documents"])]))
        row = {t: i for i, t in enumerate(texts)}
        return {
            "encoding": self.tokenizer(texts, truncation=True, max_length=self.max_length),
            "queries": [row[r["query"]] for r in requests for _ in r["documents"]],
            "documents": [row[t] for r in requests for t in r["documents"]],
        }

    @torch.inference_mode()
    def forward(self, tokenized: dict, batches: list, counts: Forwards) -> list[float]:
        vectors = [None] * len(tokenized["encoding"]["input_ids"])
        for group, cpu in batches:
            batch = {key: value.to(self.device) for key, value in cpu.items()}
            hidden = self.model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            for i, v in zip(group, pooled):
                vectors[i] = v
            b, w = batch["input_ids"].shape
            counts.padded_tokens += b * w
            counts.real_tokens += int(cpu["attention_mask"].sum())
        stacked = torch.stack(vectors)
        return (stacked[tokenized["queries"]] * stacked[tokenized["documents"]]).sum(-1).tolist()


class ForwardOnly:
    """The raw pass with tokenizing and padding done ahead, outside the timing: what the device alone can do
    (`ahead` is called with every request list before it is timed)."""

    def __init__(self, raw: RawCrossEncoder) -> None:
        self.raw = raw
        self.ready: dict[tuple[int, int], tuple[list, dict, list]] = {}

    def ahead(self, requests: list[Request], batch_size: int) -> None:
        if (id(requests), batch_size) in self.ready:  # the GPU's warm pass already prepared this list
            return
        tokenized = self.raw.tokenize(requests)
        # The list is kept beside its batches, so that its id is not reused while the cache holds it.
        self.ready[(id(requests), batch_size)] = (requests, tokenized, self.raw.batches(tokenized, batch_size))

    def __call__(self, requests: list[Request], batch_size: int, counts: Forwards) -> list[float]:
        if (id(requests), batch_size) not in self.ready:
            self.ahead(requests, batch_size)
        _, tokenized, batches = self.ready[(id(requests), batch_size)]
        return self.raw.forward(tokenized, batches, counts)


class RawClip:
    def __init__(self, model_dir: str, device: str, dtype: torch.dtype) -> None:
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.image = Image
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def __call__(self, requests: list[Request], batch_size: int, counts: Forwards) -> list[float]:
        from serve_app.scoring.dual_encoder import features

        scores = []
        for r in requests:
            images = [self.image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in r["images"]]
            text = self.tokenizer([r["query"]], truncation=True, return_tensors="pt").to(self.device)
            query = torch.nn.functional.normalize(features(self.model.get_text_features(**text)).float(), dim=-1)
            for start in range(0, len(images), batch_size):
                pixels = self.processor(images=images[start : start + batch_size], return_tensors="pt")
                pixels = pixels["pixel_values"].to(self.device, self.dtype)
                embedded = features(self.model.get_image_features(pixel_values=pixels)).float()
                scores.extend((torch.nn.functional.normalize(embedded, dim=-1) @ query[0]).tolist())
        return scores


# ---- sentence-transformers: what a user would call directly -----------------------------------------


class StCrossEncoder:
    def __init__(self, model_dir: str, device: str, dtype: torch.dtype) -> None:
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(model_dir, device=device, max_length=512, model_kwargs={"dtype": dtype})

    def __call__(self, requests: list[Request], batch_size: int, counts: Forwards) -> list[float]:
        pairs = [(r["query"], d) for r in requests for d in r["documents"]]
        return [float(s) for s in self.model.predict(pairs, batch_size=batch_size, show_progress_bar=False)]


class StEmbedding:
    def __init__(self, model_dir: str, device: str, dtype: torch.dtype) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_dir, device=device, model_kwargs={"dtype": dtype})

    def __call__(self, requests: list[Request], batch_size: int, counts: Forwards) -> list[float]:
        texts = list(dict.fromkeys([t for r in requests for t in (r["query"], *r["documents"])]))
        row = {t: i for i, t in enumerate(texts)}
        vectors = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False
        )
        q = [row[r["query"]] for r in requests for _ in r["documents"]]
        d = [row[t] for r in requests for t in r["documents"]]
        return (vectors[q] * vectors[d]).sum(-1).tolist()


SYSTEMS: dict[tuple[str, str], Callable] = {
    ("raw", "cross_encoder"): RawCrossEncoder,
    ("raw", "embedding"): RawEmbedding,
    ("raw_forward", "cross_encoder"): lambda *args: ForwardOnly(RawCrossEncoder(*args)),
    ("raw_forward", "embedding"): lambda *args: ForwardOnly(RawEmbedding(*args)),
    ("raw", "clip"): RawClip,
    ("sentence_transformers", "cross_encoder"): StCrossEncoder,
    ("sentence_transformers", "embedding"): StEmbedding,
}


def pairs_of(requests: list[Request]) -> int:
    return sum(len(r.get("documents") or r.get("images")) for r in requests)


def measure(args: argparse.Namespace) -> dict:
    requests = json.loads(Path(args.requests).read_text())
    dtype = getattr(torch, args.dtype)
    hardware.reset_peak_memory()
    score = SYSTEMS[(args.system, args.family)](args.model, args.device, dtype)
    score(requests[:2], 8, Forwards())  # load lazily built pieces and first kernels
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    sweep = {}
    if len(sizes) > 1:
        # The best batch size, on a slice of the pairs (each size warmed first).
        probe = requests[: args.sweep_requests]
        for size in sizes:
            score(probe, size, Forwards())
            sync(args.device)
            start = time.perf_counter()
            score(probe, size, Forwards())
            sync(args.device)
            sweep[size] = pairs_of(probe) / (time.perf_counter() - start)
    best = max(sweep, key=sweep.get) if sweep else sizes[0]
    if args.device.startswith("cuda"):
        score(requests, best, Forwards())  # every shape of the timed pass seen once (GPU kernels are per shape)
        sync(args.device)
    singles = [[request] for request in requests[: args.latency_requests]]
    if isinstance(score, ForwardOnly):  # forward-only: every timed list tokenized and padded before timing
        for timed in (requests, *singles):
            score.ahead(timed, best)
    counts = Forwards()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        score(requests, best, counts)
        sync(args.device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    latencies = []
    for single in singles:
        start = time.perf_counter()
        score(single, best, Forwards())
        sync(args.device)
        latencies.append((time.perf_counter() - start) * 1000)
    peak = hardware.peak_memory_bytes()
    per_pass = Forwards(*(v / args.repeats for v in asdict(counts).values()))
    return {
        "system": args.system,
        "family": args.family,
        "pairs": pairs_of(requests),
        "seconds": round(seconds, 4),
        "pairs_per_s": round(pairs_of(requests) / seconds, 2),
        "batch_size": best,
        "batch_size_sweep": {str(k): round(v, 2) for k, v in sweep.items()},
        "latency_ms": latencies,
        "latency_ms_p50": round(percentile(latencies, 0.5), 2),
        "latency_ms_p95": round(percentile(latencies, 0.95), 2),
        "peak_memory_bytes": peak,
        "padding_waste": round(per_pass.padded_tokens / per_pass.real_tokens - 1, 4) if per_pass.real_tokens else None,
        "flops_per_s": round(per_pass.flops / seconds) if per_pass.flops else None,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["raw", "raw_forward", "sentence_transformers"], required=True)
    parser.add_argument("--family", choices=["cross_encoder", "embedding", "clip"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", required=True, help="JSON list of {query, documents} or {query, images}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", default="8,16,32,64", help="swept on a slice; the best one is timed")
    parser.add_argument("--sweep-requests", type=int, default=6)
    parser.add_argument("--latency-requests", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    json.dump(measure(args), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
