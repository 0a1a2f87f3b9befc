"""serve_app.calibrate: the knee, the profile-row rewrite, and one end-to-end run on a tiny model (no Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from serve_app.calibrate import SweepRow, format_row, main, pick_knee, write_profile_row
from serve_app.hardware import ProfileRow, calibrated_path, load_profile_rows, lookup_profile, read_rows
from serve_app.settings import Settings

MIB = 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rows_of(*points: tuple[int, float, int | None]) -> list[SweepRow]:
    """(batch size, scorer pairs/s, peak MiB) -> sweep rows; raw throughput 10% above the scorer's."""
    return [
        SweepRow(
            batch_size=size,
            raw_ms=size / (pps * 1.1) * 1e3,
            scorer_ms=size / pps * 1e3,
            raw_pairs_per_s=pps * 1.1,
            scorer_pairs_per_s=pps,
            peak_bytes=None if peak is None else peak * MIB,
            bytes_per_pair=None,
        )
        for size, pps, peak in points
    ]


def test_knee_stops_where_doubling_gains_under_five_percent():
    rows = rows_of((1, 100, 10), (2, 190, 11), (4, 350, 12), (8, 360, 14), (16, 900, 18))
    # 8 gains ~2.9% over 4: the knee is 4, even though 16 would jump again.
    assert pick_knee(rows, 1024 * MIB).batch_size == 4


def test_knee_takes_exactly_five_percent_as_a_gain_and_sorts_rows():
    rows = rows_of((4, 105, 12), (1, 50, 10), (2, 100, 11))
    assert pick_knee(rows, None).batch_size == 4


def test_knee_respects_the_memory_budget():
    rows = rows_of((1, 100, 100), (2, 200, 200), (4, 400, 400), (8, 800, 900))
    assert pick_knee(rows, 500 * MIB).batch_size == 4
    assert pick_knee(rows, 1000 * MIB).batch_size == 8
    # Even the smallest past the budget: it is still the answer (a cap is at least 1).
    assert pick_knee(rows, 50 * MIB).batch_size == 1
    # Unknown peaks do not count against the budget.
    assert pick_knee(rows_of((1, 100, None), (2, 200, None)), 1).batch_size == 2


def test_knee_of_a_single_row():
    assert pick_knee(rows_of((16, 1000, 50)), 1 * MIB).batch_size == 16
    with pytest.raises(ValueError):
        pick_knee([], None)


@pytest.fixture
def profiles(tmp_path) -> Path:
    """A copy of the shipped hand-written profiles; calibrate writes beside it."""
    path = tmp_path / "batch_profiles.yaml"
    shutil.copy(Settings().batch_profiles_path, path)
    return path


def row(gpu="cpu", pool="text", model="/models/tiny-ce", size=16, source="calibrate 2025-01-01: test") -> ProfileRow:
    return ProfileRow(gpu, pool, size, 0.005, "float32", model, source)


def test_calibrated_rows_go_beside_the_profiles_and_leave_them_alone(profiles):
    original_text = profiles.read_text()
    original = load_profile_rows(profiles)
    calibrated = calibrated_path(profiles)
    assert calibrated.name == "batch_profiles.calibrated.yaml"

    assert write_profile_row(calibrated, row(size=16)) == "added"
    assert profiles.read_text() == original_text
    rows = load_profile_rows(profiles)
    assert rows == [row(size=16)] + original
    assert lookup_profile(rows, "cpu", "text", "/models/tiny-ce").max_batch_size == 16
    # Other models still get the model-less cpu row.
    other = lookup_profile(original, "cpu", "text", "/models/other").max_batch_size
    assert lookup_profile(rows, "cpu", "text", "/models/other").max_batch_size == other


def test_a_second_calibration_replaces_the_row_of_the_same_kind_pool_and_model(profiles):
    calibrated = calibrated_path(profiles)
    write_profile_row(calibrated, row(size=16))
    assert write_profile_row(calibrated, row(gpu="CPU", size=4, source="calibrate 2025-01-02: again")) == "replaced"
    # A second model and another pool are new rows; the first stays.
    write_profile_row(calibrated, row(model="/models/other", size=8))
    write_profile_row(calibrated, row(pool="image_text", size=2))
    written = read_rows(calibrated)
    assert len(written) == 3
    rows = load_profile_rows(profiles)
    profile = lookup_profile(rows, "cpu", "text", "/models/tiny-ce")
    assert profile.max_batch_size == 4 and "/models/tiny-ce" in profile.source
    assert lookup_profile(rows, "cpu", "text", "/models/other").max_batch_size == 8
    assert lookup_profile(rows, "cpu", "image_text", "/models/tiny-ce").max_batch_size == 2


def test_a_calibrated_exact_row_beats_a_hand_written_glob_and_wins_a_tie(profiles):
    """H200 text has a `*MiniLM*` row: the exact row wins by specificity, wherever it sits."""
    model = "sentence-transformers/all-MiniLM-L6-v2"
    glob_row = next(r for r in load_profile_rows(profiles) if r.gpu == "H200" and r.pool == "text" and r.model)
    write_profile_row(calibrated_path(profiles), row(gpu="H200", model=model, size=256))
    rows = load_profile_rows(profiles)
    assert lookup_profile(rows, "H200", "text", model).max_batch_size == 256
    assert lookup_profile(rows, "H200", "text", "org/paraphrase-MiniLM-L3").max_batch_size == glob_row.max_batch_size
    # The same (kind, pool, model) written by hand and calibrated: the calibrated row wins.
    with profiles.open("a") as f:
        f.write(f"  - {format_row(row(gpu='H200', model=model, size=1024, source='by hand'))}\n")
    assert lookup_profile(load_profile_rows(profiles), "H200", "text", model).max_batch_size == 256


