"""The one way a call's pairs are scored: cut into windows, checked, scored in pieces of the model's cap,
calibrated, each pair given its best window's score. The replica runs these steps around its batcher (its
pieces share forwards with other callers'); the bulk job and `calibrate_scores` run them as they stand."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from serve_app.scoring.types import Content, EncodedPair, NotFiniteScores, Pair, Score, Scorer, WindowRule, Windows
from serve_app.settings import Settings


def window_rule(settings: Settings) -> WindowRule | None:
    """How long documents are cut into windows (setting long_documents), bounded per document; None: cut to the
    model's window instead. The bound per request (max_windows_per_request) is the ingress' to share out."""
    if settings.long_documents != "windows":
        return None
    return WindowRule(settings.window_stride_tokens, per_document=settings.max_windows_per_document)


def window_share(rule: WindowRule | None, pairs: int, of_pairs: int, settings: Settings) -> WindowRule | None:
    """The rule for `pairs` of a request's `of_pairs` pairs: their share of max_windows_per_request, in
    proportion to their number (at least one window each), so that all of the request's calls together stay
    within it."""
    if rule is None:
        return None
    share = settings.max_windows_per_request * pairs // max(1, of_pairs)
    return replace(rule, per_call=max(pairs, share))


# Characters per token of ordinary text, for estimates made before anything is tokenized.
CHARS_PER_TOKEN = 4


def estimated_tokens(
    pairs: Sequence[Pair] | Sequence[EncodedPair] | Sequence[Content], max_length: int, rule: WindowRule | None
) -> int:
    """What a call's pairs cost in tokens, known before any is tokenized or cut into windows: token ids as they
    are; text by its characters (CHARS_PER_TOKEN a token), a pair at most the model's window, or with a window
    `rule` at most its windows (each a full window). Admission measures a replica's rate in these same units,
    so the estimate's bias on odd text cancels out on ordinary traffic."""
    windows = rule.per_document if rule is not None else 1
    total = 0
    for pair in pairs:
        if isinstance(pair, EncodedPair):
            total += (len(pair.ids) + len(pair.second or b"")) // 4
            continue
        if isinstance(pair, Content):  # an input to embed
            total += min(max_length, len(pair.text or "") // CHARS_PER_TOKEN + 2)
            continue
        chars = len(pair.query_text()) + len(pair.document.text or "")
        total += min(max_length * windows, chars // CHARS_PER_TOKEN + 2)
    return total


def finite(scores: Sequence[Score], model: str) -> Sequence[Score]:
    """The scores, or NotFiniteScores when any is NaN or infinite (an overflow in the model's dtype, broken
    weights): such a score would be ranked as if it meant something (JSON has no NaN: it went out as null)."""
    bad = [i for i, score in enumerate(scores) if not math.isfinite(score.raw)]
    if bad:
        raise NotFiniteScores(
            f"model {model!r} gave {len(bad)} score(s) that are not numbers (first: pair {bad[0]}); an overflow in "
            "its dtype (try dtype float32) or broken weights"
        )
    return scores


def call_windows(scorer: Scorer, pairs: Sequence[Pair], rule: WindowRule | None, truncate: bool) -> Windows:
    """The pairs to score, each checked: with a window `rule`, a document longer than the model's window as
    overlapping windows (within the rule's bounds); without, as it is (cut, or refused when not `truncate`).
    Raises ScoringError for a pair the model cannot take, TooManyWindows for a call over its bound."""
    windows = scorer.expand_windows(pairs, rule) if rule is not None else Windows.whole(pairs)
    scorer.check(windows.pairs, truncate)
    return windows


def score_call(
    scorer: Scorer,
    pairs: Sequence[Pair],
    cap: int,
    rule: WindowRule | None,
    truncate: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[Score]:
    """A score per pair, in order: `call_windows`, forwards of at most `cap` windows, the calibrated map, the
    best window's score. `progress(done, total)` is told the windows scored after each forward."""
    windows = call_windows(scorer, pairs, rule, truncate)
    raw: list[float] = []
    for start in range(0, len(windows.pairs), cap):
        raw.extend(scorer.score(windows.pairs[start : start + cap]))
        if progress is not None:
            progress(len(raw), len(windows.pairs))
    return windows.merge(finite(scorer.calibrate(raw), scorer.info.model))
