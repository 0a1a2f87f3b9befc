"""Calibration from labels: fit a monotone raw -> 0..1 map to labelled (raw score, relevant?) pairs and report
how well it is calibrated.

The map (`ScoreMap`, which the serving path applies) is numpy only. The fits and the log-loss are
scikit-learn's, imported inside the functions that use them (`load_sklearn`; the `fit` extra), and matplotlib
only inside `plot_report`. Two candidate maps:

- Platt: p = sigmoid(scale * (raw - shift)), the form `Settings.calibration` and `scoring.types.Logistic` take.
- isotonic: a non-decreasing piecewise-linear map through knots (pool-adjacent-violators), for when there are
  enough labels to afford it.

`fit` splits the labels (whole groups, e.g. one query's pairs, to one side), fits both on the train side and
keeps the one with the lower held-out log-loss; `report` gives precision/recall/F1 against thresholds, the
reliability diagram before and after, and thresholds to suggest for each strategy; `plot_report` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from serve_app.ranking import STRATEGIES, Threshold

PROB_FLOOR = 1e-4  # isotonic knots are kept in [PROB_FLOOR, 1 - PROB_FLOOR]: a finite log-loss on new data
MIN_SLOPE = 1e-6  # Platt slope floor, in units of 1 / std(raw): keeps the map increasing (see platt_fit)
THRESHOLDS = np.arange(101) / 100  # 0.00 .. 1.00; k / 100 is the same double as the literal (0.55 == 55 / 100)
SUGGEST_PRECISION = 0.95  # strict: the smallest threshold whose precision reaches this
SUGGEST_RECALL = 0.95  # explore: the largest threshold whose recall still reaches this


def _arrays(raw: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(raw, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} scores but {y.size} labels")
    if x.size == 0:
        raise ValueError("no labelled scores")
    if not np.all(np.isfinite(x)):
        raise ValueError("a raw score is NaN or infinite")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    return x, y


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z, dtype=float)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ---------------------------------------------------------------------------------------------------------------
# The two fits


class FitExtraMissing(ImportError):
    """scikit-learn, which fits the maps, is not installed."""


def load_sklearn() -> ModuleType:
    """scikit-learn's fitting modules, imported here and not at the top: the serving path imports this module for
    ScoreMap and must not load them. Raises FitExtraMissing, naming the extra to install, where it is missing."""
    try:
        import sklearn.isotonic
        import sklearn.linear_model
        import sklearn.metrics
    except ImportError as exc:
        raise FitExtraMissing(
            f"fitting a score map needs scikit-learn ({exc}): install the `fit` extra, "
            'pip install -e ".[fit]" (`make install` does)'
        ) from exc
    return sklearn


def platt_fit(raw: Any, labels: Any, ridge: float = 1e-3, max_iter: int = 100) -> tuple[float, float]:
    """(scale, shift) of p = sigmoid(scale * (raw - shift)): scikit-learn's logistic regression on the log-loss.

    Platt's smoothed targets ((n+ + 1) / (n+ + 2) for a positive, 1 / (n- + 2) for a negative) keep separable
    data from driving the slope to infinity; a tiny L2 ridge on the slope (raw standardised first) keeps the
    Hessian invertible. The map is kept increasing: where the labels would have the slope at or below zero
    (raw scores no better than chance, or all equal), the slope is floored at MIN_SLOPE / std(raw) and the
    shift put so that every raw score near the data maps to the base rate. Then `scale` is tiny and `shift`
    far from the data, but sigmoid(scale * (raw - shift)) is still the base rate there.
    """
    scale, shift, _ = _platt(*_arrays(raw, labels), ridge=ridge, max_iter=max_iter)
    return scale, shift


def _platt(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, max_iter: int = 100) -> tuple[float, float, bool]:
    """platt_fit's (scale, shift) and whether the slope was floored."""
    sklearn = load_sklearn()
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    mu = float(x.mean())
    sd = float(x.std())
    if not sd > 1e-12 * max(1.0, abs(mu)):
        sd = 1.0
    z = (x - mu) / sd
    # A soft target t is the score once as a positive of weight t and once as a negative of weight 1 - t: the
    # same log-loss. C = 1 / ridge: scikit-learn penalises (1 / 2C) slope^2 against the summed weighted loss and
    # leaves the intercept free. Newton's method (newton-cholesky) on two parameters converges in a few steps.
    model = sklearn.linear_model.LogisticRegression(C=1 / ridge, solver="newton-cholesky", tol=1e-10, max_iter=max_iter)
    model.fit(np.concatenate([z, z])[:, None], np.repeat([1, 0], z.size), sample_weight=np.concatenate([t, 1 - t]))
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    floored = slope <= MIN_SLOPE
    if floored:
        slope, intercept = MIN_SLOPE, _logit(float(t.mean()))
    # slope * (x - mu) / sd + intercept = (slope / sd) * (x - (mu - intercept * sd / slope))
    return slope / sd, mu - intercept * sd / slope, floored