def test_write_profile_row_quotes_awkward_strings(profiles):
    odd = row(model="C:/models/a: b, {c}", source='calibrate 2025-01-01: "quoted", 1,234 pairs/s # not a comment')
    write_profile_row(calibrated_path(profiles), odd)
    assert load_profile_rows(profiles)[0] == odd


def test_main_end_to_end_on_the_tiny_cross_encoder(model_dirs, profiles, tmp_path, capsys):
    model = str(model_dirs["cross_encoder"])
    original = load_profile_rows(profiles)
    png, report = tmp_path / "cal.png", tmp_path / "cal.json"
    argv = ["--pool", "text", "--model", model, "--batch-sizes", "1,2,4", "--repeats", "1", "--tokens", "32"]
    argv += ["--profiles", str(profiles), "--plot", str(png), "--json", str(report)]

    assert main(argv) == 0

    assert png.read_bytes()[:8] == PNG_SIGNATURE
    sweep = json.loads(report.read_text())
    assert [r["batch_size"] for r in sweep["rows"]] == [1, 2, 4]
    assert all(r["scorer_pairs_per_s"] > 0 and r["raw_pairs_per_s"] > 0 for r in sweep["rows"])
    assert sweep["knee"] in (1, 2, 4) and sweep["model"] == model

    rows = load_profile_rows(profiles)
    written = [r for r in rows if r.model == model]
    assert len(written) == 1 and rows[1:] == original
    assert written[0].source.startswith("calibrate")
    assert (written[0].gpu, written[0].pool, written[0].dtype) == ("cpu", "text", "float32")
    assert written[0].max_batch_size == sweep["knee"]
    assert lookup_profile(rows, "cpu", "text", model).max_batch_size == sweep["knee"]

    out = capsys.readouterr().out
    assert "scorer pairs/s" in out and "knee:" in out and "served (scorer) path at the knee" in out


def test_a_dry_run_writes_nothing_into_the_repository(model_dirs, profiles, tmp_path, monkeypatch, capsys):
    """Neither the profiles nor, without --plot and --json, bench/results: its plot and sweep go to a new temporary
    directory, which it names."""
    import tempfile

    from serve_app.calibrate import RESULTS_DIR

    before, results = profiles.read_text(), sorted(RESULTS_DIR.iterdir())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["--pool", "image_text", "--model", str(model_dirs["clip"]), "--batch-sizes", "1,2", "--repeats", "1"]
    assert main([*argv, "--profiles", str(profiles), "--dry-run"]) == 0
    assert profiles.read_text() == before and not calibrated_path(profiles).exists()
    assert sorted(RESULTS_DIR.iterdir()) == results
    (written,) = tmp_path.glob("calibrate-*/calibrate-image_text-*.json")
    assert len(json.loads(written.read_text())["rows"]) == 2 and written.with_suffix(".png").exists()
    assert f"json: {written}" in capsys.readouterr().out


# Pool settings that every loader must honour: none of them is a default.
POOL_SETTINGS = {
    "dtype": "bfloat16",
    "forward_cost_tokens": 77,
    "max_tokens_per_forward": 4096,
    "attn_implementation": "eager",
    "max_batch_size": 6,
    "cuda_graphs": True,  # carried through all three paths (no effect on the CPU)
}


def test_calibrate_bulk_and_a_replica_load_the_pool_scorer_alike(
    model_dirs, profiles, tmp_path, monkeypatch, serve_url
):
    """One loading path (pools.load_pool): the same pool settings give the same load options and batch cap."""

    from serve_app.bulk import PairScorer
    from tests.conftest import deploy, undeploy

    model = str(model_dirs["cross_encoder"])
    deploy("loaded_alike", {"text": {"model": model, **POOL_SETTINGS}, "image_text": {"enabled": False}})
    try:
        (replica,) = httpx.get(f"{serve_url}/loaded_alike/v1/models", timeout=60).json()["pools"]["text"]["replicas"]
    finally:
        undeploy("loaded_alike")

    for name, value in {"model": model, **POOL_SETTINGS}.items():
        monkeypatch.setenv(f"RERANK_TEXT__{name.upper()}", str(value))
    report = tmp_path / "c.json"
    argv = ["--pool", "text", "--batch-sizes", "1,2", "--repeats", "1", "--tokens", "16", "--dry-run"]
    assert main([*argv, "--profiles", str(profiles), "--plot", str(tmp_path / "c.png"), "--json", str(report)]) == 0
    calibrated = json.loads(report.read_text())

    bulk = PairScorer("text", Settings(text={"model": model, **POOL_SETTINGS}))

    expected = {
        "device": "cpu",
        "dtype": "bfloat16",
        "max_tokens_per_forward": 4096,
        "forward_cost_tokens": 77,
        "shape_buckets": False,
        "attn_implementation": "eager",
        "quantize": None,
        "prefix_reuse": True,
        "cuda_graphs": True,
    }
    assert replica["load_options"] == calibrated["load_options"] == bulk.scorer.options.describe() == expected
    assert replica["cuda_graphs"] is None and bulk.scorer.graphs is None  # on the CPU the setting changes nothing
    assert replica["max_batch_size"] == calibrated["profile"]["max_batch_size"] == 6
    assert replica["dtype"] == calibrated["dtype"] == "bfloat16"
