"""The one way a call's pairs are scored: cut into windows, checked, scored in pieces of the model's cap,
calibrated, each pair given its best window's score. The replica runs these steps around its batcher (its
pieces share forwards with other callers'); the bulk job and `calibrate_scores` run them as they stand."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from serve_app.scoring.types import Pair, Score, Scorer, Windows


def call_windows(scorer: Scorer, pairs: Sequence[Pair], window_stride: int | None, truncate: bool) -> Windows:
    """The pairs to score, each checked: with `window_stride` (tokens consecutive windows share), a document
    longer than the model's window as overlapping windows; without, as it is (cut, or refused when not
    `truncate`). Raises ScoringError for a pair the model cannot take."""
    windows = scorer.expand_windows(pairs, window_stride) if window_stride is not None else Windows.whole(pairs)
    scorer.check(windows.pairs, truncate)
    return windows


def score_call(
    scorer: Scorer,
    pairs: Sequence[Pair],
    cap: int,
    window_stride: int | None,
    truncate: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[Score]:
    """A score per pair, in order: `call_windows`, forwards of at most `cap` windows, the calibrated map, the
    best window's score. `progress(done, total)` is told the windows scored after each forward."""
    windows = call_windows(scorer, pairs, window_stride, truncate)
    raw: list[float] = []
    for start in range(0, len(windows.pairs), cap):
        raw.extend(scorer.score(windows.pairs[start : start + cap]))
        if progress is not None:
            progress(len(raw), len(windows.pairs))
    return windows.merge(scorer.calibrate(raw))