def isotonic_fit(raw: Any, labels: Any) -> tuple[list[float], list[float]]:
    """Knots (xs, ys) of the non-decreasing least-squares fit of labels on raw: scikit-learn's isotonic regression
    (pool-adjacent-violators; equal raw scores are pooled first, so they share one value).

    xs strictly increasing, ys non-decreasing and clipped to [PROB_FLOOR, 1 - PROB_FLOOR]; evaluate with
    `numpy.interp(raw, xs, ys)`, which holds the end values outside the range (linear between blocks). Each
    pooled block contributes its lowest and highest raw score (one knot where they are equal; the inner knots
    of a run of equal values are left out).
    """
    x, y = _arrays(raw, labels)
    model = load_sklearn().isotonic.IsotonicRegression(y_min=PROB_FLOOR, y_max=1 - PROB_FLOOR).fit(x, y)
    return model.X_thresholds_.tolist(), model.y_thresholds_.tolist()


# ---------------------------------------------------------------------------------------------------------------
# The map


@dataclass(frozen=True, eq=False)
class ScoreMap:
    """A monotone non-decreasing raw -> 0..1 map: kind "platt" (params scale, shift) or "isotonic" (params xs,
    ys: knots for numpy.interp)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "platt":
            scale, shift = float(self.params["scale"]), float(self.params["shift"])
            if not (math.isfinite(scale) and math.isfinite(shift)) or scale < 0:
                raise ValueError(f"a Platt map needs a finite scale >= 0 and a finite shift, not {scale}, {shift}")
            object.__setattr__(self, "params", {"scale": scale, "shift": shift})
        elif self.kind == "isotonic":
            xs = [float(v) for v in self.params["xs"]]
            ys = [float(v) for v in self.params["ys"]]
            if not xs or len(xs) != len(ys):
                raise ValueError("an isotonic map needs as many ys as xs, at least one")
            if any(b <= a for a, b in zip(xs, xs[1:])) or any(b < a for a, b in zip(ys, ys[1:])):
                raise ValueError("an isotonic map needs strictly increasing xs and non-decreasing ys")
            if not all(math.isfinite(v) for v in xs) or not all(0.0 <= v <= 1.0 for v in ys):
                raise ValueError("an isotonic map needs finite xs and ys in 0..1")
            object.__setattr__(self, "params", {"xs": xs, "ys": ys})
        else:
            raise ValueError(f"unknown score map kind {self.kind!r}: platt or isotonic")

    @classmethod
    def platt(cls, scale: float, shift: float) -> ScoreMap:
        return cls("platt", {"scale": scale, "shift": shift})

    @classmethod
    def isotonic(cls, xs: Sequence[float], ys: Sequence[float]) -> ScoreMap:
        return cls("isotonic", {"xs": list(xs), "ys": list(ys)})

    def apply(self, raw: Any) -> np.ndarray:
        """The map over an array of raw scores."""
        x = np.asarray(raw, dtype=float)
        if self.kind == "platt":
            return _sigmoid(self.params["scale"] * (x - self.params["shift"]))
        return np.interp(x, self.params["xs"], self.params["ys"])

    def __call__(self, raw: float) -> float:
        if self.kind == "platt":
            z = self.params["scale"] * (raw - self.params["shift"])
            if z >= 0:
                return 1.0 / (1.0 + math.exp(-z))
            e = math.exp(z)
            return e / (1.0 + e)
        return float(np.interp(raw, self.params["xs"], self.params["ys"]))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: (list(v) if isinstance(v, list) else v) for k, v in self.params.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScoreMap:
        kind = data.get("kind")
        if kind == "platt":
            return cls.platt(data["scale"], data["shift"])
        if kind == "isotonic":
            return cls.isotonic(data["xs"], data["ys"])
        raise ValueError(f"unknown score map kind {kind!r}: platt or isotonic")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScoreMap) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _probs_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = _arrays(probs, labels)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("a probability is outside 0..1")
    return p, y


def log_loss(probs: Any, labels: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the labels (scikit-learn's), probabilities clipped to [eps, 1 - eps]."""
    p, y = _probs_labels(probs, labels)
    return float(load_sklearn().metrics.log_loss(y, np.clip(p, eps, 1 - eps), labels=[0, 1]))


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum((p * bins).astype(int), bins - 1)


