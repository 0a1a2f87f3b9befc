"""Yes/no rerankers: pairs/s with the shared prompt prefix run once per query against the plain path, side by side.

    python -m bench.yes_no [--size small|qwen3-0.6b] [--requests 3] [--documents 100] [--rounds 3] [--readme]

A Qwen3 causal LM with random weights (speed does not depend on them) of the chosen size, with a byte-level
BPE tokenizer trained on the benchmark's own text (about Qwen's tokens per word), is loaded as a replica loads
it, twice: prefix_reuse on and off. Each round scores every request through both, in alternating order, cut
at the pool's batch cap as a replica cuts them. Writes bench/results/yes-no-<size>-<device>.json; --readme
renders the table in docs/models.md from the result files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import dataset
from serve_app import hardware, pages, pools
from serve_app.scoring.types import Content, Pair, TokenCount
from serve_app.settings import Settings, TextPoolSettings

log = logging.getLogger("bench.yes_no")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README_MARK = "bench:yes-no"

# Qwen3-0.6B's (Qwen3-Reranker-0.6B's) config, and a small one a 2-core CPU scores 100-document requests with.
SIZES = {
    "qwen3-0.6b": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151669,
    ),
    "small": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64,
    ),
}  # fmt: skip


def build_model(directory: Path, size: str, requests: list[dataset.BenchRequest]) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.tiny_models import save_chat_tokenizer

    if (directory / "model.safetensors").exists():
        return directory
    corpus = [r.query for r in requests] + [d for r in requests for d in r.documents]
    tokenizer = save_chat_tokenizer(directory, max_length=8192, corpus=corpus, vocab_size=8000)
    sizes = {"vocab_size": len(tokenizer), **SIZES[size]}
    torch.manual_seed(0)
    config = Qwen3Config(
        **sizes, max_position_embeddings=40960, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def score_requests(loaded: pools.PoolScorer, requests: list[list[Pair]]) -> tuple[float, list[float]]:
    """Seconds to score every request, cut at the batch cap as a replica cuts a call; the raw scores."""
    cap = loaded.profile.max_batch_size
    scores: list[float] = []
    start = time.perf_counter()
    for pairs in requests:
        for i in range(0, len(pairs), cap):
            scores.extend(loaded.scorer.score(pairs[i : i + cap]))
    return time.perf_counter() - start, scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--documents", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--readme", action="store_true", help="render the docs' table from bench/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.readme:
        render_readme()
        return

    requests = dataset.load_requests(args.requests, seed=3, min_documents=args.documents, max_documents=args.documents)
    model = build_model(args.cache / f"qwen3-reranker-{args.size}-random", args.size, requests)
    settings = Settings()
    rows = hardware.load_profile_rows(settings.batch_profiles_path)
    # The plain load measures what one more forward costs; the reuse load takes the same figure, so the two
    # differ in prefix reuse only (the measurement is noisy on a shared CPU, and it decides where batches cut).
    plain = pools.load_pool(
        "text", TextPoolSettings(model=str(model), prefix_reuse=False), rows, settings.model_cache_dir
    )
    forward_cost = plain.scorer.options.forward_cost_tokens
    reuse_settings = TextPoolSettings(model=str(model), forward_cost_tokens=forward_cost)
    loaded = {"reuse": pools.load_pool("text", reuse_settings, rows, settings.model_cache_dir), "plain": plain}
    pair_lists = [[Pair(Content(text=r.query), Content(text=d)) for d in r.documents] for r in requests]
    count = sum(len(p) for p in pair_lists)
    tokens = {mode: TokenCount() for mode in loaded}
    forwards = dict.fromkeys(loaded, 0)
    for mode, p in loaded.items():
        cap = p.profile.max_batch_size
        for pairs in pair_lists:
            for i in range(0, len(pairs), cap):
                prepared = p.scorer.prepare(pairs[i : i + cap])
                tokens[mode] += p.scorer.tokens(prepared)
                forwards[mode] += len(prepared.plain) + sum(1 + len(s.groups) for s in prepared.shared)
    rates: dict[str, list[float]] = {"reuse": [], "plain": []}
    scores: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        order = ("reuse", "plain") if round_ % 2 == 0 else ("plain", "reuse")
        for mode in order:
            seconds, scores[mode] = score_requests(loaded[mode], pair_lists)
            rates[mode].append(count / seconds)
            log.info("round %d %s: %.1f pairs/s", round_, mode, count / seconds)
    ratios = [r / p for r, p in zip(rates["reuse"], rates["plain"])]
    where = loaded["reuse"].device
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m bench.yes_no", *(sys.argv[1:] if argv is None else argv)]),
        "device": where.gpu_name
        or f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": loaded["reuse"].profile.dtype,
        "model": f"Qwen3 causal LM, {args.size} config, random weights (cost as real ones)",
        "sizes": SIZES[args.size],
        "requests": args.requests,
        "documents_per_request": args.documents,
        "batch_cap": loaded["reuse"].profile.max_batch_size,
        "forward_cost_tokens": forward_cost,
        "forwards": {mode: forwards[mode] for mode in loaded},
        "tokens_computed": {mode: {"real": t.real, "padded": t.padded} for mode, t in tokens.items()},
        "pairs_per_s": rates,
        "median_pairs_per_s": {mode: statistics.median(r) for mode, r in rates.items()},
        "speedup_per_round": ratios,
        "median_speedup": statistics.median(ratios),
        "max_abs_raw_score_difference": max(abs(a - b) for a, b in zip(scores["reuse"], scores["plain"])),
    }
    kind = "gpu-" + where.gpu_kind.lower() if where.gpu_name else "cpu"
    out = args.out or RESULTS / f"yes-no-{args.size}-{kind}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_pairs_per_s", "median_speedup", "tokens_computed")}, indent=2))
    print(f"wrote {out}")


def render_table(paths: list[Path]) -> str:
    lines = [
        "| device | model | pairs/s, prefix once | pairs/s, plain | speedup (median of rounds) | tokens computed "
        "| result |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        r = json.loads(path.read_text())
        median = r["median_pairs_per_s"]
        tokens = r["tokens_computed"]
        lines.append(
            f"| {r['device']}, {r['dtype']} | {r['model']} | {median['reuse']:,.1f} | {median['plain']:,.1f} "
            f"| {r['median_speedup']:.2f}x | {tokens['reuse']['real'] / tokens['plain']['real']:.2f} of plain's "
            f"| `{path.relative_to(ROOT)}` |"
        )
    return "\n".join(lines) + "\n"


def rendered_block() -> str:
    """The docs block (docs/models.md, `<!-- bench:yes-no -->`) from the committed results."""
    return render_table(sorted(RESULTS.glob("yes-no-*.json")))


def render_readme() -> None:
    pages.render(README_MARK, rendered_block())


if __name__ == "__main__":
    main()
