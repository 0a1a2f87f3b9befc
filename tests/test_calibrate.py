"""serve_app.calibrate: the knee, the profile-row rewrite, and one end-to-end run on a tiny model (no Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serve_app import hardware
from serve_app.calibrate import SweepRow, format_row, main, pick_knee, write_profile_row
from serve_app.hardware import ProfileRow, load_profile_rows, lookup_profile

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
    path = tmp_path / "batch_profiles.yaml"
    shutil.copy(hardware.PROFILES_PATH, path)
    return path


def header_of(text: str) -> str:
    return text[: text.index("profiles:\n") + len("profiles:\n")]


def row(
    gpu="cpu", modality="text", model="/models/tiny-ce", size=16, source="calibrate 2025-01-01: test"
) -> ProfileRow:
    return ProfileRow(gpu, modality, size, 0.005, "float32", model, source)


def test_write_profile_row_appends_then_replaces_and_keeps_the_rest(profiles):
    original_text = profiles.read_text()
    original = load_profile_rows(profiles)

    assert write_profile_row(profiles, row(size=16)) == "added"
    rows = load_profile_rows(profiles)
    assert rows == original + [row(size=16)]
    assert lookup_profile(rows, "cpu", "text", "/models/tiny-ce").max_batch_size == 16
    # Other models still get the model-less cpu row.
    other = lookup_profile(original, "cpu", "text", "/models/other").max_batch_size
    assert lookup_profile(rows, "cpu", "text", "/models/other").max_batch_size == other
    text = profiles.read_text()
    assert header_of(text) == header_of(original_text)
    assert text.startswith(original_text)  # appended: every earlier byte is as it was

    assert write_profile_row(profiles, row(size=4, source="calibrate 2025-01-02: again")) == "replaced"
    rows = load_profile_rows(profiles)
    assert rows == original + [row(size=4, source="calibrate 2025-01-02: again")]
    profile = lookup_profile(rows, "cpu", "text", "/models/tiny-ce")
    assert profile.max_batch_size == 4 and "/models/tiny-ce" in profile.source
    assert profiles.read_text() == original_text + "  " + format_row(rows[-1]) + "\n"

    # A second model and another modality are new rows; the first stays.
    write_profile_row(profiles, row(model="/models/other", size=8))
    write_profile_row(profiles, row(modality="image_text", size=2))
    rows = load_profile_rows(profiles)
    assert len(rows) == len(original) + 3
    assert lookup_profile(rows, "cpu", "text", "/models/tiny-ce").max_batch_size == 4
    assert lookup_profile(rows, "cpu", "text", "/models/other").max_batch_size == 8
    assert lookup_profile(rows, "cpu", "image_text", "/models/tiny-ce").max_batch_size == 2


def test_write_profile_row_goes_before_a_matching_model_glob(profiles):
    """H200 text already has a `*MiniLM*` row; the exact row must come first for lookup_profile to take it."""
    model = "sentence-transformers/all-MiniLM-L6-v2"
    original = load_profile_rows(profiles)
    glob_row = next(r for r in original if r.gpu == "H200" and r.modality == "text" and r.model == "*MiniLM*")
    new = row(gpu="H200", model=model, size=256)
    for size in (256, 128):  # added, then replaced in place
        new = row(gpu="H200", model=model, size=size)
        write_profile_row(profiles, new)
        rows = load_profile_rows(profiles)
        assert [r for r in rows if r != new] == original
        assert rows.index(new) < rows.index(glob_row)
        assert lookup_profile(rows, "H200", "text", model).max_batch_size == size
    # Other MiniLM variants still get the glob row.
    assert lookup_profile(rows, "H200", "text", "org/paraphrase-MiniLM-L3").max_batch_size == glob_row.max_batch_size


def test_write_profile_row_quotes_awkward_strings(profiles):
    odd = row(model="C:/models/a: b, {c}", source='calibrate 2025-01-01: "quoted", 1,234 pairs/s # not a comment')
    write_profile_row(profiles, odd)
    assert load_profile_rows(profiles)[-1] == odd


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
    assert len(written) == 1 and rows[: len(original)] == original
    assert written[0].source.startswith("calibrate")
    assert (written[0].gpu, written[0].modality, written[0].dtype) == ("cpu", "text", "float32")
    assert written[0].max_batch_size == sweep["knee"]
    assert lookup_profile(rows, "cpu", "text", model).max_batch_size == sweep["knee"]

    out = capsys.readouterr().out
    assert "scorer pairs/s" in out and "knee:" in out and "served (scorer) path at the knee" in out


def test_dry_run_leaves_the_profiles_alone(model_dirs, profiles, tmp_path):
    before = profiles.read_text()
    argv = ["--pool", "image_text", "--model", str(model_dirs["clip"]), "--batch-sizes", "1,2", "--repeats", "1"]
    argv += ["--profiles", str(profiles), "--plot", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")]
    assert main([*argv, "--dry-run"]) == 0
    assert profiles.read_text() == before
    assert len(json.loads((tmp_path / "c.json").read_text())["rows"]) == 2