def reliability(probs: Any, labels: Any, bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins over 0..1, each [lo, hi) (1.0 in the last): each bin's bounds, count, mean probability and
    fraction of positives (None for an empty bin).

    Our own count, not scikit-learn's `calibration_curve`: that gives no counts (ECE and the report need them),
    leaves out empty bins and closes its bins on the right, which would move a probability on an edge (an
    isotonic block of 1 in 2 positives is 0.5) into the row below."""
    p, y = _probs_labels(probs, labels)
    index = _bin_index(p, bins)
    out = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        out.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "count": count,
                "mean_prob": float(p[inside].mean()) if count else None,
                "frac_pos": float(y[inside].mean()) if count else None,
            }
        )
    return out


def expected_calibration_error(probs: Any, labels: Any, bins: int = 10) -> float:
    """Sum over equal-width bins of (bin count / n) * |mean probability - fraction of positives|."""
    p, y = _probs_labels(probs, labels)
    index = _bin_index(p, bins)
    counts = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, weights=p, minlength=bins) - np.bincount(index, weights=y, minlength=bins))
    return float(gap.sum() / counts.sum())  # sum |sum p - sum y| / n == sum (n_b / n) |mean p - mean y|


def precision_recall_at(probs: Any, labels: Any, threshold: float, inclusive: bool) -> tuple[float, float]:
    """(precision, recall) keeping p >= threshold (inclusive) or p > threshold, as `ranking.Threshold` does.
    Precision is NaN when nothing is kept, recall NaN when there are no positives."""
    p, y = _probs_labels(probs, labels)
    kept = p >= threshold if inclusive else p > threshold
    true_pos = int(np.sum(kept & (y == 1)))
    n_kept = int(kept.sum())
    n_pos = int(np.sum(y == 1))
    precision = true_pos / n_kept if n_kept else math.nan
    recall = true_pos / n_pos if n_pos else math.nan
    return precision, recall


def _f1(precision: float, recall: float) -> float:
    if math.isnan(precision) or math.isnan(recall):
        return math.nan
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _num(v: float | None) -> float | None:
    """JSON-safe: NaN -> None."""
    return None if v is None or math.isnan(v) else float(v)


# ---------------------------------------------------------------------------------------------------------------
# Split and fit


def split(
    rows_or_n: int | Sequence[Any], groups: Sequence[Any] | None = None, held_out: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices), each sorted. Deterministic in (the set of groups, held_out, seed), not
    in the order of the rows. With groups, every row of a group goes to the same side; the held-out side takes
    whole shuffled groups until it holds round(held_out * n) rows or more. Both sides non-empty where there
    are two or more rows (groups)."""
    n = rows_or_n if isinstance(rows_or_n, int) else len(rows_or_n)
    if not 0 < held_out < 1:
        raise ValueError("held_out is a fraction in (0, 1)")
    if groups is None:
        keys = np.arange(n)
    else:
        if len(groups) != n:
            raise ValueError(f"{n} rows but {len(groups)} groups")
        keys = np.asarray([str(g) for g in groups])
    unique, inverse = np.unique(keys, return_inverse=True)  # sorted: independent of row order
    sizes = np.bincount(inverse, minlength=len(unique))
    order = np.random.default_rng(seed).permutation(len(unique))
    target = max(1, round(held_out * n)) if n >= 2 else 0
    held_groups = np.zeros(len(unique), dtype=bool)
    taken = 0
    for g in order:
        if taken >= target or held_groups.sum() == len(unique) - 1:
            break
        held_groups[g] = True
        taken += int(sizes[g])
    held = held_groups[inverse]
    return np.flatnonzero(~held), np.flatnonzero(held)


@dataclass(frozen=True, eq=False)
class FittedMap:
    """A map fitted from labels, as a scorer's calibrator: what it maps with, how many labels fitted it, where
    it was read from."""

    score_map: ScoreMap
    labels: int
    source: str

    def __call__(self, raw: float) -> float:
        return self.score_map(raw)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.score_map.kind, "labels": self.labels, "source": self.source}

    def __repr__(self) -> str:
        return f"{self.score_map.kind} map fitted on {self.labels} labels ({self.source})"


