"""On a real CUDA card (skipped elsewhere): precision, shape buckets, the card's profile row, forward cost, memory."""

from __future__ import annotations

import pytest
import torch

from serve_app import hardware, pools
from serve_app.scoring.batching import BUCKET
from serve_app.scoring.family import LoadOptions
from serve_app.scoring.loading import load_scorer
from serve_app.scoring.types import Content, Pair
from serve_app.settings import Settings, TextPoolSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QUERIES = ["what is the capital of france", "largest river", "a photo of a cat"]
DOCUMENTS = ["paris is the capital city of france", "the dog is big", "a red car in the rain", "python code"]


def pairs() -> list[Pair]:
    return [Pair(Content(q), Content(" ".join([d] * (1 + i)))) for q in QUERIES for i, d in enumerate(DOCUMENTS)]


@pytest.mark.parametrize("family", ["cross_encoder", "embedding"])
def test_bf16_on_the_card_scores_like_fp32_on_the_cpu(model_dirs, family):
    cpu = load_scorer(str(model_dirs[family]))
    gpu = load_scorer(str(model_dirs[family]), LoadOptions(device="cuda:0", dtype=torch.bfloat16, shape_buckets=True))
    expected, got = cpu.score(pairs()), gpu.score(pairs())
    assert gpu.info.device == "cuda:0" and gpu.info.dtype == "bfloat16"
    spread = max(expected) - min(expected)
    assert max(abs(a - b) for a, b in zip(expected, got)) <= 0.05 * spread + 1e-3


def test_batches_on_the_card_have_bucketed_widths_and_power_of_two_sizes(model_dirs):
    scorer = load_scorer(str(model_dirs["cross_encoder"]), LoadOptions(device="cuda:0", shape_buckets=True))
    prepared = scorer.prepare(pairs())
    for _, batch in prepared[1]:
        size, width = batch["input_ids"].shape
        assert width % BUCKET == 0 or width == scorer.info.max_length
        assert size & (size - 1) == 0
    tokens = scorer.tokens(prepared)
    assert tokens.padded >= tokens.real > 0


def test_this_card_has_a_profile_row_and_runs_in_its_dtype():
    where = hardware.this_device()
    assert where.torch_device == "cuda:0" and where.gpu_kind != "cpu"
    rows = hardware.load_profile_rows(Settings().batch_profiles_path)
    profile = hardware.choose_profile(rows, where, "text", TextPoolSettings())
    if where.gpu_kind in {row.gpu for row in rows}:
        assert profile.source != "derive" and profile.max_batch_size >= 32
    assert profile.dtype in ("bfloat16", "float16")


def test_a_forward_pass_costs_more_tokens_on_the_card_than_on_the_cpu(model_dirs):
    cpu = load_scorer(str(model_dirs["slow"]))
    gpu = load_scorer(str(model_dirs["slow"]), LoadOptions(device="cuda:0", dtype=torch.bfloat16, shape_buckets=True))
    assert pools.measure_forward_cost_tokens(gpu, 64) > pools.measure_forward_cost_tokens(cpu, 64)


def test_memory_stats_come_from_the_cuda_allocator(model_dirs):
    load_scorer(str(model_dirs["cross_encoder"]), LoadOptions(device="cuda:0"))
    stats = hardware.memory_stats()
    assert stats["device"] == "cuda" and stats["allocated_bytes"] > 0
    assert stats["peak_allocated_bytes"] >= stats["allocated_bytes"]
