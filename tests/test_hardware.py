"""Batch profiles, GPU kinds, derived caps, shape buckets and precision options (no Ray)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from serve_app.hardware import (
    ProfileRow,
    derive_max_batch_size,
    gpu_kind_of,
    load_profile_rows,
    lookup_profile,
)
from serve_app.scoring.batching import BUCKET, Shapes, padded_groups
from serve_app.scoring.family import LoadOptions
from serve_app.scoring.loading import load_scorer
from serve_app.scoring.types import Content, Pair
from serve_app.settings import Settings


@pytest.mark.parametrize(
    ("device_name", "kind"),
    [
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10G"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GeForce RTX 3060", "RTX3060"),
        ("Tesla T4", "T4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA B200", "B200"),
    ],
)
def test_device_names_map_to_ray_accelerator_kinds(device_name, kind):
    assert gpu_kind_of(device_name) == kind


def test_every_shipped_row_loads_and_names_its_source():
    rows = load_profile_rows(Settings().batch_profiles_path)
    assert {(r.gpu, r.pool) for r in rows} >= {
        (gpu, pool)
        for gpu in ("cpu", "RTX3060", "RTX3090", "A10G", "T4", "L4", "A100", "H100", "H200")
        for pool in ("text", "image_text")
    }
    assert all(r.source for r in rows)
    for gpu in {r.gpu for r in rows}:  # image-text pairs cost more: never a larger cap than text
        text = lookup_profile(rows, gpu, "text", "any")
        image_text = lookup_profile(rows, gpu, "image_text", "any")
        assert image_text.max_batch_size <= text.max_batch_size, gpu


def test_a_model_specific_row_wins_over_the_generic_one():
    rows = [
        ProfileRow("H200", "text", 64, 0.005, "bfloat16", source="generic"),
        ProfileRow("H200", "text", 512, 0.005, "bfloat16", model="*MiniLM*", source="minilm"),
    ]
    assert lookup_profile(rows, "H200", "text", "cross-encoder/ms-marco-MiniLM-L-6-v2").max_batch_size == 512
    assert lookup_profile(rows, "H200", "text", "BAAI/bge-reranker-v2-m3").max_batch_size == 64
    assert lookup_profile(rows, "h200", "text", "x").source == "table: H200/text"
    assert lookup_profile(rows, "B200", "text", "x") is None


@pytest.mark.parametrize(
    ("free_gib", "mib_per_pair", "cap"),
    [(20, 4, 1024), (10, 8.3, 512), (1, 69, 8), (0.01, 69, 1)],
)
def test_derived_cap_is_the_largest_power_of_two_that_fits(free_gib, mib_per_pair, cap):
    assert derive_max_batch_size(int(free_gib * 2**30), mib_per_pair * 2**20) == cap


def test_shape_buckets_round_lengths_and_pad_rows_to_powers_of_two():
    shapes = Shapes(BUCKET, power_of_two_batches=True)
    assert shapes.width(1, 512) == BUCKET and shapes.width(BUCKET + 1, 512) == 2 * BUCKET
    assert shapes.width(500, 512) == 512
    assert [shapes.rows(n) for n in (1, 2, 3, 13, 16, 17)] == [1, 2, 4, 16, 16, 32]
    assert Shapes().rows(13) == 13


def test_padded_groups_only_make_warmed_shapes(model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["cross_encoder"])
    texts = [" ".join(["dog"] * n) for n in (3, 9, 17, 30, 41, 50, 61, 5, 7)]
    encoding = tokenizer(texts, truncation=True, max_length=64)
    groups = padded_groups(
        encoding, LoadOptions(max_tokens_per_forward=10_000, shape_buckets=True).cuts(), 0, max_length=64
    )
    assert sorted(i for group, _ in groups for i in group) == list(range(len(texts)))
    for group, batch in groups:
        batch_size, width = batch["input_ids"].shape
        assert width % BUCKET == 0 and batch_size & (batch_size - 1) == 0 and batch_size >= len(group)
        # Padding rows repeat a real row of the group: no row is all padding.
        assert bool(batch["attention_mask"].sum(1).gt(0).all())


PAIRS = [Pair(Content("what is the capital of france"), Content(d)) for d in ("paris is the capital", "a red car")]


def test_int8_on_cpu_quantises_linear_layers_and_stays_close(model_dirs):
    full = load_scorer(str(model_dirs["cross_encoder"]))
    int8 = load_scorer(str(model_dirs["cross_encoder"]), LoadOptions(quantize="int8"))
    assert int8.info.quantization == "int8"
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8.model.modules())
    assert int8.score(PAIRS) == pytest.approx(full.score(PAIRS), abs=0.2)


def test_flash_attention_without_flash_attn_falls_back_to_sdpa(model_dirs):
    scorer = load_scorer(str(model_dirs["cross_encoder"]), LoadOptions(attn_implementation="flash_attention_2"))
    assert scorer.info.attn_implementation == "sdpa"
    assert scorer.score(PAIRS) == pytest.approx(load_scorer(str(model_dirs["cross_encoder"])).score(PAIRS), abs=1e-5)


def test_eager_attention_gives_the_same_scores_as_sdpa(model_dirs):
    eager = load_scorer(str(model_dirs["cross_encoder"]), LoadOptions(attn_implementation="eager"))
    assert eager.info.attn_implementation == "eager"
    assert eager.score(PAIRS) == pytest.approx(load_scorer(str(model_dirs["cross_encoder"])).score(PAIRS), abs=1e-4)


def test_the_device_outside_ray_starts_no_ray_instance():
    """calibrate and the benchmarks find their device outside Ray: asking Ray would start (or join) a cluster."""
    pytest.importorskip("ray")
    code = "import ray\nfrom serve_app import hardware\nprint(hardware.this_device().gpu_kind, ray.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["cpu", "False"]