@dataclass
class FitResult:
    score_map: ScoreMap  # the chosen map, fitted on the train side
    platt: ScoreMap
    isotonic: ScoreMap | None  # None: too few train labels (or one class only)
    log_loss: dict[str, float | None]  # held-out: "platt", "isotonic", "before"
    ece_before: float | None  # held-out; None without a `before` map
    ece_after: float
    counts: dict[str, int]  # train, train_positive, held_out, held_out_positive
    train_idx: np.ndarray
    held_idx: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.score_map.kind

    def to_json(self) -> dict[str, Any]:
        return {
            "score_map": self.score_map.to_json(),
            "platt": self.platt.to_json(),
            "isotonic": self.isotonic and self.isotonic.to_json(),
            "log_loss": {k: _num(v) for k, v in self.log_loss.items()},
            "ece_before": _num(self.ece_before),
            "ece_after": _num(self.ece_after),
            "counts": dict(self.counts),
            "notes": list(self.notes),
        }


def fit(
    raw: Any,
    labels: Any,
    groups: Sequence[Any] | None = None,
    min_isotonic: int = 200,
    before: Callable[[float], float] | None = None,
    held_out: float = 0.3,
    seed: int = 0,
    bins: int = 10,
) -> FitResult:
    """Split (groups kept whole), fit Platt on the train side and isotonic too where the train side has
    >= min_isotonic labels of both classes, keep the one with the lower held-out log-loss (Platt on a tie).
    `before` (e.g. the family's default map) gives the held-out ECE and log-loss to compare with."""
    x, y = _arrays(raw, labels)
    train, held = split(x.size, groups, held_out, seed)
    if train.size == 0 or held.size == 0:
        raise ValueError("need two or more groups (rows) to hold some out")
    notes: list[str] = []
    xt, yt, xh, yh = x[train], y[train], x[held], y[held]
    n_pos_train = int(yt.sum())
    if n_pos_train in (0, yt.size):
        notes.append("the train side has one class only: the map is that class's smoothed rate")
    scale, shift, floored = _platt(xt, yt)
    platt = ScoreMap.platt(scale, shift)
    if floored:
        notes.append("raw scores do not rank the train labels (Platt slope at its floor): the map is ~constant")
    losses: dict[str, float | None] = {"platt": log_loss(platt.apply(xh), yh), "isotonic": None, "before": None}
    isotonic = None
    if yt.size >= min_isotonic and 0 < n_pos_train < yt.size:
        isotonic = ScoreMap.isotonic(*isotonic_fit(xt, yt))
        losses["isotonic"] = log_loss(isotonic.apply(xh), yh)
    chosen = platt
    if isotonic is not None and losses["isotonic"] < losses["platt"]:
        chosen = isotonic
    ece_before = None
    if before is not None:
        before_probs = np.array([before(float(v)) for v in xh])
        losses["before"] = log_loss(before_probs, yh)
        ece_before = expected_calibration_error(before_probs, yh, bins)
    return FitResult(
        score_map=chosen,
        platt=platt,
        isotonic=isotonic,
        log_loss=losses,
        ece_before=ece_before,
        ece_after=expected_calibration_error(chosen.apply(xh), yh, bins),
        counts={
            "train": int(train.size),
            "train_positive": n_pos_train,
            "held_out": int(held.size),
            "held_out_positive": int(yh.sum()),
        },
        train_idx=train,
        held_idx=held,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------------
# Report


def _suggest(probs: np.ndarray, labels: np.ndarray, inclusive: bool, rule: str, thresholds: np.ndarray) -> float | None:
    pr = [precision_recall_at(probs, labels, float(t), inclusive) for t in thresholds]
    if rule == "precision":  # smallest threshold whose precision (something kept) reaches the target
        hits = [t for t, (p, _) in zip(thresholds, pr) if not math.isnan(p) and p >= SUGGEST_PRECISION]
        return float(min(hits)) if hits else None
    if rule == "recall":  # largest threshold whose recall still reaches the target
        hits = [t for t, (_, r) in zip(thresholds, pr) if not math.isnan(r) and r >= SUGGEST_RECALL]
        return float(max(hits)) if hits else None
    f1 = [_f1(p, r) for p, r in pr]  # best F1, the smallest threshold on a tie
    best = max((v for v in f1 if not math.isnan(v)), default=math.nan)
    if math.isnan(best) or best == 0:
        return None
    return float(thresholds[f1.index(best)])


SUGGEST_RULES = {"strict": "precision", "balanced": "f1", "explore": "recall"}


def _curves(probs: np.ndarray, y: np.ndarray) -> tuple[list, list, list]:
    """Precision, recall and F1 keeping p >= each of THRESHOLDS."""
    precision, recall, f1 = [], [], []
    for t in THRESHOLDS:
        p, r = precision_recall_at(probs, y, float(t), inclusive=True)
        precision.append(_num(p))
        recall.append(_num(r))
        f1.append(_num(_f1(p, r)))
    return precision, recall, f1


def _strategy_rows(
    after: np.ndarray, prior: np.ndarray | None, y: np.ndarray, strategies: Mapping[str, Threshold]
) -> tuple[dict, dict]:
    """Each strategy's threshold with precision/recall/F1/kept after (and before) the map, and its suggested
    threshold on these labels."""

    def at(probs: np.ndarray, threshold: Threshold) -> dict[str, Any]:
        p, r = precision_recall_at(probs, y, threshold.value, threshold.inclusive)
        kept = int(np.sum(probs >= threshold.value if threshold.inclusive else probs > threshold.value))
        return {"precision": _num(p), "recall": _num(r), "f1": _num(_f1(p, r)), "kept": kept}

    per_strategy, suggested, fitted = {}, {}, {}
    for name, threshold in strategies.items():
        per_strategy[name] = {
            "threshold": threshold.value,
            "inclusive": threshold.inclusive,
            "after": at(after, threshold),
            "before": None if prior is None else at(prior, threshold),
        }
        rule = SUGGEST_RULES.get(name)
        suggested[name] = None if rule is None else _suggest(after, y, threshold.inclusive, rule, THRESHOLDS)
        chosen = Threshold(suggested[name], threshold.inclusive) if suggested[name] is not None else None
        fitted[name] = None if chosen is None else {"threshold": chosen.value, "inclusive": chosen.inclusive,
                                                    "rule": rule, **at(after, chosen)}  # fmt: skip
    return per_strategy, suggested, fitted


def report(
    raw: Any,
    labels: Any,
    score_map: Callable[[float], float],
    before: Callable[[float], float] | None = None,
    bins: int = 10,
    strategies: Mapping[str, Threshold] = STRATEGIES,
) -> dict[str, Any]:
    """How `score_map` does on these labelled scores (pass the held-out side: `FitResult.held_idx`), as a
    JSON-safe dict (NaN -> None):

    - thresholds 0.00..1.00 with precision, recall and F1 keeping calibrated p >= threshold;
    - reliability bins and ECE (and log-loss) after, and before where `before` is given;
    - each strategy's threshold (its own inclusive/exclusive rule) with precision/recall/F1/kept, before/after;
    - suggested thresholds, each under its strategy's inclusive rule: strict the smallest with precision >=
      0.95, balanced the best F1, explore the largest with recall >= 0.95; None where unreachable;
    - `fitted_thresholds`: those thresholds with their precision, recall, F1 and kept count on these labels.
    """
    x, y = _arrays(raw, labels)
    after = score_map.apply(x) if isinstance(score_map, ScoreMap) else np.array([score_map(float(v)) for v in x])
    prior = None if before is None else np.array([before(float(v)) for v in x])

    precision, recall, f1 = _curves(after, y)
    per_strategy, suggested, fitted = _strategy_rows(after, prior, y, strategies)
    return {
        "n": int(y.size),
        "positives": int(y.sum()),
        "score_map": score_map.to_json() if isinstance(score_map, ScoreMap) else None,
        "thresholds": [float(t) for t in THRESHOLDS],
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "reliability": {
            "after": reliability(after, y, bins),
            "before": None if prior is None else reliability(prior, y, bins),
        },
        "ece": {
            "after": expected_calibration_error(after, y, bins),
            "before": None if prior is None else expected_calibration_error(prior, y, bins),
        },
        "log_loss": {"after": log_loss(after, y), "before": None if prior is None else log_loss(prior, y)},
        "strategies": per_strategy,
        "suggested": suggested,
        # Each strategy's threshold for this model (the service applies these), with what it does on these labels.
        "fitted_thresholds": fitted,
        "suggest_rules": {"strict_precision": SUGGEST_PRECISION, "explore_recall": SUGGEST_RECALL},
    }


def plot_report(report: Mapping[str, Any], path: str | Path) -> None:
    """One PNG, two panels: precision/recall/F1 against threshold with the strategies' thresholds (solid) and
    the suggested ones (dotted); the reliability diagram before/after with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    def series(values: Sequence[float | None]) -> list[float]:
        return [math.nan if v is None else v for v in values]

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    try:
        t = report["thresholds"]
        left.plot(t, series(report["precision"]), label="precision")
        left.plot(t, series(report["recall"]), label="recall")
        left.plot(t, series(report["f1"]), label="F1")
        colours = {"strict": "tab:red", "balanced": "tab:purple", "explore": "tab:brown"}
        for name, s in report["strategies"].items():
            colour = colours.get(name, "grey")
            op = ">=" if s["inclusive"] else ">"
            left.axvline(s["threshold"], color=colour, linestyle="-", alpha=0.6, label=f"{name} {op} {s['threshold']}")
            suggestion = report["suggested"].get(name)
            if suggestion is not None:
                left.axvline(suggestion, color=colour, linestyle=":", alpha=0.9, label=f"{name} suggested {suggestion}")
        left.set_xlim(0, 1)
        left.set_ylim(0, 1.02)
        left.set_xlabel("threshold on the calibrated score")
        left.set_title(f"precision / recall / F1 (n={report['n']}, {report['positives']} positive)")
        left.legend(fontsize=7, loc="lower left")
        left.grid(alpha=0.3)

        right.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
        for key, style in (("before", "o--"), ("after", "s-")):
            bins = report["reliability"].get(key)
            if not bins:
                continue
            filled = [b for b in bins if b["count"]]
            ece = report["ece"][key]
            right.plot(
                [b["mean_prob"] for b in filled],
                [b["frac_pos"] for b in filled],
                style,
                label=f"{key} (ECE {ece:.3f})",
            )
        right.set_xlim(0, 1)
        right.set_ylim(0, 1)
        right.set_xlabel("mean calibrated score in bin")
        right.set_ylabel("fraction relevant")
        right.set_title("reliability (held-out)")
        right.legend(fontsize=8, loc="upper left")
        right.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
