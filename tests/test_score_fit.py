"""serve_app.score_fit: the Platt and isotonic fits (scikit-learn's), the map, the metrics, the split, fit and report
(no Ray, no model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from serve_app.ranking import STRATEGIES
from serve_app.score_fit import (
    ScoreMap,
    expected_calibration_error,
    fit,
    isotonic_fit,
    log_loss,
    platt_fit,
    plot_report,
    precision_recall_at,
    reliability,
    report,
    split,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def logistic_data(n: int, scale: float, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.normal(shift, 2.0 / scale, n)
    p = 1 / (1 + np.exp(-scale * (raw - shift)))
    return raw, (rng.random(n) < p).astype(int)


def sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=float)))


def test_platt_recovers_scale_and_shift():
    raw, labels = logistic_data(20_000, scale=8.0, shift=0.35)
    scale, shift = platt_fit(raw, labels)
    assert scale == pytest.approx(8.0, rel=0.08)
    assert shift == pytest.approx(0.35, abs=0.02)


def test_platt_separable_and_degenerate_data_stay_finite_and_increasing():
    scale, shift = platt_fit([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1])
    assert math.isfinite(scale) and 0 < scale < 100 and shift == pytest.approx(1.5)
    # All raw scores equal: no slope to learn; the map is the smoothed base rate (3 + 1) / (3 + 2) there.
    scale, shift = platt_fit([0.7] * 4, [0, 1, 1, 1])
    assert scale > 0 and math.isfinite(shift)
    assert ScoreMap.platt(scale, shift)(0.7) == pytest.approx((1 * 1 / 3 + 3 * 4 / 5) / 4, abs=1e-4)
    # Anti-correlated: floored to an (almost) flat increasing map, never a decreasing one.
    scale, shift = platt_fit([0.0, 1.0, 2.0, 3.0], [1, 1, 0, 0])
    m = ScoreMap.platt(scale, shift)
    assert 0 < scale < 1e-5 and m(0.0) <= m(3.0) and m(0.0) == pytest.approx(0.5, abs=1e-4)


def test_isotonic_is_monotone_and_fits_a_step():
    rng = np.random.default_rng(3)
    raw = rng.random(500)
    labels = (raw > 0.6).astype(int)
    xs, ys = isotonic_fit(raw, labels)
    assert all(b > a for a, b in zip(xs, xs[1:])) and all(b >= a for a, b in zip(ys, ys[1:]))
    assert min(ys) == pytest.approx(1e-4) and max(ys) == pytest.approx(1 - 1e-4)
    fitted = np.interp(raw, xs, ys)
    assert np.all(np.abs(fitted - labels) <= 1e-4 + 1e-12)
    assert np.interp(-5.0, xs, ys) == ys[0] and np.interp(5.0, xs, ys) == ys[-1]  # held outside the range
    # Violators pooled; equal raw scores share one value.
    xs, ys = isotonic_fit([1, 2, 3, 3, 4], [0, 1, 0, 1, 1])
    assert np.interp(2, xs, ys) == pytest.approx(2 / 3) and np.interp(3, xs, ys) == pytest.approx(2 / 3)
    noisy_raw = rng.random(300)
    noisy = (rng.random(300) < noisy_raw).astype(int)
    _, ys = isotonic_fit(noisy_raw, noisy)
    assert all(b >= a for a, b in zip(ys, ys[1:]))


def test_score_map_round_trips_json_and_is_monotone():
    rng = np.random.default_rng(4)
    raw = rng.random(400)
    labels = (rng.random(400) < raw).astype(int)
    grid = np.linspace(-1, 2, 301)
    for m in (ScoreMap.platt(*platt_fit(raw, labels)), ScoreMap.isotonic(*isotonic_fit(raw, labels))):
        data = json.loads(json.dumps(m.to_json()))
        back = ScoreMap.from_json(data)
        assert back == m and back.kind == m.kind
        values = [back(float(v)) for v in grid]
        assert all(b >= a for a, b in zip(values, values[1:]))
        assert all(0 <= v <= 1 for v in values)
        assert np.allclose(back.apply(grid), values)
    with pytest.raises(ValueError):
        ScoreMap.platt(-1.0, 0.0)
    with pytest.raises(ValueError):
        ScoreMap.isotonic([0, 1], [0.9, 0.1])
    with pytest.raises(ValueError):
        ScoreMap.from_json({"kind": "spline"})


def test_ece_small_when_calibrated_and_falls_after_fitting():
    rng = np.random.default_rng(5)
    probs = rng.random(20_000)
    labels = (rng.random(20_000) < probs).astype(int)
    assert expected_calibration_error(probs, labels) < 0.02
    # The same labels seen through a miscalibrated map: raw = logit(p) / 3 + 1, read as sigmoid(raw).
    raw = np.log(probs / (1 - probs)) / 3 + 1
    before = expected_calibration_error(sigmoid(raw), labels)
    assert before > 0.1
    result = fit(raw, labels, before=lambda v: float(sigmoid(v)))
    assert result.ece_before == pytest.approx(
        expected_calibration_error(sigmoid(raw[result.held_idx]), labels[result.held_idx])
    )
    assert result.ece_after < 0.03 < result.ece_before
    assert result.log_loss["platt"] < result.log_loss["before"]


def test_ece_and_log_loss_by_hand():
    probs = [0.05, 0.15, 0.15, 0.95]
    labels = [0, 1, 0, 1]
    # bin 0: |0.05 - 0| ; bin 1: |0.15 - 0.5| * 2 ; bin 9: |0.95 - 1|
    assert expected_calibration_error(probs, labels) == pytest.approx((0.05 + 0.7 + 0.05) / 4)
    expected = -(math.log(0.95) + math.log(0.15) + math.log(0.85) + math.log(0.95)) / 4
    assert log_loss(probs, labels) == pytest.approx(expected)
    assert math.isfinite(log_loss([0.0, 1.0], [1, 0]))


def test_reliability_rows_are_scikit_learns_calibration_curve_with_the_empty_bins_kept():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(10)
    probs = np.concatenate([rng.uniform(0.02, 0.28, 300), rng.uniform(0.61, 0.99, 300)])  # bins 3, 4, 5 empty
    labels = (rng.random(600) < probs).astype(int)
    rows = reliability(probs, labels)
    assert [(row["lo"], row["hi"]) for row in rows] == [(b / 10, (b + 1) / 10) for b in range(10)]
    filled = [row for row in rows if row["count"]]
    assert [rows.index(row) for row in rows if not row["count"]] == [3, 4, 5]
    assert all(row["mean_prob"] is None and row["frac_pos"] is None for row in rows if not row["count"])
    frac_pos, mean_prob = calibration_curve(labels, probs, n_bins=10)
    assert [row["frac_pos"] for row in filled] == pytest.approx(frac_pos.tolist())
    assert [row["mean_prob"] for row in filled] == pytest.approx(mean_prob.tolist())
    # A probability on an edge opens its bin (calibration_curve's bins close on the right instead); 1.0 is in the last.
    edges = reliability([0.5, 0.5, 1.0], [1, 0, 1])
    assert edges[5]["count"] == 2 and edges[4]["count"] == 0 and edges[9]["count"] == 1


def test_precision_recall_is_a_direct_count_and_ties_matter():
    rng = np.random.default_rng(6)
    probs = np.round(rng.random(1000), 2)  # many ties with the 0.01 grid
    labels = (rng.random(1000) < probs).astype(int)
    for threshold in (0.4, 0.55, 0.75):
        for inclusive in (True, False):
            kept = [p >= threshold if inclusive else p > threshold for p in probs.tolist()]
            true_pos = sum(1 for k, y in zip(kept, labels) if k and y)
            precision, recall = precision_recall_at(probs, labels, threshold, inclusive)
            assert precision == true_pos / sum(kept)
            assert recall == true_pos / labels.sum()
    # A tie at the threshold: kept when inclusive only.
    assert precision_recall_at([0.55, 0.9], [1, 1], 0.55, inclusive=True) == (1.0, 1.0)
    assert precision_recall_at([0.55, 0.9], [1, 1], 0.55, inclusive=False) == (1.0, 0.5)
    precision, recall = precision_recall_at([0.1, 0.2], [0, 1], 0.5, inclusive=True)
    assert math.isnan(precision) and recall == 0.0


def test_split_keeps_groups_together_and_is_deterministic():
    groups = [f"q{i // 5}" for i in range(200)]  # 40 groups of 5
    train, held = split(groups, groups, held_out=0.3, seed=0)
    assert sorted(train.tolist() + held.tolist()) == list(range(200))
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in held})
    assert len(held) == 60
    again = split(200, groups, held_out=0.3, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], held)
    # Row order does not matter, only the groups.
    perm = np.random.default_rng(1).permutation(200)
    shuffled = [groups[i] for i in perm]
    _, held2 = split(200, shuffled, seed=0)
    assert {shuffled[i] for i in held2} == {groups[i] for i in held}
    assert not np.array_equal(split(200, groups, seed=1)[1], held)
    # Without groups: rows, about the fraction asked.
    train, held = split(100, held_out=0.25, seed=2)
    assert len(held) == 25 and len(train) == 75
    assert len(split(2)[1]) == 1 and len(split(["a", "b", "c"], ["g", "g", "g"])[1]) == 0


def step_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A relevance curve no sigmoid follows: two plateaus and a jump."""
    rng = np.random.default_rng(seed)
    raw = rng.random(n)
    p = np.where(raw < 0.5, 0.2, np.where(raw < 0.9, 0.25, 0.97))
    return raw, (rng.random(n) < p).astype(int)


def test_fit_picks_isotonic_only_with_enough_labels():
    raw, labels = step_data(3000, seed=7)
    groups = [str(i // 3) for i in range(3000)]
    big = fit(raw, labels, groups, min_isotonic=200)
    assert big.isotonic is not None and big.kind == "isotonic"
    assert big.log_loss["isotonic"] < big.log_loss["platt"]
    assert big.counts["train"] + big.counts["held_out"] == 3000 and big.counts["train"] >= 200
    json.dumps(big.to_json())

    small = fit(raw[:240], labels[:240], groups[:240], min_isotonic=200)  # ~168 train labels
    assert small.isotonic is None and small.kind == "platt" and small.log_loss["isotonic"] is None
    assert fit(raw[:240], labels[:240], groups[:240], min_isotonic=100).isotonic is not None

    # Logistic data: Platt is the right model and holds its own.
    raw, labels = logistic_data(3000, scale=5.0, shift=0.0, seed=8)
    result = fit(raw, labels)
    assert result.log_loss["platt"] <= result.log_loss["isotonic"] + 0.01


def test_fit_needs_two_groups():
    with pytest.raises(ValueError, match="two or more"):
        fit([0.1, 0.2, 0.3], [0, 1, 1], groups=["a", "a", "a"])


def test_report_and_plot(tmp_path):
    raw, labels = logistic_data(4000, scale=6.0, shift=0.5, seed=9)
    before = ScoreMap.platt(1.0, 0.0)
    result = fit(raw, labels, before=before)
    held_raw, held_labels = raw[result.held_idx], labels[result.held_idx]
    out = report(held_raw, held_labels, result.score_map, before=before)
    json.dumps(out)  # JSON-safe: no NaN
    assert "NaN" not in json.dumps(out)
    assert len(out["thresholds"]) == 101 and out["thresholds"][55] == 0.55
    assert out["ece"]["after"] < out["ece"]["before"]
    assert out["ece"]["after"] == pytest.approx(result.ece_after)
    probs = result.score_map.apply(held_raw)
    for name, threshold in STRATEGIES.items():
        row = out["strategies"][name]
        assert row["threshold"] == threshold.value and row["inclusive"] == threshold.inclusive
        precision, recall = precision_recall_at(probs, held_labels, threshold.value, threshold.inclusive)
        assert row["after"]["precision"] == pytest.approx(precision) and row["after"]["recall"] == recall
    strict, balanced, explore = (out["suggested"][k] for k in ("strict", "balanced", "explore"))
    assert strict is not None and explore is not None and balanced is not None
    assert precision_recall_at(probs, held_labels, strict, inclusive=False)[0] >= 0.95
    assert precision_recall_at(probs, held_labels, explore, inclusive=False)[1] >= 0.9
    assert explore < balanced < strict
    f1 = [v for v in out["f1"] if v is not None]
    assert out["f1"][round(balanced * 100)] == max(f1)
    assert sum(b["count"] for b in out["reliability"]["after"]) == len(held_labels)

    # Unreachable suggestions are None: labels the scores do not rank.
    flat = report([0.5] * 10, [0, 1] * 5, ScoreMap.platt(1.0, 0.5))
    assert flat["suggested"]["strict"] is None

    path = tmp_path / "plots" / "report.png"
    plot_report(out, path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    plot_report(flat, tmp_path / "flat.png")  # no `before`, empty curves
